#!/usr/bin/env python3
"""The writer alone, in process: simulator frames -> Writer.process/parse -> spool -> Parquet.

    python bench/writer.py [--exchanges binance] [--frames 200000] [--chunk 100000]
                           [--per-frame] [--spin 1] [--switch-ms 0.5]

Frames are made by the bundled simulator's own generators (every channel, 200 symbols), stamped
like queue items. `--per-frame` disables the adapters' batch parsers (every frame through
`parse` + `schema.build_table`: the path before the Arrow batch parsing). `--spin N` runs N
busy Python threads meanwhile, like socket threads holding the GIL: it shows what each GIL
hand-back costs the writer. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import pyarrow as pa

BATCH = 300          # frames per socket micro-batch (~64 KiB of frames per read)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app import settings as settings_mod, writer as writer_mod  # noqa: E402
from app.exchanges import create  # noqa: E402
from app.state import State  # noqa: E402
from app.handoff import FrameQueue, from_items  # noqa: E402
from app.storage import LocalStorage  # noqa: E402


def sim_frames(exchange: str, n: int, symbols: int = 200) -> list[bytes]:
    """n data frames of every channel the collector subscribes, made by the simulator."""
    from bench.firehose import Firehose
    fh = Firehose([exchange], symbols=symbols)
    fh.start()
    got: list[bytes] = []
    try:
        ex = fh.sim._ex[exchange]

        def make():
            ex.index = {v: {} for inst in ex.insts for k, v in inst.ex.items()
                        if k.startswith("t_") and k not in ("t_trade", "t_ta")}

            def publish(topic, text, rows, wtext=None):
                got.append((wtext or text).encode())
                return 1
            ex.publish = publish
            now, k = 1_700_000_000_000, 0
            while len(got) < n:
                for inst in ex.insts:
                    for _ in range(3):
                        ex.ev_bbo(inst, now + k)
                    ex.ev_trade(inst, now + k)
                ex.periodic(now + k * 1001)
                k += 1
        fh.sim._lt.call(make, timeout=120)
    finally:
        fh.stop()
    return got[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exchanges", default="binance")
    p.add_argument("--frames", type=int, default=200_000, help="frames per exchange")
    p.add_argument("--chunk", type=int, default=100_000,
                   help="frames per parse chunk (writer_batch; 1 s at 100k frames/s)")
    p.add_argument("--per-frame", action="store_true", help="no batch parsers: the per-frame path")
    p.add_argument("--spin", type=int, default=0, help="busy Python threads competing for the GIL")
    p.add_argument("--switch-ms", type=float, help="the interpreter's GIL switch interval (default 5 ms): "
                   "what the writer sets while it is behind (writer.BEHIND_SWITCH_S) is 0.5")
    args = p.parse_args(argv)
    if args.switch_ms:
        sys.setswitchinterval(args.switch_ms / 1000)
    exchanges = args.exchanges.split(",")
    per_ex = {ex: sim_frames(ex, args.frames) for ex in exchanges}
    t0 = time.time_ns()
    items, seq = [], 0            # micro-batches of BATCH frames per connection, as handed over
    for i in range(0, args.frames, BATCH):
        for ex in exchanges:
            for frame in per_ex[ex][i:i + BATCH]:
                seq += 1
                items.append((ex, 1 + i // BATCH % 5, seq, t0 + seq * 1000, frame))
    with tempfile.TemporaryDirectory() as d:
        s = settings_mod.load(None, environ={}, dotenv_path=os.path.join(d, ".env")).replace(
            data_dir=d, exchanges=exchanges, writer_batch=args.chunk)
        state = State(exchanges=exchanges)
        w = writer_mod.Writer(s, FrameQueue(), state, LocalStorage(s, state),
                              {ex: create(ex) for ex in exchanges}, on_control=lambda *a: None,
                              run_id="R", version="bench")
        if args.per_frame:
            w.encoder.batch_parsers = {}
        stop = threading.Event()

        def spin():
            x = 0
            while not stop.is_set():
                x += 1
        spinners = [threading.Thread(target=spin, daemon=True) for _ in range(args.spin)]
        for t in spinners:
            t.start()
        batches = from_items(items)
        t1 = time.perf_counter()
        per_chunk = max(1, args.chunk // BATCH)
        for k in range(0, len(batches), per_chunk):
            w.process(batches[k:k + per_chunk])
            w.parse_pending()
        w.flush()
        t2 = time.perf_counter()
        arrow_peak = pa.default_memory_pool().max_memory()
        stop.set()
        w.finalizer.start()
        w.rotate()
        w.finalizer.stop()
        t3 = time.perf_counter()
    n = len(items)
    out = {"exchanges": exchanges, "frames": n, "path": "per-frame" if args.per_frame else "batch",
           "spin": args.spin, "parse_spool_frames_per_s": round(n / (t2 - t1)),
           "parquet_frames_per_s": round(n / (t3 - t2)), "total_frames_per_s": round(n / (t3 - t1)),
           "chunk": args.chunk, "arrow_peak_mb": round(arrow_peak / 2**20, 1)}
    print(f"{'+'.join(exchanges)} ({out['path']}, {args.spin} busy threads): parse+spool "
          f"{out['parse_spool_frames_per_s']:,}/s, Parquet {out['parquet_frames_per_s']:,}/s, "
          f"total {out['total_frames_per_s']:,}/s; Arrow memory peak {out['arrow_peak_mb']} MB "
          f"(chunks of {args.chunk:,} frames)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
