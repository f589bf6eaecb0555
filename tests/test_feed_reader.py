"""app.feed's socket reading against real servers on loopback: `feed.Reader` (websocket-client's
handshake and sends, the raw socket read and decoded by app/wsframes.py) must hand on_message
exactly what websocket-client's own reading hands it, on any byte stream, over TCP and TLS.

Why: the collector parses WebSocket frames itself (the hot path of every socket thread). A
server here sends one crafted stream (every length encoding, empty and large payloads, a ping to
answer, a fragmented message with a ping between its fragments, many small frames per read) cut
into pieces at awkward places; our reader and the library's must agree, and our replies (pong,
close) must reach the server. Where we are stricter than websocket-client (a masked frame from a
server, RFC 6455 5.1), the test says so.
"""
from __future__ import annotations

import gc
import logging
import os
import ssl
import struct
import threading
import time

import pytest
import websocket

from app import feed, wsframes
from tests.helpers import wait_until
from tests.wsserver import BINARY, CLOSE, PING, PONG, TEXT, WsServer, binance_manager, frame, self_signed_context


def data_stream() -> tuple[bytes, list[bytes]]:
    """The bytes a server sends and the messages a client must get, in order."""
    sizes = [0, 1, 125, 126, 127, 300, 65535, 65536, 70000, 3]
    msgs = [(b'{"i":%d,"p":"' % i + b"x" * max(0, s - 14) + b'"}')[:s] if s >= 14 else b"y" * s
            for i, s in enumerate(sizes)]
    out, expected = [], []
    for i, m in enumerate(msgs):
        out.append(frame(m, opcode=BINARY if i == 3 else TEXT))
        expected.append(m)
        if i == 2:
            out.append(frame(b"are you there", opcode=PING))     # both readers answer it
        if i == 5:                                                 # a message in three fragments
            out += [frame(b'{"part":', fin=False), frame(b"", opcode=PONG),
                    frame(b'"one",', opcode=0, fin=False), frame(b'"two"}', opcode=0)]
            expected.append(b'{"part":"one","two"}')
    out += [frame(b"%d" % i) for i in range(2000)]                 # many small frames per read
    expected += [b"%d" % i for i in range(2000)]
    return b"".join(out), expected


CLOSE_FRAME = frame(struct.pack("!H", 1000) + b"bye", opcode=CLOSE)


def serving(stream: bytes, cuts: list[int], tail: bytes, from_client: list, tls=None,
            hang_up: bool = False) -> WsServer:
    """A server that sends `stream` in pieces split at `cuts` (a short pause between pieces, so
    they arrive as separate reads), then `tail`, and records the client's frames (opcode,
    payload) until the client's close frame or the end of the connection (`hang_up`: closes the
    TCP connection after `tail` instead)."""
    def handle(conn):
        conn.handshake()
        last = 0
        for i, c in enumerate(cuts + [len(stream)]):
            conn.sock.sendall(stream[last:c])
            last = c
            if i % 50 == 0:
                time.sleep(0.001)
        conn.sock.sendall(tail)
        if hang_up:
            return
        conn.sock.settimeout(10)
        while (fr := conn.recv_frame()) is not None:
            from_client.append(fr)
            if fr[0] == CLOSE:
                return
    return WsServer(handle, tls=tls)


def ours(stream, cuts, tail, tls=None, **kw):
    """feed.Reader, as Connection runs it."""
    got, pings, pongs, sent, waits = [], [], [], [], [0]
    with serving(stream, cuts, tail, sent, tls) as srv:
        r = feed.Reader(got.append, on_ping=pings.append, on_pong=pongs.append,
                        before_wait=lambda: waits.__setitem__(0, waits[0] + 1),
                        sslopt={"cert_reqs": ssl.CERT_NONE} if tls else None, **kw)
        r.connect(srv.url)
        runner = threading.Thread(target=r.run, daemon=True)
        runner.start()
        runner.join(20)
        assert not runner.is_alive(), "the reader did not finish"
        wait_until(lambda: sent and sent[-1][0] == CLOSE, 5, what="the client's close frame")
        assert srv.errors == []
    assert r.ws.sock is None                      # run() closed its socket
    return {"got": got, "pings": pings, "pongs": pongs, "code": r.close_code, "reason": r.close_reason,
            "error": r.error, "sent": sent, "waits": waits[0]}


def library(stream, cuts, tail):
    """websocket-client's own reading (WebSocketApp), no UTF-8 validation: the reference."""
    got, pings, closes, errors, sent = [], [], [], [], []
    with serving(stream, cuts, tail, sent) as srv:
        app = websocket.WebSocketApp(srv.url, on_message=lambda _ws, m: got.append(m),
                                     on_ping=lambda _ws, d: pings.append(d),
                                     on_close=lambda _ws, code, reason: closes.append(code),
                                     on_error=lambda _ws, e: errors.append(e))
        runner = threading.Thread(target=app.run_forever, daemon=True,
                                  kwargs={"skip_utf8_validation": True, "ping_interval": 0, "reconnect": 0})
        runner.start()
        runner.join(20)
        assert not runner.is_alive(), "websocket-client did not finish"
        # what the client sent is complete once the server's handler has read it all
        wait_until(lambda: srv.accepted() and all(c.done.is_set() for c in srv.accepted()), 5,
                   what="the server's handler to end")
    return {"got": got, "pings": pings, "closes": closes, "errors": errors, "sent": sent}


def cut_points(stream: bytes, how) -> list[int]:
    if how == "every_7":
        return list(range(7, len(stream), 7))[:3000] + list(range(21007, len(stream), 4093))
    if how == "headers":          # inside the 2-, 4- and 10-byte headers of the first 40 frames
        starts, pos = [], 0
        while pos < len(stream):
            n = stream[pos + 1] & 0x7F
            hl = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if stream[pos + 1] & 0x80 else 0)
            size = struct.unpack("!H", stream[pos + 2:pos + 4])[0] if n == 126 else \
                struct.unpack("!Q", stream[pos + 2:pos + 10])[0] if n == 127 else n
            starts.append(pos)
            pos += hl + size
        return sorted({s + k for s in starts[:40] for k in (1, 3, 5, 9)} - {0})
    return []


@pytest.mark.parametrize("cuts", ["whole", "every_7", "headers"], ids=["whole", "every_7_bytes", "inside_headers"])
def test_reader_matches_websocket_client(cuts):
    stream, expected = data_stream()
    cuts = cut_points(stream, cuts)
    mine, theirs = ours(stream, cuts, CLOSE_FRAME), library(stream, cuts, CLOSE_FRAME)
    assert mine["got"] == expected
    assert theirs["got"] == expected
    assert mine["pings"] == theirs["pings"] == [b"are you there"]
    assert mine["pongs"] == [b""]
    assert (mine["code"], mine["reason"], mine["error"]) == (1000, "bye", None)
    assert theirs["closes"] == [1000]
    assert mine["waits"] > 0
    # both answered the ping (a pong with its payload) and the close (code 1000), in that order
    for sent in (mine["sent"], theirs["sent"]):
        assert sent[0] == (PONG, b"are you there")
        assert sent[-1][0] == CLOSE and sent[-1][1][:2] == struct.pack("!H", 1000)


def test_reader_over_tls(tmp_path):
    """wss://: ws.sock is an SSLSocket. Frames split across TLS records, and a last frame after
    which the server sends nothing until the client answers: a reader that waited for the socket
    while decrypted bytes sat in the TLS layer would never answer the ping."""
    stream, expected = data_stream()
    tail = frame(b"last") + frame(b"tls?", opcode=PING)
    mine = ours(stream, cut_points(stream, "every_7")[:400], tail + CLOSE_FRAME, tls=self_signed_context(tmp_path))
    assert mine["got"] == expected + [b"last"]
    assert mine["pings"] == [b"are you there", b"tls?"]
    assert mine["code"] == 1000
    assert [op for op, _ in mine["sent"]] == [PONG, PONG, CLOSE]


def test_tls_data_in_the_tls_layer_is_not_stranded(tmp_path):
    """The server sends a burst in one TLS write, then waits for the client to answer a ping that
    comes last; only then does it close. Every message must arrive before the server moves on."""
    answered = threading.Event()
    msgs = [b'{"n":%d,"pad":"%s"}' % (i, b"p" * (i % 300)) for i in range(3000)]
    burst = b"".join(frame(m) for m in msgs) + frame(b"end?", opcode=PING)

    def handle(conn):
        conn.handshake()
        conn.sock.sendall(burst)
        conn.sock.settimeout(10)
        fr = conn.recv_frame()
        if fr == (PONG, b"end?"):
            answered.set()
        conn.send(struct.pack("!H", 1000), CLOSE)
        conn.recv_frame()
    got = []
    with WsServer(handle, tls=self_signed_context(tmp_path)) as srv:
        r = feed.Reader(got.append, sslopt={"cert_reqs": ssl.CERT_NONE})
        r.connect(srv.url)
        assert isinstance(r.ws.sock, ssl.SSLSocket)
        t = threading.Thread(target=r.run, daemon=True)
        t.start()
        assert answered.wait(10), "the ping after the burst was not answered"
        t.join(10)
        assert not t.is_alive() and srv.errors == []
    assert got == msgs and r.close_code == 1000


# ---- protocol errors: the close code goes to the server ---------------------------------------------

def test_rsv_bit_is_refused_with_1002_as_websocket_client_refuses_it():
    """A frame with an RSV bit (no extension was negotiated) ends the connection on both readers;
    the frames before it are delivered; ours tells the server why (close 1002)."""
    stream = frame(b'{"a":1}') + frame(b'{"b":2}', rsv=4) + frame(b'{"c":3}')
    mine, theirs = ours(stream, [], b""), library(stream, [], b"")
    assert mine["got"] == theirs["got"] == [b'{"a":1}']
    assert [type(e).__name__ for e in theirs["errors"]] == ["WebSocketProtocolException"]
    assert mine["code"] is None and "1002" in mine["error"] and "RSV" in mine["error"]
    assert mine["sent"][-1][0] == CLOSE and mine["sent"][-1][1][:2] == struct.pack("!H", 1002)


def test_a_masked_server_frame_is_refused_with_1002():
    """RFC 6455 5.1: a client must close on a masked frame from a server. websocket-client
    accepts one; we do not (no exchange sends them)."""
    stream = frame(b'{"a":1}') + frame(b'{"masked":true}', mask=b"\x01\x02\x03\x04") + frame(b'{"c":3}')
    mine = ours(stream, [], b"")
    assert mine["got"] == [b'{"a":1}']
    assert mine["sent"][-1] == (CLOSE, struct.pack("!H", 1002) + b"masked frame from the server")
    assert library(stream, [], CLOSE_FRAME)["got"] == [b'{"a":1}', b'{"masked":true}', b'{"c":3}']


def test_a_message_over_max_size_is_refused_with_1009():
    stream = frame(b"small") + frame(b"x" * 5000) + frame(b"never")
    mine = ours(stream, [], b"", max_size=4096)
    assert mine["got"] == [b"small"]
    assert mine["sent"][-1][0] == CLOSE and mine["sent"][-1][1][:2] == struct.pack("!H", 1009)


@pytest.mark.parametrize("body,code,reason", [(b"", 1005, ""), (struct.pack("!H", 4000) + b"later", 4000, "later")])
def test_server_close_codes_are_reported_and_answered(body, code, reason):
    mine = ours(frame(b"a"), [], frame(body, opcode=CLOSE))
    assert (mine["code"], mine["reason"], mine["got"]) == (code, reason, [b"a"])
    echo = 1000 if code == 1005 else code            # no code: answered as a normal close
    assert mine["sent"] == [(CLOSE, struct.pack("!H", echo))]


# ---- callbacks, stop(), sockets ---------------------------------------------------------------------

def test_a_raising_callback_does_not_stop_the_reader():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    logger = logging.getLogger("collector")
    handler = Keep(level=logging.ERROR)
    logger.addHandler(handler)
    got = []

    def on_message(m):
        if m in (b"3", b"7"):
            raise ValueError("boom " + m.decode())
        got.append(m)
    try:
        with serving(b"".join(frame(b"%d" % i) for i in range(10)), [], CLOSE_FRAME, []) as srv:
            r = feed.Reader(on_message, name="raising-callback-test")
            r.connect(srv.url)
            r.run()
    finally:
        logger.removeHandler(handler)
    assert got == [b"%d" % i for i in range(10) if i not in (3, 7)]
    assert r.close_code == 1000
    errors = [rec for rec in records if rec.getMessage() == "ws_callback_error"]
    assert errors and "boom 3" in errors[0].error      # logged (rate limited: the second may be folded)


def test_stop_from_another_thread_ends_a_blocked_read_with_a_close_frame():
    sent = []
    with serving(frame(b"hello"), [], b"", sent) as srv:      # then nothing: the reader blocks
        got = []
        r = feed.Reader(got.append)
        r.connect(srv.url)
        t = threading.Thread(target=r.run, daemon=True)
        t.start()
        wait_until(lambda: got == [b"hello"], 5, what="the first message")
        r.stop("stop")
        t.join(5)
        assert not t.is_alive()
        wait_until(lambda: sent, 5, what="the close frame at the server")
    assert sent == [(CLOSE, struct.pack("!H", 1000) + b"stop")]
    assert r.ws.sock is None and r.close_code is None and r.error == "stopped"


def test_stop_before_the_handshake_and_without_a_socket():
    r = feed.Reader(lambda m: None)
    r.stop("early")                        # nothing to close yet: a no-op
    r.run()                                # never connected: returns at once
    assert r.error == "not connected"
    with serving(frame(b"x"), [], b"", []) as srv:
        r = feed.Reader(lambda m: None)
        r.stop(None)                       # stopped before connecting: run() reads nothing
        r.connect(srv.url)
        r.run()
    assert r.ws.sock is None


def test_a_finished_connection_closes_its_socket():
    """Every way a reader ends closes its socket at once (websocket-client leaves a closed
    connection's socket to the cyclic GC): a server's close frame, a protocol error, the
    connection dropped, stop(), a refused handshake."""
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    def refuse(conn):
        conn.refuse()
    gc.disable()
    try:
        before = open_fds()
        for tail in (CLOSE_FRAME, frame(b"x", rsv=2), b""):
            for _ in range(3):
                with serving(frame(b"x"), [], tail, [], hang_up=not tail) as srv:
                    r = feed.Reader(lambda m: None)
                    r.connect(srv.url)
                    r.run()
        with serving(b"", [], b"", []) as srv:
            r = feed.Reader(lambda m: None)
            r.connect(srv.url)
            t = threading.Thread(target=r.run, daemon=True)
            t.start()
            r.stop(None)
            t.join(5)
        with WsServer(refuse) as srv:
            r = feed.Reader(lambda m: None)
            with pytest.raises(websocket.WebSocketException):
                r.connect(srv.url)
        wait_until(lambda: open_fds() == before, 5, what="every socket closed (a leak times out here)")
    finally:
        gc.enable()


# ---- production uses this path -----------------------------------------------------------------------

def test_connections_decode_with_wsframes_not_websocket_clients_reading(tmp_path, monkeypatch):
    """What the collector's connections run (app.feed Manager -> Connection, against a real server
    on loopback) must decode every frame with app/wsframes.py's Decoder and never call
    websocket-client's reading (`WebSocket.recv*`: ~4 us of Python per frame, the socket thread's
    whole budget). A silent fall-back to the library's reading would still deliver every frame,
    so only counting calls shows it. Written against observable behaviour (frames in the queue,
    calls into the decoder and websocket-client's public WebSocket methods), not feed.py's own
    names, so that it keeps guarding a rewrite of the reader."""

    n = 5000
    payloads = [b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%d,"s":"BTCUSDT"}}' % i
                for i in range(n)]
    burst = b"".join(frame(p) if i not in (1000, 4000) else frame(b"hi", PING) + frame(p)
                     for i, p in enumerate(payloads))
    pongs = []

    def serve(conn):
        conn.handshake()
        conn.sock.sendall(burst)
        while (fr := conn.recv_frame()) is not None:   # pongs, the close frame: until the client shuts down
            if fr[0] == PONG:
                pongs.append(fr[1])

    calls = {"recv": 0, "recv_data": 0, "recv_data_frame": 0, "recv_frame": 0}

    def counting(name):
        real = getattr(websocket.WebSocket, name)

        def wrapper(self, *a, **kw):
            calls[name] += 1
            return real(self, *a, **kw)
        monkeypatch.setattr(websocket.WebSocket, name, wrapper)
    for name in calls:
        counting(name)
    decoded = {"calls": 0, "messages": 0}
    real_deliver = wsframes.Decoder.deliver

    def deliver(self, on_text, on_binary=None):
        decoded["calls"] += 1

        def count(m):
            decoded["messages"] += 1
            on_text(m)
        return real_deliver(self, count, on_binary)
    monkeypatch.setattr(wsframes.Decoder, "deliver", deliver)

    with WsServer(serve) as srv:
        # the instrument works: websocket-client's own reading goes through these per frame
        ws = websocket.create_connection(srv.url + "/public/stream", timeout=10)
        assert [ws.recv() for _ in range(50)] == [p.decode() for p in payloads[:50]]
        ws.close(timeout=0)
        assert calls["recv"] == 50 and calls["recv_frame"] >= 50
        for k in calls:
            calls[k] = 0
        pongs.clear()

        m, q = binance_manager(tmp_path, srv.url)
        got = []
        try:
            def all_in():
                for batch in q.take_all() or ():
                    got.extend(bytes(p) for p in batch.payloads)
                return len(got) >= n
            wait_until(all_in, 20, interval=0.02, what=f"{n} frames in the queue")
            wait_until(lambda: len(pongs) == 2, 5, what="both pings answered")
        finally:
            m.stop()
    assert got == payloads                       # every frame, in order, as sent
    assert pongs == [b"hi", b"hi"]
    assert calls == {"recv": 0, "recv_data": 0, "recv_data_frame": 0, "recv_frame": 0}, calls
    assert decoded["messages"] == n               # every message through app/wsframes.py
    assert decoded["calls"] < n / 10, decoded     # per read, not per frame
