"""Gap rules shared by the live detector and bin/check_raw_sanity: measure, never fill.

`SequenceTracker.observe(table)` walks a table of one (exchange, dataset) in arrival order and
reports every break of the dataset's SequenceRule per symbol. The baseline is the highest id
seen, so duplicates and overlaps (two connections during a rotation deliver the same trades)
are not gaps; a lower id is a replay/overlap, not a loss. The live writer feeds it each flush;
the sanity checker feeds it each file in recv_seq order: the same code decides in both places.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from app.exchanges import SequenceRule


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
        for lo, hi in zip(starts, ends):
            symbol = s[lo].as_py()
            first, latest = ts[lo].as_py(), ts[hi - 1].as_py()
            prev = self.last.get(symbol)
            if prev is not None and first - prev > self.limit_ns:
                gaps.append(Gap(self.exchange, self.dataset, symbol, "time", None, None, None, prev, first))
            if prev is None or latest > prev:
                self.last[symbol] = latest
        return gaps
