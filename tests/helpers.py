"""Shared test tools: run bin/collector as a real subprocess against the simulator, read back
what it wrote with pyarrow and DuckDB."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("QL_SHARED_DIR") or os.path.join(os.path.dirname(ROOT), "shared")


def sim_env(sim, exchanges=("binance", "bybit", "okx")) -> dict[str, str]:
    env = {}
    for ex in exchanges:
        env[f"{ex.upper()}_WS_URL"] = sim.urls[ex]["ws"]
        env[f"{ex.upper()}_REST_URL"] = sim.urls[ex]["rest"]
    return env


class CollectorProcess:
    """bin/collector in a subprocess; its JSON log lines are collected as they arrive."""

    def __init__(self, workdir, env: dict[str, str], args: list[str] = ()):
        self.workdir = str(workdir)
        base = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
        base.update({"DATA_DIR": os.path.join(self.workdir, "data"), "STATUS_PORT": "0",
                     "INSTANCE_ID": "test", "PYTHONUNBUFFERED": "1"})
        base.update(env)
        self.env = base
        self.args = list(args)
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._cond = threading.Condition()

    @property
    def data_dir(self) -> str:
        return self.env["DATA_DIR"]

    def start(self) -> "CollectorProcess":
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "collector"), *self.args],
                                     cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def events(self, name: str) -> list[dict]:
        with self._cond:
            return [l for l in self.lines if l.get("event") == name]

    def wait_for(self, name: str, predicate=lambda l: True, timeout: float = 30.0, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [l for l in self.lines if l.get("event") == name and predicate(l)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._more_pending()):
                    raise AssertionError(f"no {count}x {name!r} within {timeout}s; last lines:\n"
                                         + "".join(self.raw[-25:]))
                self._cond.wait(min(left, 0.2))

    def _more_pending(self) -> bool:
        return False

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("collector did not stop in time:\n" + "".join(self.raw[-25:]))
        time.sleep(0.1)
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def parquet_files(data_dir: str, dataset: str, exchange: str | None = None) -> list[str]:
    ex = f"exchange={exchange}" if exchange else "exchange=*"
    return sorted(glob.glob(os.path.join(data_dir, "raw", "v1", dataset, ex, "date=*", "*.parquet")))


def read_dataset(data_dir: str, dataset: str) -> pa.Table | None:
    """The dataset as users read it: pyarrow dataset with Hive partitioning."""
    path = os.path.join(data_dir, "raw", "v1", dataset)
    if not os.path.isdir(path):
        return None
    return pads.dataset(path, format="parquet", partitioning="hive").to_table()


def count_rows(data_dir: str, dataset: str, exchange: str | None = None) -> int:
    import pyarrow.parquet as pq
    return sum(pq.read_metadata(p).num_rows for p in parquet_files(data_dir, dataset, exchange))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
