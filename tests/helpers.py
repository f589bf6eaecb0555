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


def sim_collector(tmp_path, sim, sim_exchanges=None, defaults: dict | None = None, **settings) -> "CollectorProcess":
    """bin/collector against the simulator's exchanges (all it runs, else `sim_exchanges`): the
    caller's defaults, then settings given as keywords (lower-case names, any value)."""
    sim_exchanges = tuple(sim_exchanges or sim.urls)
    env = sim_env(sim, sim_exchanges)
    env["EXCHANGES"] = ",".join(sim_exchanges)      # never one the simulator does not run
    env.update(defaults or {})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return CollectorProcess(tmp_path, env)


# bin/collector with a slow writer (`--writer-stall SECONDS`): the tests' fault injection
SLOW_COLLECTOR = os.path.join(ROOT, "bench", "collector_slow.py")


class CollectorProcess:
    """bin/collector (or `program`, e.g. SLOW_COLLECTOR) in a subprocess; its JSON log lines are
    collected as they arrive."""

    def __init__(self, workdir, env: dict[str, str], args: list[str] = (), program: str | None = None):
        self.workdir = str(workdir)
        base = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
        base.update({"DATA_DIR": os.path.join(self.workdir, "data"), "STATUS_PORT": "0",
                     "INSTANCE_ID": "test", "PYTHONUNBUFFERED": "1"})
        base.update(env)
        self.env = base
        self.args = list(args)
        self.program = program or os.path.join(ROOT, "bin", "collector")
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def data_dir(self) -> str:
        return self.env["DATA_DIR"]

    def start(self) -> "CollectorProcess":
        self.proc = subprocess.Popen([sys.executable, self.program, *self.args],
                                     cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
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

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit and for its last output line to be read (the reader
        thread ends at end of output), so `events()` then holds everything it logged."""
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("collector did not stop in time:\n" + "".join(self.raw[-25:]))

    # ---- the status API (STATUS_PORT=0: the port it logged) ---------------------------------
    def get(self, path: str = "/status") -> dict:
        """GET a JSON path of the running collector's status API (waits for it to listen)."""
        import urllib.request
        port = self.wait_for("status_listen", timeout=30)[0]["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def metrics(self) -> dict:
        """GET /metrics (JSON) from the running collector."""
        return self.get("/metrics?format=json")

    def frames_received(self, exchange: str) -> int:
        return self.metrics()["counters"].get(exchange, {}).get("frames_received", 0)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sim_text_frames_sent(sim, exchange: str) -> int:
    """Text frames the simulator has written to the collector's sockets so far (data, control
    and raw frames; protocol pings are control frames but not text frames)."""
    st = sim.stats()[exchange]
    return sum(st["frames"].values()) + st["control_frames"] - st.get("protocol_pings", 0) + st["raw_frames"]


def sim_quiet_baseline(sim, exchanges=("binance",), timeout: float = 10.0) -> dict[str, int]:
    """Once the simulator has no connection open for these exchanges (a previous collector is
    gone): the text frames it has sent so far, the `since` of a later collector's `settle`."""
    wait_until(lambda: all(sim.stats()[ex]["connections_open"] == 0 for ex in exchanges), timeout,
               what="the simulator to see the previous collector's sockets closed")
    return {ex: sim_text_frames_sent(sim, ex) for ex in exchanges}


def settle(c: CollectorProcess, sim, exchanges=("binance",), timeout: float = 30.0,
           since: dict[str, int] | None = None) -> None:
    """Stop the simulator's data for these exchanges and wait until the collector has read every
    text frame it sent (its frames_received counter, from /metrics): the condition a test needs
    before SIGTERM so that rows can be compared with what was sent. Waiting on it, not sleeping,
    also leaves the last frames to the writer's final flush at stop. `since`: frames the
    simulator had sent to earlier collectors (sim_quiet_baseline)."""
    for ex in exchanges:
        sim.pause(ex)
    sent = {ex: sim_text_frames_sent(sim, ex) - (since or {}).get(ex, 0) for ex in exchanges}
    got: dict = {}

    def done():
        got.update({ex: c.frames_received(ex) for ex in exchanges})
        return all(got[ex] >= sent[ex] for ex in exchanges)
    try:
        wait_until(done, timeout, what="the collector to read every frame sent")
    except AssertionError:
        raise AssertionError(f"sent {sent}, received {got}") from None


def wait_rows_parsed(c: CollectorProcess, sim, exchanges, datasets, timeout: float = 30.0) -> None:
    """Until the collector has written (parsed and spooled, so its observers such as the gap
    detector have seen them) at least as many rows of these datasets as the simulator had sent
    when this was called."""
    st = sim.stats()
    want = {(ex, ds): st[ex]["rows"][ds] for ex in exchanges for ds in datasets}

    def done():
        counters = c.metrics()["counters"]
        return all((counters.get(ex, {}).get("rows_written") or {}).get(ds, 0) >= n
                   for (ex, ds), n in want.items())
    wait_until(done, timeout, what=f"rows written up to what was sent: {want}")


def parquet_files(data_dir: str, dataset: str, exchange: str | None = None) -> list[str]:
    """raw/v1/<dataset>/<exchange>/date=*/*.parquet (CONTRACT.md section 2)."""
    return sorted(glob.glob(os.path.join(data_dir, "raw", "v1", dataset, exchange or "*", "date=*", "*.parquet")))


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
        time.sleep(interval)       # the polling interval of a wait on a condition
    raise AssertionError(f"timed out waiting for {what}")
