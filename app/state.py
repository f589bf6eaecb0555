"""The one state object: every thread reports into it, the heartbeat and the API read from it.

Per-frame counters (frames received, dropped) live on the connection objects that own them
(one writer thread each, so a plain `+=` is safe under the GIL); everything else is counted per
batch or per event through `count()`, under a lock. Readers aggregate on demand.

The Monitor (below) is the only place that decides the state (READY / DEGRADED / OFFLINE /
ERROR). It runs once a second: it samples the totals and the queue, keeps the rolling
per-minute buckets of the last 15 minutes and the evaluation window, evaluates the rules, logs
every `state_change`, and emits a `heartbeat` every `heartbeat_interval`. Working from
once-a-second samples keeps everything off the per-frame path: the sockets only do `+= 1`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque

from app import logs

log = logs.get()

COUNTERS = ("frames_received", "frames_dropped", "frames_unparsed", "frames_written",
            "rows_rejected", "reconnects", "gaps", "subscription_errors", "subscriptions_rejected",
            "files_written", "bytes_written", "files_uploaded", "bytes_uploaded", "upload_failures")

READY, DEGRADED, OFFLINE, ERROR = "READY", "DEGRADED", "OFFLINE", "ERROR"
STATES = (READY, DEGRADED, OFFLINE, ERROR)
_SEVERITY = {READY: 0, DEGRADED: 1, OFFLINE: 2, ERROR: 3}
HISTORY_MINUTES = 15
_SUB_RANK = {"live": 0, "pending": 1, "rejected": 2}
PENDING_LISTED = 20            # pending stream names shown in /status (the count is always whole)

# What the monitor samples once a second, per exchange: name in the sample -> state counter.
_SAMPLED = (("msgs", "frames_received"), ("drops", "frames_dropped"), ("unparsed", "frames_unparsed"),
            ("gaps", "gaps"), ("reconnects", "reconnects"), ("rows", "rows_written"),
            ("files", "files_written"), ("bytes", "bytes_written"),
            ("files_uploaded", "files_uploaded"), ("bytes_uploaded", "bytes_uploaded"),
            ("spool_drops", "frames_dropped_spool_full"))


class State:
    def __init__(self, *, version: str = "", instance_id: str = "", run_id: str = "",
                 exchanges=(), queue=None, clock=time.time):
        self.version = version
        self.instance_id = instance_id
        self.run_id = run_id
        self.clock = clock
        self.started_at = clock()
        self.exchanges = tuple(exchanges)
        self.queue = queue
        self._lock = threading.Lock()
        self._counts: dict[tuple, int] = defaultdict(int)   # (counter, exchange, dataset|"") -> n
        self.connections: dict[str, object] = {}             # name -> feed.Connection (live)
        self.closed_totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # exch -> [recv, dropped]
        self.writer_error: str | None = None
        self.fatal_error: str | None = None
        self.writer_oldest_pending_ns: int | None = None
        self.silent_streams: dict[str, dict[str, float]] = defaultdict(dict)  # exch -> key -> since
        self.unsupported: dict[str, dict[str, str]] = defaultdict(dict)       # exch -> dataset -> why
        self.upload_backlog = {"files": 0, "bytes": 0, "oldest_age_s": 0.0}
        self.spool_usage: dict = {}    # S3 only, set by storage_s3 every second: bytes, budget, ratio, full
        self.storage_problem: dict | None = None   # S3 only: the store does not answer (setting, reason)
        self.discovery: dict[str, dict] = {}       # exchange -> what discovery is doing (collector)
        self.data_dir: str | None = None           # for the disk-free gauge
        self.shard, self.replica = "0/1", ""       # which part of the universe this instance records
        self.gap_log: list[dict] = []
        # gap detector (app/gaps.py, app/alignment.py): latest gaps per exchange (gap_detected
        # records + "at"), the last alignment_done summary, the measured server clock offset
        self.recent_gaps: dict[str, deque] = defaultdict(lambda: deque(maxlen=500))
        self.last_alignment: dict[str, dict] = {}
        self.clock_offset: dict[str, dict] = {}   # exch -> {offset_ms, rtt_ms, measured_at}
        # decided by the Monitor only; read by the API
        self.state = OFFLINE
        self.reasons: list[str] = ["starting"]
        self.details: dict = {}
        self.state_since = self.started_at
        self.stopping = False          # set by the collector when it starts draining
        self.monitor: "Monitor | None" = None

    # ---- writes -----------------------------------------------------------------------------
    def count(self, counter: str, exchange: str, n: int = 1, dataset: str = "") -> None:
        with self._lock:
            self._counts[(counter, exchange, dataset)] += n

    def register_connection(self, conn) -> None:
        with self._lock:
            self.connections[conn.name] = conn

    def retire_connection(self, conn) -> None:
        """A closed connection's per-frame counters move into the exchange totals."""
        with self._lock:
            if self.connections.pop(conn.name, None) is not None:
                totals = self.closed_totals[conn.exchange]
                totals[0] += conn.received
                totals[1] += conn.dropped

    # ---- reads ------------------------------------------------------------------------------
    def frames(self, exchange: str) -> tuple[int, int]:
        """(received, dropped) for an exchange, live connections included."""
        with self._lock:
            recv, dropped = self.closed_totals[exchange]
            for c in self.connections.values():
                if c.exchange == exchange:
                    recv += c.received
                    dropped += c.dropped
        return recv, dropped

    def total(self, counter: str, exchange: str | None = None, dataset: str | None = None) -> int:
        if counter in ("frames_received", "frames_dropped"):
            idx = 0 if counter == "frames_received" else 1
            return sum(self.frames(e)[idx] for e in (self.exchanges if exchange is None else (exchange,)))
        with self._lock:
            return sum(v for (c, e, d), v in self._counts.items()
                       if c == counter and (exchange is None or e == exchange)
                       and (dataset is None or d == dataset))

    def counters(self) -> dict:
        """Every counter, per exchange (and per dataset where it has one)."""
        out: dict = {}
        for ex in self.exchanges:
            recv, dropped = self.frames(ex)
            out[ex] = {"frames_received": recv, "frames_dropped": dropped}
        with self._lock:
            items = list(self._counts.items())
        for (c, e, d), v in items:
            slot = out.setdefault(e, {})
            if d:
                slot.setdefault(c, {})
                if isinstance(slot[c], dict):
                    slot[c][d] = slot[c].get(d, 0) + v
            else:
                slot[c] = slot.get(c, 0) + v if not isinstance(slot.get(c), dict) else slot[c]
        return out

    def gap_status(self, exchange: str, now: float | None = None, window_s: float = 900.0) -> dict:
        """Gaps of the last 15 minutes per kind, the latest few, last alignment, clock offset."""
        now = self.clock() if now is None else now
        recent = [g for g in list(self.recent_gaps.get(exchange, ())) if g.get("at", 0) >= now - window_s]
        kinds: dict[str, int] = {}
        for g in recent:
            kinds[g["kind"]] = kinds.get(g["kind"], 0) + 1
        return {"gaps_15m": len(recent), "gaps_15m_by_kind": kinds, "latest_gaps": recent[-10:],
                "last_alignment": self.last_alignment.get(exchange),
                "clock_offset": self.clock_offset.get(exchange)}

    def uptime(self) -> float:
        return self.clock() - self.started_at

    def counter_items(self) -> list[tuple[str, str, str, int]]:
        """Every counter as flat (counter, exchange, dataset or "", value) rows: /metrics."""
        rows = []
        for ex in self.exchanges:
            recv, dropped = self.frames(ex)
            rows.append(("frames_received", ex, "", recv))
            rows.append(("frames_dropped", ex, "", dropped))
        with self._lock:
            items = list(self._counts.items())
        rows.extend((c, e, d, v) for (c, e, d), v in sorted(items))
        return rows

    def totals(self) -> dict[str, dict[str, int]]:
        """The sampled counters per exchange, summed over datasets (one pass, one lock)."""
        wanted = {c: name for name, c in _SAMPLED}
        out = {ex: {name: 0 for name, _c in _SAMPLED} for ex in self.exchanges}
        with self._lock:
            for ex in self.exchanges:
                recv, dropped = self.closed_totals[ex]
                out[ex]["msgs"], out[ex]["drops"] = recv, dropped
            for c in self.connections.values():
                slot = out.get(c.exchange)
                if slot is not None:
                    slot["msgs"] += c.received
                    slot["drops"] += c.dropped
            for (c, e, _d), v in self._counts.items():
                name = wanted.get(c)
                if name is not None and name not in ("msgs", "drops") and e in out:
                    out[e][name] += v
        return out

    def connection_status(self) -> dict[str, list[dict]]:
        """feed.Connection.status() of every live connection, per exchange."""
        with self._lock:
            conns = list(self.connections.values())
        out: dict[str, list[dict]] = {ex: [] for ex in self.exchanges}
        for c in conns:
            try:
                st = c.status()
            except Exception:  # noqa: BLE001 - a connection mid-teardown must not break a reader
                continue
            out.setdefault(c.exchange, []).append(st)
        return out

    def subscriptions(self) -> dict[str, dict]:
        """Per exchange, every requested stream once: live if any connection has it live (a
        rotation overlaps two), else pending, else rejected; with the rejected ones' reasons."""
        with self._lock:
            conns = list(self.connections.values())
        best: dict[str, dict[str, tuple[str, str]]] = {ex: {} for ex in self.exchanges}
        for c in conns:
            try:
                subs = c.subscriptions()
            except Exception:  # noqa: BLE001 - a connection mid-teardown must not break a reader
                continue
            mine = best.setdefault(c.exchange, {})
            for key, (status, reason) in subs.items():
                old = mine.get(key)
                if old is None or _SUB_RANK[status] < _SUB_RANK[old[0]]:
                    mine[key] = (status, reason)
        out = {}
        for ex, streams in best.items():
            statuses = [st for st, _r in streams.values()]
            out[ex] = {"requested": len(streams), "live": statuses.count("live"),
                       "pending": statuses.count("pending"), "rejected": statuses.count("rejected"),
                       "rejected_streams": {k: r for k, (st, r) in sorted(streams.items())
                                            if st == "rejected"},
                       "pending_streams": sorted(k for k, (st, _r) in streams.items()
                                                 if st == "pending")[:PENDING_LISTED]}
        return out

    def queue_figures(self, now_ns: int | None = None) -> dict:
        """Queue size/capacity/utilisation and the writer lag (oldest frame not yet in a spool)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        q = self.queue
        size = q.qsize() if q is not None else 0
        cap = q.maxsize if q is not None and q.maxsize > 0 else 0
        oldest_queued = None
        if q is not None:
            oldest_queued = q.oldest_ts_recv()
        pending = self.writer_oldest_pending_ns
        ages = [now_ns - t for t in (pending, oldest_queued) if t]
        return {"size": size, "capacity": cap,
                "utilisation": round(size / cap, 4) if cap else 0.0,
                "oldest_queued_age_s": _age(now_ns, oldest_queued),
                "oldest_pending_age_s": _age(now_ns, pending),
                "writer_lag_s": round(max(0, max(ages)) / 1e9, 3) if ages else 0.0}


def _age(now_ns: int, ts_ns: int | None) -> float | None:
    return round(max(0, now_ns - ts_ns) / 1e9, 3) if ts_ns else None


def _diff(cur: dict, base: dict) -> dict:
    """Per-exchange counter deltas, never negative (a counter only grows)."""
    return {ex: {k: max(0, v - base.get(ex, {}).get(k, 0)) for k, v in vals.items()}
            for ex, vals in cur.items()}


def iso_seconds(t: float) -> str:
    """Epoch seconds -> ISO 8601 UTC to the second, as /status and the logs show times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Monitor:
    """Samples once a second; decides the state; keeps the 15-minute history; heartbeat.

    `tick(now)` does one second's work and is what the tests drive with an injected clock;
    `start()` runs it in a thread. Thresholds come from settings (degraded_*; heartbeat_interval).
    """

    def __init__(self, state: State, settings, *, clock=None, writer_alive=None):
        self.state = state
        self.settings = settings
        self.clock = clock or state.clock
        self.writer_alive = writer_alive          # callable -> bool, or None
        self.window_s = float(getattr(settings, "degraded_window", 60.0))
        now = self.clock()
        first = {ex: {name: 0 for name, _c in _SAMPLED} for ex in state.exchanges}  # since start
        self._lock = threading.Lock()
        self._last = first                        # previous tick's totals
        self._window: deque = deque([(now, first)])
        self._buckets: deque = deque(maxlen=HISTORY_MINUTES)
        self._hb_t = now
        self._hb_due = now + settings.heartbeat_interval
        self._hb_totals = first
        self._hb_peak = 0.0
        self.last_heartbeat: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev_excepthook = None
        state.monitor = self

    # ---- the once-a-second work -----------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        st = self.state
        totals = st.totals()
        q = st.queue_figures(int(now * 1e9))
        delta = _diff(totals, self._last)
        self._last = totals
        dropped_now = any(d["drops"] for d in delta.values())
        util = q["utilisation"]
        peak = 1.0 if dropped_now else util        # a drop means the queue was full at some point
        with self._lock:
            prev = self._window[-1][0] if self._window else now
            if now < prev:                   # the wall clock stepped back (NTP, VM): shift our own
                step = prev - now            # times by the step, or heartbeats and the window wait
                self._window = deque((t - step, v) for t, v in self._window)   # as long as it
                self._hb_t -= step
                self._hb_due -= step
            self._add_to_bucket(now, delta, peak)
            self._hb_peak = max(self._hb_peak, peak)
            self._window.append((now, totals))
            while len(self._window) > 1 and self._window[1][0] <= now - self.window_s:
                self._window.popleft()
            base = self._window[0][1]
        self.evaluate(now, totals, base, q)
        if now >= self._hb_due - 0.1:          # ticks jitter by milliseconds around the second
            self.heartbeat(now, totals, q)

    def _add_to_bucket(self, now: float, delta: dict, peak: float) -> None:
        minute = int(now // 60)
        if not self._buckets or self._buckets[-1]["minute"] < minute:
            last = self._buckets[-1]["minute"] if self._buckets else minute - 1
            for m in range(max(last + 1, minute - HISTORY_MINUTES + 1), minute + 1):
                self._buckets.append({"minute": m, "msgs": 0, "rows": 0, "drops": 0, "unparsed": 0,
                                      "gaps": 0, "reconnects": 0, "queue_peak": 0.0,
                                      "by_exchange": {ex: {"msgs": 0, "drops": 0, "gaps": 0,
                                                           "reconnects": 0}
                                                      for ex in self.state.exchanges}})
        b = self._buckets[-1]
        for ex, d in delta.items():
            for k in ("msgs", "rows", "drops", "unparsed", "gaps", "reconnects"):
                b[k] += d[k]
            per = b["by_exchange"].setdefault(ex, {"msgs": 0, "drops": 0, "gaps": 0, "reconnects": 0})
            for k in per:
                per[k] += d[k]
        b["queue_peak"] = max(b["queue_peak"], round(peak, 4))

    def evaluate(self, now: float, totals: dict, base: dict, q: dict) -> str:
        """Apply the rules; every reason is named (and detailed); log any change."""
        st, s = self.state, self.settings
        reasons: list[tuple[str, str]] = []      # (state it implies, reason)
        details: dict = {}
        if st.writer_error:
            reasons.append((ERROR, "writer_error"))
            details["writer_error"] = st.writer_error
        if st.fatal_error:
            reasons.append((ERROR, "fatal_error"))
            details["fatal_error"] = st.fatal_error
        if self.writer_alive is not None and not st.stopping and not self.writer_alive():
            reasons.append((ERROR, "writer_stopped"))
        conns = st.connection_status()
        connected = {ex: sum(1 for c in cs if c.get("connected")) for ex, cs in conns.items()}
        if not any(connected.values()):
            reasons.append((OFFLINE, "no_connection"))
        else:
            down = [ex for ex, cs in conns.items() if cs and not connected[ex]]
            if down:
                reasons.append((DEGRADED, "exchange_offline"))
                details["exchange_offline"] = sorted(down)
        discovering = {ex: dict(d) for ex, d in list(st.discovery.items()) if d.get("status") != "done"}
        if discovering:        # no instruments yet: nothing of that exchange can be recorded
            reasons.append((DEGRADED, "discovering"))
            details["discovering"] = discovering
        if q["capacity"] and q["utilisation"] > s.degraded_queue_ratio:
            reasons.append((DEGRADED, "queue_utilisation"))
            details["queue_utilisation"] = q["utilisation"]
        win = _diff(totals, base)
        drops = {ex: d["drops"] for ex, d in win.items() if d["drops"]}
        if drops:
            reasons.append((DEGRADED, "drops"))
            details["drops"] = drops
        gaps = sum(d["gaps"] for d in win.values())
        gap_rate = gaps * 60.0 / self.window_s
        if gap_rate > s.degraded_gap_rate:
            reasons.append((DEGRADED, "gap_rate"))
            details["gap_rate"] = {"per_min": round(gap_rate, 2),
                                   "by_exchange": {ex: d["gaps"] for ex, d in win.items() if d["gaps"]}}
        subs = st.subscriptions()
        pending = {ex: v["pending"] for ex, v in subs.items() if v["pending"]}
        if pending and any(connected.values()):
            count = sum(pending.values())
            reasons.append((DEGRADED, "streams_pending"))
            details["streams_pending"] = {"count": count, "by_exchange": pending,
                                          "summary": f"{count} requested stream(s) not live yet"}
        rejected = {ex: v["rejected_streams"] for ex, v in subs.items() if v["rejected"]}
        if rejected:              # reported, not a degradation: the exchange refused them
            details["streams_rejected"] = rejected
        silent = {ex: sorted(keys) for ex, keys in list(st.silent_streams.items()) if keys}
        if silent:
            reasons.append((DEGRADED, "silent_streams"))
            details["silent_streams"] = silent
        spool_drops = {ex: d["spool_drops"] for ex, d in win.items() if d["spool_drops"]}
        if spool_drops:
            reasons.append((DEGRADED, "spool_drops"))
            details["spool_drops"] = spool_drops
        for reason, detail in self._upload_pressure():
            reasons.append((DEGRADED, reason))
            details[reason] = detail
        new = max((r[0] for r in reasons), key=_SEVERITY.__getitem__, default=READY)
        if st.stopping and new != ERROR:
            new = st.state                         # draining: closing sockets is not an outage
        names = [r for _s, r in sorted(reasons, key=lambda x: -_SEVERITY[x[0]])]
        old, old_reasons = st.state, st.reasons
        st.details = details
        if new != old:
            st.state, st.reasons, st.state_since = new, names, now
            log.log(logging.WARNING if _SEVERITY[new] > _SEVERITY[old] else logging.INFO,
                    "state_change", extra={"old": old, "new": new, "state": new, "reasons": names,
                                           "details": details})
        elif names != old_reasons and not st.stopping:
            st.reasons = names
            log.info("state_reasons", extra={"state": new, "reasons": names, "details": details})
        return new

    def _upload_pressure(self) -> list[tuple[str, dict]]:
        """S3 only (local storage has neither): spool usage near its budget (storage_s3 sets
        state.spool_usage every second) or an upload backlog whose oldest file is too old."""
        st, s = self.state, self.settings
        out = []
        problem = st.storage_problem
        if problem is not None:
            out.append(("storage_unavailable", dict(problem)))
        usage = dict(getattr(st, "spool_usage", None) or {})
        ratio = usage.get("ratio")
        if usage.get("full") or (ratio is not None and ratio >= s.degraded_spool_ratio):
            out.append(("spool_full" if usage.get("full") else "spool_near_full",
                        {k: usage.get(k) for k in ("bytes", "budget", "ratio")}))
        backlog = dict(st.upload_backlog or {})
        age = float(backlog.get("oldest_age_s") or 0.0)
        if age > s.degraded_upload_age:
            out.append(("upload_backlog", {"files": backlog.get("files", 0), "bytes": backlog.get("bytes", 0),
                                           "oldest_age_s": round(age, 1)}))
        return out

    def heartbeat(self, now: float, totals: dict | None = None, q: dict | None = None,
                  final: bool = False) -> dict:
        st = self.state
        totals = st.totals() if totals is None else totals
        q = st.queue_figures(int(now * 1e9)) if q is None else q
        with self._lock:
            d = _diff(totals, self._hb_totals)
            dt = max(1e-9, now - self._hb_t)
            peak = max(self._hb_peak, q["utilisation"])
            self._hb_t, self._hb_totals, self._hb_peak = now, totals, 0.0
            if not final:
                due = self._hb_due + self.settings.heartbeat_interval
                self._hb_due = due if due > now else now + self.settings.heartbeat_interval
        conns = st.connection_status()
        subs = st.subscriptions()
        exchanges = {}
        for ex, v in d.items():
            cs = conns.get(ex, [])
            sub = subs.get(ex, {})
            exchanges[ex] = {"connections": len(cs),
                             "connected": sum(1 for c in cs if c.get("connected")),
                             "msgs_per_s": round(v["msgs"] / dt, 2), "rows_per_s": round(v["rows"] / dt, 2),
                             "msgs": v["msgs"], "rows": v["rows"], "drops": v["drops"],
                             "unparsed": v["unparsed"], "spool_drops": v["spool_drops"],
                             "gaps": v["gaps"], "reconnects": v["reconnects"],
                             "files_written": v["files"], "bytes_written": v["bytes"],
                             "files_uploaded": v["files_uploaded"], "bytes_uploaded": v["bytes_uploaded"],
                             "silent_streams": len(st.silent_streams.get(ex, ())),
                             "streams": {k: sub.get(k, 0) for k in ("requested", "live", "pending", "rejected")}}
        beat = {"state": st.state, "reasons": list(st.reasons), "uptime_s": round(now - st.started_at, 1),
                "shard": st.shard, "replica": st.replica,
                "interval_s": round(dt, 3), "exchanges": exchanges,
                "queue": {"size": q["size"], "capacity": q["capacity"],
                          "utilisation": q["utilisation"], "peak": round(peak, 4)},
                "writer_lag_s": q["writer_lag_s"],
                "files_written": sum(v["files"] for v in d.values()),
                "bytes_written": sum(v["bytes"] for v in d.values()),
                "upload_backlog": dict(st.upload_backlog or {})}
        if getattr(st, "spool_usage", None):
            beat["spool_usage"] = dict(st.spool_usage)
        if final:
            beat["final"] = True
        self.last_heartbeat = beat
        log.info("heartbeat", extra=beat)
        return beat

    # ---- read models --------------------------------------------------------------------------
    def history(self, now: float | None = None) -> list[dict]:
        """The last 15 minutes, one bucket per minute (oldest first, current minute last)."""
        now = self.clock() if now is None else now
        current = int(now // 60)
        with self._lock:
            buckets = [dict(b, by_exchange={ex: dict(v) for ex, v in b["by_exchange"].items()})
                       for b in self._buckets if b["minute"] > current - HISTORY_MINUTES]
        for b in buckets:
            b["start"] = iso_seconds(b.pop("minute") * 60)
        return buckets

    def status(self, now: float | None = None) -> dict:
        """GET /status: what an operator needs at a glance. Nothing secret in here."""
        st = self.state
        now = self.clock() if now is None else now
        conns = st.connection_status()
        totals = st.totals()
        subs = st.subscriptions()
        exchanges = {}
        for ex in st.exchanges:
            cs = conns.get(ex, [])
            t = totals.get(ex, {})
            exchanges[ex] = {"connected": sum(1 for c in cs if c.get("connected")),
                             "connections": cs,
                             "frames_received": t.get("msgs", 0), "frames_dropped": t.get("drops", 0),
                             "frames_unparsed": t.get("unparsed", 0), "rows_written": t.get("rows", 0),
                             "gaps": t.get("gaps", 0), "reconnects": t.get("reconnects", 0),
                             "silent_streams": sorted(st.silent_streams.get(ex, {})),
                             "subscriptions": subs.get(ex),
                             "unsupported": dict(st.unsupported.get(ex, {})),
                             **st.gap_status(ex, now)}
        return {"state": st.state, "reasons": list(st.reasons), "details": st.details,
                "since": iso_seconds(st.state_since), "uptime_s": round(now - st.started_at, 1),
                "started_at": iso_seconds(st.started_at), "version": st.version,
                "instance_id": st.instance_id, "run_id": st.run_id, "stopping": st.stopping,
                "shard": st.shard, "replica": st.replica,
                "exchanges": exchanges, "queue": st.queue_figures(int(now * 1e9)),
                "writer_error": st.writer_error, "fatal_error": st.fatal_error,
                "discovery": {ex: dict(d) for ex, d in list(st.discovery.items())},
                "storage_problem": dict(st.storage_problem) if st.storage_problem else None,
                "upload_backlog": dict(st.upload_backlog or {}),
                "spool_usage": dict(getattr(st, "spool_usage", None) or {}) or None,
                "last_heartbeat": self.last_heartbeat,
                "last_15m": self.history(now)}

    # ---- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._prev_excepthook = threading.excepthook
        threading.excepthook = self._thread_died
        self.evaluate(self.clock(), self.state.totals(), self._last, self.state.queue_figures())
        self._thread = threading.Thread(target=self._run, name="state-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_t = time.monotonic() + 1.0
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            next_t += 1.0
            if next_t < time.monotonic():            # we were starved: do not burst to catch up
                next_t = time.monotonic() + 1.0
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the monitor must outlive any bug
                log.error("monitor_error", extra={"error": repr(e)})

    def _thread_died(self, args) -> None:
        """Every thread is built never to die; one that does is a fatal internal error."""
        name = args.thread.name if args.thread is not None else "?"
        if args.exc_type is not SystemExit:
            self.state.fatal_error = f"thread {name} died: {args.exc_value!r}"[:500]
            log.error("thread_died", extra={"thread": name, "error": repr(args.exc_value)[:500]})
        if self._prev_excepthook is not None:
            self._prev_excepthook(args)

    def stop(self, final_heartbeat: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._prev_excepthook is not None and threading.excepthook == self._thread_died:
            threading.excepthook = self._prev_excepthook
        if final_heartbeat:
            self.heartbeat(self.clock(), final=True)
