"""WebSocket connections: one thread per socket that stamps frames and hands them over in batches.

`on_message` is the hot path and does only this: stamp the frame with the process-wide
recv_seq and ts_recv and append it, raw bytes, to the connection's micro-batch
(`handoff.Stamps`; UTF-8 is validated later, per batch, in Arrow). The micro-batch goes into the
queue under one lock whenever the thread is about to wait for the network
(`FrameQueue.offer`), so a frame is never held back waiting for the next one. A full queue is a
counted drop per frame, never a block: the exchange would disconnect a slow reader.

Why the socket is read here and not by websocket-client: its reading costs ~4 us of Python per
frame (two or three recv() calls, a frame object, continuation bookkeeping), a socket thread's
whole budget, and the faster reader this replaced had to reach into its private internals,
which any release could break without a sound. So websocket-client does what its documented
API does well: the handshake (`WebSocket.connect`, which reads the HTTP response byte by byte,
so no frame bytes are consumed), TLS, proxies, and every send (`send`, `ping`, `pong`,
`send_close` mask client frames and hold its send lock). The thread reads the raw socket
itself, 64 KiB a time, and decodes with app/wsframes.py (sans-I/O, tested on its own): whole
data frames go from the read buffer straight to on_message. tests/test_public_api.py keeps
app/ off websocket-client's private names.

Everything slower lives in the Manager's watchdog thread, once a second: keepalive pings,
dead-socket detection (no frame at all for stale_timeout, which also catches half-open
sockets), silent-stream reports, and rotation before a server's forced close (open the new
connection, close the old one once the new one delivers: overlap, never a hole). Reconnects are
owned here, not by websocket-client: capped, jittered exponential backoff that resets after a
stable minute, and a fresh subscribe on every connect.
"""
from __future__ import annotations

import itertools
import logging
import random
import socket
import threading
import time

import websocket

from app import logs
from app.handoff import FrameQueue, Stamps
from app.exchanges import ConnectionPlan, Control
from app.subscriptions import LIVE, PENDING, SubscriptionBook
from app.wsframes import Close, Decoder, Ping, Pong, ProtocolError

log = logs.get()

READ_CHUNK = 64 * 1024          # bytes per recv(): one syscall per ~400 typical frames
MAX_MESSAGE = 16 << 20          # a larger message is refused (close 1009) and the socket reconnects


def _nothing(*_args) -> None:
    pass


_callback_errors = logs.RateLimited(10.0)


class Reader:
    """One WebSocket connection read through app.wsframes; websocket-client does the handshake and
    every send. Used by Connection and by bench/clients.py (the reader limit), so the bench
    measures what production runs.

        r = Reader(on_message, before_wait=hand_over, on_ping=..., on_pong=...)
        r.connect(url)          # the handshake (blocking); r.ws is the websocket-client WebSocket
        r.run()                 # reads until the connection ends; the socket is then closed

    on_message(payload: bytes) gets every text and binary message, UTF-8 not validated;
    on_ping / on_pong(payload) every ping (already answered with a pong) and pong;
    before_wait() runs before every recv() that may block. A callback that raises is logged
    (`ws_callback_error`, rate limited) and reading goes on. After run(): close_code and
    close_reason of the server's close frame (close_code None: there was none), `error` why
    reading ended otherwise ("stopped" after stop(); None after a close frame).

    stop() may be called from any thread, at any time (before, during or after the handshake):
    it optionally sends a close frame, then shuts the socket down, which ends a blocked recv()."""

    __slots__ = ("ws", "name", "on_message", "before_wait", "on_ping", "on_pong", "max_size",
                 "running", "close_code", "close_reason", "error")

    def __init__(self, on_message, *, before_wait=_nothing, on_ping=_nothing, on_pong=_nothing,
                 max_size: int = MAX_MESSAGE, name: str = "", sslopt: dict | None = None):
        # the send lock (enable_multithread, the default) serialises the pongs of this thread
        # with other threads' sends; sslopt as websocket-client takes it (wss:// only)
        self.ws = websocket.WebSocket(sslopt=sslopt, skip_utf8_validation=True)
        self.name = name
        self.on_message = on_message
        self.before_wait = before_wait
        self.on_ping = on_ping
        self.on_pong = on_pong
        self.max_size = max_size
        self.running = True
        self.close_code: int | None = None
        self.close_reason = ""
        self.error: str | None = None

    def connect(self, url: str, **options) -> None:
        """websocket-client's handshake (its options: header, http_proxy_host, timeout...). Raises
        as WebSocket.connect does; the socket is then already closed."""
        self.ws.connect(url, **options)

    def stop(self, close_reason: str | None = None) -> None:
        """End reading from another thread: a close frame first if close_reason is given (a
        half-open peer would never answer one: then don't), then shutdown(), which wakes recv().
        The socket thread may tear the socket down meanwhile: each step tolerates that."""
        self.running = False
        ws = self.ws
        raw = ws.sock                 # captured once: the socket thread sets ws.sock None when it ends
        if raw is None:
            return                    # not connected yet (run() will not read) or already ended
        if close_reason is not None:
            try:
                ws.send_close(websocket.STATUS_NORMAL, close_reason.encode()[:120])
            except (OSError, websocket.WebSocketException, AttributeError, ValueError):
                pass                  # already closing: the shutdown still ends it
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        """Read until the server closes, the protocol breaks, the socket fails or stop() is
        called; then close the socket (websocket-client would leave it to the cyclic GC)."""
        ws = self.ws
        try:
            raw = ws.sock
            if raw is None:
                self.error = "not connected"
                return
            recv = raw.recv           # TLS: SSLSocket.recv returns decrypted bytes, pending first
            decoder = Decoder(self.max_size)
            feed, deliver = decoder.feed, decoder.deliver
            on_message, before_wait = self.on_message, self.before_wait
            while self.running:
                before_wait()
                try:
                    data = recv(READ_CHUNK)
                except TimeoutError:  # only if a socket timeout was configured: keep waiting
                    continue
                except OSError as e:  # reset, TLS error, or a shutdown from stop()
                    self.error = repr(e) if self.running else "stopped"
                    return
                if not data:          # the peer's FIN, or a shutdown from stop()
                    self.error = "connection closed without a close frame" if self.running else "stopped"
                    return
                feed(data)
                # every complete frame now, before the next recv() may block: with TLS, bytes
                # already decrypted would otherwise wait for more to arrive
                while True:
                    try:
                        event = deliver(on_message)
                        if event is None:
                            break
                        kind = type(event)
                        if kind is Ping:
                            self._quietly(ws.pong, event.payload)
                            self.on_ping(event.payload)
                        elif kind is Pong:
                            self.on_pong(event.payload)
                        elif kind is Close:
                            self.close_code = event.code
                            self.close_reason = event.reason.decode("utf-8", "replace")
                            # echo the code (RFC 6455 5.5.1); no code: a normal close
                            code = event.code if event.code != 1005 else websocket.STATUS_NORMAL
                            self._quietly(ws.send_close, code)
                            return
                    except ProtocolError as e:
                        self.error = f"protocol error {e.code}: {e.reason}"
                        self._quietly(ws.send_close, e.code, e.reason.encode()[:120])
                        return
                    except Exception as e:  # noqa: BLE001 - a callback's bug never ends the socket
                        _callback_errors(logging.ERROR, "ws_callback_error", key=self.name,
                                         conn=self.name, error=repr(e))
        finally:
            self.running = False
            ws.shutdown()             # closes the socket (public API), ws.sock = None

    @staticmethod
    def _quietly(method, *args) -> None:
        try:
            method(*args)
        except (OSError, websocket.WebSocketException):
            pass                      # the socket is going: the next recv() says so



class Connection:
    """One logical connection (a plan of streams on one path); reconnects until stopped."""

    def __init__(self, manager: "Manager", plan: ConnectionPlan, name: str):
        self.manager = manager
        self.adapter = manager.adapters[plan.exchange]
        self.exchange = plan.exchange
        self.plan = plan
        self.name = name
        self.base_url = manager.settings.ws_url(plan.exchange)
        self.url = ""
        # per-frame counters: written by this connection's socket thread only
        self.received = 0
        self.dropped = 0
        self.last_frame_ns = 0
        # connection status, read by the watchdog and the status API
        self.conn_id: int | None = None
        self.connected = False
        self.connected_since: float | None = None
        self.connects = 0
        self.last_ping = 0.0
        self.book: SubscriptionBook | None = None  # this socket's subscriptions (None: not open)
        self._open_ns = 0
        self._sub_wake = threading.Event()
        self.notice_seen = False
        self.replacement: "Connection | None" = None
        self.replacing_since = 0.0
        self.ws: websocket.WebSocket | None = None    # the current socket, for sending
        self._reader: Reader | None = None
        self._close_reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"ws-{name}", daemon=True)

    # ---- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str = "stop") -> None:
        self._stop.set()
        self.close(reason, abort=False)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self, reason: str, abort: bool = True) -> None:
        """End the current socket (from any thread); the loop reconnects unless stopped. `abort`
        skips the closing handshake (a half-open peer would never answer it)."""
        reader = self._reader
        if reader is None:
            return
        self._close_reason = reason
        reader.stop(None if abort else reason)

    def _loop(self) -> None:
        s = self.manager.settings
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._run_once()
            except Exception as e:  # noqa: BLE001 - a connection thread must never die
                log.error("ws_thread_error", extra={"exchange": self.exchange, "conn": self.name,
                                                    "error": repr(e)})
            if self._stop.is_set():
                break
            if time.monotonic() - started >= s.reconnect_stable_after:
                attempt = 0
            delay = min(s.reconnect_max, s.reconnect_min * 2 ** attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self.manager.state.count("reconnects", self.exchange)
            log.info("ws_reconnect_wait", extra={"exchange": self.exchange, "conn": self.name,
                                                 "delay_s": round(delay, 3), "attempt": attempt})
            self._stop.wait(delay)

    def _run_once(self) -> None:
        conn_id = next(self.manager.conn_ids)
        exchange = self.exchange
        streams = list(self.plan.streams)     # the plan may change (delistings) between connects
        url = self.url = self.adapter.ws_url(self.base_url, self.plan.path, streams)
        q = self.manager.queue
        next_seq = self.manager.recv_seq.__next__
        time_ns = time.time_ns
        on_drop = self.manager.on_drop
        stamps = Stamps(exchange, conn_id)      # frames not yet in the queue (a micro-batch)
        add_seq, add_ts, add_payload = stamps.recv_seq.append, stamps.ts_recv.append, stamps.payloads.append

        screen = self.adapter.URGENT_SCREEN
        if not screen:
            def on_message(data):
                add_seq(next_seq())
                add_ts(time_ns())
                add_payload(data)
        else:
            size, urgent = len(screen), self.adapter.urgent_control

            def on_message(data):     # the same, and a look at frames that are not data
                add_seq(next_seq())
                add_ts(time_ns())
                add_payload(data)
                if data[:size] != screen:
                    ctrl = urgent(data)
                    if ctrl is not None:
                        self.on_urgent(ctrl)

        def hand_over():
            """The micro-batch -> the queue: before the thread waits for the network (so a
            frame never waits here for the next one), and on close."""
            batch = stamps.take()
            if batch is None:
                return
            self.received += len(batch)
            self.last_frame_ns = batch.ts_recv[-1]
            dropped = q.offer(batch)
            if dropped:
                self.dropped += dropped
                on_drop(self)

        def on_open(ws):
            self.conn_id = conn_id
            self.connected = True
            self.connected_since = time.time()
            self.last_frame_ns = time.time_ns()
            self.connects += 1
            self.notice_seen = False
            self._open_ns = time.time_ns()
            s = self.manager.settings
            book = SubscriptionBook(self.adapter, streams, now=time.time(),
                                    ack_timeout=s.subscribe_timeout, retries=s.subscribe_retries,
                                    next_request_id=self.manager.next_request_id)
            self.book = book
            self.manager.by_conn_id[conn_id] = self
            log.info("ws_connect", extra={"exchange": exchange, "conn": self.name, "conn_id": conn_id,
                                          "url": url.split("?")[0], "streams": len(streams)})
            self.manager.notify("open", self, conn_id)
            if self.adapter.SUBSCRIBE_IN_URL:     # the URL named the streams: no ACK will come
                book.all_live(time.time())
                self.log_book_events(via="url")
            else:
                threading.Thread(target=self._subscriber, args=(ws, book),
                                 name=f"sub-{self.name}", daemon=True).start()

        def on_liveness(_payload):
            self.last_frame_ns = time.time_ns()

        def on_close(code, reason):
            hand_over()
            was_connected = self.connected
            self.connected = False
            self.book = None
            self._sub_wake.set()
            self.manager.by_conn_id.pop(conn_id, None)
            log.info("ws_disconnect", extra={"exchange": exchange, "conn": self.name,
                                             "conn_id": conn_id, "code": code,
                                             "reason": reason or self._close_reason or "closed",
                                             "was_connected": was_connected})
            self.manager.notify("close", self, conn_id, was_connected)

        self._close_reason = ""
        self.manager.connect_gate(exchange, self._stop)
        reader = Reader(on_message, before_wait=hand_over, on_ping=on_liveness, on_pong=on_liveness,
                        name=self.name)
        self._reader, self.ws = reader, reader.ws      # close() may stop it from now on
        if self._stop.is_set():
            return
        try:
            # a peer that accepts TCP and never answers the handshake must not hold the thread
            # for ever: the handshake gets stale_timeout, then the socket blocks again (reads
            # wait without a timer; liveness is the watchdog's job)
            reader.connect(url, timeout=self.manager.settings.stale_timeout)
            reader.ws.settimeout(None)
        except Exception as e:  # noqa: BLE001 - refused, unreachable, a bad handshake: reconnect
            self._close_reason = self._close_reason or repr(e)
        else:
            try:
                on_open(reader.ws)
            except Exception as e:  # noqa: BLE001 - as any callback: logged, the socket goes on
                log.error("ws_callback_error", extra={"exchange": exchange, "conn": self.name,
                                                      "error": repr(e)})
            try:
                reader.run()                   # closes the socket however it ends
            except Exception as e:  # noqa: BLE001 - hand_over or a bug: this socket ends, the loop goes on
                log.error("ws_thread_error", extra={"exchange": exchange, "conn": self.name,
                                                    "error": repr(e)})
                self._close_reason = self._close_reason or repr(e)
            if not self._close_reason:
                self._close_reason = reader.error or f"closed by the server ({reader.close_code})"
        on_close(reader.close_code, reader.close_reason)     # also after a failed handshake
        if not self.connects and self._close_reason:
            log.warning("ws_connect_failed", extra={"exchange": exchange, "conn": self.name,
                                                   "url": url.split("?")[0], "reason": self._close_reason})

    def _subscriber(self, ws, book: SubscriptionBook) -> None:
        """Sends what the book says is due (first round, split batches, retries) while this
        socket is open; paced by the exchange's SUBSCRIBE_INTERVAL_S."""
        pause = self.adapter.SUBSCRIBE_INTERVAL_S
        while not self._stop.is_set() and self.connected and self.ws is ws and self.book is book:
            for text, _rid, _keys in book.take_due(time.time()):
                if self._stop.is_set() or not self.connected or self.ws is not ws:
                    return
                try:
                    ws.send(text)
                except Exception as e:  # noqa: BLE001 - the socket died; the loop reconnects
                    log.info("subscribe_send_failed", extra={"exchange": self.exchange,
                                                             "conn": self.name, "error": repr(e)})
                    return
                self._stop.wait(pause)
            self.log_book_events()
            due = book.next_due()
            wait = 1.0 if due is None else min(1.0, max(0.0, due - time.time()))
            self._sub_wake.wait(wait)
            self._sub_wake.clear()

    def log_book_events(self, **extra) -> None:
        """One line per finished subscription round, one per rejection (from the book)."""
        book = self.book
        if book is None:
            return
        base = {"exchange": self.exchange, "conn": self.name, "conn_id": self.conn_id}
        for event, fields in book.take_events():
            if event == "subscription_rejected":
                self.manager.state.count("subscriptions_rejected", self.exchange)
                log.warning(event, extra={**base, **fields})
            else:
                log.info(event, extra={**base, **fields, **extra})

    def is_live(self, key: str) -> bool:
        book = self.book
        return book is not None and book.status.get(key) == LIVE

    @property
    def subscribed(self) -> set[str]:
        """Keys of the streams live on this socket."""
        book = self.book
        if book is None:
            return set()
        return {k for k, (st, _r) in book.snapshot().items() if st == LIVE}

    def subscriptions(self) -> dict[str, tuple[str, str]]:
        """Every planned stream -> (pending|live|rejected, reason); pending while not open."""
        book = self.book
        snap = book.snapshot() if book is not None else {}
        return {st.key: snap.get(st.key, (PENDING, "")) for st in self.plan.streams}

    # ---- watchdog work (manager thread) -------------------------------------------------------
    def ping(self, now: float) -> None:
        keep = self.adapter.KEEPALIVE
        interval = self.manager.settings.keepalive_interval or keep.interval_s
        if not keep.kind or not self.connected or now - self.last_ping < interval:
            return
        self.last_ping = now
        ws = self.ws
        try:
            if keep.kind == "protocol":
                ws.ping(keep.payload)
            else:
                ws.send(keep.payload)
        except Exception:  # noqa: BLE001 - a dead socket is found by the stale check
            pass

    def on_control(self, ctrl: Control) -> None:
        """A control frame the writer parsed (ACK, error, notice) for this connection."""
        book = self.book
        if ctrl.kind == "ack":
            if book is not None:
                book.on_ack(ctrl.request_id, ctrl.keys, time.time())
        elif ctrl.kind == "error":
            self.manager.state.count("subscription_errors", self.exchange)
            ours = book is not None and book.on_error(ctrl.request_id, ctrl.keys, ctrl.detail, time.time())
            if not ours:
                log.warning("subscription_error", extra={"exchange": self.exchange, "conn": self.name,
                                                         "request_id": ctrl.request_id,
                                                         "detail": ctrl.detail, "streams": list(ctrl.keys)})
            self._sub_wake.set()
        elif ctrl.kind == "notice":
            self.on_urgent(ctrl)
        self.log_book_events()

    def on_urgent(self, ctrl: Control) -> None:
        """An event that cannot wait for the writer (OKX 64008: reconnect now): acted on in the
        socket thread, before the next frame is read; the writer's later sight of it is a no-op."""
        if ctrl.kind != "notice" or self.notice_seen:
            return
        self.notice_seen = True
        log.warning("exchange_notice", extra={"exchange": self.exchange, "conn": self.name,
                                              "detail": ctrl.detail})
        self.manager.rotate(self, "notice")

    def status(self) -> dict:
        now_ns = time.time_ns()
        return {"name": self.name, "exchange": self.exchange, "path": self.plan.path,
                "conn_id": self.conn_id, "connected": self.connected,
                "connected_since": self.connected_since, "connects": self.connects,
                "streams": len(self.plan.streams), "subscribed": len(self.subscribed),
                "subscriptions": self.book.counts() if self.book is not None else None,
                "frames": self.received, "dropped": self.dropped,
                "last_frame_age_s": round((now_ns - self.last_frame_ns) / 1e9, 3) if self.last_frame_ns else None}


class Manager:
    """Builds connections from plans, routes control messages, runs the watchdog."""

    def __init__(self, settings, adapters: dict, q: FrameQueue, state, last_seen: dict[str, dict]):
        self.settings = settings
        self.adapters = adapters
        self.queue = q
        self.state = state
        self.last_seen = last_seen          # exchange -> {stream key: ts_recv ns}, from the writer
        self.recv_seq = itertools.count(1)
        self.conn_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._request_lock = threading.Lock()
        self._gate_lock = threading.Lock()
        self._next_connect: dict[str, float] = {}
        self.connections: list[Connection] = []
        self.by_conn_id: dict[int, Connection] = {}
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._silent: dict[tuple[str, str], float] = {}
        self._drop_log = logs.RateLimited(10.0)
        # callables(event "open"|"close", conn, conn_id, was_connected), called in the socket
        # thread on every connect/disconnect (the gap detector); they must only enqueue
        self.listeners: list = []
        self._thread = threading.Thread(target=self._watchdog, name="ws-watchdog", daemon=True)

    def notify(self, event: str, conn: Connection, conn_id: int, was_connected: bool = True) -> None:
        for listener in self.listeners:
            try:
                listener(event, conn, conn_id, was_connected)
            except Exception as e:  # noqa: BLE001 - a listener must never break a socket thread
                log.error("listener_error", extra={"event": event, "error": repr(e)})

    def connect_gate(self, exchange: str, stop: threading.Event) -> None:
        """Space new connections per exchange (OKX: 3 per second per IP; Bybit: 500 per 5 min)."""
        interval = self.adapters[exchange].CONNECT_INTERVAL_S
        if not interval:
            return
        with self._gate_lock:
            slot = max(time.monotonic(), self._next_connect.get(exchange, 0.0))
            self._next_connect[exchange] = slot + interval
        delay = slot - time.monotonic()
        if delay > 0:
            stop.wait(delay)

    def next_request_id(self, n: int) -> int:
        with self._request_lock:
            first = next(self._request_ids)
            for _ in range(max(0, n - 1)):
                next(self._request_ids)
        return first

    def add_plan(self, plan: ConnectionPlan) -> Connection:
        conn = Connection(self, plan, f"{plan.exchange}-{next(self._names)}")
        with self._lock:
            self.connections.append(conn)
        self.state.register_connection(conn)
        conn.start()
        return conn

    def start(self, plans: list[ConnectionPlan]) -> None:
        for plan in plans:
            self.add_plan(plan)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            conns = list(self.connections)
        for c in conns:
            c.stop()
        deadline = time.monotonic() + timeout
        for c in conns:
            c.join(max(0.1, deadline - time.monotonic()))
        self._thread.join(timeout=2)

    def remove_symbols(self, exchange: str, symbols: set[str]) -> None:
        """Unsubscribe delisted symbols; their streams leave the plans (and the watchdog)."""
        with self._lock:
            conns = [c for c in self.connections if c.exchange == exchange and not c.stopped]
        for c in conns:
            gone = [st for st in c.plan.streams if st.symbol in symbols]
            if not gone:
                continue
            c.plan.streams = [st for st in c.plan.streams if st.symbol not in symbols]
            book = c.book
            if book is not None:
                book.remove(st.key for st in gone)
            if c.connected and c.ws is not None:
                for text, _rid, _keys in c.adapter.unsubscribe_messages(gone, self.next_request_id(len(gone))):
                    try:
                        c.ws.send(text)
                    except Exception:  # noqa: BLE001 - a reconnect uses the new plan anyway
                        break
                    time.sleep(c.adapter.SUBSCRIBE_INTERVAL_S)

    def on_drop(self, conn: Connection) -> None:
        self._drop_log(logging.WARNING, "queue_full_drop", key=conn.exchange, exchange=conn.exchange,
                       dropped_total=conn.dropped, queue_size=self.queue.qsize(),
                       queue_capacity=self.queue.maxsize)

    def on_control(self, exchange: str, conn_id: int, ctrl: Control) -> None:
        """Called by the writer thread for every non-data frame it parsed."""
        conn = self.by_conn_id.get(conn_id)
        if conn is not None:
            conn.on_control(ctrl)
        elif ctrl.kind == "error":
            self.state.count("subscription_errors", exchange)
            log.warning("subscription_error", extra={"exchange": exchange, "conn_id": conn_id,
                                                     "detail": ctrl.detail})

    def rotate(self, old: Connection, reason: str) -> None:
        """Open a replacement with the same streams; the old one closes once it delivers."""
        with self._lock:
            if old.replacement is not None or old.stopped:
                return
            old.replacing_since = time.monotonic()
            plan = ConnectionPlan(old.plan.exchange, old.plan.path, list(old.plan.streams))
        log.info("ws_rotate", extra={"exchange": old.exchange, "conn": old.name, "reason": reason})
        old.replacement = self.add_plan(plan)

    def _retire(self, conn: Connection, reason: str) -> None:
        conn.stop(reason)
        with self._lock:
            if conn in self.connections:
                self.connections.remove(conn)
        threading.Thread(target=self._finish_retire, args=(conn,), daemon=True).start()

    def _finish_retire(self, conn: Connection) -> None:
        conn.join(10)
        self.state.retire_connection(conn)

    def _max_age(self, exchange: str) -> float | None:
        if self.settings.connection_max_age > 0:
            return self.settings.connection_max_age
        return self.adapters[exchange].MAX_CONNECTION_AGE_S

    def _watchdog(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.check(time.time())
            except Exception as e:  # noqa: BLE001 - the watchdog must survive anything
                log.error("watchdog_error", extra={"error": repr(e)})

    def check(self, now: float) -> None:
        s = self.settings
        with self._lock:
            conns = list(self.connections)
        now_ns = int(now * 1e9)
        for c in conns:
            if c.stopped:
                continue
            c.ping(now)
            if c.connected and now_ns - c.last_frame_ns > s.stale_timeout * 1e9:
                log.warning("ws_stale", extra={"exchange": c.exchange, "conn": c.name,
                                               "silent_s": round((now_ns - c.last_frame_ns) / 1e9, 1)})
                c.close("stale: no frames", abort=True)
            max_age = self._max_age(c.exchange)
            if max_age and c.connected and c.connected_since and now - c.connected_since > max_age:
                self.rotate(c, "max_age")
            r = c.replacement
            if r is not None and (r.received > 0 and r.subscribed or
                                  time.monotonic() - c.replacing_since > 30):
                self._retire(c, "rotated")
            book = c.book
            if book is not None and c.connected:
                book.on_data(self.last_seen.get(c.exchange, {}), c._open_ns, now)
                c.log_book_events()
                self._check_silence(c, book, now)

    def _check_silence(self, c: Connection, book: SubscriptionBook, now: float) -> None:
        """Per stream only where the exchange pushes on a fixed period (cadence_s): trades, BBO
        and the like are event driven, and a quiet market sends nothing for minutes. A dead
        connection is found by `check` (no frame at all, pongs included, for stale_timeout)."""
        s = self.settings
        seen = self.last_seen.get(c.exchange, {})
        silent_map = self.state.silent_streams[c.exchange]
        for stream in c.plan.streams:
            if stream.cadence_s is None:
                continue
            key = (c.exchange, stream.key)
            since = book.live_at.get(stream.key)
            if since is None:
                continue
            last = max(seen.get(stream.key, 0) / 1e9, since)
            limit = max(s.silence_floor, s.silence_factor * (stream.cadence_s or 0))
            if now - last > limit:
                if key not in self._silent:
                    self._silent[key] = last
                    silent_map[stream.key] = last
                    log.warning("stream_silent", extra={"exchange": c.exchange, "stream": stream.key,
                                                        "conn": c.name, "silent_s": round(now - last, 1)})
            elif key in self._silent:
                del self._silent[key]
                silent_map.pop(stream.key, None)
                log.info("stream_resumed", extra={"exchange": c.exchange, "stream": stream.key})
