"""The checks behind bin/check_raw_sanity: verify stored RAW data, flag, never fix.

Why a separate pass over stored files: the live collector knows what it saw; this knows what is
on disk (or in S3) for a day, after uploads, crashes, restarts and several instances (shards of
the universe, and replicas: twins of a shard on other machines, all writing to one root). It
reads with pyarrow only the columns a check needs, file by file (large files batch by batch), so
a day of every perpetual (~100 M rows) checks in bounded memory (bench/sanity_large.py measures
it).

Every file's key-value metadata names its instance, run, `shard` ("i/N") and `replica` (a label,
"" for none); files written before scale-out have neither and count as shard 0/1, replica "".

Checks (exit 2 = schema/readability violation, 1 = findings, 0 = clean):

- layout: files are found under raw/v1/<dataset>/<exchange>/date=<day>/ and, still read, under
  the first layout's `exchange=<x>/` directories; these are a finding that names the command
  moving them (`--migrate-layout`, app/migrate.py).
- schema: each file's Arrow schema equals app.schema.SCHEMAS[dataset] (names, types, order,
  nullability) and carries REQUIRED_METADATA matching its partition (and a valid `shard` where
  there is one); its exchange column and ts_recv statistics agree with the exchange directory
  and the `date=` partition; unreadable, truncated or corrupt files are violations.
- accounting: per run (`run_id`), holes in `recv_seq` over the `frames` of every exchange (the
  sequence is process-wide). A lost frame's exchange is unknown: a hole is attributed to the
  exchange of the frames on both sides when they agree, else to both (label "binance|okx").
  Only holes between the first and last frame of the run inside the checked dates can be seen.
- the union of instances: what a replica recorded twice is one message, and what one replica
  missed and its twin recorded is not lost. So every data dataset is judged on the union of all
  instances' rows, in slices of the exchange's own time (ts_exchange, else ts_event, else
  ts_recv: the same in every copy of a message): files are read in ts_recv order, merged, and
  a slice is judged once every file that could still hold rows of it has been read (rows reach
  us at most UNION_MARGIN_S after their exchange time; later ones are counted and noted) and
  UNION_SLICE_ROWS new rows are waiting (per-slice costs amortised). Memory is those rows, the
  margin's and one file (or batch) per instance open at that time, not the day.
  In each slice:
  - duplicates: a message's identity is the dataset's key: (symbol, trade_id) for trades,
    (symbol, update_id, else seq) for bbo, (symbol, ts_exchange) for the others (rows without
    one are each unique). Per (exchange, dataset): `rows` (all stored), `unique_rows`,
    `duplicates_across_instances` (a copy of a message another instance also recorded: the
    replicas' overlap) and `duplicates_within_instance` (the same message twice in one instance,
    in one file or across its files and runs, e.g. a connection rotation's overlap); rows =
    unique + across + within. Identities of the last UNION_TAIL_S of each slice are carried to
    the next, so a re-send a little later still counts as a duplicate. Reported, never a
    finding (Bybit re-sends unchanged snapshots with the same update id).
  - sequence gaps with the adapters' GAP_RULES through app.gaps.SequenceTracker (the live
    detector's code), fed the slice's rows sorted by (symbol, id): an id one replica missed and
    another recorded is no gap; time gaps per (exchange, dataset, symbol) for streams with a
    cadence (app.gaps.TimeGapTracker, limit time_gap_limit_s: max(floor, factor x cadence)), on
    the stream's first dataset (as live), over the union too; event-driven streams (trades,
    Binance bookTicker, OKX open interest) have no time gaps: quiet markets are normal.
  - content of each message once (crossed/locked BBO, non-positive prices/sizes, invalid trade
    side); clock skew is per copy (it judges the recording instance's clock).
- offline: spans where a shard of an exchange (the union of its replicas) has no frame at all
  for longer than the threshold, from the frames' ts_recv (1-second buckets holding exact
  min/max, so file order and instances do not matter): a shard whose twins were both down is
  offline even while other shards ran. By default the start of the first day and the end of the
  last complete day count as edges (a collector down at midnight is offline); downtime per
  exchange (any shard offline) and per shard, per day. A day not over yet (today) is looked at
  from its first file on (the hours before the collector started that day are not offline) up
  to now. An expected shard (0..N-1 of an N seen) without frames is offline all the window.
- replicas: the same windows per (exchange, shard, replica) where a shard has twins; a window
  its shard's union does not share is `covered_by` the twin(s) that recorded meanwhile: not a
  loss, not a finding (the report says who covered it).
- coverage: the universe per exchange = the requested symbols (Options.symbols: the settings'
  `symbols`, ALL = every listed one) resolved (app.exchanges.resolve_symbols) against the
  instruments of the checked days' reference snapshots (reference/<exchange>/instruments-<fetch
  time>-<instance>.parquet, union over instances); no snapshot: coverage unknown (a note). A
  universe symbol without a row in any dataset of its exchange is a finding naming the shard
  that owns it (app.sharding.shard_of with the N of the files) and whether that shard wrote
  anything. Shards seen vs expected (0..N-1): a shard that wrote nothing is a finding; files of
  one exchange with different N (a resharding in the checked days) are a finding, and coverage
  is given per N too; a symbol recorded by a shard that does not own it is a finding.
- instances: each instance (id, shard, replica, runs, exchanges, first/last ts_recv, files,
  rows) is listed.

Which day: --date/--from/--to, else the last complete UTC day that has data (the most recent
date partition before today; today if only today has data); no data at all under the root is a
finding ("no data under <root>"), a root that does not exist a violation.
Content flags (never fixed): crossed/locked BBO, non-positive prices/sizes, invalid trade side,
ts_recv going backwards within a connection, |ts_exchange - ts_recv| over the skew threshold
(ts_event where the exchange sends no message time); duplicates as above.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import heapq
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app import migrate, schema, sharding, storage_s3
from app.exchanges import EXCHANGES, Instrument, resolve_symbols
from app.exchanges import create as create_adapter
from app.gaps import Gap, SequenceTracker, TimeGapTracker, time_gap_limit_s

NS = 1_000_000_000
BATCH_ROWS = 1_000_000          # rows per record batch of a streamed (large) file
PREFETCH_FILES = 16             # small files read ahead in threads ...
PREFETCH_ROWS = 2_000_000       # ... holding at most this many rows
EX_CODE = {ex: i + 1 for i, ex in enumerate(EXCHANGES)}      # 0 = "not seen" in run bitmaps
CODE_EX = {v: k for k, v in EX_CODE.items()}
SCHEMA_KINDS = ("unreadable", "schema")                       # violations whose data is not read
# the union of instances (see the module docstring): slices of exchange time
UNION_MARGIN_S = 120.0          # a row reaches us at most this long after its exchange time
UNION_SLICE_ROWS = 50_000       # new rows buffered before a slice is judged (per-slice costs amortised)
UNION_TAIL_S = 120.0            # identities carried from one slice to the next (re-sends)
_I64_MAX, _I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min
_REFERENCE_NAME = re.compile(r"^instruments-(\d{8})T\d{6}Z-(.+)\.parquet$")


# ---- options -------------------------------------------------------------------------------------

@dataclass
class Options:
    root: str = "./data"
    dates: list[str] = field(default_factory=list)
    exchanges: list[str] | None = None           # None = every exchange found
    offline_threshold_s: float = 30.0
    gap_floor_s: float = 60.0                    # settings gap_time_floor
    gap_factor: float = 10.0                     # settings gap_time_factor
    skew_threshold_s: float = 5.0
    day_edges: bool = True
    max_list: int = 1000                         # per list in the report; totals stay exact
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    now_ns: int | None = None                    # tests: "now" for the last-day edge
    workers: int = 8                             # footer reads in parallel (S3 latency)
    config: str | None = None                    # --config, repeated in the --migrate-layout hint
    symbols: list[str] | None = None             # requested symbols (coverage); None: not known


def parse_duration(text: str) -> float:
    """'30s', '2m', '1h', '500ms' or a bare number of seconds."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            return float(t[:-len(suffix)]) * mult
    return float(t)


def date_range(date: str | None, start: str | None, end: str | None, today: dt.date) -> list[str]:
    def one(text: str) -> dt.date:
        if text == "today":
            return today
        if text == "yesterday":
            return today - dt.timedelta(days=1)
        return dt.date.fromisoformat(text)
    if date:
        return [one(date).isoformat()]
    lo = one(start) if start else (one(end) if end else today - dt.timedelta(days=1))
    hi = one(end) if end else (lo if not start else today)
    if hi < lo:
        raise ValueError(f"--to {hi} is before --from {lo}")
    return [(lo + dt.timedelta(days=i)).isoformat() for i in range((hi - lo).days + 1)]


def iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / NS, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def day_start_ns(date: str) -> int:
    d = dt.date.fromisoformat(date)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp()) * NS


class Capped(list):
    """A list that keeps the first `cap` items and counts the rest."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap
        self.dropped = 0

    def add(self, item) -> None:
        if len(self) < self.cap:
            self.append(item)
        else:
            self.dropped += 1


# ---- storage roots -------------------------------------------------------------------------------

def open_root(root: str, endpoint: str = "", region: str = "us-east-1") -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local directory or s3://bucket/prefix."""
    if root.startswith("s3://"):
        u = urlparse(root)
        kw = {"region": region or "us-east-1"}
        if endpoint:
            e = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
            kw["endpoint_override"] = e.netloc
            kw["scheme"] = e.scheme or "https"
        base = (u.netloc + "/" + u.path.strip("/")).rstrip("/")
        return pafs.S3FileSystem(**kw), base
    return pafs.LocalFileSystem(), os.path.abspath(root)


@dataclass
class FileRef:
    path: str
    dataset: str
    exchange: str
    date: str
    size: int
    legacy: bool = False            # under the first layout's exchange=<x>/ directory

    @property
    def ex_dir(self) -> str:
        return f"{schema.LEGACY_EXCHANGE_DIR}{self.exchange}" if self.legacy else self.exchange


@dataclass
class FileInfo:
    ref: FileRef
    rows: int
    run_id: str
    instance_id: str
    min_ts: int | None
    max_ts: int | None
    min_seq: int | None
    max_seq: int | None
    readable_data: bool = True      # False: schema/readability violation, data not read
    shard: sharding.Shard = sharding.ALL     # files written before scale-out: 0/1
    replica: str = ""

    @property
    def shard_text(self) -> str:
        return str(self.shard)


def exchange_dirs(fs, base: str, exchanges: list[str] | None = None, frames_all: bool = False):
    """(dataset, directory name, exchange, legacy) of every exchange directory under raw/v1/, in
    both layouts (<x>/ and the first layout's exchange=<x>/). `exchanges` filters, except for
    frames with `frames_all`."""
    for ds in schema.ALL_DATASETS:
        ds_dir = f"{base}/raw/v1/{ds}"
        try:
            infos = fs.get_file_info(pafs.FileSelector(ds_dir, allow_not_found=True))
        except OSError:
            infos = []
        for info in sorted(infos, key=lambda i: i.base_name):
            ex = schema.exchange_dir(info.base_name)
            if info.type != pafs.FileType.Directory or ex is None:
                continue
            if exchanges is not None and ex[0] not in exchanges and not (frames_all and ds == "frames"):
                continue
            yield ds, info.base_name, ex[0], ex[1]


def list_dates(fs, base: str, exchanges: list[str] | None = None) -> list[str]:
    """Every date partition (date=YYYY-MM-DD) under raw/v1/, both layouts, sorted."""
    dates = set()
    for ds, name, _ex, _legacy in exchange_dirs(fs, base, exchanges):
        for f in fs.get_file_info(pafs.FileSelector(f"{base}/raw/v1/{ds}/{name}", allow_not_found=True)):
            if f.type == pafs.FileType.Directory and f.base_name.startswith("date="):
                try:
                    dates.add(dt.date.fromisoformat(f.base_name[len("date="):]).isoformat())
                except ValueError:
                    continue
    return sorted(dates)


def legacy_dirs(fs, base: str) -> list[str]:
    """The first layout's exchange directories still present: ['raw/v1/bbo/exchange=okx', ...]."""
    return sorted(f"raw/v1/{ds}/{name}" for ds, name, _ex, legacy in exchange_dirs(fs, base) if legacy)


def list_files(fs, base: str, dates: list[str], exchanges: list[str] | None):
    """Every Parquet file of the checked partitions; temporary (.tmp) and other files apart.
    frames are listed for every exchange: recv_seq is process-wide, accounting needs them all.
    Files of the first layout (exchange=<x>/) are listed too (FileRef.legacy); a file present in
    both layouts (a migration interrupted between copy and delete) is listed once, at its new
    place. -> (refs, temporary paths, other paths, legacy paths also at the new place)"""
    refs, temps, others = [], [], []
    for ds, name, ex, legacy in exchange_dirs(fs, base, exchanges, frames_all=True):
        for date in dates:
            sel = pafs.FileSelector(f"{base}/raw/v1/{ds}/{name}/date={date}", allow_not_found=True)
            for f in fs.get_file_info(sel):
                if f.type != pafs.FileType.File:
                    continue
                if f.base_name.endswith(".tmp"):
                    temps.append(f.path)
                elif f.base_name.endswith(".parquet"):
                    refs.append(FileRef(f.path, ds, ex, date, f.size or 0, legacy))
                else:
                    others.append(f.path)
    current = {(r.dataset, r.exchange, r.date, os.path.basename(r.path)) for r in refs if not r.legacy}
    both = [r.path for r in refs if r.legacy and (r.dataset, r.exchange, r.date, os.path.basename(r.path)) in current]
    twice = set(both)
    return [r for r in refs if r.path not in twice], temps, others, both


# ---- schema and footer checks --------------------------------------------------------------------

def schema_problems(dataset: str, got: pa.Schema) -> list[str]:
    """Differences from the frozen v1 schema: names, types, order, nullability."""
    want = schema.SCHEMAS[dataset]
    problems = []
    have = {f.name: f for f in got}
    for f in want:
        g = have.get(f.name)
        if g is None:
            problems.append(f"missing column {f.name}")
            continue
        if g.type != f.type:
            problems.append(f"column {f.name}: type {g.type}, expected {f.type}")
        if g.nullable != f.nullable:
            problems.append(f"column {f.name}: nullable={g.nullable}, expected {f.nullable}")
    for name in have:
        if want.get_field_index(name) < 0:
            problems.append(f"extra column {name}")
    if not problems and got.names != want.names:
        problems.append(f"column order {got.names}, expected {want.names}")
    return problems


def _stats(md: pq.FileMetaData, col: int):
    """(min, max) of a column over all row groups from the footer statistics, or None."""
    lo = hi = None
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(col).statistics
        if st is None or not st.has_min_max:
            return None
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return None if lo is None else (lo, hi)


def read_footer(fs, ref: FileRef) -> tuple[FileInfo | None, list[dict]]:
    """Footer-only checks of one file: (info, violations)."""
    def bad(kind, detail):
        return {"path": ref.path, "kind": kind, "detail": detail, "dataset": ref.dataset,
                "exchange": ref.exchange, "date": ref.date}
    try:
        with fs.open_input_file(ref.path) as f:
            pf = pq.ParquetFile(f)
            md, got = pf.metadata, pf.schema_arrow
    except Exception as e:  # noqa: BLE001 - any failure to read the footer is "unreadable"
        return None, [bad("unreadable", f"{type(e).__name__}: {e}")]
    out = []
    problems = schema_problems(ref.dataset, got)
    if problems:
        out.append(bad("schema", "; ".join(problems)))
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (got.metadata or {}).items()}
    missing = [k for k in schema.REQUIRED_METADATA if k not in meta]
    if missing:
        out.append(bad("metadata", "missing key-value metadata " + ", ".join(missing)))
    for key, want in (("schema_version", schema.SCHEMA_VERSION), ("dataset", ref.dataset),
                      ("exchange", ref.exchange)):
        if key in meta and meta[key] != want:
            out.append(bad("metadata", f"{key}={meta[key]!r}, expected {want!r}"))
    shard = sharding.ALL
    if "shard" in meta:
        try:
            shard = sharding.parse(meta["shard"])
        except ValueError as e:
            out.append(bad("metadata", f"shard={meta['shard']!r}: {e}"))
    names = got.names
    ts = seq = None
    if not problems:
        ex_stats = _stats(md, names.index("exchange"))
        if ex_stats and (ex_stats[0] != ref.exchange or ex_stats[1] != ref.exchange):
            out.append(bad("partition", f"exchange column holds {ex_stats[0]!r}..{ex_stats[1]!r}, "
                                        f"directory is {ref.ex_dir}"))
        ts = _stats(md, names.index("ts_recv"))
        lo = day_start_ns(ref.date)
        if ts and (ts[0] < lo or ts[1] >= lo + schema.NS_PER_DAY):
            out.append(bad("partition", f"ts_recv {iso(ts[0])}..{iso(ts[1])} outside date={ref.date}"))
        seq = _stats(md, names.index("recv_seq"))
    info = FileInfo(ref, md.num_rows, meta.get("run_id", "?"), meta.get("instance_id", "?"),
                    ts[0] if ts else None, ts[1] if ts else None,
                    seq[0] if seq else None, seq[1] if seq else None,
                    readable_data=not problems, shard=shard, replica=meta.get("replica", ""))
    return info, out


# ---- per-run recv_seq accounting -----------------------------------------------------------------

class RunSeqs:
    """Which recv_seq of one run were seen, and from which exchange: one byte per sequence number
    (100 M frames = 100 MB), 0 = not seen."""

    def __init__(self, lo: int, hi: int):
        self.base = lo
        self.codes = np.zeros(max(hi - lo + 1, 1), dtype=np.uint8)
        self.frames = 0
        self.duplicates = 0

    def _ensure(self, lo: int, hi: int) -> None:
        if lo < self.base:
            self.codes = np.concatenate([np.zeros(self.base - lo, np.uint8), self.codes])
            self.base = lo
        need = hi - self.base + 1
        if need > len(self.codes):
            self.codes = np.concatenate([self.codes, np.zeros(need - len(self.codes), np.uint8)])

    def mark(self, seqs: np.ndarray, code: int) -> None:
        if not len(seqs):
            return
        self._ensure(int(seqs.min()), int(seqs.max()))
        idx = seqs - self.base
        self.duplicates += int(np.count_nonzero(self.codes[idx]))
        self.codes[idx] = code
        self.frames += len(seqs)

    def holes(self) -> tuple[int, int, list[tuple[int, int, int, int]]]:
        """(first seq, last seq, [(from_seq, to_seq, prev exchange code, next exchange code)])."""
        seen = self.codes != 0
        if not seen.any():
            return 0, 0, []
        first = int(np.argmax(seen))
        last = len(seen) - 1 - int(np.argmax(seen[::-1]))
        step = np.diff(seen[first:last + 1].view(np.int8))
        starts = np.flatnonzero(step == -1) + first + 1     # first missing index of each hole
        ends = np.flatnonzero(step == 1) + first            # last missing index of each hole
        out = [(int(a) + self.base, int(b) + self.base, int(self.codes[a - 1]), int(self.codes[b + 1]))
               for a, b in zip(starts, ends)]
        return first + self.base, last + self.base, out


def hole_label(prev_code: int, next_code: int) -> str:
    a, b = CODE_EX.get(prev_code, "?"), CODE_EX.get(next_code, "?")
    return a if a == b else "|".join(sorted({a, b}))


# ---- offline buckets ---------------------------------------------------------------------------

class Buckets:
    """When frames were received, as the exact (min, max) ts_recv per bucket of `bucket_ns`: every
    silence longer than a threshold >= the bucket width can be found from them, whatever the order
    of files and rows. Numpy blocks of BLOCK buckets, allocated when first touched (16 bytes per
    bucket: 1.4 MB per day at 1 s): one per (exchange, shard, replica) stays small."""

    BLOCK = 4096

    def __init__(self, bucket_ns: int):
        self.bns = bucket_ns
        self.blocks: dict[int, np.ndarray] = {}      # block -> [[min ...], [max ...]]

    @staticmethod
    def reduce(ts: np.ndarray, bucket_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket keys, min, max) of the non-empty buckets of some ts_recv values."""
        srt = np.sort(ts, kind="stable")
        b = srt // bucket_ns
        cut = np.flatnonzero(np.diff(b)) + 1
        starts = np.concatenate(([0], cut))
        ends = np.concatenate((cut, [len(srt)])) - 1
        return b[starts], srt[starts], srt[ends]

    def _block(self, bi: int) -> np.ndarray:
        arr = self.blocks.get(bi)
        if arr is None:
            arr = self.blocks[bi] = np.empty((2, self.BLOCK), np.int64)
            arr[0], arr[1] = _I64_MAX, _I64_MIN
        return arr

    def add(self, keys: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Reduced values (`reduce`: each key once)."""
        blk = keys // self.BLOCK
        off = keys - blk * self.BLOCK
        for bi in np.unique(blk).tolist():
            m = blk == bi
            arr, o = self._block(bi), off[m]
            arr[0, o] = np.minimum(arr[0, o], lo[m])
            arr[1, o] = np.maximum(arr[1, o], hi[m])

    def merge(self, other: "Buckets") -> None:
        for bi, arr in other.blocks.items():
            mine = self._block(bi)
            np.minimum(mine[0], arr[0], out=mine[0])
            np.maximum(mine[1], arr[1], out=mine[1])

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) of every non-empty bucket, in time order."""
        los, his = [], []
        for bi in sorted(self.blocks):
            arr = self.blocks[bi]
            m = arr[0] != _I64_MAX
            los.append(arr[0][m])
            his.append(arr[1][m])
        if not los:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(los), np.concatenate(his)


def silences(lo: np.ndarray, hi: np.ndarray, span_lo: int, span_hi: int, end: int, thr: int,
             edges: bool, complete: bool) -> list[tuple[int, int, str | None]]:
    """Windows longer than `thr` without a frame, from `spans` (none at all: one "no_frames"
    window from span_lo to end). -> [(start, end, edge)]"""
    if not len(lo):
        return [(span_lo, end, "no_frames")] if end - span_lo > thr else []
    out = []
    if edges and lo[0] - span_lo > thr:
        out.append((span_lo, int(lo[0]), "start"))
    for i in np.flatnonzero(lo[1:] - hi[:-1] > thr).tolist():
        out.append((int(hi[i]), int(lo[i + 1]), None))
    if edges and complete and span_hi - hi[-1] > thr:
        out.append((int(hi[-1]), span_hi, "end"))
    return out


def _overlaps(a: int, z: int, windows) -> bool:
    return any(w0 < z and a < w1 for w0, w1, *_ in windows)


# ---- reference snapshots (the universe) ----------------------------------------------------------

def reference_instruments(fs, base: str, exchange: str, dates: list[str]) -> tuple[list[Instrument], list[str], list[str]]:
    """Instruments of an exchange's reference snapshots fetched on the checked dates, the union
    over every instance's snapshots (by native symbol). Without one on those dates, the
    snapshots of the latest earlier day: a collector with a fixed symbol list fetches the
    listing only at start, so a run in its third day has no snapshot of that day.
    -> (instruments, snapshot paths, problems)"""
    days = {d.replace("-", "") for d in dates}
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{base}/reference/{exchange}", allow_not_found=True))
    except OSError as e:
        return [], [], [f"cannot list reference/{exchange}: {e}"]
    dated = [(m.group(1), i.path) for i in infos if i.type == pafs.FileType.File
             and (m := _REFERENCE_NAME.match(i.base_name))]
    if not any(day in days for day, _ in dated):
        earlier = [day for day, _ in dated if day < min(days)]
        days = {max(earlier)} if earlier else set()
    paths = sorted(path for day, path in dated if day in days)
    fields = [f.name for f in dataclasses.fields(Instrument)]
    found: dict[str, Instrument] = {}
    problems = []
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                rows = pq.ParquetFile(f).read().to_pylist()
            for row in rows:
                inst = Instrument(**{k: row.get(k) for k in fields})
                found.setdefault(inst.symbol, inst)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: coverage goes on without it
            problems.append(f"reference snapshot {path} unreadable ({type(e).__name__}: {e})")
    return list(found.values()), paths, problems


def _shard_key(text: str) -> tuple[int, int]:
    sh = sharding.parse(text)
    return sh.count, sh.index


def shard_of_text(exchange: str, symbol: str, text: str) -> bool:
    """Does shard "i/N" own the symbol?"""
    return sharding.parse(text).owns(exchange, symbol)


def _per_day(intervals: list[tuple[int, int]]) -> dict[str, float]:
    """Seconds covered by the union of [a, z) intervals, per UTC day."""
    merged: list[list[int]] = []
    for a, z in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], z)
        else:
            merged.append([a, z])
    out: dict[str, float] = {}
    for a, z in merged:
        day = (a // schema.NS_PER_DAY) * schema.NS_PER_DAY
        while day < z:
            lo, hi = max(a, day), min(z, day + schema.NS_PER_DAY)
            if hi > lo:
                d = iso(day)[:10]
                out[d] = round(out.get(d, 0.0) + (hi - lo) / NS, 3)
            day += schema.NS_PER_DAY
    return out


# ---- the checker ---------------------------------------------------------------------------------

def _cadence(adapter, exchange: str, dataset: str) -> float | None:
    """The adapter's declared cadence of the stream carrying a dataset, as the live detector
    sees it: a stream feeding several datasets (Binance markPrice -> mark_price + funding, Bybit
    tickers -> mark_price + funding + open_interest) is timed on its first dataset only, since
    the others are only present in some of its frames. None: event driven, or not timed."""
    inst = Instrument(exchange, "X", "X-USDT-PERP", "X", "USDT", "live", "perpetual")
    try:
        streams = adapter.streams_for(inst, list(schema.DATASETS))
    except Exception:  # noqa: BLE001 - an adapter that cannot say has no time rule
        return None
    cad = [s.cadence_s for s in streams if s.cadence_s and s.datasets and s.datasets[0] == dataset]
    return max(cad) if cad else None


def _first(mask, table: pa.Table) -> dict | None:
    """The flagged row received first (so the example does not depend on reading order)."""
    m = pc.fill_null(mask, False)
    idx = pc.indices_nonzero(m.combine_chunks() if isinstance(m, pa.ChunkedArray) else m)
    if not len(idx):
        return None
    i = int(idx[int(np.argmin(pc.take(table.column("ts_recv"), idx).to_numpy()))].as_py())
    return {"symbol": table.column("symbol")[i].as_py(), "ts_recv": iso(table.column("ts_recv")[i].as_py()),
            "recv_seq": table.column("recv_seq")[i].as_py()}


def _identity(dataset: str, t: pa.Table) -> tuple[pa.Table, list[str], pa.ChunkedArray]:
    """A message's identity in a dataset (see the module docstring) for the rows of `t`, as the
    table of the rows that have one (key columns + _inst, _st, _row), its key names, and the mask
    of those rows."""
    sym = t.column("symbol")
    if dataset == "trades":
        cols = {"s": sym, "k": t.column("trade_id")}
    elif dataset == "bbo":
        has_u = pc.is_valid(t.column("update_id"))
        cols = {"s": sym, "k": pc.coalesce(t.column("update_id"), t.column("seq")), "u": pc.cast(has_u, pa.int8())}
    else:
        cols = {"s": sym, "k": t.column("ts_exchange")}
    valid = pc.is_valid(cols["k"])
    keys = list(cols)
    for c in ("_inst", "_st", "_row"):
        cols[c] = t.column(c)
    return pa.table(cols).filter(valid), keys, valid


@dataclass
class _Union:
    """The union of every instance's rows of one (exchange, dataset), judged slice by slice."""
    exchange: str
    dataset: str
    rule: object
    seq: SequenceTracker | None
    tgap: TimeGapTracker | None
    buffer: list = field(default_factory=list)     # tables read, not judged yet (+ _st, _inst)
    rows: int = 0                                  # rows in buffer
    judge_at: int = 0                              # buffer size that triggers the next slice
    closed: int | None = None                      # exchange time below which rows were judged
    tail: pa.Table | None = None                   # identities of the last UNION_TAIL_S judged


def _count(mask) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


class Checker:
    """One check over a root and a set of dates; `run()` returns the report (a JSON-able dict)."""

    def __init__(self, opts: Options):
        self.o = opts = dataclasses.replace(opts, dates=list(opts.dates))
        self.fs, self.base = open_root(opts.root, opts.s3_endpoint, opts.s3_region)
        self.now_ns = opts.now_ns if opts.now_ns is not None else time.time_ns()
        cap = opts.max_list
        self.violations = Capped(cap)
        self.violation_counts: dict[str, int] = {}
        self.seq_gaps = Capped(cap)
        self.time_gaps = Capped(cap)
        self.content: dict[tuple[str, str, str], dict] = {}
        self.per_ex: dict[str, dict] = {}
        self.per_ds: dict[tuple[str, str], dict] = {}
        self.runs: dict[str, RunSeqs] = {}
        self.run_meta: dict[str, dict] = {}
        self.buckets: dict[tuple[str, str, str], Buckets] = {}   # (exchange, shard, replica)
        self.bucket_ns = max(1, int(min(1.0, opts.offline_threshold_s) * NS))
        self.inst_codes: dict[str, int] = {}         # instance id -> small int (the union's _inst)
        self.sym_seen: dict[str, dict[str, set[str]]] = {}    # exchange -> shard -> symbols with rows
        self.late_rows = 0                          # rows judged after their slice (see _Union)
        self.conn_last: dict[tuple[str, str, int], int] = {}  # (run, exchange, conn) -> ts_recv
        self.adapters: dict[str, object] = {}
        self.notes: list[str] = []
        self.refs: list[FileRef] = []
        self.bad_frames_files = 0
        self.infos: list[FileInfo] = []
        self.temp_files: list[str] = []
        self.other_files: list[str] = []
        self.legacy: list[str] = []                 # exchange=<x> directories (first layout)
        self.in_both: list[str] = []                # legacy files also at their new place
        self.auto_date: dict | None = None          # no --date: which day, and why
        self.data_dates: list[str] | None = None    # every date with data (when looked up)
        self.window: dict | None = None             # the span the offline check looked at

    # -- helpers --
    def _ex(self, ex: str) -> dict:
        return self.per_ex.setdefault(ex, {"files": 0, "bytes": 0, "rows": 0, "frames": 0})

    def _flag(self, ex: str, ds: str, check: str, n: int, example: dict | None, **extra) -> None:
        if n <= 0:
            return
        c = self.content.get((ex, ds, check))
        if c is None:
            c = self.content[(ex, ds, check)] = {"exchange": ex, "dataset": ds, "check": check,
                                                 "count": 0, "first": example}
        elif example is not None and (c["first"] is None or example["ts_recv"] < c["first"]["ts_recv"]):
            c["first"] = example                    # the earliest, whatever the reading order
        c["count"] += n
        for k, v in extra.items():
            if k == "max_abs_ns":
                c[k] = max(c.get(k, 0), v)
            else:
                c[k] = v

    def _violation(self, v: dict) -> None:
        self.violation_counts[v["kind"]] = self.violation_counts.get(v["kind"], 0) + 1
        if v.get("dataset") == "frames" and v["kind"] in SCHEMA_KINDS:
            self.bad_frames_files += 1
        self.violations.add(v)

    def _adapter(self, ex: str):
        if ex not in self.adapters:
            try:
                self.adapters[ex] = create_adapter(ex)
            except Exception as e:  # noqa: BLE001 - unknown exchange dir or adapter not importable
                self.adapters[ex] = None
                self.notes.append(f"no adapter for {ex!r} ({type(e).__name__}): sequence and time gaps not checked")
        return self.adapters[ex]

    def _wanted(self, ex: str) -> bool:
        return self.o.exchanges is None or ex in self.o.exchanges

    def _read_whole(self, info: FileInfo, columns: list[str]) -> pa.Table:
        with self.fs.open_input_file(info.ref.path) as f:
            return pq.ParquetFile(f).read(columns=columns, use_threads=False)

    def _file_tables(self, files: list[FileInfo], columns: list[str]):
        """(info, tables) per file, in order. Small files are read ahead in a thread pool (Parquet
        decoding releases the GIL, so reading overlaps the checks); at most PREFETCH_ROWS rows are
        held ahead. A file larger than BATCH_ROWS is streamed batch by batch instead."""
        ahead: deque = deque()
        held = 0
        it = iter(files)
        pool = self.pool

        def fill():
            nonlocal held
            while len(ahead) < PREFETCH_FILES and held < PREFETCH_ROWS:
                info = next(it, None)
                if info is None:
                    return
                if info.readable_data and info.rows <= BATCH_ROWS:
                    ahead.append((info, pool.submit(self._read_whole, info, columns)))
                    held += info.rows
                else:
                    ahead.append((info, None))

        fill()
        while ahead:
            info, fut = ahead.popleft()
            if fut is None:
                fill()
                yield info, (self._batches(info, columns) if info.readable_data else iter(()))
                continue
            try:
                table = fut.result()
            except Exception as e:  # noqa: BLE001 - a corrupt page: "unreadable"
                table = None
                self._violation({"path": info.ref.path, "kind": "unreadable", "detail": f"{type(e).__name__}: {e}",
                                 "dataset": info.ref.dataset, "exchange": info.ref.exchange, "date": info.ref.date})
            held -= info.rows
            fill()
            yield info, (iter((table,)) if table is not None else iter(()))

    def _batches(self, info: FileInfo, columns: list[str]):
        """Record batches of one file, projected; a read failure becomes an `unreadable` violation."""
        try:
            with self.fs.open_input_file(info.ref.path) as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=True):
                    yield pa.Table.from_batches([batch])
        except Exception as e:  # noqa: BLE001
            self._violation({"path": info.ref.path, "kind": "unreadable", "detail": f"{type(e).__name__}: {e}",
                             "dataset": info.ref.dataset, "exchange": info.ref.exchange, "date": info.ref.date})

    def _merged(self, files: list[FileInfo], columns: list[str]):
        """(info, table, watermark) over files sorted by their first ts_recv, in about ts_recv
        order: a file joins when the read position reaches its first ts_recv, and of the files
        open (several instances write the same hours) the one furthest behind is read next, one
        table (a small file) or batch (a large one) at a time. `watermark`: no row not yet
        yielded has a ts_recv below it (None: none left), assuming a file's rows come in about
        ts_recv order (they come in recv_seq order)."""
        src = self._file_tables(files, columns)
        heap: list = []
        order = itertools.count()
        pending = next(src, None)

        def first(info: FileInfo) -> int:
            return info.min_ts if info.min_ts is not None else -1      # no statistics: read first

        while heap or pending is not None:
            while pending is not None and (not heap or first(pending[0]) <= heap[0][0]):
                heapq.heappush(heap, (first(pending[0]), next(order), *pending))
                pending = next(src, None)
            key, _, info, tables = heapq.heappop(heap)
            t = next(tables, None)
            if t is None:
                continue
            if not (info.readable_data and info.rows <= BATCH_ROWS):      # streamed: more batches
                if t.num_rows:
                    key = max(key, int(pc.max(t.column("ts_recv")).as_py()))
                heapq.heappush(heap, (key, next(order), info, tables))
            marks = ([heap[0][0]] if heap else []) + ([first(pending[0])] if pending is not None else [])
            yield info, t, (min(marks) if marks else None)

    # -- main --
    def run(self) -> dict:
        t0 = time.monotonic()
        o = self.o
        # a root that does not exist (local directory, S3 bucket) is a violation: cron must see it
        probe = self.base.split("/")[0] if o.root.startswith("s3://") else self.base
        if self.fs.get_file_info(probe).type == pafs.FileType.NotFound:
            self._violation({"path": o.root, "kind": "unreadable",
                             "detail": f"root not found (no data under {o.root})"})
            self.data_dates = []
            return self.report(t0, [])
        self.legacy = legacy_dirs(self.fs, self.base)
        if not o.dates:
            self._choose_date()
            if not o.dates:
                return self.report(t0, [])
        refs, self.temp_files, self.other_files, self.in_both = list_files(self.fs, self.base, o.dates, o.exchanges)
        self.refs = refs
        with ThreadPoolExecutor(max(1, o.workers)) as pool:
            footers = list(pool.map(lambda r: read_footer(self.fs, r), refs))
        infos: list[FileInfo] = []
        for ref, (info, problems) in zip(refs, footers):
            for p in problems:
                self._violation(p)
            if info is None and self._wanted(ref.exchange):
                self._count_file(ref, 0)         # unreadable: counted as a file, no rows
            if info is not None:
                infos.append(info)
                if any(p["kind"] in SCHEMA_KINDS for p in problems):
                    info.readable_data = False
        self.infos = infos
        by_key: dict[tuple[str, str], list[FileInfo]] = {}
        for info in infos:
            by_key.setdefault((info.ref.dataset, info.ref.exchange), []).append(info)
        for files in by_key.values():
            files.sort(key=lambda i: (i.min_ts if i.min_ts is not None else 0, i.ref.path))
        frames_files = [i for (ds, _), fl in sorted(by_key.items()) if ds == "frames" for i in fl]
        self._size_runs(frames_files)
        with ThreadPoolExecutor(2) as self.pool:
            for info, tables in self._file_tables(frames_files, ["conn_id", "recv_seq", "ts_recv"]):
                self._frames_file(info, tables)
            for (ds, ex), files in sorted(by_key.items()):
                if ds != "frames":
                    self._data_files(ds, ex, files)
            return self.report(t0, frames_files)

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.now_ns / NS, dt.timezone.utc).date().isoformat()

    def _choose_date(self) -> None:
        """No --date: the last complete UTC day with data (the latest date partition before
        today), else today if only today has data; none: o.dates stays empty (no data)."""
        today = self._today()
        self.data_dates = dates = list_dates(self.fs, self.base, self.o.exchanges)
        before = [d for d in dates if d < today]
        if before:
            choice = (before[-1], "the last complete UTC day with data")
        elif today in dates:
            choice = (today, "only today has data: checking today so far")
        elif dates:
            choice = (dates[-1], f"the only data is dated after today ({today} UTC): check the clocks")
        else:
            return
        self.o.dates = [choice[0]]
        self.auto_date = {"date": choice[0], "why": choice[1]}

    def _no_data_finding(self) -> str:
        o = self.o
        where = f"no data under {o.root}" + (f" for {','.join(o.exchanges)}" if o.exchanges else "")
        if self.data_dates is None:
            self.data_dates = list_dates(self.fs, self.base, o.exchanges)
        if not self.data_dates or not o.dates:
            return where
        d = self.data_dates
        span = d[0] if len(d) == 1 else f"{d[0]}..{d[-1]}"
        checked = o.dates[0] + (f"..{o.dates[-1]}" if len(o.dates) > 1 else "")
        return f"no data files for {checked} (data under {o.root}: {span}, {len(d)} day(s))"

    def _first_ts(self, date: str) -> int | None:
        """ts_recv of the first row of a day over all its files (footer statistics)."""
        ts = [i.min_ts for i in self.infos if i.ref.date == date and i.min_ts is not None]
        return min(ts) if ts else None

    def _size_runs(self, frames_files: list[FileInfo]) -> None:
        """Allocate each run's recv_seq bitmap once from the footer statistics."""
        span: dict[str, list[int]] = {}
        for i in frames_files:
            if i.min_seq is not None and i.readable_data:
                s = span.setdefault(i.run_id, [i.min_seq, i.max_seq])
                s[0], s[1] = min(s[0], i.min_seq), max(s[1], i.max_seq)
        for run, (lo, hi) in span.items():
            self.runs[run] = RunSeqs(lo, hi)

    def _count_file(self, ref: FileRef, rows: int) -> None:
        ex = self._ex(ref.exchange)
        ex["files"] += 1
        ex["bytes"] += ref.size
        d = self.per_ds.setdefault((ref.exchange, ref.dataset), {"files": 0, "rows": 0, "bytes": 0})
        d["files"] += 1
        d["rows"] += rows
        d["bytes"] += ref.size
        ex["frames" if ref.dataset == "frames" else "rows"] += rows

    # -- frames: accounting, offline buckets, ts_recv order per connection --
    def _frames_file(self, info: FileInfo, tables) -> None:
        ex = info.ref.exchange
        if self._wanted(ex):
            self._count_file(info.ref, info.rows)
        if not info.readable_data:
            return
        run = info.run_id
        self.run_meta.setdefault(run, {"instance_id": info.instance_id, "exchanges": set()})["exchanges"].add(ex)
        code = EX_CODE.get(ex, 255)
        key = (ex, info.shard_text, info.replica)
        buckets = self.buckets.get(key)
        if buckets is None and self._wanted(ex):
            buckets = self.buckets[key] = Buckets(self.bucket_ns)
        for t in tables:
            seqs = t.column("recv_seq").to_numpy()
            runseqs = self.runs.get(run)
            if runseqs is None:
                runseqs = self.runs[run] = RunSeqs(int(seqs.min()), int(seqs.max()))
            runseqs.mark(seqs, code)
            if not self._wanted(ex):
                continue
            ts = t.column("ts_recv").to_numpy()
            # offline: exact min/max ts_recv per 1-second bucket, per (exchange, shard, replica)
            if len(ts):
                buckets.add(*Buckets.reduce(ts, self.bucket_ns))
            # ts_recv must not go backwards within a connection (in recv_seq order)
            conn = t.column("conn_id").to_numpy()
            order = np.lexsort((seqs, conn))
            c, s, tt = conn[order], seqs[order], ts[order]
            same = c[1:] == c[:-1]
            back = same & (tt[1:] < tt[:-1])
            n_back = int(np.count_nonzero(back))
            worst = int((tt[:-1] - tt[1:])[back].max()) if n_back else 0
            first_back = None
            if n_back:
                j = int(np.flatnonzero(back)[0]) + 1
                first_back = {"conn_id": int(c[j]), "recv_seq": int(s[j]), "ts_recv": iso(int(tt[j]))}
            # and across batches/files: the first row of each connection against the carried one
            gstart = np.concatenate(([0], np.flatnonzero(~same) + 1))
            gend = np.concatenate((np.flatnonzero(~same), [len(c) - 1]))
            for g0, g1 in zip(gstart.tolist(), gend.tolist()):
                key = (run, ex, int(c[g0]))
                prev = self.conn_last.get(key)
                if prev is not None and tt[g0] < prev:
                    n_back += 1
                    worst = max(worst, int(prev - tt[g0]))
                    first_back = first_back or {"conn_id": int(c[g0]), "recv_seq": int(s[g0]),
                                                "ts_recv": iso(int(tt[g0]))}
                self.conn_last[key] = int(tt[g1])
            self._flag(ex, "frames", "ts_recv_backwards", n_back, first_back, max_abs_ns=worst)

    # -- data datasets: the union of instances (duplicates, sequence/time gaps, content) --
    def _inst_code(self, instance_id: str) -> int:
        code = self.inst_codes.get(instance_id)
        if code is None:
            code = self.inst_codes[instance_id] = len(self.inst_codes)
        return code

    def _data_files(self, ds: str, ex: str, files: list[FileInfo]) -> None:
        adapter = self._adapter(ex)
        rule = adapter.GAP_RULES.get(ds) if adapter is not None else None
        seq = SequenceTracker(ex, ds, rule) if rule else None
        limit = time_gap_limit_s(_cadence(adapter, ex, ds) if adapter is not None else None,
                                 self.o.gap_factor, self.o.gap_floor_s)
        tgap = TimeGapTracker(ex, ds, limit) if limit else None
        cols = ["symbol", "ts_event", "ts_exchange", "ts_recv", "recv_seq"]
        cols += {"bbo": ["bid_px", "bid_sz", "ask_px", "ask_sz", "update_id", "seq"],
                 "trades": ["trade_id", "price", "size", "side"],
                 "mark_price": ["mark_px", "index_px"]}.get(ds, [])
        if rule:
            cols += [c for c in (rule.column, rule.count_column) if c and c not in cols]
        for info in files:
            self._count_file(info.ref, info.rows)
        d = self.per_ds[(ex, ds)]
        for k in ("unique_rows", "duplicates_across_instances", "duplicates_within_instance"):
            d.setdefault(k, 0)
        u = _Union(ex, ds, rule, seq, tgap)
        margin = int(UNION_MARGIN_S * NS)
        for info, t, watermark in self._merged(files, cols):
            if not t.num_rows:
                continue
            t = t.replace_schema_metadata(None)
            self._recorded(ds, ex, info, t)
            st = pc.coalesce(t.column("ts_exchange"), t.column("ts_event"), t.column("ts_recv"))
            if u.closed is not None:
                self.late_rows += _count(pc.less(st, u.closed))
            t = t.append_column("_st", st).append_column(
                "_inst", pa.array(np.full(t.num_rows, self._inst_code(info.instance_id), np.int32)))
            u.buffer.append(t)
            u.rows += t.num_rows
            # judge what no unread row can belong to any more, once enough is buffered
            if (u.rows >= max(u.judge_at, UNION_SLICE_ROWS) and watermark is not None
                    and (u.closed is None or watermark - margin > u.closed)):
                self._judge(u, watermark - margin)
                u.judge_at = u.rows + UNION_SLICE_ROWS          # what stayed (the margin) + as many new
        self._judge(u, None)

    def _recorded(self, ds: str, ex: str, info: FileInfo, t: pa.Table) -> None:
        """What is judged per recorded copy: the symbols a shard recorded, the receiving clock."""
        self.sym_seen.setdefault(ex, {}).setdefault(info.shard_text, set()).update(
            pc.unique(t.column("symbol")).to_pylist())
        # clock skew: the exchange's message time (or event time where it sends none) vs ts_recv
        col = t.column
        diff = pc.subtract(pc.coalesce(col("ts_exchange"), col("ts_event")), col("ts_recv"))
        skewed = pc.greater(pc.abs(diff), int(self.o.skew_threshold_s * NS))
        k = _count(skewed)
        if k:
            mm = pc.min_max(pc.abs(pc.filter(diff, skewed)))
            self._flag(ex, ds, "clock_skew", k, _first(skewed, t), max_abs_ns=int(mm["max"].as_py()))

    def _judge(self, u: _Union, upto: int | None) -> None:
        """Judge the buffered rows with an exchange time below `upto` (None: all of them)."""
        ready, keep = [], []
        for b in u.buffer:
            if upto is None:
                ready.append(b)
                continue
            m = pc.less(b.column("_st"), upto)
            n = _count(m)
            if n == b.num_rows:
                ready.append(b)
            elif n == 0:
                keep.append(b)
            else:
                ready.append(b.filter(m))
                keep.append(b.filter(pc.invert(m)))
        u.buffer = keep
        u.rows = sum(b.num_rows for b in keep)
        if upto is not None:
            u.closed = upto if u.closed is None else max(u.closed, upto)
        if not ready:
            return
        chunk = pa.concat_tables(ready) if len(ready) > 1 else ready[0]
        chunk = chunk.append_column("_row", pa.array(np.arange(chunk.num_rows, dtype=np.int64)))
        ex, ds = u.exchange, u.dataset
        found: list[Gap] = []
        if u.seq is not None:
            rule = u.rule
            try:
                ids = pc.cast(chunk.column(rule.column), pa.int64())
            except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
                self._flag(ex, ds, "ids_not_integer", chunk.num_rows, None, detail=str(e)[:200])
            else:
                cols = {"symbol": chunk.column("symbol"), rule.column: ids, "ts_recv": chunk.column("ts_recv")}
                if rule.count_column:
                    cols[rule.count_column] = chunk.column(rule.count_column)
                t = pa.table(cols)
                t = t.take(pc.sort_indices(t, sort_keys=[("symbol", "ascending"), (rule.column, "ascending"),
                                                         ("ts_recv", "ascending")]))
                found += u.seq.observe(t)
        if u.tgap is not None:
            found += u.tgap.observe(chunk.select(["symbol", "ts_recv"]))
        for g in sorted(found, key=lambda g: (g.ts_from, g.symbol, g.kind)):
            (self.seq_gaps if g.kind == "sequence" else self.time_gaps).add(g)
            self._gap_totals(g)
        reps = self._dedup(u, chunk, upto)
        self._values(ds, ex, chunk if len(reps) == chunk.num_rows else chunk.take(pa.array(reps)))

    def _dedup(self, u: _Union, chunk: pa.Table, upto: int | None) -> np.ndarray:
        """Count the slice's unique rows and duplicates (across instances, within an instance),
        identities of the tail of the previous slices included. -> the rows of the slice that
        are the first copy of their message (and those without identity)."""
        ident, keys, valid = _identity(u.dataset, chunk)
        n, n_valid = chunk.num_rows, ident.num_rows
        ident = ident.append_column("_old", pa.array(np.zeros(n_valid, np.int64)))
        both = pa.concat_tables([u.tail, ident]) if u.tail is not None and u.tail.num_rows else ident
        # per (message, instance), then per message: copies, instances, and how many of each were
        # counted in an earlier slice (two plain hash aggregations: cheaper than count_distinct)
        g = both.group_by(keys + ["_inst"], use_threads=False).aggregate(
            [("_old", "count"), ("_old", "sum"), ("_old", "max"), ("_row", "min")])
        g = g.group_by(keys, use_threads=False).aggregate(
            [("_old_count", "sum"), ("_old_sum", "sum"), ("_inst", "count"), ("_old_max", "sum"),
             ("_row_min", "min")])
        c_all = g.column("_old_count_sum").to_numpy()
        d_all = g.column("_inst_count").to_numpy()
        c_old = g.column("_old_sum_sum").to_numpy()
        d_old = g.column("_old_max_sum").to_numpy()
        had = c_old > 0                            # counted in an earlier slice already
        groups, seen_before = len(c_all), int(np.count_nonzero(had))
        d = self.per_ds[(u.exchange, u.dataset)]
        d["unique_rows"] += groups - seen_before + (n - n_valid)
        d["duplicates_within_instance"] += int((c_all - d_all).sum() - (c_old - d_old).sum())
        d["duplicates_across_instances"] += int(d_all.sum() - groups - (d_old.sum() - seen_before))
        if upto is not None:                       # carried to the next slice
            keep = both.filter(pc.greater_equal(both.column("_st"), upto - int(UNION_TAIL_S * NS)))
            m = keep.num_rows
            u.tail = keep.select(keys + ["_inst", "_st"]).append_column(
                "_row", pa.array(np.full(m, -1, np.int64))).append_column("_old", pa.array(np.ones(m, np.int64)))
        firsts = g.column("_row_min_min").to_numpy()[~had]
        alone = np.flatnonzero(~pc.fill_null(valid, False).to_numpy())
        return np.sort(np.concatenate([firsts, alone])) if len(alone) else np.sort(firsts)

    def _gap_totals(self, g: Gap) -> None:
        d = self.per_ds.setdefault((g.exchange, g.dataset), {"files": 0, "rows": 0, "bytes": 0})
        key = "sequence_gaps" if g.kind == "sequence" else "time_gaps"
        d[key] = d.get(key, 0) + 1
        if g.missed:
            d["ids_missed"] = d.get("ids_missed", 0) + g.missed

    def _values(self, ds: str, ex: str, t: pa.Table) -> None:
        """Content of each message once (the first copy of each)."""
        col = t.column
        flag = self._flag

        def nonpos(*names):
            for n in names:
                m = pc.less_equal(col(n), 0)
                k = _count(m)
                if k:
                    flag(ex, ds, f"non_positive_{n}", k, _first(m, t))

        if ds == "bbo":
            crossed = pc.greater(col("bid_px"), col("ask_px"))
            locked = pc.equal(col("bid_px"), col("ask_px"))
            flag(ex, ds, "crossed_bbo", _count(crossed), _first(crossed, t))
            flag(ex, ds, "locked_bbo", _count(locked), _first(locked, t))
            nonpos("bid_px", "ask_px", "bid_sz", "ask_sz")
        elif ds == "trades":
            nonpos("price", "size")
            bad_side = pc.invert(pc.is_in(col("side"), value_set=pa.array(["buy", "sell"])))
            flag(ex, ds, "invalid_side", _count(bad_side), _first(bad_side, t))
        elif ds == "mark_price":
            nonpos("mark_px", "index_px")

    # -- second pass: time of the frames around each listed hole --
    def _hole_times(self, frames_files: list[FileInfo], wanted: dict[str, set[int]]) -> dict[tuple[str, int], int]:
        found: dict[tuple[str, int], int] = {}
        for info in frames_files:
            need = wanted.get(info.run_id)
            if not need or not info.readable_data:
                continue
            if info.min_seq is not None and not any(info.min_seq <= s <= info.max_seq for s in need):
                continue
            value_set = pa.array(sorted(need), pa.int64())
            for t in self._batches(info, ["recv_seq", "ts_recv"]):
                hit = t.filter(pc.is_in(t.column("recv_seq"), value_set=value_set))
                for s, ts in zip(hit.column("recv_seq").to_pylist(), hit.column("ts_recv").to_pylist()):
                    found[(info.run_id, s)] = ts
        return found

    # -- shards, coverage, instances --
    def _shard_files(self) -> dict[str, dict[str, dict]]:
        """exchange -> shard -> what its files say (replicas, instances, files, rows), wanted
        exchanges only, every dataset."""
        per: dict[str, dict[str, dict]] = {}
        for i in self.infos:
            ex = i.ref.exchange
            if not self._wanted(ex):
                continue
            s = per.setdefault(ex, {}).setdefault(i.shard_text, {"replicas": set(), "instances": set(),
                                                                  "files": 0, "rows": 0, "frames": 0})
            s["replicas"].add(i.replica)
            s["instances"].add(i.instance_id)
            s["files"] += 1
            s["frames" if i.ref.dataset == "frames" else "rows"] += i.rows
        return per

    def _coverage(self, per: dict[str, dict[str, dict]]) -> tuple[dict, list[str], dict[str, list[str]]]:
        """The universe per exchange against the symbols recorded, shards seen vs expected.
        per: _shard_files(). -> (report section, findings, exchange -> the shards expected)"""
        o, cap = self.o, self.o.max_list
        expected_shards: dict[str, list[str]] = {}
        exchanges = set(per) | set(o.exchanges or ())
        snapshots: dict[str, tuple] = {}
        if o.symbols is not None and o.dates:
            for ex in EXCHANGES:
                if self._wanted(ex):
                    snapshots[ex] = reference_instruments(self.fs, self.base, ex, o.dates)
                    if snapshots[ex][1]:
                        exchanges.add(ex)
        out: dict = {"requested": o.symbols, "exchanges": {}, "notes": []}
        findings: list[str] = []
        unknown: dict[str, list[str]] = {}           # why -> exchanges (one note per reason)
        for ex in sorted(exchanges):
            shards = per.get(ex, {})
            ns = sorted({sharding.parse(t).count for t in shards})
            seen_syms = self.sym_seen.get(ex, {})
            recorded = set().union(*seen_syms.values()) if seen_syms else set()
            # the universe
            universe: list[str] | None = None
            uni = {"status": "unknown"}
            if o.symbols is None:
                uni["why"] = "no requested symbols given (--symbols, or the settings' symbols)"
            else:
                insts, paths, problems = snapshots.get(ex, ([], [], []))
                out["notes"] += problems
                if not paths:
                    uni["why"] = f"no reference snapshot of {', '.join(o.dates)} or before under reference/{ex}/"
                    uni["note"] = (f"no reference snapshot of {', '.join(o.dates)} or before "
                                   "(reference/<exchange>/instruments-<fetch time>-<instance>.parquet)")
                else:
                    found, missing = resolve_symbols(o.symbols, insts)
                    universe = sorted(i.symbol for i in found)
                    uni = {"status": "known", "symbols": len(universe), "snapshots": len(paths),
                           "listed": len(insts), "not_listed": missing[:cap]}
                    if missing:
                        out["notes"].append(f"{ex}: {len(missing)} requested symbol(s) not listed in the reference "
                                            f"snapshots ({', '.join(missing[:10])}): not part of its universe")
            if universe is None:
                unknown.setdefault(uni["note"] if "note" in uni else uni["why"], []).append(ex)
                uni.pop("note", None)
            owned = lambda text: universe is None or any(sharding.parse(text).owns(ex, s) for s in universe)  # noqa: E731
            # shards seen vs expected (0..N-1 of every N seen)
            rows_sh = []
            missing_sh, idle = [], []
            for n in ns:
                for i in range(n):
                    text = f"{i}/{n}"
                    s = shards.get(text)
                    owns = None if universe is None else sum(1 for x in universe if shard_of_text(ex, x, text))
                    if s is None:
                        (missing_sh if owned(text) else idle).append(text)
                        rows_sh.append({"shard": text, "seen": False, "replicas": [], "instances": [], "files": 0,
                                        "rows": 0, "symbols": 0, "owns": owns})
                        continue
                    rows_sh.append({"shard": text, "seen": True, "replicas": sorted(s["replicas"]),
                                    "instances": sorted(s["instances"]), "files": s["files"], "rows": s["rows"],
                                    "frames": s["frames"], "symbols": len(seen_syms.get(text, ())), "owns": owns})
            expected_shards[ex] = sorted(set(shards) | set(missing_sh), key=_shard_key)
            entry = {"universe": uni, "shard_counts": ns, "resharded": len(ns) > 1, "shards": rows_sh,
                     "shards_expected": sum(ns), "shards_seen": len(shards), "missing_shards": missing_sh,
                     "idle_shards": idle, "symbols_recorded": len(recorded)}
            if len(ns) > 1:
                findings.append(f"{ex}: files disagree on the number of shards ({', '.join(map(str, ns))}): "
                                "resharded during the checked days (coverage per N in the report)")
            if missing_sh:
                findings.append(f"{ex}: shard(s) {', '.join(missing_sh)} wrote nothing")
            # a symbol recorded by a shard that does not own it (another version's hash, a bad setting)
            foreign = []
            for text, syms in sorted(seen_syms.items()):
                sh = sharding.parse(text)
                for sym in sorted(syms):
                    if not sh.owns(ex, sym):
                        foreign.append({"symbol": sym, "shard": text,
                                        "owner": f"{sharding.shard_of(ex, sym, sh.count)}/{sh.count}"})
            entry["foreign"] = foreign[:cap]
            if foreign:
                findings.append(f"{ex}: {len(foreign)} symbol(s) recorded by a shard that does not own them")
            if universe is not None:
                not_rec = [x for x in universe if x not in recorded]
                entry["universe_recorded"] = len(universe) - len(not_rec)
                entry["not_recorded"] = [{"symbol": x, "owners": [
                    {"shard": (t := f"{sharding.shard_of(ex, x, n)}/{n}"), "wrote_anything": t in shards,
                     "instances": sorted(shards[t]["instances"]) if t in shards else []} for n in ns]}
                    for x in not_rec[:cap]]
                entry["not_recorded_truncated"] = max(0, len(not_rec) - cap)
                extra = sorted(recorded - set(universe))
                entry["outside_universe"] = {"symbols": len(extra), "first": extra[:20]}
                entry["per_n"] = {str(n): {"not_recorded": [x for x in universe if not any(
                    x in seen_syms.get(t, ()) for t in shards if sharding.parse(t).count == n)][:cap]} for n in ns}
                if not_rec:
                    owners = sorted({o_["shard"] for x in entry["not_recorded"] for o_ in x["owners"]}, key=_shard_key)
                    findings.append(f"{ex}: {len(not_rec)} symbol(s) of the universe recorded by no shard"
                                    + (f" (owners {', '.join(owners)})" if owners else " (no files at all)"))
            out["exchanges"][ex] = entry
        out["notes"] += [f"coverage unknown for {', '.join(exs)}: {why}" for why, exs in unknown.items()]
        return out, findings, expected_shards

    def _instances(self) -> list[dict]:
        inst: dict[str, dict] = {}
        for i in self.infos:
            if not self._wanted(i.ref.exchange):
                continue
            e = inst.setdefault(i.instance_id, {"shards": set(), "replicas": set(), "runs": set(), "exchanges": set(),
                                                "first": None, "last": None, "files": 0, "rows": 0, "frames": 0})
            e["shards"].add(i.shard_text)
            e["replicas"].add(i.replica)
            e["runs"].add(i.run_id)
            e["exchanges"].add(i.ref.exchange)
            e["files"] += 1
            e["frames" if i.ref.dataset == "frames" else "rows"] += i.rows
            if i.min_ts is not None:
                e["first"] = i.min_ts if e["first"] is None else min(e["first"], i.min_ts)
                e["last"] = i.max_ts if e["last"] is None else max(e["last"], i.max_ts)
        return [{"instance_id": k, "shard": ",".join(sorted(e["shards"], key=_shard_key)),
                 "replica": ",".join(sorted(e["replicas"])), "runs": sorted(e["runs"]),
                 "exchanges": sorted(e["exchanges"]), "first_ts_recv": iso(e["first"]),
                 "last_ts_recv": iso(e["last"]), "files": e["files"], "rows": e["rows"], "frames": e["frames"]}
                for k, e in sorted(inst.items())]

    # -- offline windows: per shard (the union of its replicas), and per replica --
    def _offline(self, per: dict[str, dict[str, dict]], expected_shards: dict[str, list[str]]
                 ) -> tuple[list[dict], dict, dict, list[dict]]:
        """-> (windows, downtime per exchange and day, per shard, replica windows)"""
        o = self.o
        span_lo = day_start_ns(o.dates[0])
        span_hi = day_start_ns(o.dates[-1]) + schema.NS_PER_DAY
        complete = span_hi <= self.now_ns
        start_from = "day_start"
        if span_lo + schema.NS_PER_DAY > self.now_ns:
            # a day not over yet (today): from its first file on, not from midnight (the hours
            # before the collector started today are not an outage of the day being recorded)
            first = self._first_ts(o.dates[0])
            if first is not None:
                span_lo, start_from = first, "first_file"
        end = span_hi if complete else max(self.now_ns, span_lo)
        self.window = {"start": iso(span_lo), "end": iso(end), "seconds": round((end - span_lo) / NS, 3),
                       "from": start_from, "to": "day_end" if complete else "now"}
        thr = int(o.offline_threshold_s * NS)
        expected = set(o.exchanges) if o.exchanges is not None else set(self.per_ex)

        def find(lo_hi):
            return silences(*lo_hi, span_lo, span_hi, end, thr, o.day_edges, complete)

        windows, replica_windows, by_shard = [], [], {}
        for ex in sorted(expected):
            shards = expected_shards.get(ex) or []
            if not shards:                           # an expected exchange without a single file
                windows += [(ex, None, [], a, z, edge) for a, z, edge in find((np.zeros(0, np.int64),) * 2)]
                continue
            for text in shards:
                info = per.get(ex, {}).get(text, {"replicas": set(), "instances": set()})
                labels = sorted(info["replicas"])
                reps = {r: b for (e, t, r), b in self.buckets.items() if e == ex and t == text}
                union = Buckets(self.bucket_ns)
                for b in reps.values():
                    union.merge(b)
                found = find(union.spans())
                windows += [(ex, text, labels, a, z, edge) for a, z, edge in found]
                by_shard.setdefault(ex, {})[text] = {"replicas": labels, "instances": sorted(info["instances"]),
                                                     "windows": len(found), "downtime_s": _per_day(
                                                         [(a, z) for a, z, _ in found])}
                if len(labels) < 2:
                    continue
                spans = {r: (reps[r].spans() if r in reps else (np.zeros(0, np.int64),) * 2) for r in labels}
                for r in labels:
                    for a, z, edge in find(spans[r]):
                        covered = None
                        if not _overlaps(a, z, found):
                            covered = "+".join(x for x in labels if x != r and bool(
                                np.any((spans[x][1] > a) & (spans[x][0] < z)))) or None
                        replica_windows.append({"exchange": ex, "shard": text, "replica": r,
                                                "start": iso(a), "end": iso(z), "start_ns": a, "end_ns": z,
                                                "duration_s": round((z - a) / NS, 3), "edge": edge,
                                                "covered_by": covered})
        out = [{"exchange": ex, "shard": text, "replicas": labels, "start": iso(a), "end": iso(z),
                "start_ns": a, "end_ns": z, "duration_s": round((z - a) / NS, 3), "edge": edge}
               for ex, text, labels, a, z, edge in windows]
        downtime = {}
        for ex in sorted({w["exchange"] for w in out}):
            days = _per_day([(w["start_ns"], w["end_ns"]) for w in out if w["exchange"] == ex])
            if days:
                downtime[ex] = days
        return out, downtime, by_shard, replica_windows

    # -- report --
    def report(self, t0: float, frames_files: list[FileInfo]) -> dict:
        o = self.o
        cap = o.max_list
        per_shard = self._shard_files()
        coverage, coverage_findings, expected_shards = self._coverage(per_shard)
        offline, downtime, by_shard, replica_windows = (self._offline(per_shard, expected_shards) if o.dates
                                                        else ([], {}, {}, []))
        # accounting
        runs_out, by_ex_lost = [], {}
        holes_all = []
        for run, rs in sorted(self.runs.items()):
            first, last, holes = rs.holes()
            meta = self.run_meta.get(run, {"instance_id": "?", "exchanges": set()})
            lost = sum(b - a + 1 for a, b, _, _ in holes)
            shown = [h for h in holes if self._wanted_label(hole_label(h[2], h[3]))]
            for a, b, pc_, nc in shown:
                lab = hole_label(pc_, nc)
                e = by_ex_lost.setdefault(lab, {"lost_frames": 0, "holes": 0})
                e["lost_frames"] += b - a + 1
                e["holes"] += 1
            holes_all.append((run, shown))
            runs_out.append({"run_id": run, "instance_id": meta["instance_id"],
                             "exchanges": sorted(meta["exchanges"]), "frames": rs.frames,
                             "first_seq": first, "last_seq": last, "lost_frames": lost,
                             "holes": len(holes), "duplicate_recv_seq": rs.duplicates, "windows": []})
        wanted: dict[str, set[int]] = {}
        budget = cap
        for run, shown in holes_all:
            for a, b, _, _ in shown[:max(budget, 0)]:
                wanted.setdefault(run, set()).update((a - 1, b + 1))
            budget -= len(shown)
        times = self._hole_times(frames_files, wanted) if wanted else {}
        budget = cap
        for r, (run, shown) in zip(runs_out, holes_all):
            for a, b, pc_, nc in shown[:max(budget, 0)]:
                r["windows"].append({"from_seq": a, "to_seq": b, "lost": b - a + 1,
                                     "exchange": hole_label(pc_, nc),
                                     "ts_from": iso(times.get((run, a - 1))), "ts_to": iso(times.get((run, b + 1)))})
            budget -= len(shown)
            r["windows_truncated"] = max(0, len(shown) - len(r["windows"]))
        for r in runs_out:
            if r["duplicate_recv_seq"]:
                self._flag("|".join(r["exchanges"]), "frames", "duplicate_recv_seq", r["duplicate_recv_seq"], None)

        def gap_dict(g: Gap) -> dict:
            d = g.as_dict()
            d["ts_from"], d["ts_to"] = iso(g.ts_from), iso(g.ts_to)
            d["duration_s"] = round((g.ts_to - g.ts_from) / NS, 3)
            d["during_offline"] = any(w["exchange"] == g.exchange and w["start_ns"] < g.ts_to
                                      and g.ts_from < w["end_ns"]
                                      and (w["shard"] is None or shard_of_text(g.exchange, g.symbol, w["shard"]))
                                      for w in offline)
            return d

        def dups(v: dict) -> int:
            return v.get("duplicates_across_instances", 0) + v.get("duplicates_within_instance", 0)

        content = sorted(self.content.values(), key=lambda c: (c["exchange"], c["dataset"], c["check"]))
        for c in content:
            if "max_abs_ns" in c:
                c["max_abs_s"] = round(c.pop("max_abs_ns") / NS, 3)
        exchanges = sorted(set(self.per_ex) | {w["exchange"] for w in offline})
        summary = {}
        for ex in exchanges:
            pe = self.per_ex.get(ex, {"files": 0, "bytes": 0, "rows": 0, "frames": 0})
            dss = [v for (e, _), v in self.per_ds.items() if e == ex]
            summary[ex] = dict(pe, lost_frames=by_ex_lost.get(ex, {}).get("lost_frames", 0),
                               sequence_gaps=sum(v.get("sequence_gaps", 0) for v in dss),
                               ids_missed=sum(v.get("ids_missed", 0) for v in dss),
                               time_gaps=sum(v.get("time_gaps", 0) for v in dss),
                               offline_windows=sum(1 for w in offline if w["exchange"] == ex),
                               downtime_s=round(sum(downtime.get(ex, {}).values()), 3),
                               content_issues=sum(c["count"] for c in content if c["exchange"] == ex),
                               unique_rows=sum(v.get("unique_rows", 0) for (e, d), v in self.per_ds.items()
                                               if e == ex and d != "frames"),
                               duplicates=sum(dups(v) for (e, _), v in self.per_ds.items() if e == ex))
        lost_total = sum(v["lost_frames"] for v in by_ex_lost.values())
        bad_frames = self.bad_frames_files
        if bad_frames:
            self.notes.append(f"{bad_frames} frames file(s) could not be read: their recv_seq count as holes")
        findings = []
        n_viol = sum(self.violation_counts.values())
        if n_viol:
            findings.append(f"{n_viol} schema/readability violation(s): " +
                            ", ".join(f"{k} {v}" for k, v in sorted(self.violation_counts.items())))
        if not self.refs:
            findings.append(self._no_data_finding())
        if self.legacy:
            findings.append(f"{len(self.legacy)} director(ies) in the old exchange=<x> layout (checked all the "
                            f"same; pandas and pyarrow.parquet.read_table cannot read them): move them with "
                            f"{migrate.command(o.root, o.config)}")
        if self.in_both:
            self.notes.append(f"{len(self.in_both)} file(s) in both layouts (a migration interrupted between "
                              "copy and delete): checked once, at the new place; --migrate-layout removes the old copy")
        if lost_total:
            findings.append(f"{lost_total} frame(s) lost (recv_seq holes)")
        n_seq = sum(v.get("sequence_gaps", 0) for v in self.per_ds.values())
        if n_seq:
            findings.append(f"{n_seq} sequence gap(s), {sum(v.get('ids_missed', 0) for v in self.per_ds.values())} id(s) missed")
        n_time = sum(v.get("time_gaps", 0) for v in self.per_ds.values())
        if n_time:
            findings.append(f"{n_time} time gap(s)")
        if offline:
            findings.append(f"{len(offline)} offline window(s)")
        n_content = sum(c["count"] for c in content)
        if n_content:
            findings.append(f"{n_content} content issue(s)")
        findings += coverage_findings
        if self.late_rows:
            self.notes.append(f"{self.late_rows} row(s) received more than {UNION_MARGIN_S:g} s after their exchange "
                              "time were judged in a later slice: a copy of them may count as unique, an id "
                              "gap they fill may show")
        exit_code = 2 if n_viol else (1 if findings else 0)
        infos = self.infos
        legacy_files = sum(1 for r in self.refs if r.legacy)
        return {
            "root": o.root, "dates": o.dates, "exchanges": o.exchanges or exchanges,
            "date_choice": self.auto_date, "window": self.window,
            "layout": {"legacy_dirs": self.legacy, "legacy_files_checked": legacy_files,
                       "in_both_layouts": len(self.in_both),
                       "migrate_command": migrate.command(o.root, o.config) if self.legacy else None},
            "thresholds": {"offline_s": o.offline_threshold_s, "gap_floor_s": o.gap_floor_s,
                           "gap_factor": o.gap_factor, "skew_s": o.skew_threshold_s,
                           "day_edges": o.day_edges},
            "exit_code": exit_code, "findings": findings,
            "elapsed_s": round(time.monotonic() - t0, 3),
            "files": {"checked": len(self.refs), "rows": sum(i.rows for i in infos),
                      "bytes": sum(r.size for r in self.refs), "temporary": len(self.temp_files),
                      "other": len(self.other_files)},
            "summary": summary,
            "datasets": [dict(v, exchange=e, dataset=d) for (e, d), v in sorted(self.per_ds.items())
                         if self._wanted(e)],
            "violations": list(self.violations), "violations_truncated": self.violations.dropped,
            "accounting": {"runs": runs_out, "by_exchange": by_ex_lost, "lost_frames": lost_total,
                           "complete": not bad_frames},
            "sequence_gaps": [gap_dict(g) for g in sorted(self.seq_gaps, key=_gap_order)],
            "sequence_gaps_truncated": self.seq_gaps.dropped,
            "time_gaps": [gap_dict(g) for g in sorted(self.time_gaps, key=_gap_order)],
            "time_gaps_truncated": self.time_gaps.dropped,
            "offline": {"windows": offline[:cap], "windows_truncated": max(0, len(offline) - cap),
                        "downtime_s": downtime, "by_shard": by_shard},
            "replicas": {"windows": replica_windows[:cap], "windows_truncated": max(0, len(replica_windows) - cap),
                         "covered": sum(1 for w in replica_windows if w["covered_by"]),
                         "not_covered": sum(1 for w in replica_windows if not w["covered_by"])},
            "content": content,
            "duplicates": [{"exchange": e, "dataset": d, "rows": dups(v),
                            "duplicates_across_instances": v["duplicates_across_instances"],
                            "duplicates_within_instance": v["duplicates_within_instance"]}
                           for (e, d), v in sorted(self.per_ds.items()) if dups(v) and self._wanted(e)],
            "coverage": coverage,
            "instances": self._instances(),
            "notes": self.notes,
        }

    def _wanted_label(self, label: str) -> bool:
        return self.o.exchanges is None or any(p in self.o.exchanges for p in label.split("|"))


def _gap_order(g: Gap):
    return g.ts_from, g.exchange, g.dataset, g.symbol


def check(opts: Options) -> dict:
    return Checker(opts).run()


# ---- text output -----------------------------------------------------------------------------------

def _fmt_int(n) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _where(first: dict) -> str:
    return " ".join(str(v) if k in ("symbol", "ts_recv") else f"{k} {v}" for k, v in first.items())


def render_text(r: dict, max_lines: int = 20) -> str:
    out = []
    w = out.append
    f = r["files"]
    dates = r["dates"][0] + (f"..{r['dates'][-1]}" if len(r["dates"]) > 1 else "") if r["dates"] else "-"
    w(f"check_raw_sanity  root={r['root']}  dates={dates}"
      + f"  exchanges={','.join(r['exchanges']) or '-'}")
    if r.get("date_choice"):
        w(f"checked {r['date_choice']['date']}: {r['date_choice']['why']} (no --date given)")
    win = r.get("window")
    if win and win["from"] == "first_file":
        w(f"window: {win['start']} (first file of the day) .. {win['end']} (now), {win['seconds']:.0f} s: "
          "the day is not over; the time before its first file is not counted as offline")
    w(f"{_fmt_int(f['checked'])} files, {_fmt_int(f['rows'])} rows, {_fmt_bytes(f['bytes'])}"
      f" checked in {r['elapsed_s']:.1f} s"
      + (f"; {f['temporary']} temporary (.tmp) file(s) present" if f["temporary"] else ""))
    w("")
    head = ("exchange", "files", "rows", "unique", "frames", "lost", "seq gaps", "ids missed", "time gaps",
            "offline", "downtime s", "content", "dups")
    rows = [head]
    for ex, s in r["summary"].items():
        rows.append((ex, _fmt_int(s["files"]), _fmt_int(s["rows"]), _fmt_int(s.get("unique_rows", 0)),
                     _fmt_int(s["frames"]),
                     _fmt_int(s["lost_frames"]), _fmt_int(s["sequence_gaps"]), _fmt_int(s["ids_missed"]),
                     _fmt_int(s["time_gaps"]), _fmt_int(s["offline_windows"]), f"{s['downtime_s']:.1f}",
                     _fmt_int(s["content_issues"]), _fmt_int(s["duplicates"])))
    for lab, v in r["accounting"]["by_exchange"].items():
        if lab not in r["summary"]:
            rows.append((lab, "", "", "", "", _fmt_int(v["lost_frames"]), "", "", "", "", "", "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for row in rows:
        w("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row)).rstrip())

    def section(title, items, line, truncated=0):
        if not items:
            return
        w("")
        w(title)
        for it in items[:max_lines]:
            w("  " + line(it))
        more = len(items) - max_lines + truncated if len(items) > max_lines else truncated
        if more > 0:
            w(f"  ... and {more} more (see --json)")

    def table(title, head, lines):
        if not lines:
            return
        w("")
        w(title)
        body = [head] + [tuple(str(c) for c in line) for line in lines[:max_lines]]
        widths = [max(len(row[i]) for row in body) for i in range(len(head))]
        for row in body:
            w("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        if len(lines) > max_lines:
            w(f"  ... and {len(lines) - max_lines} more (see --json)")

    insts = r.get("instances") or []
    if len(insts) > 1 or any(i["shard"] != "0/1" or i["replica"] for i in insts):
        table("instances:", ("instance", "shard", "replica", "runs", "exchanges", "first ts_recv", "last ts_recv",
                             "files", "rows", "frames"),
              [(i["instance_id"], i["shard"], i["replica"] or "-", len(i["runs"]), ",".join(i["exchanges"]),
                i["first_ts_recv"] or "-", i["last_ts_recv"] or "-", _fmt_int(i["files"]), _fmt_int(i["rows"]),
                _fmt_int(i["frames"])) for i in insts])
    cov = (r.get("coverage") or {}).get("exchanges") or {}
    if any(c["shard_counts"] != [1] or c["universe"]["status"] == "known" for c in cov.values()):
        w("")
        w("coverage (universe = requested symbols listed in the reference snapshots):")
        for ex, c in cov.items():
            u = c["universe"]
            uni = (f"universe {u['symbols']} symbol(s), {c['universe_recorded']} recorded" if u["status"] == "known"
                   else f"universe unknown, {c['symbols_recorded']} symbol(s) recorded")
            shards = "; ".join(f"{x['shard']}: " + ((",".join(x["replicas"]) or "-") if x["seen"] else
                                                    "idle (owns no symbol)" if x["owns"] == 0 else "NOTHING")
                               for x in c["shards"])
            w(f"  {ex:<8} {uni}; shards seen {c['shards_seen']} of {c['shards_expected']} ({shards})"
              + ("  [RESHARDED]" if c["resharded"] else ""))
            for x in c.get("not_recorded", [])[:max_lines]:
                owners = ", ".join(f"shard {o['shard']} " + (f"wrote files ({','.join(o['instances'])})"
                                                           if o["wrote_anything"] else "wrote nothing")
                                   for o in x["owners"]) or "no files of this exchange"
                w(f"    {x['symbol']}: recorded by no shard ({owners})")
            for x in c.get("foreign", [])[:max_lines]:
                w(f"    {x['symbol']}: recorded by shard {x['shard']}, owned by {x['owner']}")
    section("violations:", r["violations"], lambda v: f"{v['kind']:<11} {v['path']}: {v['detail']}",
            r["violations_truncated"])
    hole_lines = [(run, h) for run in r["accounting"]["runs"] for h in run["windows"]]
    section("lost frames (recv_seq holes; exchange = neighbouring frames):", hole_lines,
            lambda x: f"run {x[0]['run_id']} ({x[0]['instance_id']}) {x[1]['exchange']}: seq "
                      f"{x[1]['from_seq']}-{x[1]['to_seq']} ({x[1]['lost']} lost) "
                      f"{x[1]['ts_from']} .. {x[1]['ts_to']}",
            sum(run["windows_truncated"] for run in r["accounting"]["runs"]))
    section(f"offline windows (no frames > {r['thresholds']['offline_s']:g} s):", r["offline"]["windows"],
            lambda o: f"{o['exchange']:<8} " + (f"shard {o['shard']} " if o.get("shard") not in (None, "0/1") else "")
                      + f"{o['start']} .. {o['end']}  {o['duration_s']:.1f} s"
                      + (f"  [{o['edge']}]" if o["edge"] else ""),
            r["offline"]["windows_truncated"])
    rep_w = (r.get("replicas") or {}).get("windows") or []
    section("replica windows (no frames from one replica; covered by its twin = not a loss):", rep_w,
            lambda o: f"{o['exchange']:<8} shard {o['shard']} replica {o['replica']}: {o['start']} .. {o['end']}  "
                      f"{o['duration_s']:.1f} s" + (f"  [{o['edge']}]" if o["edge"] else "")
                      + (f"  covered by {o['covered_by']}" if o["covered_by"] else "  NOT covered (offline above)"),
            (r.get("replicas") or {}).get("windows_truncated", 0))
    if r["offline"]["downtime_s"]:
        w("  downtime per day: " + "; ".join(f"{ex} " + ", ".join(f"{d} {s:.1f} s" for d, s in days.items())
                                           for ex, days in r["offline"]["downtime_s"].items()))
    section("sequence gaps:", r["sequence_gaps"],
            lambda g: f"{g['exchange']} {g['dataset']} {g['symbol']}: ids {g['from_id']} -> {g['to_id']} "
                      f"({g['missed']} missed) {g['ts_from']} .. {g['ts_to']}"
                      + ("  [offline]" if g["during_offline"] else ""),
            r["sequence_gaps_truncated"])
    section("time gaps:", r["time_gaps"],
            lambda g: f"{g['exchange']} {g['dataset']} {g['symbol']}: {g['duration_s']:.1f} s silent "
                      f"{g['ts_from']} .. {g['ts_to']}" + ("  [offline]" if g["during_offline"] else ""),
            r["time_gaps_truncated"])
    section("content (flagged, not fixed):", r["content"],
            lambda c: f"{c['exchange']} {c['dataset']} {c['check']}: {_fmt_int(c['count'])}"
                      + (f" (max {c['max_abs_s']} s)" if "max_abs_s" in c else "")
                      + (f"; first {_where(c['first'])}" if c.get("first") else ""))
    section("duplicate rows (reported, not an error):", r["duplicates"],
            lambda d: f"{d['exchange']} {d['dataset']}: {_fmt_int(d['rows'])} ("
                      f"{_fmt_int(d['duplicates_across_instances'])} across instances, "
                      f"{_fmt_int(d['duplicates_within_instance'])} within an instance)")
    lay = r.get("layout") or {}
    if lay.get("legacy_dirs"):
        w("")
        w("old layout (exchange=<x>/ directories: pandas and pyarrow.parquet.read_table cannot read them;"
          " checked all the same):")
        for d in lay["legacy_dirs"][:max_lines]:
            w(f"  {d}/")
        if len(lay["legacy_dirs"]) > max_lines:
            w(f"  ... and {len(lay['legacy_dirs']) - max_lines} more (see --json)")
        w(f"  move them to <dataset>/<exchange>/ with: {lay['migrate_command']}")
    for n in r["notes"] + ((r.get("coverage") or {}).get("notes") or []):
        w(f"note: {n}")
    w("")
    verdict = {0: "OK", 1: "FINDINGS", 2: "VIOLATIONS"}[r["exit_code"]]
    w(f"result: {verdict} (exit {r['exit_code']})" + (": " + "; ".join(r["findings"]) if r["findings"] else ""))
    return "\n".join(out)


# ---- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="check_raw_sanity",
        description="Verify stored RAW data. Exit 0 clean, 1 findings (no data under the root is one), "
                    "2 schema/readability violations or a root that does not exist. With --migrate-layout: move "
                    "the first layout's files to the current one instead; exit 0 done or nothing to do, 2 "
                    "conflicts or errors (nothing lost: a file not moved is still at its old place).")
    p.add_argument("--root", help="local directory or s3://bucket/prefix (default: the settings' storage)")
    p.add_argument("--date", help="YYYY-MM-DD, 'today' or 'yesterday' (default: the last complete UTC day "
                                  "that has data; today if only today has data)")
    p.add_argument("--from", dest="start", help="first date of a range (YYYY-MM-DD)")
    p.add_argument("--to", dest="end", help="last date of a range (default: today)")
    p.add_argument("--exchange", "--exchanges", dest="exchange", help="comma separated (default: all found)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing when clean (cron)")
    p.add_argument("--offline-threshold", default="30s", help="no frames this long = offline (default 30s)")
    p.add_argument("--gap-threshold", help="time-gap floor per stream (default: settings gap_time_floor)")
    p.add_argument("--skew-threshold", default="5s", help="|ts_exchange - ts_recv| above this is flagged")
    p.add_argument("--no-day-edges", dest="day_edges", action="store_false",
                   help="do not count the time before the first / after the last frame of the days as offline")
    p.add_argument("--max-list", type=int, default=1000, help="items per list in the report (totals stay exact)")
    p.add_argument("--config", help="settings file (for the S3 endpoint/region and default root)")
    p.add_argument("--symbols", help="the requested symbols (comma separated, or ALL) the coverage is judged "
                                     "against (default: the settings' symbols)")
    p.add_argument("--migrate-layout", action="store_true",
                   help="move every file of the first layout (raw/v1/<dataset>/exchange=<x>/...) to the current "
                        "one (raw/v1/<dataset>/<x>/...), local or S3; safe to run again; checks nothing")
    p.add_argument("--dry-run", action="store_true", help="with --migrate-layout: print what would move, move nothing")
    return p


def options_from_args(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    from app import settings as settings_mod
    try:
        s = settings_mod.load(args.config, {})
    except settings_mod.SettingsError as e:
        if args.config:
            raise
        s = None
        print(f"check_raw_sanity: settings ignored ({e}); using defaults and S3_ENDPOINT/S3_REGION", file=sys.stderr)
    get = (lambda k, d: getattr(s, k)) if s is not None else (lambda k, d: os.environ.get(k.upper(), d))
    root = args.root
    if not root:
        if get("storage_backend", "local") == "s3" and get("s3_bucket", ""):
            root = f"s3://{get('s3_bucket', '')}/{get('s3_prefix', '')}".rstrip("/")
        else:
            root = get("data_dir", "./data")
    today = dt.datetime.now(dt.timezone.utc).date()
    exchanges = [e.strip() for e in args.exchange.split(",") if e.strip()] if args.exchange else None
    unknown = sorted(set(exchanges or ()) - set(EXCHANGES))
    if unknown:
        raise ValueError(f"unknown exchange {', '.join(unknown)} (known: {', '.join(EXCHANGES)})")
    if args.migrate_layout:
        given = [f for f, v in (("--date", args.date), ("--from", args.start), ("--to", args.end),
                                ("--exchange", args.exchange)) if v]
        if given:
            raise ValueError(f"--migrate-layout moves every date and exchange: {', '.join(given)} does not apply")
    elif args.dry_run:
        raise ValueError("--dry-run goes with --migrate-layout")
    # no --date/--from/--to: dates stay empty, the checker picks the last complete day with data
    dates = date_range(args.date, args.start, args.end, today) if (args.date or args.start or args.end) else []
    symbols = args.symbols if args.symbols is not None else get("symbols", None)
    if isinstance(symbols, str):
        symbols = [x.strip() for x in symbols.split(",") if x.strip()] or None
    return Options(
        root=root, dates=dates, exchanges=exchanges, config=args.config, symbols=symbols,
        offline_threshold_s=parse_duration(args.offline_threshold),
        gap_floor_s=parse_duration(args.gap_threshold) if args.gap_threshold else float(get("gap_time_floor", 60.0)),
        gap_factor=float(get("gap_time_factor", 10.0)),
        skew_threshold_s=parse_duration(args.skew_threshold), day_edges=args.day_edges,
        max_list=args.max_list, s3_endpoint=get("s3_endpoint", "") or "",
        s3_region=get("s3_region", "us-east-1") or "us-east-1"), args


def main(argv: list[str]) -> int:
    try:
        opts, args = options_from_args(argv)
    except Exception as e:  # noqa: BLE001 - a bad flag or settings file: say so, exit 2
        print(f"check_raw_sanity: {e}", file=sys.stderr)
        return 2
    if args.migrate_layout:
        try:
            return migrate.run(opts.root, opts.s3_endpoint, opts.s3_region, dry_run=args.dry_run, as_json=args.json)
        except Exception as e:  # noqa: BLE001 - storage unreachable etc.: files stay where they are
            print(f"check_raw_sanity: cannot migrate {opts.root}: {storage_s3.error_reason(e)}", file=sys.stderr)
            return 2
    try:
        report = check(opts)
    except Exception as e:  # noqa: BLE001 - storage unreachable etc.: cron must see it
        print(f"check_raw_sanity: cannot check {opts.root}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    code = report["exit_code"]
    if args.quiet and code == 0:
        return 0
    if args.json:
        print(json.dumps(report, indent=1, default=list))
    else:
        print(render_text(report))
    return code
