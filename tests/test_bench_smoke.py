"""`make bench` harness smoke test: every phase runs for seconds (--smoke) and the last line is
the JSON summary. Figures are not asserted (a shared 2-core box makes them meaningless here);
that the harness measures them, and that the collector under it really recorded data, is."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

KEYS = ("e2e_frames_per_s", "ceiling_frames_per_s", "ratio", "server_frames_per_s", "peak_rss_mb",
        "bbo_bytes_per_row", "size_vs_plain_zstd")


def test_bench_smoke_prints_the_json_summary(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary)[:len(KEYS)] == list(KEYS)
    # every phase produced a figure: the collector recorded, the references read, files exist
    assert summary["e2e_frames_per_s"] > 0 and summary["ceiling_frames_per_s"] > 0
    assert summary["server_frames_per_s"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["bbo_bytes_per_row"] > 0 and 0 < summary["size_vs_plain_zstd"] < 2
    assert summary["parquet"]["binance"]["bbo"]["rows"] > 0
    assert summary["reconciled"] is True      # frames read == frames written + dropped
    assert any("pass" in line for line in lines if "e2e:" in line)
