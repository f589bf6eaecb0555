"""app.feed's socket reading against a real server on loopback: the direct data-frame path must
hand on_message exactly what websocket-client's own frame parsing hands it, on any byte stream.

Why: `_BufferedReader.data_frames` parses WebSocket frame headers itself (the hot path of every
socket thread). A server here sends one crafted stream (every length encoding, empty and large
payloads, a ping to answer, a fragmented message, a masked frame, a frame with an RSV bit) cut
into pieces at awkward places; the collector's reader and the library's own must agree.
"""
import base64
import gc
import hashlib
import os
import socket
import struct
import threading

import pytest

from app import feed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    head = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        out = bytes([head, m | n])
    elif n < 65536:
        out = bytes([head, m | 126]) + struct.pack("!H", n)
    else:
        out = bytes([head, m | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        out += mask
    return out + payload


def data_stream() -> tuple[bytes, list[bytes]]:
    """The bytes a server sends and the messages a client must get, in order."""
    sizes = [0, 1, 125, 126, 127, 300, 65535, 65536, 70000, 3]
    msgs = [(b'{"i":%d,"p":"' % i + b"x" * max(0, s - 14) + b'"}')[:s] if s >= 14 else b"y" * s
            for i, s in enumerate(sizes)]
    out, expected = [], []
    for i, m in enumerate(msgs):
        out.append(frame(m, opcode=2 if i == 3 else 1))
        expected.append(m)
        if i == 2:
            out.append(frame(b"are you there", opcode=9))        # ping: the library answers
        if i == 5:                                                 # a message in three fragments
            out += [frame(b'{"part":', fin=False), frame(b'"one",', opcode=0, fin=False),
                    frame(b'"two"}', opcode=0)]
            expected.append(b'{"part":"one","two"}')
        if i == 7:
            out.append(frame(b'{"masked":true}', mask=b"\x01\x02\x03\x04"))   # servers must not, but may
            expected.append(b'{"masked":true}')
    out += [frame(b"%d" % i) for i in range(2000)]                 # many small frames per read
    expected += [b"%d" % i for i in range(2000)]
    return b"".join(out), expected


def closing_frame_in(data: bytes) -> bool:
    """True if the client's frames (masked, short) in data include a close frame."""
    pos = 0
    while pos + 6 <= len(data):
        if data[pos] & 0x0F == 8:
            return True
        pos += 6 + (data[pos + 1] & 0x7F)
    return False


def serve_once(stream: bytes, cuts: list[int], tail: bytes, got_from_client: list) -> tuple[str, threading.Thread]:
    """A one-connection WebSocket server: handshake, then `stream` in pieces split at `cuts`,
    then `tail`; it records what the client sends (the pong, the close reply)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        srv.close()
        req = b""
        while b"\r\n\r\n" not in req:
            req += conn.recv(4096)
        key = [line.split(b":", 1)[1].strip() for line in req.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        last = 0
        for c in cuts + [len(stream)]:
            conn.sendall(stream[last:c])
            last = c
        conn.sendall(tail)
        conn.settimeout(5)
        try:          # until the client's close frame (websocket-client leaves its socket to the GC)
            while not closing_frame_in(b"".join(got_from_client)):
                data = conn.recv(65536)
                if not data:
                    break
                got_from_client.append(data)
        except OSError:
            pass
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"ws://127.0.0.1:{srv.getsockname()[1]}/", t


def read_all(stream: bytes, cuts: list[int], tail: bytes, data_frames: bool):
    got, pings, closes, errors, waits, sent = [], [], [], [], [0], []
    url, server = serve_once(stream, cuts, tail, sent)

    class App(feed.FastWebSocketApp):
        pass
    App.data_frames = data_frames
    app = App(url, on_message=lambda _ws, m: got.append(m), on_ping=lambda _ws, d: pings.append(d),
              on_close=lambda _ws, code, reason: closes.append(code),
              on_error=lambda _ws, e: errors.append(e))
    app.before_wait = lambda: waits.__setitem__(0, waits[0] + 1)
    runner = threading.Thread(target=app.run_forever, kwargs=feed.RUN_OPTIONS, daemon=True)
    runner.start()
    runner.join(20)
    assert not runner.is_alive(), "the reader did not finish"
    server.join(10)
    return got, pings, closes, errors, waits[0], b"".join(sent)


CLOSE = frame(struct.pack("!H", 1000) + b"bye", opcode=8)


@pytest.mark.parametrize("cuts", [[], "every_7", "headers"], ids=["whole", "every_7_bytes", "inside_headers"])
def test_direct_path_matches_websocket_client(cuts):
    stream, expected = data_stream()
    if cuts == "every_7":
        cuts = list(range(7, len(stream), 7))[:3000] + list(range(21007, len(stream), 4093))
    elif cuts == "headers":          # inside the 2-, 4- and 10-byte headers of the big frames
        starts, pos = [], 0
        while pos < len(stream):
            n = stream[pos + 1] & 0x7F
            hl = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if stream[pos + 1] & 0x80 else 0)
            size = struct.unpack("!H", stream[pos + 2:pos + 4])[0] if n == 126 else \
                struct.unpack("!Q", stream[pos + 2:pos + 10])[0] if n == 127 else n
            starts.append(pos)
            pos += hl + size
        cuts = sorted({s + k for s in starts[:40] for k in (1, 3, 5)} - {0})
    direct = read_all(stream, cuts, CLOSE, data_frames=True)
    library = read_all(stream, cuts, CLOSE, data_frames=False)
    got, pings, closes, errors, waits, sent = direct
    assert got == expected
    assert got == library[0]
    assert pings == library[1] == [b"are you there"]
    assert closes == library[2] == [1000]
    assert waits > 0
    # the client answered the ping (pong, opcode 0xA, masked) and the close (0x88), both paths
    for client_bytes in (sent, library[5]):
        assert client_bytes[0] == 0x8A and client_bytes[1] == 0x80 | 13
        assert 0x88 in (client_bytes[6 + 13],)


def test_rsv_bit_is_refused_as_websocket_client_refuses_it():
    """A frame with an RSV bit (no extension was negotiated) ends the connection with the
    library's protocol error on both paths; the frames before it are delivered."""
    stream = frame(b'{"a":1}') + frame(b'{"b":2}', rsv=4) + frame(b'{"c":3}')
    direct = read_all(stream, [], b"", data_frames=True)
    library = read_all(stream, [], b"", data_frames=False)
    assert direct[0] == library[0] == [b'{"a":1}']
    assert [type(e).__name__ for e in direct[3]] == [type(e).__name__ for e in library[3]]
    assert "rsv" in repr(direct[3][0]).lower()


def test_a_raising_callback_does_not_stop_the_reader():
    """As websocket-client's _callback: the error goes to on_error, reading goes on."""
    stream = b"".join(frame(b"%d" % i) for i in range(10))
    url, server = serve_once(stream, [], CLOSE, [])
    got, errors = [], []

    def on_message(_ws, m):
        if m == b"3":
            raise ValueError("boom")
        got.append(m)
    app = feed.FastWebSocketApp(url, on_message=on_message, on_error=lambda _ws, e: errors.append(e))
    runner = threading.Thread(target=app.run_forever, kwargs=feed.RUN_OPTIONS, daemon=True)
    runner.start()
    runner.join(10)
    server.join(10)
    assert got == [b"%d" % i for i in range(10) if i != 3]
    assert [str(e) for e in errors if isinstance(e, ValueError)] == ["boom"]


def test_a_finished_connection_closes_its_socket():
    """websocket-client leaves a closed connection's socket to the cyclic GC (its WebSocket is
    in a reference cycle); FastWebSocketApp closes it when run_forever returns."""
    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    gc.disable()
    try:
        before = open_fds()
        for _ in range(5):
            url, server = serve_once(frame(b"x"), [], CLOSE, [])
            feed.FastWebSocketApp(url, on_message=lambda *_: None).run_forever(**feed.RUN_OPTIONS)
            server.join(10)
        assert open_fds() == before
    finally:
        gc.enable()


# ---- production uses the fast path -------------------------------------------------------------------

def test_connections_read_data_frames_without_websocket_clients_per_frame_parsing(tmp_path, monkeypatch):
    """What the collector's connections run (app.feed Manager -> Connection, against a real server
    on loopback) must not hand data frames to websocket-client's per-frame reading: its
    `WebSocket.recv_data_frame` / `frame_buffer.recv_frame` (~4 us of Python per frame, the socket
    thread's whole budget) may see the control frames only. A silent fall-back to the library's
    path would still deliver every frame, so only counting its calls shows it. Written against
    observable behaviour (frames in the queue, calls into websocket-client), not feed.py's own
    names, so that it keeps guarding a rewrite of the reader."""
    import websocket
    from websocket import _abnf, _core

    from app import settings as settings_mod
    from app.exchanges import ConnectionPlan, Stream, load
    from app.handoff import FrameQueue
    from app.state import State
    from tests.helpers import wait_until
    from tests.wsserver import PING, WsServer
    from tests.wsserver import frame as server_frame

    n = 5000
    payloads = [b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%d,"s":"BTCUSDT"}}' % i
                for i in range(n)]
    burst = b"".join(server_frame(p) if i not in (1000, 4000) else server_frame(b"hi", PING) + server_frame(p)
                     for i, p in enumerate(payloads))

    def serve(conn):
        conn.handshake()
        conn.sock.sendall(burst)
        while conn.recv_frame() is not None:    # pongs, the close frame: until the client shuts down
            pass

    calls = {"recv_data_frame": 0, "recv_frame": 0}

    def counting(cls, name):
        real = getattr(cls, name)

        def wrapper(self, *a, **kw):
            calls[name] += 1
            return real(self, *a, **kw)
        monkeypatch.setattr(cls, name, wrapper)
    counting(_core.WebSocket, "recv_data_frame")
    counting(_abnf.frame_buffer, "recv_frame")

    with WsServer(serve) as srv:
        # the instrument works: websocket-client's own reading goes through these per frame
        ws = websocket.create_connection(srv.url + "/public/stream", timeout=10)
        assert [ws.recv() for _ in range(50)] == [p.decode() for p in payloads[:50]]
        ws.shutdown()
        assert calls["recv_frame"] >= 50 and calls["recv_data_frame"] >= 50
        calls.update(recv_data_frame=0, recv_frame=0)

        s = settings_mod.load(None, environ={}, dotenv_path=str(tmp_path / ".env")).replace(
            exchanges=["binance"], binance_ws_url=srv.url, data_dir=str(tmp_path))
        q = FrameQueue()
        state = State(exchanges=["binance"], queue=q)
        m = feed.Manager(s, {"binance": load("binance")}, q, state, {})
        m.start([ConnectionPlan("binance", "/public", [
            Stream("btcusdt@bookTicker", "BTCUSDT", "bookTicker", ("bbo",), "/public")])])
        got = []
        try:
            def all_in():
                for batch in q.take_all() or ():
                    got.extend(bytes(p) for p in batch.payloads)
                return len(got) >= n
            wait_until(all_in, 20, interval=0.02, what=f"{n} frames in the queue")
        finally:
            m.stop()
    assert got == payloads                       # every frame, in order, as sent
    # the two pings (and at most a close) are all websocket-client may have read itself
    assert calls["recv_frame"] <= 5 and calls["recv_data_frame"] <= 5, calls
