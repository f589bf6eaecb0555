"""Server plumbing shared by the three exchange simulators.

Why it is built this way:

* One asyncio loop in one background thread runs every server (WS + REST for each exchange)
  and every generator, so all simulator state is only ever mutated from that thread; the public
  `Simulator` methods hop onto the loop with `call_soon_threadsafe` and wait for the result.
* Data frames are encoded once and framed once (`ws_frame`), then the same bytes are written
  straight to each subscribed socket's transport.  Going through `websockets`' `send()` per
  socket would cost a coroutine + frame serialisation per socket and let one slow reader stall
  the generator.  Writes bypass `websockets` only for data/control *text* frames of OPEN
  connections; handshake, close and ping/pong handling stay with the library.  Compression is
  disabled so pre-framed bytes are valid.
* A reader that does not read is aborted when its transport buffer exceeds `max_buffer`
  (exchanges do the same: OKX close 4005 "Buffer is full").
* Counters are plain dicts/ints mutated in the loop thread; `stats()` copies them from the
  caller's thread with C-level `dict.copy()` (atomic under the GIL), so it is cheap enough to
  poll every 100 ms and never blocks on the loop.
* REST is a tiny HTTP/1.1 server on asyncio streams (keep-alive, GET only): it keeps REST in
  the same loop as the market state, so REST answers (e.g. latest trade ids) are consistent
  with what the generator produced.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import random
import struct
import threading
import time
import urllib.parse
from http import HTTPStatus

import ujson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

DATASETS = ("bbo", "trades", "mark_price", "funding", "open_interest")
_conn_ids = itertools.count(1)
_pack_h = struct.Struct("!BBH").pack
_pack_q = struct.Struct("!BBQ").pack


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Unmasked server frame with FIN set (text by default)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return _pack_h(0x80 | opcode, 126, n) + payload
    return _pack_q(0x80 | opcode, 127, n) + payload


def dumps(obj) -> str:
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


class SimConnection(ServerConnection):
    """websockets connection with the per-socket bookkeeping the simulator needs."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sim_id = next(_conn_ids)
        self.ex = None                 # ExchangeBase, set in process_request
        self.path = ""
        self.subs: dict = {}           # topic -> True if delivered (routable), False if ACKed-but-silent
        self.frames_sent = 0
        self.client_pings = 0
        self.connected_at = time.time()
        m = time.monotonic()
        self.opened_mono = m
        self.last_client_msg = m
        self.last_client_ping = m      # JSON/text/protocol ping from the client
        self.last_push = m             # last data frame written
        self.last_pong = m             # last protocol pong (binance)
        self.ping_outstanding = None   # monotonic time of first unanswered server ping
        self.last_server_ping = m
        self.muted = False
        self.closing = False
        self.detached = False
        self.wrapped = False           # binance combined-stream wrapper
        self.st: dict = {}             # exchange specific state

    # incoming protocol frames: count client pings / pongs, detach on close
    def process_event(self, event) -> None:
        if self.request is not None and isinstance(event, Frame):
            op = event.opcode
            if op is Opcode.PING:
                self.client_pings += 1
                self.last_client_ping = time.monotonic()
            elif op is Opcode.PONG:
                self.last_pong = time.monotonic()
                self.ping_outstanding = None
            elif op is Opcode.CLOSE and self.ex is not None:
                self.ex.detach(self)
        super().process_event(event)

    def send_data(self) -> None:
        if self.muted:               # half-open: swallow everything (pongs, close frames)
            for _ in self.protocol.data_to_send():
                pass
            return
        super().send_data()

    def connection_lost(self, exc) -> None:
        if self.ex is not None:
            self.ex.detach(self)
        super().connection_lost(exc)

    def write_frame(self, frame: bytes) -> bool:
        """Write a pre-framed message; False if this socket must not/cannot be written."""
        if self.muted or self.closing or self.detached or self.protocol.state is not State.OPEN:
            return False
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(frame)
        return True


class Counters:
    def __init__(self):
        self.frames: dict = {}
        self.rows = {k: 0 for k in DATASETS}
        self.skipped_ids: dict = {}
        self.trades_generated: dict = {}
        self.n = {"control_frames": 0, "raw_frames": 0, "connections_opened": 0,
                  "connections_rejected": 0, "closed_idle": 0, "closed_by_fault": 0,
                  "closed_policy": 0, "closed_slow": 0, "rest_requests": 0, "rest_429": 0,
                  "rest_418": 0, "rest_403": 0, "rest_5xx": 0}
        # soak (bench/soak.py): protocol-level pings are in control_frames but are not text frames
        # a client's on_message sees; text frames sent = sum(frames) + control - pings + raw
        self.n["protocol_pings"] = 0

    def snapshot(self) -> dict:
        d = self.n.copy()
        d["frames"] = self.frames.copy()
        d["rows"] = self.rows.copy()
        d["skipped_ids"] = self.skipped_ids.copy()
        d["trades_generated"] = self.trades_generated.copy()
        return d


class ExchangeBase:
    """Shared per-exchange machinery; subclasses fill in the protocol.

    Subclass contract (each exchange module has the same shape):
      build_instruments()              -> list of streamable instruments (self.insts)
      parse_path(path)                 -> path kind or None (404)
      on_open(conn) / on_text(conn, msg)
      keepalive(conn, mono)            -> periodic per-socket rules (pings, idle closes)
      ev_bbo(inst, now_ms) / ev_trade(inst, now_ms) / periodic(now_ms)   (generation)
      topic_target(topic)              -> (inst, kind) for silence/skip, or None
      lookup(symbol)                   -> inst for a native symbol (quiet), or None
      quiet_start(inst)                -> arm "resend when unchanged" timers of a quiet symbol
      replay_items(line)               -> [(topic, text, rows, wrapped_text_or_None)]
      rest(path, query)                -> (status, headers, body)

    Faults shared by all three: `rejected` (topic -> reason or None: a subscribe naming the topic
    gets the exchange's own rejection, see each module's on_text) and quiet symbols (no trades,
    no book changes: gen_tick skips them, periodic channels go on).
    """

    name = ""
    max_buffer = 16 * 1024 * 1024

    def __init__(self, sim, cfg: dict, universe):
        self.sim = sim
        self.cfg = cfg
        self.rng = random.Random(f"{cfg['seed']}-{self.name}")
        self.c = Counters()
        self.conns: dict = {}          # sim_id -> conn
        self.index: dict = {}          # topic -> {conn: None}
        self.silenced: dict = {}       # topic -> expiry monotonic or None
        self.skip: dict = {}           # topic -> pending ids to swallow
        self.paused = False
        self.rate = float(cfg["rate"])
        self.scale = float(cfg["cadence_scale"])
        self.rest_fail_q: list = []    # [[status, n, body, headers]]
        # fault: refuse WebSocket handshakes (HTTP 503) until this monotonic time; trades keep
        # being generated meanwhile, so a test can cut a collector off for exactly N seconds
        self.refuse_until = 0.0
        # every REST answer as (wall time, path, status): lets tests check pacing and back-off
        self.rest_log = collections.deque(maxlen=20000)
        self.replay = None
        self.universe = universe
        self.insts = self.build_instruments()
        self.by_topic_sym: dict = {}
        self.ws_server = None
        self.rest_server = None
        self.tasks: list = []
        # fault: topics whose subscribe the exchange refuses (topic -> reason text or None)
        self.rejected: dict = {}
        rt = (cfg.get("reject_topics") or {}).get(self.name) or ()
        for t in ([rt] if isinstance(rt, str) else rt):
            self.rejected[t] = rt[t] if isinstance(rt, dict) else None
        # fault: quiet symbols (sym -> expiry monotonic or None)
        self.quieted: dict = {}
        qs = (cfg.get("quiet_symbols") or {}).get(self.name) or ()
        for sym in ([qs] if isinstance(qs, str) else qs):
            self.quiet(sym, None)

    # ------------------------------------------------------------------ sending
    def publish(self, topic: str, text: str, rows, wtext: str | None = None) -> int:
        subs = self.index.get(topic)
        if not subs:
            return 0
        fr = fw = None
        n = 0
        mono = self.mono
        slow = None
        for c in subs:
            if wtext is not None and c.wrapped:
                if fw is None:
                    fw = ws_frame(wtext.encode())
                f = fw
            else:
                if fr is None:
                    fr = ws_frame(text.encode())
                f = fr
            t = c.transport
            if t.is_closing():          # lost but connection_lost() not yet delivered
                continue
            t.write(f)
            c.frames_sent += 1
            c.last_push = mono
            n += 1
            if c.paused and t.get_write_buffer_size() > self.max_buffer:
                slow = slow or []
                slow.append(c)
        fc = self.c.frames
        fc[topic] = fc.get(topic, 0) + n
        rc = self.c.rows
        for ds, k in rows:
            rc[ds] += k * n
        if slow:
            for c in slow:
                self.c.n["closed_slow"] += 1
                self.detach(c)
                c.transport.abort()
        return n

    def send_to(self, conn, topic: str, text: str, rows) -> bool:
        """Data frame to one socket (initial snapshots)."""
        if not conn.write_frame(ws_frame(text.encode())):
            return False
        conn.frames_sent += 1
        conn.last_push = time.monotonic()
        fc = self.c.frames
        fc[topic] = fc.get(topic, 0) + 1
        for ds, k in rows:
            self.c.rows[ds] += k
        return True

    def control(self, conn, text) -> bool:
        data = text if isinstance(text, bytes) else text.encode()
        if conn.write_frame(ws_frame(data)):
            self.c.n["control_frames"] += 1
            return True
        return False

    # ------------------------------------------------------------- subscriptions
    def deliver(self, conn, topic):
        if conn.muted or conn.detached:
            return
        self.index.setdefault(topic, {})[conn] = None

    def undeliver(self, conn, topic):
        d = self.index.get(topic)
        if d is not None:
            d.pop(conn, None)
            if not d:
                del self.index[topic]

    def detach(self, conn):
        """Stop all writes to a socket (closing, closed, muted)."""
        if conn.detached:
            return
        conn.detached = True
        for t in conn.subs:
            self.undeliver(conn, t)

    def close_conn(self, conn, code: int, reason: str, counter: str):
        if conn.closing:
            return
        conn.closing = True
        self.detach(conn)
        self.c.n[counter] += 1
        asyncio.ensure_future(conn.close(code, reason))

    # ------------------------------------------------------------- ws lifecycle
    def process_request(self, conn, request):
        u = urllib.parse.urlsplit(request.path)
        kind = self.parse_path(u.path)
        if kind is None:
            self.c.n["connections_rejected"] += 1
            return conn.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if time.monotonic() < self.refuse_until:
            self.c.n["connections_rejected"] += 1
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        r = self.admit(conn)
        if r is not None:
            self.c.n["connections_rejected"] += 1
            return r
        conn.ex = self
        conn.path = u.path
        conn.st["kind"] = kind
        conn.st["query"] = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
        return None

    def admit(self, conn):
        return None

    async def handler(self, conn: SimConnection):
        self.conns[conn.sim_id] = conn
        self.c.n["connections_opened"] += 1
        try:
            self.on_open(conn)
            async for msg in conn:
                conn.last_client_msg = time.monotonic()
                if conn.muted:
                    continue
                try:
                    self.on_text(conn, msg)
                except Exception:  # pragma: no cover - a bug must not look like a protocol close
                    import traceback
                    traceback.print_exc()
        except ConnectionClosed:
            pass
        finally:
            self.detach(conn)
            self.conns.pop(conn.sim_id, None)

    async def keepalive_loop(self):
        while True:
            await asyncio.sleep(0.1)
            mono = time.monotonic()
            for conn in list(self.conns.values()):
                if conn.muted or conn.closing or conn.detached:
                    continue
                try:
                    self.keepalive(conn, mono)
                except Exception:  # pragma: no cover - never kill the loop
                    pass
            if self.silenced:
                exp = [t for t, e in self.silenced.items() if e is not None and e <= mono]
                for t in exp:
                    self.unsilence(t)
            if self.quieted:
                exp = [t for t, e in self.quieted.items() if e is not None and e <= mono]
                for t in exp:
                    self.unquiet(t)

    # ---------------------------------------------------------------- generation
    def gen_count(self, r: float) -> int:
        """Events in this tick for expected count r (Bernoulli/Poisson-ish, cheap)."""
        n = int(r)
        if self.rng.random() < r - n:
            n += 1
        return n

    async def generator_loop(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            mono = time.monotonic()
            dt = min(mono - last, 0.5)
            last = mono
            self.mono = mono
            if self.paused:
                continue
            now_ms = int(time.time() * 1000)
            try:
                if self.replay is not None:
                    self.replay_tick(dt)
                else:
                    self.gen_tick(now_ms, dt)
            except Exception:  # pragma: no cover
                import traceback
                traceback.print_exc()

    def gen_tick(self, now_ms: int, dt: float):
        rb = self.rate * dt
        rt = self.rate * 0.5 * dt
        gc = self.gen_count
        for inst in self.insts:
            if inst.quiet:                  # no trades, no book changes: no event-driven frames
                continue
            if not inst.silent_bbo:
                for _ in range(gc(rb)):
                    self.ev_bbo(inst, now_ms)
            if not inst.silent_trades:
                for _ in range(gc(rt)):
                    self.ev_trade(inst, now_ms)
        self.periodic(now_ms)

    def take_skip(self, topics, want: int) -> tuple:
        """Cap a trade batch by pending skip counts; returns (count, skipped_topics)."""
        skipped = ()
        for t in topics:
            p = self.skip.get(t)
            if p:
                want = min(want, p)
                skipped += (t,)
        return want, skipped

    def consume_skip(self, topic: str, ids: int):
        p = self.skip.get(topic, 0) - ids
        if p <= 0:
            self.skip.pop(topic, None)
        else:
            self.skip[topic] = p
        sk = self.c.skipped_ids
        sk[topic] = sk.get(topic, 0) + ids

    def count_trades(self, sym: str, n: int):
        tg = self.c.trades_generated
        tg[sym] = tg.get(sym, 0) + n

    # ------------------------------------------------------------------ replay
    def load_replay(self, files, rate, loop):
        items = []
        for fn in files:
            with open(fn, "r", encoding="utf-8", newline="") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if line:
                        items.extend(self.replay_items(line))
        self.replay = {"items": items, "pos": 0, "rate": float(rate), "loop": loop, "acc": 0.0}

    def replay_tick(self, dt):
        rp = self.replay
        rp["acc"] += rp["rate"] * dt
        items = rp["items"]
        while rp["acc"] >= 1.0 and items:
            if rp["pos"] >= len(items):
                if not rp["loop"]:
                    rp["acc"] = 0.0
                    return
                rp["pos"] = 0
            topic, text, rows, wtext = items[rp["pos"]]
            rp["pos"] += 1
            rp["acc"] -= 1.0
            if topic in self.silenced:
                continue
            self.publish(topic, text, rows, wtext)

    # ------------------------------------------------------------------- faults
    def silence(self, topic, seconds):
        self.silenced[topic] = None if seconds is None else time.monotonic() + seconds
        self._apply_silence()

    def unsilence(self, topic):
        self.silenced.pop(topic, None)
        self._apply_silence()

    def _apply_silence(self):
        for inst in self.insts:
            inst.silent_bbo = inst.silent_trades = False
            inst.silent_other = set()
        for t in self.silenced:
            tgt = self.topic_target(t)
            if tgt is None:
                continue
            inst, kind = tgt
            if kind == "bbo":
                inst.silent_bbo = True
            elif kind == "trades":
                inst.silent_trades = True
            else:
                inst.silent_other.add(kind)

    def reject(self, topic, reason=None):
        """Refuse subscribes naming `topic` (existing subscriptions are left alone)."""
        self.rejected[topic] = reason

    def unreject(self, topic):
        self.rejected.pop(topic, None)

    def lookup(self, symbol):
        return getattr(self, "by_sym", {}).get(symbol)

    def quiet_start(self, inst):
        pass

    def _quiet_inst(self, symbol):
        inst = self.lookup(symbol)
        if inst is None:
            raise ValueError(f"{self.name}: unknown symbol {symbol!r}")
        return inst

    def quiet(self, symbol, seconds):
        """No trades and no book changes for `symbol` (native name) for `seconds` (None: until
        unquiet).  Periodic channels go on; "resend when unchanged" timers start now at latest."""
        inst = self._quiet_inst(symbol)
        self.quieted[inst.sym] = None if seconds is None else time.monotonic() + float(seconds)
        inst.quiet = True
        self.quiet_start(inst)

    def unquiet(self, symbol):
        inst = self._quiet_inst(symbol)
        self.quieted.pop(inst.sym, None)
        inst.quiet = False

    def drop_connections(self):
        for c in list(self.conns.values()):
            if c.transport is not None and not c.transport.is_closing():
                self.c.n["closed_by_fault"] += 1
            self.detach(c)
            c.closing = True
            c.transport.abort()

    def close_connections(self, code, reason):
        for c in list(self.conns.values()):
            if not c.muted:
                self.close_conn(c, code, reason, "closed_by_fault")

    def half_open(self, seconds):
        loop = asyncio.get_running_loop()
        muted = []
        for c in list(self.conns.values()):
            if c.closing or c.muted:
                continue
            self.detach(c)
            c.muted = True
            c.transport.pause_reading()
            muted.append(c)

        def _resume():
            for c in muted:
                t = c.transport
                if t is not None and not t.is_closing():
                    try:
                        t.resume_reading()
                    except Exception:
                        pass
        loop.call_later(seconds, _resume)
        return len(muted)

    def send_raw(self, payload, n):
        data = payload if isinstance(payload, (bytes, bytearray)) else payload.encode()
        frame = ws_frame(bytes(data))
        sent = 0
        for c in list(self.conns.values()):
            for _ in range(n):
                if c.write_frame(frame):
                    sent += 1
        self.c.n["raw_frames"] += sent
        return sent

    def rest_fail(self, status, n, body, headers=None):
        self.rest_fail_q.append([int(status), int(n), body, dict(headers or {})])

    def refuse_connections(self, seconds):
        """Refuse new WebSocket handshakes for `seconds` (0 = accept again at once)."""
        self.refuse_until = time.monotonic() + seconds if seconds > 0 else 0.0

    # --------------------------------------------------------------------- REST
    def handle_rest(self, method, path, query):
        status, headers, body = self._handle_rest(method, path, query)
        self.rest_log.append((time.time(), path, status))
        return status, headers, body

    def _handle_rest(self, method, path, query):
        self.c.n["rest_requests"] += 1
        if self.rest_fail_q:
            f = self.rest_fail_q[0]
            f[1] -= 1
            if f[1] <= 0:
                self.rest_fail_q.pop(0)
            status, body = f[0], f[2]
            if body is None:
                body = self.fail_body(status)
            self.count_status(status)
            return status, dict(f[3]), body
        try:
            status, headers, body = self.rest(path, query)
        except Exception as e:  # pragma: no cover
            status, headers, body = 500, {}, dumps({"error": repr(e)})
        self.count_status(status)
        return status, headers, body

    def count_status(self, status):
        n = self.c.n
        if status == 429:
            n["rest_429"] += 1
        elif status == 418:
            n["rest_418"] += 1
        elif status == 403:
            n["rest_403"] += 1
        elif status >= 500:
            n["rest_5xx"] += 1

    # ---------------------------------------------------------------- snapshots
    def conn_info(self):
        out = []
        for c in list(self.conns.values()):
            out.append({"id": c.sim_id, "path": c.path, "subscriptions": list(c.subs),
                        "connected_at": c.connected_at, "frames_sent": c.frames_sent,
                        "client_pings": c.client_pings, "muted": c.muted})
        return out


async def _http_conn(ex: ExchangeBase, reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            parts = line.decode("latin1").strip().split(" ")
            if len(parts) < 2:
                break
            method, target = parts[0], parts[1]
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin1").partition(":")
                headers[k.strip().lower()] = v.strip()
            clen = int(headers.get("content-length") or 0)
            if clen:
                await reader.readexactly(clen)
            u = urllib.parse.urlsplit(target)
            q = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
            status, hdrs, body = ex.handle_rest(method, u.path, q)
            b = body.encode() if isinstance(body, str) else body
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "I'm a teapot" if status == 418 else "Error"
            ctype = "application/json" if b[:1] in (b"{", b"[") else "text/plain"
            head = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {ctype}",
                    f"Content-Length: {len(b)}"]
            close = headers.get("connection", "").lower() == "close"
            head.append("Connection: close" if close else "Connection: keep-alive")
            for k, v in hdrs.items():
                head.append(f"{k}: {v}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b)
            await writer.drain()
            if close:
                break
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def start_exchange(ex: ExchangeBase, host: str, ws_port: int, rest_port: int):
    ex.mono = time.monotonic()
    ex.ws_server = await serve(ex.handler, host, ws_port, compression=None,
                               process_request=ex.process_request, ping_interval=None,
                               ping_timeout=None, close_timeout=2, max_size=2 ** 22,
                               create_connection=SimConnection, write_limit=2 ** 20)
    ex.rest_server = await asyncio.start_server(lambda r, w: _http_conn(ex, r, w), host, rest_port)
    wp = ex.ws_server.sockets[0].getsockname()[1]
    rp = ex.rest_server.sockets[0].getsockname()[1]
    ex.tasks = [asyncio.ensure_future(ex.generator_loop()), asyncio.ensure_future(ex.keepalive_loop())]
    return {"ws": f"ws://{host}:{wp}", "rest": f"http://{host}:{rp}"}


class LoopThread:
    """Owns the background asyncio loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="sim-loop", daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self):
        self.thread.start()

    def call(self, fn, *args, timeout=10.0):
        """Run fn(*args) (sync or coroutine function) on the loop and return its result."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("Simulator API called from the simulator loop thread")

        async def _w():
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(_w(), self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
