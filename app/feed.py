"""WebSocket connections: websocket-client threads that stamp frames and enqueue them.

`on_message` is the hot path and does only this: stamp the frame with the process-wide
recv_seq and ts_recv and append it, raw bytes, to the connection's micro-batch
(`handoff.Stamps`; UTF-8 is validated later, per batch, in Arrow). The micro-batch goes into the
queue under one lock whenever the thread is about to wait for the network
(`FrameQueue.offer`), so a frame is never held back waiting for the next one. A full queue is a
counted drop per frame, never a block: the exchange would disconnect a slow reader.

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
import selectors
import socket
import threading
import time

import websocket

from app import logs
from app.handoff import FrameQueue, Stamps
from app.exchanges import ConnectionPlan, Control
from app.subscriptions import LIVE, PENDING, SubscriptionBook

log = logs.get()

# ---- socket reading: the per-frame cost of websocket-client, cut where it is spent ------------------
#
# websocket-client (>=1.8,<2) reads every frame with `frame_buffer.recv_strict(n)`: one recv()
# syscall for the 2-byte header, another for the length and the payload, and its Dispatcher
# calls select() before every frame; then it builds and validates an ABNF object and passes it
# through its continuation-frame logic: ~4 us of Python per frame, most of a socket thread's
# time. Three small adapters remove that cost without changing what a callback receives:
#   * `_BufferedReader` replaces `recv_strict` on the connection's frame_buffer: it recv()s
#     READ_CHUNK bytes at a time and serves the header, length and payload as slices of that
#     buffer (one syscall per ~64 KiB instead of 2-3 per frame).
#   * `_BufferedReader.data_frames` hands every buffered frame that is a whole text or binary
#     message as servers send it (FIN set, no RSV bits, no mask) straight to on_message, as the
#     bytes websocket-client would have passed. Anything else (pings, pongs, close, fragments,
#     RSV bits, a mask) is left where it is, and websocket-client reads it itself, with its own
#     checks, replies and errors.
#   * `BufferedDispatcher` installs the reader when the dispatcher starts reading (after the
#     handshake, which websocket-client reads byte by byte, so no data is in flight) and lets
#     recv() do the waiting instead of a select() before every read.
#   * Before the thread may wait for the network (a refill or a select), the app's
#     `before_wait` hook runs: the connection hands its micro-batch of frames to the queue
#     there, under one lock, instead of one put_nowait per frame (see Connection._run_once).
# UTF-8 is not validated here (`skip_utf8_validation`): Arrow validates each batch in the writer.

READ_CHUNK = 64 * 1024


class _BufferedReader:
    """`recv_strict(n)` for websocket-client's frame_buffer, served from READ_CHUNK reads."""

    __slots__ = ("_recv", "_pending_ssl", "_before_wait", "buf", "pos")

    def __init__(self, frame_buffer, sock, before_wait):
        self._recv = frame_buffer.recv          # WebSocket._recv: closed socket -> exception
        self._pending_ssl = getattr(sock, "pending", None)    # TLS: decrypted, not yet read
        self._before_wait = before_wait
        self.buf = b""
        self.pos = 0

    def recv_strict(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end <= len(self.buf):            # the common case: the frame part is buffered
            self.pos = end
            return self.buf[pos:end]
        parts = [self.buf[pos:]]
        have = len(parts[0])
        while have < n:
            self._before_wait()
            chunk = self._recv(max(READ_CHUNK, n - have))
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)
        self.pos = n
        return self.buf[:n]

    def buffered(self) -> bool:
        """True if a frame (or part of one) can be read without waiting for the socket."""
        return self.pos < len(self.buf) or bool(self._pending_ssl and self._pending_ssl())

    def data_frames(self, app) -> int:
        """Call app.on_message(app, payload) for each complete frame at the head of the buffer
        that is a whole message in one unmasked frame (first byte 0x81 text or 0x82 binary: FIN,
        no RSV bits), the payload as websocket-client passes it with skip_utf8_validation.
        -> 0 when it stops at a frame websocket-client must read (`read_callback`), else the
        number of bytes, at least, that the buffer lacks for the next frame (`fill`)."""
        on_message = app.on_message
        buf, pos = self.buf, self.pos
        size = len(buf)
        need = 2
        while size - pos >= 2:
            head, n = buf[pos], buf[pos + 1]
            if (head != 0x81 and head != 0x82) or n & 0x80:
                self.pos = pos
                return 0
            if n < 126:
                start = pos + 2
            elif n == 126:
                start = pos + 4
                if start > size:
                    need = start - pos
                    break
                n = buf[pos + 2] << 8 | buf[pos + 3]
            else:
                start = pos + 10
                if start > size:
                    need = start - pos
                    break
                n = int.from_bytes(buf[pos + 2:start], "big")
            end = start + n
            if end > size:
                need = end - pos
                break
            pos = end
            try:
                on_message(app, buf[start:end])
            except Exception as e:  # noqa: BLE001 - as websocket-client's own _callback does
                app._callback(app.on_error, e)
        self.pos = pos
        return max(need - (size - pos), 1)

    def fill(self, need: int) -> None:
        """One read from the socket (after `before_wait`), appended to what is left unread."""
        self._before_wait()
        chunk = self._recv(max(READ_CHUNK, need))
        self.buf = self.buf[self.pos:] + chunk if self.pos < len(self.buf) else chunk
        self.pos = 0


class BufferedDispatcher(websocket._app.Dispatcher):
    """websocket-client's Dispatcher, reading through a `_BufferedReader`. When nothing is
    buffered it reads straight away: on a blocking socket (websocket-client's default: no
    timeout) recv() itself waits for data without the GIL, so the select() call websocket-client
    makes first is skipped: ~10 % less CPU per frame at a paced 100k frames/s, where every tick
    wakes the thread (bench/run.py's firehose). A socket with a timeout (or TLS data still in
    the TLS layer) keeps the select(). close() shuts the socket down, which ends either wait.

    On a blocking socket, whole data frames go to on_message from `data_frames`; only the
    other frames take websocket-client's read path (`read_callback`, one frame each), and so
    does everything while a fragmented message is being received, or when the app asked for
    what only that path gives (UTF-8 validation, on_data, on_cont_message)."""

    def read(self, sock, read_callback, check_callback) -> None:
        ws = self.app.sock
        if ws is None or ws.sock is None:
            return
        app = self.app
        app.raw_socket = sock
        before_wait = getattr(app, "before_wait", None) or _nothing
        reader = _BufferedReader(ws.frame_buffer, ws.sock, before_wait)
        ws.frame_buffer.recv_strict = reader.recv_strict     # instance attribute shadows the method
        buffered = reader.buffered
        blocking = ws.sock.gettimeout() is None
        direct = (blocking and app.data_frames and ws.frame_buffer.skip_utf8_validation
                  and app.on_data is None and app.on_cont_message is None)
        fragments = ws.cont_frame
        sel = selectors.DefaultSelector()
        sel.register(ws.sock, selectors.EVENT_READ)
        try:
            while app.keep_running:
                if direct and fragments.recving_frames is None:
                    need = reader.data_frames(app)
                    if need:
                        reader.fill(need)
                        check_callback()
                        continue
                if buffered() or blocking:
                    if not read_callback():
                        break
                else:
                    before_wait()
                    if sel.select(self.ping_timeout) and not read_callback():
                        break
                check_callback()
        finally:
            sel.close()


def _nothing() -> None:
    pass


class FastWebSocketApp(websocket.WebSocketApp):
    """WebSocketApp whose default dispatcher is `BufferedDispatcher` (same semantics otherwise:
    no custom-dispatcher code paths of websocket-client are involved). Set `before_wait` to a
    callable to run it whenever the socket thread is about to wait for data; `data_frames`
    False keeps websocket-client's frame parsing for every frame (the bench's reference)."""

    before_wait = None
    data_frames = True          # False: every frame through websocket-client's own parsing
    raw_socket = None

    def run_forever(self, *args, **kwargs):
        """As websocket-client's, then the socket is closed. websocket-client only drops it
        (after a close frame, or a shutdown() from Connection.close), and its WebSocket object
        is in a reference cycle (frame_buffer holds a bound method of it): each finished
        connection kept its file descriptor until the cyclic GC ran."""
        try:
            return super().run_forever(*args, **kwargs)
        finally:
            raw, self.raw_socket = self.raw_socket, None
            if raw is not None:
                raw.close()

    def create_dispatcher(self, ping_timeout, dispatcher=None, *args, **kwargs):
        if dispatcher is not None:
            return super().create_dispatcher(ping_timeout, dispatcher, *args, **kwargs)
        return BufferedDispatcher(self, ping_timeout or 10)


# run_forever options of every connection (and of the bench's no-op ceiling client): no UTF-8
# validation in Python, no library pings or reconnects (the watchdog owns both).
RUN_OPTIONS = {"skip_utf8_validation": True, "ping_interval": 0, "reconnect": 0}


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
        self.app: websocket.WebSocketApp | None = None
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
        """End the current socket; the loop reconnects unless stopped. `abort` skips the
        closing handshake (a half-open peer would never answer it)."""
        app = self.app
        if app is None:
            return
        self._close_reason = reason
        app.keep_running = False
        ws = app.sock
        raw = ws.sock if ws is not None else None     # the socket thread may drop ws.sock meanwhile
        if raw is None:
            return
        try:
            if not abort:
                ws.send_close(websocket.STATUS_NORMAL, reason.encode()[:120])
        except (OSError, websocket.WebSocketException, AttributeError):
            pass                                       # already closing: the shutdown still ends it
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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
            def on_message(_ws, data):
                add_seq(next_seq())
                add_ts(time_ns())
                add_payload(data)
        else:
            size, urgent = len(screen), self.adapter.urgent_control

            def on_message(_ws, data):     # the same, and a look at frames that are not data
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

        def on_liveness(_ws, _data):
            self.last_frame_ns = time.time_ns()

        def on_error(_ws, error):
            if not self._close_reason:
                self._close_reason = repr(error)

        def on_close(_ws, code, reason):
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
        self.app = FastWebSocketApp(self.url, on_open=on_open, on_message=on_message,
                                    on_error=on_error, on_close=on_close,
                                    on_ping=on_liveness, on_pong=on_liveness)
        self.app.before_wait = hand_over
        if self._stop.is_set():
            return
        self.app.run_forever(**RUN_OPTIONS)
        hand_over()
        if self.connected:   # on_close not called (failed handshake path)
            on_close(None, None, self._close_reason)
        if not self.connects and self._close_reason:
            log.warning("ws_connect_failed", extra={"exchange": exchange, "conn": self.name,
                                                   "url": url.split("?")[0], "reason": self._close_reason})

    def _subscriber(self, ws, book: SubscriptionBook) -> None:
        """Sends what the book says is due (first round, split batches, retries) while this
        socket is open; paced by the exchange's SUBSCRIBE_INTERVAL_S."""
        pause = self.adapter.SUBSCRIBE_INTERVAL_S
        while not self._stop.is_set() and self.connected and self.app is ws and self.book is book:
            for text, _rid, _keys in book.take_due(time.time()):
                if self._stop.is_set() or not self.connected or self.app is not ws:
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
        app = self.app
        try:
            if keep.kind == "protocol":
                app.sock.ping(keep.payload)
            else:
                app.send(keep.payload)
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
        interval = getattr(self.adapters[exchange], "CONNECT_INTERVAL_S", 0.0)
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
            if c.connected and c.app is not None:
                for text, _rid, _keys in c.adapter.unsubscribe_messages(gone, self.next_request_id(len(gone))):
                    try:
                        c.app.send(text)
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
