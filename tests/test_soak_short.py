"""The short chaos soak inside the test suite; `make soak` is the long one (bench/soak.py).

Same machinery and the same reconciliation rules as `make soak` (R1-R6, see bench/soak.py),
on a small universe and shortened time scales: the simulator (all three exchanges) -> the real
bin/collector -> moto S3 on loopback, through a reconnect storm with a REST 429 storm, bad
frames, a writer stall that fills the queue, an S3 outage and a SIGKILL while a Parquet file is
being written; then every frame is accounted for from the Parquet files read back from S3. The
host clock jump runs in process (injected clock): bench/clockjump.py.
"""
from __future__ import annotations

import json

from bench.clockjump import run as clock_jump
from bench.scenarios import select
from bench.soak import Soak, build_report, run_schedule


def _failures(checks: dict) -> dict:
    return {k: v["detail"] for k, v in checks.items() if not v["pass"]}


def test_clock_jump_loses_nothing_and_keeps_real_time_cadence():
    r = clock_jump(phase_s=1.5)
    assert not _failures(r["checks"]), json.dumps(r, default=str)[:3000]
    assert len(r["figures"]["dates"]) == 2                # midnight was crossed


def test_short_soak_accounts_for_every_frame(tmp_path):
    soak = Soak(minutes=1, rate=1500, symbols=20, workdir=str(tmp_path), verbose=False,
                flush_interval=0.5, rotate_interval=3, queue_seconds=3, stale_timeout=4, silence_floor=6,
                degraded_window=3, degraded_upload_age=3, alignment_timeout=3, alignment_max_wait=2,
                calibrate=False, storm_plan=(("binance", 2), ("okx", 1)), storm_gap=2.0)
    scenarios = select(["steady", "reconnect_storm", "bad_frames", "writer_stall", "s3_outage", "sigkill"])
    rep = None
    try:
        run_schedule(soak, scenarios, 1, durations={"steady": 2, "reconnect_storm": 6, "bad_frames": 1,
                                                   "writer_stall": 3, "s3_outage": 1, "sigkill": 1})
        rep = build_report(soak, scenarios)
    finally:
        soak.close(keep=rep is None)
    summary = rep["summary"]
    segs = {s["name"]: s for s in rep["segments"]}
    failed = {name: _failures(s["checks"]) for name, s in segs.items() if not s["pass"]}
    assert not failed, json.dumps(failed, default=str)[:4000]
    assert not _failures(rep["checks"]), json.dumps(_failures(rep["checks"]), default=str)[:4000]
    assert summary["failed"] == [] and summary["unaccounted"] == 0, summary
    # the faults really happened, and were measured
    assert segs["writer_stall"]["totals"]["dropped"] > 0
    assert segs["writer_stall"]["recv_seq_holes"] == segs["writer_stall"]["totals"]["dropped"]
    assert segs["reconnect_storm"]["exchanges"]["binance"]["trades"]["missed"] > 0
    assert segs["bad_frames"]["totals"]["unparsed"] > 0
    assert segs["sigkill"]["killed_run"] and segs["sigkill"]["notes"]["spool_recovered"] >= 1
    assert rep["sanity"]["_exit"] == 1              # findings (drops, gaps), no violation
