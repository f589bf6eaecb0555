"""Start-up as an operator meets it: the collector never refuses to record for something that
may pass (a store or an exchange that does not answer yet), shows what it is doing from its
first second, and stops at once, in one line, only for a setting that cannot work."""
from __future__ import annotations

import time

import pytest

from tests.helpers import CollectorProcess, sim_collector, wait_until
from tests.s3server import S3Server


def _collector(tmp_path, sim, exchanges, **env) -> CollectorProcess:
    return sim_collector(tmp_path, sim, exchanges, {"SYMBOLS": "BTCUSDT,ETHUSDT",
                                                    "FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "2"}, **env)


@pytest.fixture
def sim():
    from sim import Simulator
    with Simulator(exchanges=("binance", "okx"), rate=20.0, seed=4, cadence_scale=0.2) as s:
        yield s


def test_store_down_at_start_records_locally_then_uploads(tmp_path, sim):
    """S3 does not answer at start: no exit, DEGRADED naming the store, Parquet in the spool;
    when the store is back the backlog is uploaded and the state clears on its own."""
    srv = S3Server()
    srv.start()
    bucket = srv.new_bucket()
    srv.stop()                                   # the outage: the port refuses connections
    try:
        with _collector(tmp_path, sim, ("binance",), **srv.env(bucket, "p"), upload_retry_min=0.2,
                        upload_retry_max=1) as c:
            line = c.wait_for("storage_unavailable", timeout=30)[0]
            assert line["setting"] == "s3_endpoint" and "cannot reach" in line["reason"]
            st = wait_until(lambda: (lambda s: s if "storage_unavailable" in s["reasons"] else None)(c.get()),
                            20, what="DEGRADED storage_unavailable")
            assert st["state"] == "DEGRADED" and st["storage_problem"]["setting"] == "s3_endpoint"
            c.wait_for("file_written", timeout=30)       # recording goes on, into the local spool
            assert c.proc.poll() is None
            srv.start()
            c.wait_for("file_uploaded", timeout=30)
            c.wait_for("storage_available", timeout=30)
            wait_until(lambda: c.get()["state"] == "READY", 30, what="READY after the store came back")
            assert c.get()["storage_problem"] is None
            assert c.stop() == 0
        assert any(k.startswith("p/raw/v1/") for k in srv.objects(bucket))
    finally:
        srv.stop()


def test_no_credentials_is_a_settings_error_at_once(tmp_path, sim):
    srv = S3Server()
    srv.start()
    try:
        env = {**srv.env(srv.new_bucket()), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
        c = _collector(tmp_path, sim, ("binance",), **env).start()
        assert c.wait(60) == 2
        out = "".join(c.raw)
        assert "invalid setting AWS_ACCESS_KEY_ID: no AWS credentials found" in out
        assert "Traceback" not in out
    finally:
        srv.stop()


def test_status_answers_while_discovery_retries_and_exchanges_start_independently(tmp_path, sim):
    """OKX's REST fails its next 3 answers, the last a 429 with Retry-After: /status says so from
    the first second (attempt, last error, next retry) while Binance, discovered in parallel,
    already records; the retry waits at least the Retry-After; OKX joins once discovery works."""
    sim.rest_fail("okx", 503, 2)          # discovery's calls, and the clock check's at start-up
    sim.rest_fail("okx", 429, 1, headers={"Retry-After": "9"})   # longer than the back-off (<= 8 s)
    t0 = time.monotonic()
    with _collector(tmp_path, sim, ("binance", "okx")) as c:
        first = c.get()
        assert time.monotonic() - t0 < 10
        assert set(first["discovery"]) == {"binance", "okx"}
        assert first["reasons"] and first["reasons"] != ["starting"]     # already evaluated
        retrying = wait_until(lambda: (lambda s: s if s["discovery"]["okx"].get("status") == "retrying"
                                       and "discovering" in s["reasons"] else None)(c.get()),
                              20, what="okx discovery retrying")
        okx = retrying["discovery"]["okx"]
        assert "503" in okx["last_error"] and okx["next_retry_in_s"] > 0 and okx["next_retry_at"]
        assert "okx" in retrying["details"]["discovering"]
        c.wait_for("subscribed", lambda l: l["exchange"] == "binance", timeout=20)
        assert not [l for l in c.events("plan") if l["exchange"] == "okx"]   # still retrying
        c.wait_for("subscribed", lambda l: l["exchange"] == "okx", timeout=60)
        fails = [l["attempt"] for l in c.events("discovery_failed") if l["exchange"] == "okx"]
        assert len(fails) >= 2 and fails == list(range(1, len(fails) + 1))
        failed = [l for l in c.events("discovery_failed") if l["exchange"] == "okx"]
        delays = [l["retry_in_s"] for l in failed]
        assert delays[1] >= 1.5 * delays[0], delays      # backs off (doubling, jitter 0.8-1)
        (limited,) = [l for l in failed if "HTTP 429" in l["error"]]
        assert limited["retry_in_s"] >= 9, failed        # the exchange's Retry-After, not sooner
        st = wait_until(lambda: (lambda s: s if s["state"] == "READY" else None)(c.get()), 30, what="READY")
        assert st["discovery"]["okx"]["status"] == "done"
        assert c.stop() == 0


def test_unknown_symbol_is_named_with_close_matches_and_the_rest_recorded(tmp_path, sim):
    with _collector(tmp_path, sim, ("binance", "okx"), symbols="BTCUSDT,BTCUSDX") as c:
        lines = {l["exchange"]: l for l in c.wait_for("symbols_not_listed", count=2, timeout=30)}
        assert lines["binance"]["symbols"] == ["BTCUSDX"]
        assert "BTCUSDT" in lines["binance"]["close_matches"]["BTCUSDX"]
        assert "BTCUSDT" in lines["okx"]["close_matches"]["BTCUSDX"]      # unified alias form
        c.wait_for("subscribed", count=2, timeout=30)
        st = c.get()
        assert st["discovery"]["binance"]["unknown_symbols"]["BTCUSDX"][0] == "BTCUSDT"
        assert st["discovery"]["okx"]["symbols"] == 1
        assert c.stop() == 0


def test_no_known_symbol_at_all_exits_2_in_one_line(tmp_path, sim):
    c = _collector(tmp_path, sim, ("binance", "okx"), symbols="BTCUSDX").start()
    assert c.wait(60) == 2
    out = "".join(c.raw)
    line = [l for l in out.splitlines() if l.startswith("collector: ")]
    assert len(line) == 1 and line[0].startswith(
        "collector: invalid setting symbols: none of BTCUSDX is listed on binance, okx (close matches: ")
    assert "BTCUSDT" in line[0]
    assert "Traceback" not in out
    assert c.events("collector_stop")
