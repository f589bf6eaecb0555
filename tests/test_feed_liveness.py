"""Connection liveness and reconnects of bin/collector (a real subprocess) against a small real
WebSocket server of the test's own (tests/wsserver.py): the simulator's REST for discovery, the
test's server for the one Binance connection. Timings are made short through settings
(STALE_TIMEOUT, KEEPALIVE_INTERVAL, RECONNECT_MIN/MAX) so each test runs in seconds.

Why a server of our own: the simulator cannot stop answering pings while keeping the socket
open and sending nothing (its half-open fault also stops reading), nor refuse every handshake
on its own schedule while a test timestamps each attempt.
"""
from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import CollectorProcess, wait_until
from tests.wsserver import CLOSE, PING, PONG, WsServer, binance_manager


@pytest.fixture(scope="module")
def rest_sim():
    """The simulator, for Binance's REST (discovery, server time) only."""
    from sim import Simulator
    s = Simulator(exchanges=("binance",), symbols=["BTC"], rate=5.0, seed=3)
    s.start()
    yield s
    s.stop()


def collector(tmp_path, rest_sim, ws_url: str, **env) -> CollectorProcess:
    base = {"EXCHANGES": "binance", "SYMBOLS": "BTCUSDT", "DATASETS": "bbo",   # one connection
            "BINANCE_WS_URL": ws_url, "BINANCE_REST_URL": rest_sim.urls["binance"]["rest"],
            "FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "60", "HEARTBEAT_INTERVAL": "60"}
    base.update({k.upper(): str(v) for k, v in env.items()})
    return CollectorProcess(tmp_path, base)


# ---- keepalive: pongs are liveness; no pong and no data is a dead connection ----------------------

class PongServer:
    """Answers the client's pings with pongs and sends nothing else. The first connection stops
    answering when `mute` is set (the socket stays open and is still read: to the client it is
    a peer that went silent); later connections always answer."""

    def __init__(self):
        self.mute = threading.Event()
        self.lock = threading.Lock()
        self.pings: dict[int, int] = {}          # connection index -> pings received
        self.pongs: dict[int, int] = {}          # connection index -> pongs sent
        self.ended: dict[int, float] = {}        # connection index -> when the client closed it
        self.srv = WsServer(self.handle)

    def handle(self, conn):
        conn.handshake()
        i = conn.index
        while True:
            fr = conn.recv_frame()
            if fr is None:                       # the client shut the socket down
                with self.lock:
                    self.ended[i] = time.monotonic()
                return
            op, data = fr                        # a close frame: the client shuts down next
            if op == PING:
                with self.lock:
                    self.pings[i] = self.pings.get(i, 0) + 1
                if i > 0 or not self.mute.is_set():
                    conn.send(data, PONG)
                    with self.lock:
                        self.pongs[i] = self.pongs.get(i, 0) + 1

    def count(self, table: dict, i: int) -> int:
        with self.lock:
            return table.get(i, 0)


def test_unanswered_pings_make_a_dead_connection_that_is_reconnected(tmp_path, rest_sim):
    stale, keepalive = 1.2, 0.2        # pings go out on the watchdog's 0.5 s tick
    ps = PongServer()
    with ps.srv, collector(tmp_path, rest_sim, ps.srv.url, stale_timeout=stale,
                           keepalive_interval=keepalive, reconnect_min=0.1, reconnect_max=0.2) as c:
        c.wait_for("ws_connect", timeout=30)
        # 1. no data at all, but every ping is answered: the pongs alone keep the connection
        #    alive for well over twice stale_timeout
        answered_for = 2.5 * stale
        t0 = time.monotonic()
        wait_until(lambda: ps.count(ps.pongs, 0) >= 3 and time.monotonic() - t0 >= answered_for,
                   10, what="pings answered for 2.5 x stale_timeout")
        assert c.events("ws_stale") == [], "a connection whose pings are answered was declared dead"
        assert len(ps.srv.accepted()) == 1 and c.events("ws_disconnect") == []
        # 2. the server stops answering; the socket stays open and nothing else arrives
        ps.mute.set()
        muted_at = time.monotonic()
        pings_at_mute = ps.count(ps.pings, 0)
        stale_line = c.wait_for("ws_stale", timeout=10)[0]
        # 3. the watchdog closed it, and the collector connects again
        wait_until(lambda: len(ps.srv.accepted()) >= 2, 10, what="a new connection after ws_stale")
        ended = wait_until(lambda: ps.ended.get(0), 5, what="the dead socket closed by the client")
        wait_until(lambda: ps.count(ps.pongs, 1) >= 1, 10, what="pings on the new connection")
        c.wait_for("ws_connect", count=2, timeout=10)
        assert c.stop() == 0, "".join(c.raw[-30:])
    assert ps.srv.errors == []
    # declared dead for the silence, not before: at least stale_timeout without a pong
    assert stale_line["silent_s"] >= stale
    assert ended - muted_at >= stale - 0.1
    # the client kept pinging the muted peer (keepalive went on), and nothing was answered
    assert ps.count(ps.pings, 0) > pings_at_mute
    disc = c.events("ws_disconnect")
    assert disc and disc[0]["conn_id"] == c.events("ws_connect")[0]["conn_id"]
    assert "stale" in disc[0]["reason"]
    waits = c.events("ws_reconnect_wait")
    assert waits and waits[0]["attempt"] == 1


# ---- reconnect back-off ------------------------------------------------------------------------------

def test_reconnect_backoff_grows_is_capped_and_jittered(tmp_path, rest_sim):
    """Every handshake is refused (HTTP 503): each ws_reconnect_wait delay lies within
    [reconnect_min x 2^(attempt-1), capped at reconnect_max] x [0.5, 1] (the jitter), delays
    grow until the cap, are not all their nominal value, and the collector really waits that
    long before the next attempt (the server timestamps each one)."""
    rmin, rmax = 0.05, 0.6
    srv = WsServer(lambda conn: conn.refuse())
    n = 9
    with srv, collector(tmp_path, rest_sim, srv.url, reconnect_min=rmin, reconnect_max=rmax,
                        reconnect_stable_after=60) as c:
        c.wait_for("ws_reconnect_wait", count=n, timeout=30)
        attempts_seen = len(srv.accepted())
        assert c.stop() == 0, "".join(c.raw[-30:])
    waits = c.events("ws_reconnect_wait")[:n]
    delays = [w["delay_s"] for w in waits]
    assert [w["attempt"] for w in waits] == list(range(1, n + 1)), waits   # consecutive failures
    nominal = [min(rmax, rmin * 2 ** k) for k in range(n)]
    for d, nom in zip(delays, nominal):          # delay_s is rounded to the millisecond
        assert nom * 0.5 - 0.001 <= d <= nom + 0.001, (delays, nominal)
    assert max(delays) <= rmax + 0.001                                   # bounded
    assert delays[0] <= rmin + 0.001 and min(delays[4:]) >= rmax * 0.5 - 0.001   # grown to the cap
    assert sum(delays[4:]) / len(delays[4:]) > 4 * sum(delays[:2]) / 2
    capped = delays[4:]                          # nominal rmax for each: jitter makes them differ
    assert len(set(capped)) > 1 and any(abs(d - rmax) > 0.002 for d in capped), capped
    assert not all(abs(d - nom) <= 0.001 for d, nom in zip(delays, nominal))
    # the waits are real: attempt k+1 reaches the server no sooner than delay k after attempt k
    assert attempts_seen >= n
    t = [conn.accepted_at for conn in srv.accepted()]
    for k in range(n - 1):
        assert t[k + 1] - t[k] >= delays[k] - 0.02, (k, t[k + 1] - t[k], delays[k])
    assert len(c.events("ws_connect_failed")) >= n and c.events("ws_connect") == []


# ---- stop while the peer closes -------------------------------------------------------------------

def test_stop_survives_the_socket_thread_tearing_the_socket_down(tmp_path, monkeypatch):
    """The SIGTERM path (Manager.stop -> Connection.close without abort) sends a close frame and
    then shuts the socket down. A server that closes the TCP connection as soon as it reads the
    close frame makes the socket thread end its read and tear the socket down meanwhile
    (WebSocket.shutdown(): the socket closed, WebSocket.sock = None). Seen on its own in about
    1 of 8 SIGTERMs of bin/collector against such a server; here that interleaving is made
    certain by letting the socket thread finish its teardown before send_close returns to the
    stopping thread, and the test checks that it happened."""
    import websocket

    def closes_after_close_frame(conn):
        conn.handshake()
        while True:
            fr = conn.recv_frame()
            if fr is None or fr[0] == CLOSE:
                return                            # WsServer closes the socket
    srv = WsServer(closes_after_close_frame)
    real_send_close = websocket.WebSocket.send_close
    stopper = threading.current_thread()
    torn_down_first = []

    def send_close(self, *a, **kw):
        real_send_close(self, *a, **kw)
        if threading.current_thread() is stopper:       # the stopping thread only
            deadline = time.monotonic() + 5
            while self.sock is not None and time.monotonic() < deadline:
                time.sleep(0.005)     # polling for the condition (the socket thread's teardown)
            torn_down_first.append(self.sock is None)
    with srv:
        m, q = binance_manager(tmp_path, srv.url)
        wait_until(lambda: m.connections and m.connections[0].connected, 10, what="connected")
        monkeypatch.setattr(websocket.WebSocket, "send_close", send_close)
        m.stop()                                  # must not raise on the torn-down socket
        for c in m.connections:
            c.join(5)
            assert not c._thread.is_alive() and not c.connected
    assert torn_down_first == [True], "the interleaving under test did not happen"


def test_a_handshake_that_never_comes_is_given_up_and_retried(tmp_path, rest_sim):
    """A peer that accepts TCP and never answers the HTTP upgrade: before, the connection thread
    waited in the handshake for ever (the stale check only watches connected sockets)."""
    import socket
    accepted = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append((time.monotonic(), conn))      # held open, never answered
    threading.Thread(target=accept, daemon=True).start()
    url = f"ws://127.0.0.1:{srv.getsockname()[1]}"
    try:
        with collector(tmp_path, rest_sim, url, stale_timeout=1.0, reconnect_min=0.1,
                       reconnect_max=0.2) as c:
            wait_until(lambda: len(accepted) >= 3, 20, what="three handshake attempts")
            fails = c.wait_for("ws_connect_failed", count=2, timeout=10)
            assert all("timed out" in l["reason"].lower() for l in fails), fails
            gaps = [b[0] - a[0] for a, b in zip(accepted, accepted[1:])]
            assert all(g >= 0.9 for g in gaps[:2]), gaps              # each waited its timeout
            assert c.stop() == 0
    finally:
        srv.close()
        for _t, conn in accepted:
            conn.close()
