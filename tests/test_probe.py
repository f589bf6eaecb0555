"""bin/collector --probe against the simulator's real servers: the table a user reads after a
deploy, its exit code, and that it writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT, sim_env

EXCHANGES = ("binance", "bybit", "okx")


def run_probe(tmp_path, sim, *args, seconds="4"):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
    env.update(sim_env(sim, tuple(sim.urls)))
    env.update({"DATA_DIR": str(tmp_path / "data"), "STATUS_PORT": "0", "SUBSCRIBE_TIMEOUT": "2",
                "SUBSCRIBE_RETRIES": "0"})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--probe",
                           "--seconds", seconds, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc, report


def test_probe_reports_every_kind_and_writes_nothing(tmp_path):
    from sim import Simulator
    with Simulator(exchanges=EXCHANGES, rate=20.0, cadence_scale=0.2) as sim:
        proc, report = run_probe(tmp_path, sim)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] is True
    for ex in EXCHANGES:
        r = report["exchanges"][ex]
        assert r["parse_errors"] == 0 and r["problem"] is None
        for kind, row in r["kinds"].items():
            if ex == "binance" and kind == "open_interest":
                assert "unsupported" in row
                continue
            assert row["subscribed"] == 2 and row["live"] == 2 and row["rejected"] == 0, (ex, kind, row)
            assert row["rows"] >= row["frames"] > 0, (ex, kind, row)
            assert row["first"] != "-" and row["last"] != "-"
        assert f"\n{ex}  parse errors: 0" in proc.stdout
    assert "probe: OK" in proc.stdout
    assert not os.path.exists(tmp_path / "data"), "the probe must write nothing"


def test_probe_fails_on_a_rejected_kind_and_names_it(tmp_path):
    from sim import Simulator
    with Simulator(exchanges=("bybit",), rate=20.0, cadence_scale=0.2,
                   reject_topics={"bybit": ["publicTrade.ETHUSDT"]}) as sim:
        proc, report = run_probe(tmp_path, sim, "--exchanges", "bybit")
    assert proc.returncode == 1
    trades = report["exchanges"]["bybit"]["kinds"]["trades"]
    assert trades["rejected"] == 1 and trades["live"] == 1
    assert "handler not found" in trades["reasons"]["publicTrade.ETHUSDT"]
    assert report["exchanges"]["bybit"]["kinds"]["bbo"]["ok"] is True
    assert "rejected publicTrade.ETHUSDT" in proc.stdout and "probe: FAILED" in proc.stdout


def test_a_frame_the_parser_chokes_on_is_counted_and_the_probe_goes_on():
    """Whatever a parser raises on a frame, the probe counts it as an error (with a sample) and
    parses the next one, as the writer does."""
    from app.exchanges import create
    from app.handoff import FrameQueue
    from app.probe import Consumer

    class Choking(type(create("binance"))):
        def parse(self, frame, sink):
            if frame[4] == b"choke":
                raise RuntimeError("a bug in a parser")
            return super().parse(frame, sink)
    c = Consumer(FrameQueue(100), {"binance": Choking()}, {"binance": []})
    c.frame("binance", 1, 1, 10, b"choke")
    c.frame("binance", 1, 2, 20, b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"a":5,"s":"BTCUSDT",'
                                 b'"p":"1","q":"1","f":1,"l":1,"T":1,"m":false}}')
    tally = c.tallies["binance"]
    assert tally.errors == 1 and "a bug in a parser" in tally.error_samples[0]
    assert tally.rows["trades"] == 1
