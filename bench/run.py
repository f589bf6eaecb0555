#!/usr/bin/env python3
"""`make bench`: firehose -> the real collector -> local Parquet, against the socket's own limit.

    python bench/run.py [--quick] [--step 10] [--confirm-step 30] [--symbols 200] [--exchange binance]
                        [--skip-three] [--skip-per-process] [--keep] [--smoke] [--readers]

Every process is a separate OS process, as in production: the firehose(s) (bench/firehose.py,
one per exchange), the reference readers (bench/clients.py) and the collector (bin/collector,
same code path as production, every dataset including `frames`, local storage).

Phases (each figure is measured in this run, on this machine, so ratios compare like with like;
the 1-minute load average is printed with every step because other processes share the CPUs):
 1. server: the firehose into a raw socket sink (no framing): how fast frames can be sent.
 2. ceiling: the bare WebSocketApp the issue's targets are set against: websocket-client
    parsing every frame, with buffered 64 KiB reads and no UTF-8 validation (bench/clients.py
    `--reader frames`) and a no-op on_message, same connections as the collector. And the
    reader's own limit: the collector's reading (app.feed.Reader: the raw socket decoded by
    app/wsframes.py, whole data frames straight from the read buffer to on_message); it is
    ~10 x the first, so it also checks the firehose. Reference rates are the median of
    REFERENCE_RUNS windows.
 3. e2e: the collector on one exchange. Ramp (x1.25) then bisect the firehose rate; a step
    passes when, over `--step` seconds, the collector dropped nothing, the firehose sent the
    whole target (>= 97 %: no TCP back-pressure, the sockets kept up) and the writer kept up
    (queue backlog at the end of the step under 2 s of input). Without --quick the best rate
    must then be sustained for --confirm-step (30 s) on a fresh collector (so a failed step's
    backlog does not inflate memory; if it fails, 90 % of the last rate tried, up to
    CONFIRM_ATTEMPTS runs), and that run's figures are reported: frames/s, rows/s, CPU %,
    peak RSS, peak queue utilisation, writer lag p99, and the writer's wait: the share of its
    parse time not spent on its own CPU (waiting, mostly for the GIL the socket threads hold;
    from the collector's writer_parse_seconds / writer_parse_cpu_seconds counters).
 4. sizes: Parquet bytes per row per dataset and exchange, and our size vs plain
    `pq.write_table(same table, compression="zstd")`, on realistic data (size_phase says why).
 5. three: all three exchanges in one collector process vs the same three-exchange ceiling.
 6. per-process: one collector process per exchange (as supervisord runs them: own instance id
    and status port), total rate split evenly; the sum vs the one-process figure.
`--readers` only compares socket readers (raw sink, websocket-client's own reading, ours).

Counters come from each collector's status API (`GET /metrics`, port from its `status_listen`
log line); CPU and RSS from psutil. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EXCHANGES = ("binance", "bybit", "okx")
PASS_SEND_RATIO = 0.97          # the firehose must deliver this share of the target
BACKLOG_SECONDS = 2.0           # queue backlog allowed at the end of a step, in seconds of input
REFERENCE_RUNS = 3              # reference rates (server, ceiling) are the median of this many windows
CONFIRM_ATTEMPTS = 3            # 30 s confirmation runs: the search's best, then 90 %, 81 %


def rss_budget_mb(frames_per_s: float) -> float:
    """The issue's memory budget: 100 MB + 15 MB per 10 000 frames/s."""
    return round(100 + 15 * frames_per_s / 10_000, 1)


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- processes -----------------------------------------------------------------------------------
class Firehose:
    """bench/firehose.py for some exchanges; JSON commands over its stdin/stdout."""

    def __init__(self, exchanges, symbols: int):
        self.exchanges = tuple(exchanges)
        self.proc = subprocess.Popen([PY, os.path.join(ROOT, "bench", "firehose.py"),
                                      "--exchanges", ",".join(exchanges), "--symbols", str(symbols)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = json.loads(self.proc.stdout.readline())
        self.urls = ready["urls"]
        self._lock = threading.Lock()

    def cmd(self, **c) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps(c) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def rate(self, rate) -> None:
        self.cmd(op="rate", rate=rate)

    def stats(self) -> dict:
        return self.cmd(op="stats")

    def wait_subscribed(self, streams: int | None = None, timeout: float = 60.0) -> None:
        """Until the subscribed topics stop changing (and reach `streams` if given) and every
        connection has a feed."""
        deadline, last, stable_since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            s = self.stats()["exchanges"]
            key = tuple((v["topics"], v["feeds"]) for v in s.values())
            if key != last:
                last, stable_since = key, time.monotonic()
            enough = streams is None or sum(v["topics"] for v in s.values()) >= streams
            if enough and all(v["feeds"] for v in s.values()) and time.monotonic() - stable_since > 1.0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"firehose: subscriptions did not settle: {last}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


class Firehoses:
    """One firehose process per exchange (each its own core share); rates split evenly."""

    def __init__(self, exchanges, symbols: int):
        self.by_ex = {ex: Firehose([ex], symbols) for ex in exchanges}

    def urls(self, exchanges) -> dict:
        return {ex: self.by_ex[ex].urls[ex] for ex in exchanges}

    def rate(self, exchanges, total) -> None:
        for ex, fh in self.by_ex.items():
            fh.rate(("max" if total == "max" else total / len(exchanges)) if ex in exchanges else 0)

    def sent(self, exchanges) -> tuple[float, int]:
        stats = [self.by_ex[ex].stats() for ex in exchanges]
        return stats[-1]["t"], sum(s["sent"] for s in stats)

    def wait_subscribed(self, exchanges, streams: dict | None = None) -> None:
        for ex in exchanges:
            self.by_ex[ex].wait_subscribed((streams or {}).get(ex))

    def close(self) -> None:
        for fh in self.by_ex.values():
            fh.close()


class Clients:
    """bench/clients.py: the no-op ceiling reader or the raw sink."""

    def __init__(self, mode: str, urls: dict, reader: str = "feed"):
        self.proc = subprocess.Popen([PY, os.path.join(ROOT, "bench", "clients.py"), "--mode", mode,
                                      "--urls", json.dumps(urls), "--reader", reader],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self.proc.stdout.readline())
        self.ps = psutil.Process(self.proc.pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(10)


class Collector:
    """bin/collector as a subprocess, its JSON log lines kept; /metrics and psutil sampling."""

    def __init__(self, workdir: str, urls: dict, instance: str, data_dir: str):
        os.makedirs(workdir, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
        env.update({"DATA_DIR": data_dir, "STATUS_PORT": "0", "INSTANCE_ID": instance,
                    "SYMBOLS": "ALL", "EXCHANGES": ",".join(urls), "PYTHONUNBUFFERED": "1"})
        for ex, u in urls.items():
            env[f"{ex.upper()}_WS_URL"], env[f"{ex.upper()}_REST_URL"] = u["ws"], u["rest"]
        self.exchanges = tuple(urls)
        self.data_dir = data_dir
        self.lines: list[dict] = []
        self.proc = subprocess.Popen([PY, os.path.join(ROOT, "bin", "collector")], cwd=workdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.ps = psutil.Process(self.proc.pid)
        self.port = None
        self.samples: list[dict] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            self.lines.append(rec)
            if rec.get("event") == "status_listen":
                self.port = rec.get("port")

    def events(self, name: str) -> list[dict]:
        return [l for l in self.lines if l.get("event") == name]

    def wait_ready(self, timeout: float = 90.0) -> dict[str, int]:
        """Until the status API listens and every planned stream is acknowledged; -> streams per exchange."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("collector exited: " + json.dumps(self.lines[-5:]))
            plans = {l["exchange"]: l["streams"] for l in self.events("plan")}
            if self.port and len(plans) == len(self.exchanges):
                acked = {}
                for l in self.events("subscribed"):
                    acked[(l["exchange"], l.get("conn"))] = (l.get("live", 0), l.get("requested", 0))
                per_ex = {ex: sum(t for (e, _c), (t, _p) in acked.items() if e == ex) for ex in plans}
                if all(per_ex[ex] >= plans[ex] for ex in plans):
                    threading.Thread(target=self._sample, daemon=True).start()
                    return plans
            time.sleep(0.2)
        raise RuntimeError("collector not ready: " + json.dumps(self.lines[-5:]))

    def metrics(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics?format=json", timeout=5) as r:
            return json.loads(r.read())

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                m = self.metrics()
                cpu = self.ps.cpu_times()
                rss = self.ps.memory_info().rss
            except Exception:  # noqa: BLE001 - the process is stopping
                return
            self.peak_rss = max(self.peak_rss, rss)
            g = m["gauges"]
            self.samples.append({"t": time.monotonic(), "rss": rss, "cpu": cpu.user + cpu.system,
                                 "queue_size": g["queue_size"], "queue_util": g["queue_utilisation"],
                                 "lag": g["writer_lag_seconds"]})

    def totals(self) -> dict:
        c = self.metrics()["counters"]
        out = {"received": 0, "dropped": 0, "frames_written": 0, "rows": 0, "parse_s": 0.0, "parse_cpu_s": 0.0}
        for ex in self.exchanges:
            e = c.get(ex, {})
            out["received"] += e.get("frames_received", 0)
            out["dropped"] += e.get("frames_dropped", 0)
            out["frames_written"] += e.get("frames_written", 0)
            out["parse_s"] += e.get("writer_parse_seconds", 0.0)
            out["parse_cpu_s"] += e.get("writer_parse_cpu_seconds", 0.0)
            rows = e.get("rows_written", {})
            out["rows"] += sum(rows.values()) if isinstance(rows, dict) else rows
        return out

    def stop(self) -> dict:
        """SIGTERM (drain, write Parquet) -> the counters of its `collector_stop` line."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        time.sleep(0.2)
        stops = self.events("collector_stop")
        return stops[-1].get("counters", {}) if stops else {}


# ---- measurements -------------------------------------------------------------------------------
def measure_send(fh: Firehoses, exchanges, seconds: float) -> float:
    """Frames/s the firehoses send at "max" into whatever reader is connected."""
    fh.rate(exchanges, "max")
    time.sleep(min(1.0, seconds / 3))
    t0, s0 = fh.sent(exchanges)
    time.sleep(seconds)
    t1, s1 = fh.sent(exchanges)
    fh.rate(exchanges, 0)
    return (s1 - s0) / (t1 - t0)


def reference(fh: Firehoses, exchanges, mode: str, seconds: float, reader: str = "feed",
              runs: int = REFERENCE_RUNS) -> dict:
    """The readers' rate: the median of `runs` windows of `seconds` (one window is ±10 % here)."""
    clients = Clients(mode, fh.urls(exchanges), reader)
    rates, cpus = [], []
    try:
        fh.wait_subscribed(exchanges)
        for _ in range(runs):
            cpu0 = clients.ps.cpu_times()
            t0 = time.monotonic()
            rates.append(measure_send(fh, exchanges, seconds))
            cpu1 = clients.ps.cpu_times()
            cpus.append((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (time.monotonic() - t0) * 100)
    finally:
        clients.close()
    time.sleep(0.5)      # the firehoses notice the closed sockets
    return {"frames_per_s": round(statistics.median(rates)), "runs": [round(r) for r in rates],
            "connections": clients.ready["connections"], "streams": clients.ready["streams"],
            "cpu_pct": round(statistics.median(cpus))}


def drain(collectors: list[Collector], timeout: float = 60.0) -> None:
    """Until every queue is empty and nothing more arrives."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        tot = [c.totals()["received"] for c in collectors]
        sizes = [c.metrics()["gauges"]["queue_size"] for c in collectors]
        if tot == last and not any(sizes):
            return
        last = tot
        time.sleep(0.5)


def run_step(fh: Firehoses, exchanges, collectors: list[Collector], rate: float, seconds: float,
             warmup: float) -> dict:
    fh.rate(exchanges, rate)
    time.sleep(warmup)
    t0, s0 = fh.sent(exchanges)
    a = [c.totals() for c in collectors]
    cpu0 = [c.ps.cpu_times() for c in collectors]
    m0 = time.monotonic()
    time.sleep(seconds)
    t1, s1 = fh.sent(exchanges)
    b = [c.totals() for c in collectors]
    cpu1 = [c.ps.cpu_times() for c in collectors]
    m1 = time.monotonic()
    end_queue = sum(c.metrics()["gauges"]["queue_size"] for c in collectors)
    fh.rate(exchanges, 0)
    window = [s for c in collectors for s in c.samples if m0 <= s["t"] <= m1]
    sent_rate = (s1 - s0) / (t1 - t0)
    dropped = sum(y["dropped"] - x["dropped"] for x, y in zip(a, b))
    received = sum(y["received"] - x["received"] for x, y in zip(a, b))
    cpu = sum((y.user + y.system - x.user - x.system) for x, y in zip(cpu0, cpu1)) / (m1 - m0) * 100
    lags = sorted(s["lag"] for s in window) or [0.0]
    parse_s = sum(y["parse_s"] - x["parse_s"] for x, y in zip(a, b))
    parse_cpu_s = sum(y["parse_cpu_s"] - x["parse_cpu_s"] for x, y in zip(a, b))
    res = {"target": round(rate), "sent_per_s": round(sent_rate), "received_per_s": round(received / (m1 - m0)),
           "dropped": dropped, "end_queue": end_queue, "cpu_pct": round(cpu),
           "peak_queue_util": max((s["queue_util"] for s in window), default=0.0),
           "lag_p99_s": lags[min(len(lags) - 1, int(math.ceil(0.99 * len(lags))) - 1)],
           "peak_rss_mb": round(max((s["rss"] for s in window), default=0) / 2**20, 1),
           # the share of the writer's parse time spent waiting (mostly for the GIL), not computing
           "writer_wait": round(1 - parse_cpu_s / parse_s, 2) if parse_s > 0 else 0.0}
    res["passed"] = (dropped == 0 and sent_rate >= PASS_SEND_RATIO * rate
                     and end_queue <= BACKLOG_SECONDS * rate)
    drain(collectors)
    return res


def start_collectors(fh: Firehoses, groups: list[tuple[str, ...]], workdir: str, tag: str) -> list[Collector]:
    data_dir = os.path.join(workdir, tag, "data")
    cols = [Collector(os.path.join(workdir, tag), fh.urls(g), f"bench-{tag}-{'-'.join(g)}", data_dir)
            for g in groups]
    for c in cols:
        plans = c.wait_ready()
        fh.wait_subscribed(c.exchanges, plans)
    return cols


def search(fh: Firehoses, exchanges, groups, workdir: str, tag: str, start: float, args) -> dict:
    """Ramp up by 1.25x until a step fails, then bisect; confirm the best on fresh collectors
    (the reported figures come from that run, so a failed step's backlog does not inflate them)."""
    cols = start_collectors(fh, groups, workdir, tag + "-search")
    steps, lo, hi, rate = [], None, None, start
    best = None
    try:
        for _ in range(args.max_steps):
            r = run_step(fh, exchanges, cols, rate, args.step, args.warmup)
            steps.append(r)
            say(f"  {tag}: {r['target']:>8,} frames/s -> {'pass' if r['passed'] else 'FAIL'}  "
                f"sent {r['sent_per_s']:,}/s dropped {r['dropped']:,} backlog {r['end_queue']:,} "
                f"cpu {r['cpu_pct']}% lag p99 {r['lag_p99_s']}s writer wait {r['writer_wait']:.0%} "
                f"load {os.getloadavg()[0]:.1f}")
            if r["passed"]:
                lo, best = rate, r
                rate = rate * 1.25 if hi is None else (lo + hi) / 2
            else:
                hi = rate
                rate = rate / 1.25 if lo is None else (lo + hi) / 2
            if lo is not None and hi is not None and hi / lo < 1 + args.precision:
                break
    finally:
        counters = [c.stop() for c in cols]
    out = {"frames_per_s": 0, "search_best": round(lo or 0), "steps": steps, "confirmed": False,
           "final": best or {},
           "data_dir": os.path.join(workdir, tag + "-search", "data"),
           "peak_rss_mb": round(max(c.peak_rss for c in cols) / 2**20, 1)}
    if lo is None:
        return out
    if args.confirm:
        for attempt in range(CONFIRM_ATTEMPTS):
            shutil.rmtree(os.path.join(workdir, tag), ignore_errors=True)
            cols = start_collectors(fh, groups, workdir, tag)
            try:
                r = run_step(fh, exchanges, cols, lo, args.confirm_step, args.warmup)
            finally:
                counters = [c.stop() for c in cols]
            say(f"  {tag}: confirm {r['target']:,} frames/s for {args.confirm_step:g}s on a fresh "
                f"collector -> {'pass' if r['passed'] else 'FAIL'} (dropped {r['dropped']:,}, "
                f"backlog {r['end_queue']:,}, writer wait {r['writer_wait']:.0%})")
            if r["passed"] or attempt == CONFIRM_ATTEMPTS - 1:
                break
            lo *= 0.9
        best = r
        out.update(data_dir=os.path.join(workdir, tag, "data"),
                   peak_rss_mb=round(max(c.peak_rss for c in cols) / 2**20, 1))
    rows = sum(_sum_rows(c) for c in counters)
    frames = sum(sum(e.get("frames_written", 0) for e in c.values()) for c in counters)
    out["reconciled"] = all(_reconciled(c) for c in counters)
    best["rows_per_frame"] = round(rows / frames, 3) if frames else 0.0
    best["rows_per_s"] = round(best["received_per_s"] * best["rows_per_frame"])
    out.update(frames_per_s=round(lo) if best["passed"] else 0, final=best,
               confirmed=best["passed"] if args.confirm else None)     # None: --quick, no confirmation run
    return out


def size_phase(fh: Firehoses, exchanges, workdir: str, seconds: float) -> dict:
    """Parquet bytes per row from realistic data: the firehose repeats its corpus every ~16k
    frames per connection, which flatters dictionary encoding, so file sizes are measured on a
    fresh collector fed by the simulator's own generator instead (every price, size, id and
    time distinct, like production), 25 events/s per instrument, for `seconds`."""
    cols = start_collectors(fh, [tuple(exchanges)], workdir, "sizes")
    for ex in exchanges:
        fh.by_ex[ex].cmd(op="sim_rate", rate=25)
    time.sleep(seconds)
    for ex in exchanges:
        fh.by_ex[ex].cmd(op="sim_rate", rate=0)
    cols[0].stop()
    data_dir = cols[0].data_dir
    return {ex: parquet_sizes(data_dir, ex) for ex in exchanges}


def _reconciled(counters: dict) -> bool:
    """Every frame a collector read was written to `frames` or counted as dropped."""
    return bool(counters) and all(
        e.get("frames_received", 0) == e.get("frames_written", 0) + e.get("frames_dropped", 0)
        for e in counters.values() if isinstance(e, dict))


def _sum_rows(counters: dict) -> int:
    n = 0
    for e in counters.values():
        rows = e.get("rows_written", {}) if isinstance(e, dict) else {}
        n += sum(rows.values()) if isinstance(rows, dict) else rows
    return n


def parquet_sizes(data_dir: str, exchange: str = "*") -> dict:
    """Bytes per row per dataset, and our size vs pq.write_table(same table, compression="zstd")."""
    out = {}
    tmp = tempfile.mkdtemp(prefix="plain-")
    try:
        for ds_dir in sorted(glob.glob(os.path.join(data_dir, "raw", "v1", "*"))):
            ds = os.path.basename(ds_dir)
            files = glob.glob(os.path.join(ds_dir, exchange, "date=*", "*.parquet"))
            ours = plain = rows = 0
            for f in files:
                table = pq.read_table(f, partitioning=None)
                ours += os.path.getsize(f)
                rows += table.num_rows
                p = os.path.join(tmp, "plain.parquet")
                pq.write_table(table, p, compression="zstd")
                plain += os.path.getsize(p)
            if rows:
                out[ds] = {"rows": rows, "files": len(files), "bytes_per_row": round(ours / rows, 2),
                           "plain_zstd_bytes_per_row": round(plain / rows, 2),
                           "size_vs_plain_zstd": round(ours / plain, 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="firehose -> collector -> Parquet; last line is JSON")
    p.add_argument("--quick", action="store_true", help="3 s steps, no confirmation runs: ~3 minutes")
    p.add_argument("--smoke", action="store_true", help="seconds-long harness check (tests); figures meaningless")
    p.add_argument("--step", type=float, help="seconds per search step (default 10; --quick 3)")
    p.add_argument("--confirm-step", type=float, help="seconds the best rate must be sustained on a "
                   "fresh collector (default 30)")
    p.add_argument("--symbols", type=int, help="USDT perpetuals per exchange (default 200)")
    p.add_argument("--exchange", default="binance", choices=EXCHANGES, help="the single-exchange phase")
    p.add_argument("--max-steps", type=int, help="ramp/bisection steps per phase (default 6; --quick 4)")
    p.add_argument("--precision", type=float, help="stop bisecting within this ratio (default 0.07; --quick 0.15)")
    p.add_argument("--size-seconds", type=float, help="seconds of realistic data for file sizes "
                   "(default 30; --quick 5)")
    p.add_argument("--skip-three", action="store_true", help="no three-exchange phases")
    p.add_argument("--skip-per-process", action="store_true", help="no one-process-per-exchange phase")
    p.add_argument("--readers", action="store_true", help="only compare socket readers: raw sink, "
                   "websocket-client's own reading, the same from buffered reads, feed.py's "
                   "reading (no-op callbacks)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (Parquet, logs)")
    p.add_argument("--workdir", help="default: a new temporary directory")
    args = p.parse_args(argv)
    quick = args.quick or args.smoke
    args.step = args.step or (1.5 if args.smoke else 3.0 if quick else 10.0)
    args.confirm_step = args.confirm_step or (args.step if quick else 30.0)
    args.confirm = not quick          # --quick reports the best search step (same collector)
    args.size_seconds = args.size_seconds or (5.0 if quick else 30.0)
    args.warmup = 0.5 if quick else 2.0
    args.symbols = args.symbols or (5 if args.smoke else 200)
    args.max_steps = args.max_steps or (1 if args.smoke else 4 if quick else 6)
    args.precision = args.precision or (0.15 if quick else 0.07)
    ref_s = 1.0 if args.smoke else 2.0 if quick else 8.0
    ref_runs = 1 if args.smoke else REFERENCE_RUNS
    if args.smoke:
        args.skip_three = args.skip_per_process = True
    single = (args.exchange,)
    three = EXCHANGES if not args.skip_three or not args.skip_per_process else single
    workdir = args.workdir or tempfile.mkdtemp(prefix="qlbench-")
    say(f"bench: work dir {workdir}; step {args.step:g}s; {args.symbols} symbols per exchange; "
        f"{psutil.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} (other processes share them)")
    t_start = time.monotonic()
    load = [os.getloadavg()[0]]
    fh = Firehoses(three, args.symbols)
    result: dict = {}
    if args.readers:
        try:
            for name, mode, reader in (("raw socket sink", "raw", "feed"),
                                       ("websocket-client reading (no buffer, select per frame)", "noop", "plain"),
                                       ("buffered reads, websocket-client frame parsing", "noop", "frames"),
                                       ("feed.py reading (app/wsframes.py decoder)", "noop", "feed")):
                r = reference(fh, single, mode, ref_s, reader, runs=ref_runs)
                result[name] = r["frames_per_s"]
                say(f"{name}: {r['frames_per_s']:,} frames/s ({r['connections']} connections, cpu {r['cpu_pct']}%)")
        finally:
            fh.close()
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        say(json.dumps(result))
        return 0
    try:
        server = reference(fh, single, "raw", ref_s, runs=ref_runs)
        say(f"server (firehose -> raw socket sink, {args.exchange}): {server['frames_per_s']:,} frames/s")
        ceiling = reference(fh, single, "noop", ref_s, "frames", runs=ref_runs)
        ceil = ceiling["frames_per_s"]
        say(f"ceiling (bare WebSocketApp: websocket-client parses every frame; buffered reads, no-op "
            f"callback, {args.exchange}, {ceiling['connections']} connections): {ceil:,} frames/s "
            f"(median of {ceiling['runs']}), cpu {ceiling['cpu_pct']}%")
        reader = reference(fh, single, "noop", ref_s, runs=ref_runs)
        rceil = reader["frames_per_s"]
        say(f"reader limit (the collector's reading: feed.Reader, app/wsframes.py, no-op callback): "
            f"{rceil:,} frames/s (median of {reader['runs']}), cpu {reader['cpu_pct']}%")
        say(f"e2e ({args.exchange}, one collector process):")
        e2e = search(fh, single, [single], workdir, "e2e", 2000 if args.smoke else 0.6 * ceil, args)
        final = e2e["final"]
        # the budget at the rate the reported RSS was measured at (the last confirmation run's
        # target when none held, not 0)
        budget = rss_budget_mb(final.get("target") or e2e["frames_per_s"])
        load.append(os.getloadavg()[0])
        say(f"e2e: {e2e['frames_per_s']:,} frames/s ({final.get('rows_per_s', 0):,} rows/s), "
            f"cpu {final.get('cpu_pct')}%, peak RSS {e2e['peak_rss_mb']} MB (budget "
            f"{budget:.0f}), peak queue {final.get('peak_queue_util')}, "
            f"writer lag p99 {final.get('lag_p99_s')}s, writer wait {final.get('writer_wait', 0):.0%}; "
            f"{e2e['frames_per_s'] / ceil if ceil else 0:.2f} x ceiling, "
            f"{e2e['frames_per_s'] / rceil if rceil else 0:.2f} x the reader's limit")
        if args.smoke:       # sizes of what the e2e step wrote (the firehose's repeated corpus)
            all_sizes = {args.exchange: parquet_sizes(e2e["data_dir"], args.exchange)}
        else:
            size_exchanges = single if args.skip_three else EXCHANGES
            say(f"file sizes (simulator's own generator, {', '.join(size_exchanges)}, {args.size_seconds:g}s):")
            all_sizes = size_phase(fh, size_exchanges, workdir, args.size_seconds)
        for ex, per_ds in all_sizes.items():
            for ds, sz in per_ds.items():
                say(f"  {ex:<8} {ds:<14} {sz['bytes_per_row']:>7.2f} B/row (plain zstd "
                    f"{sz['plain_zstd_bytes_per_row']:.2f}: {sz['size_vs_plain_zstd']:.2f}x; {sz['rows']:,} rows)")
        sizes = all_sizes.get(args.exchange, {})
        result = {
            "e2e_frames_per_s": e2e["frames_per_s"],
            "ceiling_frames_per_s": ceil,
            "ratio": round(e2e["frames_per_s"] / ceil, 3) if ceil else 0.0,
            "server_frames_per_s": server["frames_per_s"],
            "peak_rss_mb": e2e["peak_rss_mb"],
            "bbo_bytes_per_row": sizes.get("bbo", {}).get("bytes_per_row"),
            "size_vs_plain_zstd": sizes.get("bbo", {}).get("size_vs_plain_zstd"),
            "exchange": args.exchange,
            "reader_limit_frames_per_s": rceil,
            "ratio_vs_reader_limit": round(e2e["frames_per_s"] / rceil, 3) if rceil else 0.0,
            "rows_per_s": final.get("rows_per_s"),
            "cpu_pct": final.get("cpu_pct"),
            "peak_queue_util": final.get("peak_queue_util"),
            "writer_lag_p99_s": final.get("lag_p99_s"),
            "writer_wait": final.get("writer_wait"),
            "rss_budget_mb": budget,
            # the firehose must outrun the fastest reader, not only the ceiling
            "server_vs_ceiling": round(server["frames_per_s"] / max(ceil, rceil), 1) if ceil else 0.0,
            "confirmed": e2e["confirmed"],
            "search_best_frames_per_s": e2e["search_best"],
            "reconciled": e2e.get("reconciled"),
        }
        if not args.skip_three:
            server3 = reference(fh, EXCHANGES, "raw", ref_s, runs=ref_runs)
            ceiling3 = reference(fh, EXCHANGES, "noop", ref_s, "frames", runs=ref_runs)
            c3 = ceiling3["frames_per_s"]
            reader3 = reference(fh, EXCHANGES, "noop", ref_s, runs=ref_runs)
            r3 = reader3["frames_per_s"]
            say(f"three exchanges: server {server3['frames_per_s']:,} frames/s; ceiling (bare WebSocketApp) "
                f"{c3:,} frames/s (median of {ceiling3['runs']}; {ceiling3['connections']} connections in one "
                f"process); reader limit {r3:,} frames/s (median of {reader3['runs']})")
            say("e2e (three exchanges, one collector process):")
            e3 = search(fh, EXCHANGES, [EXCHANGES], workdir, "three", 0.6 * c3, args)
            load.append(os.getloadavg()[0])
            result.update({"three_server_frames_per_s": server3["frames_per_s"],
                           "three_ceiling_frames_per_s": c3,
                           "three_e2e_frames_per_s": e3["frames_per_s"],
                           "three_search_best_frames_per_s": e3["search_best"],
                           "three_ratio": round(e3["frames_per_s"] / c3, 3) if c3 else 0.0,
                           "three_reader_limit_frames_per_s": r3,
                           "three_ratio_vs_reader_limit": round(e3["frames_per_s"] / r3, 3) if r3 else 0.0,
                           "three_peak_rss_mb": e3["peak_rss_mb"],
                           "three_writer_wait": e3["final"].get("writer_wait")})
            say(f"three exchanges e2e: {e3['frames_per_s']:,} frames/s = {result['three_ratio']:.2f} x ceiling "
                f"({result['three_ratio_vs_reader_limit']:.2f} x the reader's limit), "
                f"peak RSS {e3['peak_rss_mb']} MB, writer wait {e3['final'].get('writer_wait', 0):.0%}")
        if not args.skip_per_process:
            say("e2e (one collector process per exchange, total rate split evenly):")
            base = result.get("three_e2e_frames_per_s") or result["e2e_frames_per_s"]
            ep = search(fh, EXCHANGES, [(ex,) for ex in EXCHANGES], workdir, "per-process",
                        max(1000, 1.6 * base), args)
            load.append(os.getloadavg()[0])
            result["per_process_sum_frames_per_s"] = ep["frames_per_s"]
            result["per_process_search_best_frames_per_s"] = ep["search_best"]
            if result.get("three_e2e_frames_per_s"):
                result["per_process_vs_single"] = round(ep["frames_per_s"] / result["three_e2e_frames_per_s"], 2)
            say(f"per-process sum: {ep['frames_per_s']:,} frames/s"
                + (f" = {result['per_process_vs_single']:.2f} x one process" if "per_process_vs_single" in result else ""))
        result["parquet"] = all_sizes
    finally:
        fh.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["load_avg_1m"] = [round(x, 1) for x in load]
    result["bench_seconds"] = round(time.monotonic() - t_start)
    say(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
