"""Gap detection: measure what the WebSocket did not say, in RAM; never fill (CONTRACT §1, §5).

Shared rules (used live and by bin/check_raw_sanity, so the same code decides in both places):
`SequenceTracker.observe(table)` walks a table of one (exchange, dataset) in arrival order and
reports every break of the dataset's SequenceRule per symbol. The baseline is the highest id
seen, so duplicates and overlaps (two connections during a rotation deliver the same trades)
are not gaps; a lower id is a replay/overlap, not a loss. `TimeGapTracker` finds silences longer
than max(gap_time_floor, gap_time_factor x cadence) on streams that have a cadence.

The live detector (`GapDetector`, one thread) is fed by the writer after each flush (the Arrow
tables it just spooled: `writer.observers`) and by the feed on every connect/disconnect
(`manager.listeners`); both only enqueue. Per stream it reports, as one `gap_detected` log and
one `gaps` count each:
- `sequence`: ids that skip (Binance aggTrade `a`, OKX trades `tradeId - count`), exact count;
- `time`: a cadenced stream silent longer than its limit (event-driven streams never: a quiet
  market is not a gap);
- `disconnect`: every stream of a connection that dropped, from the last frame before to the
  first frame after; for trade streams with the missed trades measured from ids, or from the
  REST alignment (app/alignment.py) where ids are not consecutive (Bybit). The sequence or time
  gap across a disconnect is that disconnect gap, reported once, never twice.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from app import logs
from app.exchanges import SequenceRule, Stream

log = logs.get()


@dataclass
class Gap:
    exchange: str
    dataset: str
    symbol: str
    kind: str               # "sequence" | "time" | "disconnect"
    from_id: int | None
    to_id: int | None
    missed: int | None      # ids missing between the two, where measurable
    ts_from: int            # ts_recv (ns) of the last row before the gap
    ts_to: int              # ts_recv (ns) of the first row after it

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _ints(table: pa.Table, column: str) -> list:
    col = table.column(column)
    if col.type != pa.int64():
        col = pc.cast(col, pa.int64(), safe=False) if pa.types.is_integer(col.type) else pc.cast(col, pa.int64())
    return col.to_pylist()


class SequenceTracker:
    """Per-symbol id continuity for one (exchange, dataset)."""

    def __init__(self, exchange: str, dataset: str, rule: SequenceRule):
        self.exchange = exchange
        self.dataset = dataset
        self.rule = rule
        self.last: dict[str, tuple[int, int]] = {}   # symbol -> (highest id, its ts_recv)

    def observe(self, table: pa.Table) -> list[Gap]:
        if table.num_rows == 0:
            return []
        ids = _ints(table, self.rule.column)
        counts = _ints(table, self.rule.count_column) if self.rule.count_column else None
        symbols = table.column("symbol").to_pylist()
        ts = table.column("ts_recv").to_pylist()
        last = self.last
        gaps = []
        for i, sym in enumerate(symbols):
            cur = ids[i]
            if cur is None:
                continue
            first = cur - counts[i] + 1 if counts is not None and counts[i] else cur
            prev = last.get(sym)
            if prev is None:
                last[sym] = (cur, ts[i])
                continue
            prev_id, prev_ts = prev
            if cur <= prev_id:
                continue                       # duplicate or overlap: not a loss
            if first > prev_id + 1:
                gaps.append(Gap(self.exchange, self.dataset, sym, "sequence", prev_id, first,
                                first - prev_id - 1, prev_ts, ts[i]))
            last[sym] = (cur, ts[i])
        return gaps

    def reset(self, symbol: str | None = None, baseline: int | None = None, ts: int = 0) -> None:
        """Forget (or re-seed) a symbol's baseline, e.g. after a measured reconnect."""
        if symbol is None:
            self.last.clear()
        elif baseline is None:
            self.last.pop(symbol, None)
        else:
            self.last[symbol] = (baseline, ts)


# ---- time gaps (added for bin/check_raw_sanity; usable by the live detector too) -----------------

def time_gap_limit_s(cadence_s: float | None, factor: float, floor: float) -> float | None:
    """Longest normal silence of a stream: max(floor, factor x cadence). None for event-driven
    streams (no cadence): their silence is normal market quiet, not a gap."""
    if not cadence_s:
        return None
    return max(floor, factor * cadence_s)


class TimeGapTracker:
    """Per-symbol silences longer than `limit_s` between rows of one (exchange, dataset).

    Vectorised (Arrow) per table: rows are ordered by (symbol, ts_recv) inside the table and the
    latest ts_recv per symbol is carried to the next table, so a gap across a file boundary is
    found too. A row older than the carried time (an overlap) never makes a gap.
    """

    def __init__(self, exchange: str, dataset: str, limit_s: float):
        self.exchange = exchange
        self.dataset = dataset
        self.limit_ns = int(limit_s * 1e9)
        self.last: dict[str, int] = {}    # symbol -> latest ts_recv seen

    def observe(self, table: pa.Table) -> list[Gap]:
        n = table.num_rows
        if n == 0:
            return []
        sym = table.column("symbol")
        if pa.types.is_dictionary(sym.type):
            sym = pc.cast(sym, pa.string())
        t = pa.table({"s": sym, "t": table.column("ts_recv")})
        t = t.take(pc.sort_indices(t, sort_keys=[("s", "ascending"), ("t", "ascending")]))
        s, ts = t.column("s").combine_chunks(), t.column("t").combine_chunks()
        # group starts: row 0 and every row whose symbol differs from the previous one
        changed = pc.not_equal(s.slice(1), s.slice(0, n - 1))
        starts = [0] + [i + 1 for i in pc.indices_nonzero(changed).to_pylist()]
        ends = starts[1:] + [n]
        gaps = []
        big = pc.greater(pc.pairwise_diff(ts), self.limit_ns)     # index i: ts[i] - ts[i-1]
        inside = pc.and_(big.slice(1), pc.invert(changed)) if n > 1 else pa.array([], pa.bool_())
        for i in pc.indices_nonzero(inside).to_pylist():
            a, b = ts[i].as_py(), ts[i + 1].as_py()
            gaps.append(Gap(self.exchange, self.dataset, s[i].as_py(), "time", None, None, None, a, b))
        last, limit = self.last, self.limit_ns
        symbols = s.take(pa.array(starts)).to_pylist()
        firsts = ts.take(pa.array(starts)).to_pylist()
        latests = ts.take(pa.array([e - 1 for e in ends])).to_pylist()
        for symbol, first, latest in zip(symbols, firsts, latests):
            prev = last.get(symbol)
            if prev is not None and first - prev > limit:
                gaps.append(Gap(self.exchange, self.dataset, symbol, "time", None, None, None, prev, first))
            if prev is None or latest > prev:
                last[symbol] = latest
        return gaps


# ---- the live detector ---------------------------------------------------------------------------

ALIGN_DETAIL_MAX = 100       # per-symbol lines in one alignment_done log


@dataclass
class _Hole:
    """One stream of a dropped connection, until its disconnect gap is reported."""
    stream: Stream
    last_id: str | None = None     # last trade id before the disconnect (WS)
    last_ts: int | None = None
    first_id: str | None = None    # first trade id after (first of an aggregation)
    first_ts: int | None = None
    absorbed: Gap | None = None    # the tracker's sequence gap across the disconnect
    done: bool = False


@dataclass
class _Outage:
    """A connection that dropped (not stopped, not rotated) and the streams it carried."""
    id: int
    exchange: str
    conn_name: str
    old_conn_id: int
    ts_last: int                   # ns: last frame on the old socket
    ts_down: int                   # ns: the old socket closed
    holes: dict = field(default_factory=dict)           # stream key -> _Hole
    align: dict = field(default_factory=dict)           # symbol -> trades stream key (to align)
    new_conn_id: int | None = None
    ts_up: int | None = None       # ns: the new socket opened
    ts_first: int | None = None    # ns: first frame on the new socket
    submitted: bool = False
    aligned: dict = field(default_factory=dict)         # symbol -> worker result
    aligned_at: dict = field(default_factory=dict)      # symbol -> detector clock
    results: dict = field(default_factory=dict)         # symbol -> measured figures
    ts_stop: int | None = None     # ns: the collector stopped before the stream came back

    @property
    def ts_to(self) -> int:
        """End of the hole: the first frame after it, else the stop, the reconnect, the close."""
        return self.ts_first or self.ts_stop or self.ts_up or self.ts_down


def _group_last(table: pa.Table, columns: list[str]) -> dict:
    """symbol -> tuple of the last value of each column (arrival order)."""
    agg = table.group_by("symbol", use_threads=False).aggregate([(c, "last") for c in columns])
    cols = [agg.column(f"{c}_last").to_pylist() for c in columns]
    return {s: tuple(col[i] for col in cols) for i, s in enumerate(agg.column("symbol").to_pylist())}


class GapDetector:
    """One thread: tables from the writer, connection events from the feed, REST results from the
    alignment workers, all through one queue, so every piece of state here has one owner.

    `process(exchange, tables)` (one flush of one exchange) and `tick(now)` are what the unit
    tests drive directly, with an injected clock."""

    def __init__(self, settings, state, adapters: dict, streams: dict | None = None, *,
                 clock=time.time, workers: dict | None = None):
        self.settings = settings
        self.state = state
        self.adapters = adapters
        self.clock = clock
        self.workers = workers if workers is not None else {}
        self.q: queue.Queue = queue.Queue()
        self.seq: dict[tuple[str, str], SequenceTracker] = {}
        for ex, adapter in adapters.items():
            for ds, rule in adapter.GAP_RULES.items():
                self.seq[(ex, ds)] = SequenceTracker(ex, ds, rule)
        self.channels: dict[str, dict[str, tuple]] = {ex: {} for ex in adapters}  # ch -> (datasets, limit_s)
        self.ds_channel: dict[str, dict[str, str]] = {ex: {} for ex in adapters}
        self.keys: dict[tuple[str, str, str], str] = {}           # (ex, channel, symbol) -> key
        self.timers: dict[tuple[str, str], TimeGapTracker] = {}   # (ex, channel)
        self.outages: dict[int, _Outage] = {}
        self.by_conn: dict[tuple[str, str], _Outage] = {}
        self.hole_of: dict[tuple[str, str], _Outage] = {}
        self.windows: dict[tuple[str, str], tuple[int, int]] = {}  # last (ts_last, ts_down) per key
        self.last_trade: dict[tuple[str, str], tuple] = {}       # UUID exchanges: (id, ts_recv)
        self._ids = itertools.count(1)
        self._group: tuple[str, dict] | None = None
        self._thread: threading.Thread | None = None
        for ex, lst in (streams or {}).items():
            for st in lst:
                self.register(ex, st)

    # ---- inputs (any thread: only enqueue) ---------------------------------------------------------
    def observe(self, exchange: str, dataset: str, table: pa.Table) -> None:
        """writer.observers: called in the writer thread after each flush."""
        self.q.put(("table", exchange, dataset, table))

    def on_connection(self, event: str, conn, conn_id: int, was_connected: bool = True) -> None:
        """manager.listeners: called in the connection's socket thread on open and close."""
        if event == "close":
            self.q.put(("close", conn.exchange, conn.name, conn_id, conn.last_frame_ns, time.time_ns(),
                        list(conn.plan.streams), was_connected, conn.stopped))
        elif event == "open":
            self.q.put(("open", conn.exchange, conn.name, conn_id, time.time_ns(), conn))

    def post(self, kind: str, outage_id: int, symbol: str, result: dict) -> None:
        """AlignmentWorker results."""
        self.q.put((kind, outage_id, symbol, result))

    def add_streams(self, exchange: str, streams: list) -> None:
        """Streams planned after start (discovery runs beside the detector, listings change)."""
        self.q.put(("streams", exchange, list(streams)))

    # ---- stream metadata ---------------------------------------------------------------------------
    def register(self, exchange: str, st: Stream) -> None:
        self.keys[(exchange, st.channel, st.symbol)] = st.key
        chans = self.channels.setdefault(exchange, {})
        if st.channel not in chans:
            s = self.settings
            limit = time_gap_limit_s(st.cadence_s, s.gap_time_factor, s.gap_time_floor)
            chans[st.channel] = (tuple(st.datasets), limit)
            if limit:
                self.timers[(exchange, st.channel)] = TimeGapTracker(exchange, st.datasets[0], limit)
            for ds in st.datasets:
                self.ds_channel.setdefault(exchange, {}).setdefault(ds, st.channel)

    def key_for(self, exchange: str, dataset: str, symbol: str) -> str:
        ch = self.ds_channel.get(exchange, {}).get(dataset, dataset)
        return self.keys.get((exchange, ch, symbol)) or f"{ch}:{symbol}"

    # ---- one flush of one exchange -----------------------------------------------------------------
    def process(self, exchange: str, tables: dict, now: float | None = None) -> list[Gap]:
        now = self.clock() if now is None else now
        frames = tables.get("frames")
        if frames is not None and frames.num_rows:
            self._first_frames(exchange, frames)
        found: list[Gap] = []
        for ds, table in tables.items():
            tracker = self.seq.get((exchange, ds))
            if tracker is not None and table.num_rows:
                found.extend(tracker.observe(table))
        trades = tables.get("trades")
        if trades is not None and trades.num_rows:
            self._trades(exchange, trades)
        for ch, (datasets, limit) in list(self.channels.get(exchange, {}).items()):
            if not limit:
                continue
            parts = [tables[d].select(["symbol", "ts_recv"]) for d in datasets
                     if d in tables and tables[d].num_rows]
            if parts:
                t = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
                found.extend(self.timers[(exchange, ch)].observe(t))
        emitted = []
        for g in found:
            if not self._absorb(g):
                self._emit(g, stream=self.key_for(g.exchange, g.dataset, g.symbol))
                emitted.append(g)
        self.tick(now)
        return emitted

    def _first_frames(self, exchange: str, frames: pa.Table) -> None:
        waiting = [o for o in self.outages.values()
                   if o.exchange == exchange and o.new_conn_id is not None and o.ts_first is None]
        if not waiting:
            return
        conn = frames.column("conn_id")
        for o in waiting:
            mask = pc.equal(conn, o.new_conn_id)
            if pc.any(mask).as_py():
                o.ts_first = pc.min(pc.filter(frames.column("ts_recv"), mask)).as_py()

    def _trade_ids(self, exchange: str, table: pa.Table) -> tuple[list, list]:
        """(last id, first id) per row, as text: for consecutive ids the first of an OKX
        aggregation is id - count + 1; otherwise both are the trade id."""
        rule = self.adapters[exchange].GAP_RULES.get("trades")
        if rule is None:
            ids = table.column("trade_id").to_pylist()
            return ids, ids
        last = _ints(table, rule.column)
        if rule.count_column:
            counts = _ints(table, rule.count_column)
            first = [None if v is None else v - (c or 1) + 1 for v, c in zip(last, counts)]
        else:
            first = last
        return ([None if v is None else str(v) for v in last],
                [None if v is None else str(v) for v in first])

    def _trades(self, exchange: str, table: pa.Table) -> None:
        exact = "trades" in self.adapters[exchange].GAP_RULES
        if not exact:     # UUID ids: remember the last one per symbol for the next disconnect
            for sym, (tid, ts) in _group_last(table, ["trade_id", "ts_recv"]).items():
                self.last_trade[(exchange, sym)] = (tid, ts)
        holes = {}
        for o in self.outages.values():
            if o.exchange != exchange:
                continue
            for sym, key in o.align.items():
                h = o.holes.get(key)
                if h is not None and not h.done and h.first_id is None:
                    holes[sym] = (o, h)
        if not holes:
            return
        t = table.filter(pc.is_in(table.column("symbol"), value_set=pa.array(list(holes), pa.string())))
        if not t.num_rows:
            return
        last_ids, first_ids = self._trade_ids(exchange, t)
        for sym, conn, ts, lid, fid in zip(t.column("symbol").to_pylist(), t.column("conn_id").to_pylist(),
                                           t.column("ts_recv").to_pylist(), last_ids, first_ids):
            o, h = holes[sym]
            if lid is None:
                continue
            if conn <= o.old_conn_id:
                if not exact or h.last_id is None or int(lid) > int(h.last_id):
                    h.last_id, h.last_ts = lid, ts
            elif h.first_id is None:
                h.first_id, h.first_ts = fid, ts

    def _absorb(self, g: Gap) -> bool:
        """A sequence or time gap that spans a disconnect of its stream is that disconnect gap."""
        key = (g.exchange, self.key_for(g.exchange, g.dataset, g.symbol))
        if g.kind == "sequence":
            o = self.hole_of.get(key)
            h = o.holes.get(key[1]) if o is not None else None
            if h is not None and not h.done and g.ts_from <= o.ts_down < g.ts_to:
                h.absorbed = g
                return True
            return False
        w = self.windows.get(key)
        return w is not None and g.ts_from <= w[1] <= g.ts_to

    # ---- connection events -------------------------------------------------------------------------
    def _on_close(self, exchange, conn_name, conn_id, ts_last, ts_down, streams, was_connected, stopped):
        if stopped or not was_connected:
            return            # our own stop or a rotation (overlap): nothing was missed
        for st in streams:
            self.register(exchange, st)
        prev = self.by_conn.get((exchange, conn_name))
        if prev is not None and prev.ts_first is None:
            prev.new_conn_id = prev.ts_up = None        # dropped again before a frame: still blind
            return
        if prev is not None:
            self._settle(prev, self.clock(), force=True)
        o = _Outage(next(self._ids), exchange, conn_name, conn_id, ts_last or ts_down, ts_down)
        exact = "trades" in self.adapters[exchange].GAP_RULES
        for st in streams:
            h = _Hole(st)
            if "trades" in st.datasets:
                o.align[st.symbol] = st.key
                if exact:
                    base = self.seq[(exchange, "trades")].last.get(st.symbol)
                    if base is not None:
                        h.last_id, h.last_ts = str(base[0]), base[1]
                else:
                    base = self.last_trade.get((exchange, st.symbol))
                    if base is not None:
                        h.last_id, h.last_ts = base
            o.holes[st.key] = h
            old = self.hole_of.get((exchange, st.key))
            if old is not None and old is not o:
                self._settle(old, self.clock(), force=True)
            self.hole_of[(exchange, st.key)] = o
            self.windows[(exchange, st.key)] = (o.ts_last, ts_down)
        self.outages[o.id] = o
        self.by_conn[(exchange, conn_name)] = o

    def _on_open(self, exchange, conn_name, conn_id, ts_up, conn) -> None:
        o = self.by_conn.get((exchange, conn_name))
        if o is None or o.new_conn_id is not None:
            return            # a first connect, not a reconnect
        o.new_conn_id, o.ts_up = conn_id, ts_up
        worker = self.workers.get(exchange)
        if o.align and worker is not None and not o.submitted:
            o.submitted = True
            from app.alignment import AlignJob
            worker.submit(AlignJob(o.id, conn, list(o.align.items())))

    def _on_aligned(self, outage_id, symbol, result) -> None:
        o = self.outages.get(outage_id)
        if o is not None:
            o.aligned[symbol] = result
            o.aligned_at[symbol] = self.clock()

    # ---- reporting -----------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for o in list(self.outages.values()):
            self._settle(o, now)

    def _settle(self, o: _Outage, now: float, force: bool = False) -> None:
        """Report every hole of an outage that is ready; finish the outage when all are."""
        if o.ts_first is None and not force:
            return
        s = self.settings
        deadline = force or (o.ts_up is not None and now >= o.ts_up / 1e9 + s.alignment_timeout)
        grace = s.flush_interval + 1.0
        for key, h in o.holes.items():
            if h.done:
                continue
            sym = h.stream.symbol
            if sym in o.align and o.align[sym] == key:
                res = o.aligned.get(sym)
                rest_ready = (res is not None and res.get("status") == "ok"
                              and now >= o.aligned_at[sym] + grace)
                wait_rest = self.workers.get(o.exchange) is not None and res is None and o.submitted
                if not deadline and (wait_rest or (h.first_id is None and not rest_ready)):
                    continue
                self._emit_trades(o, h)
            else:
                self._emit(Gap(o.exchange, h.stream.datasets[0], sym, "disconnect", None, None, None,
                               o.ts_last, o.ts_to), **self._extra(o, key))
            h.done = True
        if all(h.done for h in o.holes.values()):
            self._finish(o)

    def _settle_all_at_stop(self) -> None:
        """An outage still open at shutdown (no frame since the reconnect, or no reconnect) is
        reported up to now, marked `open_at_stop`: dropping it would hide a loss."""
        now = self.clock()
        for o in list(self.outages.values()):
            if o.ts_first is None:
                o.ts_stop = time.time_ns()
            self._settle(o, now, force=True)

    def _extra(self, o: _Outage, key: str) -> dict:
        extra = {"stream": key, "conn": o.conn_name, "conn_id_before": o.old_conn_id,
                 "conn_id_after": o.new_conn_id}
        if o.ts_stop is not None:
            extra["open_at_stop"] = True
        return extra

    def _emit_trades(self, o: _Outage, h: _Hole) -> None:
        from app.alignment import measure
        ex, sym = o.exchange, h.stream.symbol
        exact = "trades" in self.adapters[ex].GAP_RULES
        res = o.aligned.get(sym) or {}
        rest = res.get("trades") if res.get("status") == "ok" else None
        m = measure(exact, h.last_id, h.first_id, rest)
        if exact and h.first_id is None and m["method"] == "rest_ids":
            # nothing after the reconnect yet: start the tracker at REST's latest id, so the next
            # trade is compared with what the exchange had, not reported again as a sequence gap
            tracker = self.seq[(ex, "trades")]
            latest = int(m["rest_latest_id"])
            cur = tracker.last.get(sym)
            if cur is None or cur[0] < latest:
                tracker.reset(sym, latest, res.get("at_ns") or 0)
        status = res.get("status") or ("not_run" if self.workers.get(ex) is None else "pending")
        figures = {"last_ws_id": h.last_id, "first_ws_id": h.first_id,
                   "rest_latest_id": m["rest_latest_id"], "missed": m["missed"],
                   "rest_missed": m["rest_missed"], "method": m["method"], "exact": m["exact"],
                   "alignment": status}
        o.results[sym] = figures
        ts_to = o.ts_to
        from_id = int(h.last_id) if exact and h.last_id is not None else None
        to_id = int(h.first_id) if exact and h.first_id is not None else None
        self._emit(Gap(ex, "trades", sym, "disconnect", from_id, to_id, m["missed"], o.ts_last, ts_to),
                   **self._extra(o, h.stream.key), **figures)

    def _finish(self, o: _Outage) -> None:
        self.outages.pop(o.id, None)
        if self.by_conn.get((o.exchange, o.conn_name)) is o:
            del self.by_conn[(o.exchange, o.conn_name)]
        for key in o.holes:
            if self.hole_of.get((o.exchange, key)) is o:
                del self.hole_of[(o.exchange, key)]
        if not o.align:
            return
        res = o.results
        statuses = [r["alignment"] for r in res.values()]
        measured = [r["missed"] for r in res.values() if r["missed"] is not None]
        summary = {"exchange": o.exchange, "conn": o.conn_name, "conn_id_before": o.old_conn_id,
                   "conn_id_after": o.new_conn_id, "ts_from": o.ts_last,
                   "ts_to": o.ts_to,
                   "window_s": round(((o.ts_to) - o.ts_last) / 1e9, 3),
                   "symbols": len(res), "measured": len(measured), "missed_total": sum(measured),
                   "rest_ok": statuses.count("ok"), "skipped": statuses.count("skipped"),
                   "failed": statuses.count("failed"),
                   "clock_offset_ms": (self.state.clock_offset.get(o.exchange) or {}).get("offset_ms"),
                   "details": dict(itertools.islice(res.items(), ALIGN_DETAIL_MAX)),
                   "details_truncated": max(0, len(res) - ALIGN_DETAIL_MAX), "at": round(self.clock(), 3)}
        self.state.count("alignments", o.exchange)
        self.state.last_alignment[o.exchange] = summary
        log.info("alignment_done", extra=summary)

    def _emit(self, g: Gap, **extra) -> None:
        rec = g.as_dict()
        rec["duration_s"] = round((g.ts_to - g.ts_from) / 1e9, 3) if g.ts_to and g.ts_from else None
        rec.update(extra)
        self.state.count("gaps", g.exchange, 1, g.dataset)
        self.state.recent_gaps[g.exchange].append(dict(rec, at=round(self.clock(), 3)))
        log.warning("gap_detected", extra=rec)

    # ---- the thread -----------------------------------------------------------------------------------
    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "table":
            _, ex, ds, table = item
            if self._group is not None and (ds == "frames" or self._group[0] != ex):
                self._close_group()
            if self._group is None:
                self._group = (ex, {})
            tables = self._group[1]
            tables[ds] = pa.concat_tables([tables[ds], table]) if ds in tables else table
        elif kind == "close":
            self._on_close(*item[1:])
        elif kind == "open":
            self._on_open(*item[1:])
        elif kind == "aligned":
            self._on_aligned(*item[1:])
        elif kind == "streams":
            for st in item[2]:
                self.register(item[1], st)

    def _close_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            self.process(group[0], group[1])

    def run(self) -> None:
        """One flush of one exchange arrives as consecutive tables, `frames` first: a group ends at
        the next `frames` table, another exchange, or a quiet queue."""
        next_tick = time.monotonic() + 0.5
        while True:
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                item = False
            try:
                if item is None:          # stopping: every outage is reported, as measured so far
                    self._close_group()
                    self._settle_all_at_stop()
                    return
                if item is False:
                    self._close_group()
                else:
                    self._handle(item)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + 0.5
                    self.tick()
            except Exception as e:  # noqa: BLE001 - the detector must survive anything
                log.error("gap_detector_error", extra={"error": repr(e)})

    def start(self) -> None:
        for w in self.workers.values():
            w.start()
        self._thread = threading.Thread(target=self.run, name="gaps", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        for w in self.workers.values():
            w.stop()
        self.q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)


def build(settings, state, adapters: dict) -> GapDetector:
    """The detector, and one alignment worker per exchange (every adapter can ask for the latest
    trade)."""
    from app.alignment import AlignmentWorker
    det = GapDetector(settings, state, adapters)
    for ex, adapter in adapters.items():
        det.workers[ex] = AlignmentWorker(ex, adapter, settings.rest_url(ex), settings, state, det.post)
    return det
