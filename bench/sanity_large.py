#!/usr/bin/env python3
"""Benchmark for bin/check_raw_sanity on a large synthetic day: wall time and peak RSS.

Why: the checker must verify a day of every perpetual (~100 M rows) in bounded memory (< 2 GiB).
This generates such a day in a temporary directory with the real v1 schemas, file metadata,
Parquet options and layout (one file per dataset, exchange and minute, one collector run with a
process-wide recv_seq interleaved across the exchanges, round-robin symbols with consecutive
trade ids), then runs the checker in a child process and prints its wall time and peak RSS
(resource.getrusage of that child alone). The data is clean, so the check should exit 0.

    python bench/sanity_large.py                     # 100 M rows (frames + data rows)
    python bench/sanity_large.py --rows 10_000_000 --keep /tmp/day   # smaller, keep the files
    python bench/sanity_large.py --reuse /tmp/day    # check an existing generated day again
    python bench/sanity_large.py --rows 5_000_000 --replicas 2   # the same day recorded twice

With --replicas 2 every file is written by two instances (replicas a and b of shard 0/1, their
own run and recv_seq, ts_recv 1 ms apart, the exchange's times identical), as scale-out's twins
do: the checker judges the union (every message once, the other copy a duplicate across
instances), so this measures what that costs in time and memory (--rows counts one copy).

Payloads in `frames` are short synthetic texts: the checker never reads that column.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from app import schema  # noqa: E402

DATE = "2024-03-05"
DAY_NS = 1_709_596_800 * 10**9          # 2024-03-05T00:00:00Z
MIN_NS = 60 * 10**9
RUN_ID = "20240304T000000Zbe0c"
# share of the frames per exchange, and per exchange the frame kinds (pattern of 20 frames)
EX_SHARE = {"binance": 0.45, "bybit": 0.35, "okx": 0.20}
KINDS = {  # kind -> datasets it yields (one row each)
    "binance": [("bbo", ("bbo",))] * 14 + [("trade", ("trades",))] * 4 + [("mark", ("mark_price", "funding"))] * 2,
    "bybit": [("bbo", ("bbo",))] * 12 + [("trade", ("trades",))] * 5
             + [("tickers", ("mark_price", "funding", "open_interest"))] * 3,
    "okx": [("bbo", ("bbo",))] * 13 + [("trade", ("trades",))] * 5 + [("mark", ("mark_price",))]
           + [("oi", ("open_interest",))],
}
OKX_FUNDING_EVERY = 4      # one OKX funding-rate frame instead of an oi frame every 4th pattern
SYMBOLS = {"binance": 500, "bybit": 450, "okx": 250}
CONNS = {"binance": 6, "bybit": 5, "okx": 3}


def rows_per_frame() -> float:
    return sum(EX_SHARE[ex] * sum(len(d) for _, d in KINDS[ex]) / 20 for ex in EX_SHARE)


def symbol_names(ex: str) -> pa.Array:
    n = SYMBOLS[ex]
    return pa.array([f"S{i:04d}-USDT-SWAP" if ex == "okx" else f"S{i:04d}USDT" for i in range(n)])


def plan(frames_per_min: int) -> dict:
    """Per exchange: frames per minute (a multiple of 20) and rows per dataset per minute."""
    out = {}
    for ex, share in EX_SHARE.items():
        n = max(20, int(frames_per_min * share) // 20 * 20)
        out[ex] = n
    return out


def replica_ids(replicas: int, r: int) -> tuple[str, str, str]:
    """(instance id, run id, replica label) of replica r (one replica: the historical names)."""
    if replicas == 1:
        return "bench", RUN_ID, ""
    label = "abcdefgh"[r]
    return f"bench{label}", f"{RUN_ID[:-2]}{r:02d}", label


def gen_minute(args) -> int:
    """Write the 17 files of one minute (per replica); returns rows written. Deterministic per
    minute, so minutes can be generated in any order by any worker."""
    base, minute, per_ex, replicas = args
    return sum(_gen_minute(base, minute, per_ex, replicas, r) for r in range(replicas))


def _gen_minute(base, minute, per_ex, replicas, r) -> int:
    instance, run_id, label = replica_ids(replicas, r)
    shift = r * 1_000_000                               # replica r receives each frame r ms later
    total = sum(per_ex.values())
    t0 = DAY_NS + minute * MIN_NS
    seq0 = minute * total + 1
    order = np.arange(total)
    # interleave the exchanges: frame j of the minute belongs to exchange codes[j]
    codes = np.concatenate([np.full(n, i, np.int8) for i, n in enumerate(per_ex.values())])
    rng = np.random.default_rng(minute)
    rng.shuffle(codes)
    ts_all = t0 + (order * (MIN_NS // total)).astype(np.int64)
    seq_all = (seq0 + order).astype(np.int64)
    written = 0
    fseq = minute * 20
    for ci, (ex, n) in enumerate(per_ex.items()):
        sel = codes == ci
        ts, seqs = ts_all[sel], seq_all[sel]
        conn = (np.arange(n) % CONNS[ex] + 1 + 10 * ci).astype(np.int64)
        meta = {}
        for ds in schema.ALL_DATASETS:
            meta[ds] = schema.file_metadata(ds, ex, collector_version="bench", instance_id=instance, run_id=run_id,
                                            replica=label)
        payload = pc.binary_join_element_wise('{"e":"x","u":', pc.cast(pa.array(seqs), pa.string()), "}", "")
        frames = pa.Table.from_arrays([pa.array([ex] * n, pa.string()), pa.array(conn), pa.array(seqs),
                                       pa.array(ts + shift), payload], schema=schema.SCHEMAS["frames"])
        fseq += 1
        written += _write(base, "frames", ex, frames, meta["frames"], fseq, instance, run_id)
        pattern = KINDS[ex]
        kind_idx = np.arange(n) % 20
        per_ds: dict[str, np.ndarray] = {}
        for k, (kind, dss) in enumerate(pattern):
            for ds in dss:
                per_ds.setdefault(ds, []).append(np.flatnonzero(kind_idx == k))
        if ex == "okx":   # every 4th oi frame is a funding-rate frame instead
            oi = np.sort(np.concatenate(per_ds.pop("open_interest")))
            per_ds["funding"] = [oi[::OKX_FUNDING_EVERY]]
            per_ds["open_interest"] = [np.setdiff1d(oi, oi[::OKX_FUNDING_EVERY])]
        syms = symbol_names(ex)
        for ds, parts in per_ds.items():
            idx = np.sort(np.concatenate(parts))
            m = len(idx)
            k = minute * m + np.arange(m)                  # global row counter of this dataset
            sym_i = k % len(syms)
            nth = k // len(syms) + 1                        # per-symbol consecutive counter
            t = pa.Table.from_arrays(_columns(ex, ds, syms, sym_i, nth, ts[idx], conn[idx], seqs[idx], shift),
                                     schema=schema.SCHEMAS[ds])
            fseq += 1
            written += _write(base, ds, ex, t, meta[ds], fseq, instance, run_id)
    return written


def _columns(ex, ds, syms, sym_i, nth, ts, conn, seqs, shift=0) -> list:
    m = len(ts)
    sym = syms.take(pa.array(sym_i))
    inst = pc.binary_join_element_wise(pc.utf8_slice_codeunits(sym, 0, 5), "-USDT-PERP", "")
    ms = (ts // 1_000_000 - 3) * 1_000_000             # the exchange's times: the same in every copy
    common = [pa.array([ex] * m, pa.string()), sym, inst, pa.array(ms), pa.array(ms + 1_000_000),
              pa.array(ts + shift), pa.array(conn), pa.array(seqs)]
    px = 100.0 + (nth % 50) * 0.1
    if ds == "bbo":
        return common + [pa.array(px), pa.array(np.full(m, 1.5)), pa.array(px + 0.1), pa.array(np.full(m, 2.5)),
                         pa.array(nth), pa.array(nth * 3)]
    if ds == "trades":
        tid = pc.cast(pa.array(nth), pa.string())
        if ex == "bybit":
            tid = pc.binary_join_element_wise("0000-", pc.cast(pa.array(sym_i), pa.string()), "-", tid, "")
        last = pa.array(nth * (2 if ex == "okx" else 1))
        count = pa.array(np.full(m, 2 if ex == "okx" else 1))
        if ex == "okx":
            tid = pc.cast(last, pa.string())
        side = pa.array(np.where(nth % 2 == 0, "buy", "sell"))
        return common + [tid, pa.array(px), pa.array(np.full(m, 0.5)), side, pa.array(nth), last, count,
                         pa.nulls(m, pa.bool_())]
    if ds == "mark_price":
        return common + [pa.array(px), pa.array(px - 0.01), pa.array(px + 0.01)]
    if ds == "funding":
        return common + [pa.array(np.full(m, 0.0001)), pa.array(np.full(m, DAY_NS + 8 * 3600 * 10**9)),
                         pa.nulls(m, pa.int64()), pa.nulls(m, pa.float64()), pa.array(np.full(m, 8))]
    return common + [pa.array(np.full(m, 1000.0)), pa.array(np.full(m, 100000.0))]


def _write(base: str, ds: str, ex: str, table: pa.Table, meta: dict, fseq: int, instance: str = "bench",
           run_id: str = RUN_ID) -> int:
    d = os.path.join(base, schema.partition_path(ds, ex, DATE))
    os.makedirs(d, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), os.path.join(d, f"i-{instance}-{run_id}-{fseq:06d}.parquet"),
                   **schema.parquet_options(ds, ex))
    return table.num_rows


def generate(base: str, rows: int, minutes: int, workers: int, replicas: int = 1) -> int:
    frames_per_min = int(rows / (1 + rows_per_frame()) / minutes)
    per_ex = plan(frames_per_min)
    with Pool(workers) as pool:
        return sum(pool.imap_unordered(gen_minute, [(base, m, per_ex, replicas) for m in range(minutes)],
                                       chunksize=4))


def check_only(base: str, minutes: int) -> None:
    """Child process: run the checker, print its figures as one JSON line."""
    from app import sanity
    t = time.monotonic()
    report = sanity.check(sanity.Options(root=base, dates=[DATE], day_edges=minutes >= 1440,
                                         now_ns=time.time_ns()))
    wall = time.monotonic() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": round(wall, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
                      "exit_code": report["exit_code"], "findings": report["findings"],
                      "files": report["files"]["checked"], "rows": report["files"]["rows"],
                      "unique_rows": sum(s.get("unique_rows", 0) for s in report["summary"].values()),
                      "duplicates": sum(s.get("duplicates", 0) for s in report["summary"].values()),
                      "bytes": report["files"]["bytes"],
                      "frames": sum(s["frames"] for s in report["summary"].values())}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                   help="total rows of the day, frames included (default 100 M)")
    p.add_argument("--minutes", type=int, default=1440, help="minutes of the day to generate (files per dataset)")
    p.add_argument("--workers", type=int, default=2, help="generator processes")
    p.add_argument("--replicas", type=int, default=1, choices=range(1, 9),
                   help="instances recording the same day (replicas of one shard; default 1)")
    p.add_argument("--keep", help="generate into this directory and keep it")
    p.add_argument("--reuse", help="check an already generated directory, generate nothing")
    p.add_argument("--check-only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.check_only:
        check_only(args.check_only, args.minutes)
        return 0
    base = args.reuse or args.keep or tempfile.mkdtemp(prefix="sanity_large_")
    try:
        if not args.reuse:
            t = time.monotonic()
            n = generate(base, args.rows, args.minutes, args.workers, args.replicas)
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(base) for f in fs)
            print(f"generated {n:,} rows in {time.monotonic() - t:.0f} s: {size / 2**20:,.0f} MiB under {base}",
                  flush=True)
        proc = subprocess.run([sys.executable, __file__, "--check-only", base, "--minutes", str(args.minutes)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"checked {r['files']:,} files, {r['rows']:,} rows ({r['frames']:,} frames; data rows "
              f"{r.get('unique_rows', 0):,} unique, {r.get('duplicates', 0):,} duplicates), "
              f"{r['bytes'] / 2**20:,.0f} MiB: wall {r['wall_s']} s, peak RSS {r['peak_rss_mib']:,.0f} MiB"
              f" (getrusage of the checker process), exit {r['exit_code']}"
              + (f", findings: {r['findings']}" if r["findings"] else ""))
        return 0 if r["peak_rss_mib"] < 2048 else 1
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
