"""The one state object: every thread reports into it, the heartbeat and the API read from it.

Per-frame counters (frames received, dropped) live on the connection objects that own them
(one writer thread each, so a plain `+=` is safe under the GIL); everything else is counted per
batch or per event through `count()`, under a lock. Readers aggregate on demand.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

COUNTERS = ("frames_received", "frames_dropped", "frames_unparsed", "frames_written",
            "rows_rejected", "reconnects", "gaps", "subscription_errors",
            "files_written", "bytes_written", "files_uploaded", "bytes_uploaded", "upload_failures")


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
        self.gap_log: list[dict] = []

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

    def uptime(self) -> float:
        return self.clock() - self.started_at
