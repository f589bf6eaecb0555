"""`make demo` (bin/demo) as a new user runs it: simulated data lands in ./demo-data, never in
./data, where real recordings live."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_demo_writes_into_demo_data_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
    env.update(STATUS_PORT="0")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "demo"), "--seconds", "6", "--quiet"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    files = glob.glob(str(tmp_path / "demo-data" / "raw" / "v1" / "*" / "*" / "date=*" / "*.parquet"))
    assert {f.split(os.sep)[-3] for f in files} >= {"binance", "bybit", "okx"}     # <dataset>/<exchange>/date=
    assert not (tmp_path / "data").exists()
    assert "[demo] collector exited 0;" in p.stdout
