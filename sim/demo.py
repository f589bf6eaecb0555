"""`make demo`: the simulator on loopback and bin/collector against it, so anyone can watch the
collector work with no network. Files appear under ./demo-data/raw/v1/ within seconds (the demo
rotates files every 10 s instead of 60 s); Ctrl-C stops both, the collector drains first."""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import threading
import time

from sim import Simulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(data_dir: str) -> str:
    files = glob.glob(os.path.join(data_dir, "raw", "v1", "*", "*", "date=*", "*.parquet"))
    per: dict[str, int] = {}
    for f in files:
        parts = f.split(os.sep)
        key = f"{parts[-4]}/{parts[-3]}"                 # <dataset>/<exchange>
        per[key] = per.get(key, 0) + 1
    return f"{len(files)} Parquet files: " + ", ".join(f"{k}:{v}" for k, v in sorted(per.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)")
    ap.add_argument("--data-dir", default="./demo-data",
                    help="never ./data: the demo's simulated rows must not mix with real ones")
    ap.add_argument("--symbols", default="BTCUSDT,ETHUSDT,BTCUSDC")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--quiet", action="store_true", help="do not echo the collector's log lines")
    a = ap.parse_args(argv)

    sim = Simulator(exchanges=("binance", "bybit", "okx"), rate=a.rate, cadence_scale=0.5)
    sim.start()
    env = {k: v for k, v in os.environ.items() if k not in ("QL_DATA_DIR", "QL_INSTANCE_ID")}
    env.update(DATA_DIR=a.data_dir, ROTATE_INTERVAL="10", INSTANCE_ID="demo",
               STATUS_PORT=os.environ.get("STATUS_PORT", "8000"))
    for ex, urls in sim.urls.items():
        env[f"{ex.upper()}_WS_URL"], env[f"{ex.upper()}_REST_URL"] = urls["ws"], urls["rest"]
    print(f"simulator on loopback: {sim.urls}", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "collector"), "--symbols", a.symbols],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo():
        for line in proc.stdout:
            if not a.quiet:
                sys.stdout.write(line)
    threading.Thread(target=echo, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    while not stop.wait(5):
        print(f"[demo] {summary(a.data_dir)}", flush=True)
        if a.seconds and time.monotonic() - started >= a.seconds or proc.poll() is not None:
            break
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(120)
    sim.stop()
    print(f"[demo] collector exited {rc}; {summary(a.data_dir)}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
