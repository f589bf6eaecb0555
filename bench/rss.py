#!/usr/bin/env python3
"""Resident memory of the collector held at a fixed rate for minutes (Parquet rotations included).

    python bench/rss.py [--exchange binance] [--rate 60000] [--seconds 600]

The firehose (bench/firehose.py) feeds the real bin/collector (default settings, local storage)
at --rate frames/s; RSS and the queue size are printed every 10 s (the peaks over the run come
from the bench's 0.5 s sampling, with the rate the firehose achieved). The budget is the issue's:
100 MB + 15 MB per 10 000 frames/s. Last line: JSON with the range of RSS from minute 2 on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exchange", default="binance", choices=bench.EXCHANGES)
    p.add_argument("--rate", type=float, default=60_000)
    p.add_argument("--seconds", type=float, default=600)
    args = p.parse_args(argv)
    ex = (args.exchange,)
    workdir = tempfile.mkdtemp(prefix="qlrss-")
    fh = bench.Firehoses(ex, 200)
    try:
        collector = bench.start_collectors(fh, [ex], workdir, "rss")[0]
        before = collector.totals()
        fh.rate(ex, args.rate)
        sent0 = fh.sent(ex)
        t0, samples = time.monotonic(), []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(10)
            rss = round(collector.ps.memory_info().rss / 2**20, 1)
            samples.append((time.monotonic() - t0, rss))
            bench.say(json.dumps({"t_s": round(samples[-1][0]), "rss_mb": rss,
                                  "queue": collector.metrics()["gauges"]["queue_size"]}))
        after = collector.totals()
        sent1 = fh.sent(ex)
        fh.rate(ex, 0)
        collector.stop()
    finally:
        fh.close()
        shutil.rmtree(workdir, ignore_errors=True)
    later = [r for t, r in samples if t >= 120] or [r for _t, r in samples]
    bench.say(json.dumps({"exchange": args.exchange, "rate": args.rate, "seconds": args.seconds,
                          "budget_mb": bench.rss_budget_mb(args.rate),
                          "rss_min_mb": min(later), "rss_max_mb": max(later), "rss_end_mb": later[-1],
                          "peak_rss_mb": round(collector.peak_rss / 2**20, 1),
                          "peak_queue": max((x["queue_size"] for x in collector.samples), default=0),
                          "sent_per_s": round((sent1[1] - sent0[1]) / (sent1[0] - sent0[0])),
                          "received": after["received"] - before["received"],
                          "dropped": after["dropped"] - before["dropped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
