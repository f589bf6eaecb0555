"""Post-reconnect REST alignment: token bucket and measurement (injected clocks), the budgeted REST
client against the simulator's REST servers, and the collector (subprocess) through real outages."""
from __future__ import annotations

import json
import time
import urllib.request

import pyarrow.compute as pc
import pytest

from app.alignment import OverBudget, RestClient, TokenBucket, measure
from app.exchanges import create
from tests.helpers import read_dataset, settle, sim_collector, wait_until

EXCHANGES = ("binance", "bybit", "okx")


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s
        return False


# ---- token bucket -----------------------------------------------------------------------------------

def test_token_bucket_rate_and_burst():
    clk = FakeClock()
    b = TokenBucket(600, clock=clk, min_capacity=20)      # 10/s, holds 15 s = 150
    assert b.capacity == 150
    assert all(b.try_take(20) for _ in range(7)) and not b.try_take(20)
    assert b.wait_time(20) == pytest.approx(1.0)           # 10 left, 10 more needed at 10/s
    clk.t += 1.0
    assert b.try_take(20)
    assert b.wait_time(1000) == float("inf")               # can never fit: callers must skip


def test_token_bucket_never_exceeds_its_bound_in_any_minute():
    """A greedy caller for 5 minutes: every 60 s window sees at most budget + burst (1.25 x)."""
    clk = FakeClock()
    b = TokenBucket(600, clock=clk, min_capacity=20)
    taken = []
    while clk.t < 1300:
        if b.try_take(20):
            taken.append(clk.t)
        else:
            clk.t += 0.01
    worst = max(sum(20 for x in taken if t <= x < t + 60) for t in taken)
    assert 600 <= worst <= 750
    late = [x for x in taken if x >= 1100]                 # steady state: the budget itself
    assert len(late) * 20 == pytest.approx(600 / 60 * 200, rel=0.02)


def test_rest_client_gives_up_at_the_deadline_without_calling():
    clk = FakeClock()
    b = TokenBucket(60, clock=clk, min_capacity=20)        # 1/s, capacity 20
    client = RestClient("binance", create("binance"), "http://127.0.0.1:9", b, clock=clk, sleep=clk.sleep)
    assert b.try_take(20)
    with pytest.raises(OverBudget):
        client.get("/fapi/v1/time", {}, 20, deadline=clk.t + 5)   # needs 20 s of refill
    client.blocked_until = clk.t + 100                     # a back-off longer than the deadline
    clk.t += 30
    with pytest.raises(OverBudget):
        client.get("/fapi/v1/time", {}, 1, deadline=clk.t + 10)
    assert client.requests == 0


# ---- measurement ------------------------------------------------------------------------------------

def test_measure_consecutive_ids():
    m = measure(True, "100", "111", [("120", 0)])
    assert (m["missed"], m["method"], m["rest_missed"], m["exact"]) == (10, "ws_ids", 10, True)
    m = measure(True, "100", None, [("104", 0)])            # nothing on the WS yet: REST counts
    assert (m["missed"], m["method"]) == (4, "rest_ids")
    m = measure(True, "100", "103", [("101", 0)])           # REST asked before the WS resumed
    assert (m["missed"], m["rest_missed"]) == (2, 1)
    assert measure(True, None, "7", [("9", 0)])["missed"] is None   # no baseline: unknown, not 0
    assert measure(True, "100", "101", None)["missed"] == 0


def test_measure_uuid_list():
    rest = [(f"u{i}", i) for i in range(10)]
    assert measure(False, "u2", "u7", rest)["missed"] == 4
    m = measure(False, "u2", None, rest)                    # nothing after the reconnect yet
    assert (m["missed"], m["exact"]) == (7, True)
    m = measure(False, "gone", "u3", rest)                  # more trades since than the list holds
    assert (m["missed"], m["method"], m["exact"]) == (3, "rest_list_lower_bound", False)
    assert measure(False, "u2", "u3", None)["missed"] is None


# ---- adapters: throttle rules (pure) ------------------------------------------------------------------

def test_throttle_rules():
    b, y, o = create("binance"), create("bybit"), create("okx")
    assert b.rest_throttle(200, {}, [], 0.0) is None
    assert b.rest_throttle(429, {"retry-after": "7"}, {}, 0.0) == 7.0
    assert b.rest_throttle(429, {}, {}, 1_800_000_030.0) == pytest.approx(31.0)   # to the next minute
    assert b.rest_throttle(418, {}, {}, 0.0) == 120.0
    assert y.rest_throttle(403, {}, None, 0.0) == 600.0
    assert y.rest_throttle(200, {"x-bapi-limit-reset-timestamp": "10500"}, {"retCode": 10006}, 10.0) == 0.5
    assert y.rest_throttle(200, {}, {"retCode": 0}, 0.0) is None
    assert o.rest_throttle(200, {}, {"code": "50011"}, 0.0) == 2.0
    assert o.rest_throttle(429, {"retry-after": "3"}, {}, 0.0) == 3.0
    assert o.rest_throttle(200, {}, {"code": "0"}, 0.0) is None


# ---- REST client and adapters against the simulator -----------------------------------------------------

@pytest.fixture(scope="module")
def rest_sim():
    from sim import Simulator
    s = Simulator(exchanges=EXCHANGES, symbols=["BTC"], rate=20.0, seed=5, okx_max_conn_per_sec=0)
    s.start()
    # the REST trade lists hold something
    wait_until(lambda: all(s.stats()[ex]["trades_generated"].get(SYMBOL[ex], 0) >= 2 for ex in EXCHANGES),
               10, interval=0.05, what="trades generated on every exchange")
    yield s
    s.stop()


SYMBOL = {"binance": "BTCUSDT", "bybit": "BTCUSDT", "okx": "BTC-USDT-SWAP"}


@pytest.mark.parametrize("ex", EXCHANGES)
def test_adapters_read_latest_trades_and_server_time(rest_sim, ex):
    adapter = create(ex)
    client = RestClient(ex, adapter, rest_sim.urls[ex]["rest"], TokenBucket(600, min_capacity=20))
    wait_until(lambda: rest_sim.stats()[ex]["trades_generated"].get(SYMBOL[ex]), what="trades")
    path, params, _w = adapter.alignment_request(SYMBOL[ex])
    body, t0, t1 = client.get(path, params, 1, time.monotonic() + 5)
    trades = adapter.parse_recent_trades(body)
    assert trades and trades == sorted(trades, key=lambda t: t[1])     # oldest first
    assert abs(trades[-1][1] - t1 / 1e6) < 5000
    if "trades" in adapter.GAP_RULES:
        ids = [int(t[0]) for t in trades]
        assert ids == sorted(ids)                          # oldest first
    path, params, _w = adapter.time_request()
    body, t0, t1 = client.get(path, params, 1, time.monotonic() + 5)
    assert t0 - 50e6 <= adapter.parse_server_time(body) <= t1 + 50e6
    with pytest.raises(ValueError):
        adapter.parse_recent_trades({"code": "51001", "retCode": 10001, "data": []} if ex != "binance"
                                    else {"code": -1121, "msg": "Invalid symbol."})


def test_rest_client_honours_retry_after(rest_sim):
    adapter = create("binance")
    client = RestClient("binance", adapter, rest_sim.urls["binance"]["rest"], TokenBucket(600, min_capacity=20))
    rest_sim.rest_fail("binance", 429, 1, headers={"Retry-After": "1"})
    t = time.monotonic()
    body, _t0, _t1 = client.get("/fapi/v1/time", {}, 1, time.monotonic() + 5)
    assert "serverTime" in body and time.monotonic() - t >= 1.0
    log = rest_sim.rest_log("binance")
    (i429,) = [i for i, r in enumerate(log) if r[2] == 429]
    assert log[i429 + 1][0] - log[i429][0] >= 0.99          # nothing was sent during the back-off
    # a ban longer than the deadline: give up at once, send nothing more
    rest_sim.rest_fail("binance", 418, 1, headers={"Retry-After": "120"})
    n = len(rest_sim.rest_log("binance"))
    with pytest.raises(OverBudget):
        client.get("/fapi/v1/time", {}, 1, time.monotonic() + 3)
    assert len(rest_sim.rest_log("binance")) == n + 1


def test_rest_client_bybit_endpoint_limit_in_a_200(rest_sim):
    """Bybit signals its per-endpoint limit as HTTP 200 + retCode 10006: that is a back-off too."""
    adapter = create("bybit")
    client = RestClient("bybit", adapter, rest_sim.urls["bybit"]["rest"], TokenBucket(600))
    rest_sim.rest_fail("bybit", 200, 1, body=json.dumps({"retCode": 10006, "retMsg": "Too many visits!",
                                                         "result": {}}))
    t = time.monotonic()
    body, _t0, _t1 = client.get("/v5/market/time", {}, 1, time.monotonic() + 5)
    assert body["retCode"] == 0 and time.monotonic() - t >= 0.9


# ---- the collector through real outages ---------------------------------------------------------------

def _collector(tmp_path, sim, exchanges, **env):
    return sim_collector(tmp_path, sim, exchanges, {"FLUSH_INTERVAL": "0.5",
                                                    "ROTATE_INTERVAL": "5", "RECONNECT_MIN": "0.1",
                                                    "RECONNECT_MAX": "0.5", "HEARTBEAT_INTERVAL": "60"}, **env)


def _bybit_recent(sim, symbol):
    url = f"{sim.urls['bybit']['rest']}/v5/market/recent-trade?category=linear&symbol={symbol}&limit=1000"
    with urllib.request.urlopen(url, timeout=5) as r:
        return [t["execId"] for t in reversed(json.loads(r.read())["result"]["list"])]


def test_outage_alignment_measures_the_missed_trades(tmp_path):
    """Every exchange is cut off for 3 s while its trades go on. The alignment measures the
    trades generated meanwhile (the generator is paused at both edges, so the count is exact)
    and none of them appears in raw/: REST answers are never written."""
    from sim import Simulator
    sim = Simulator(exchanges=EXCHANGES, symbols=["BTC"], rate=10.0, seed=9, okx_max_conn_per_sec=0,
                    rest_history=1000)
    sim.start()
    try:
        with _collector(tmp_path, sim, EXCHANGES, symbols="BTCUSDT", datasets="trades,mark_price",
                        alignment_timeout=10) as c:
            c.wait_for("subscribed", count=3)
            c.wait_for("file_written", timeout=20)
            settle(c, sim, EXCHANGES)                       # the last frames are read
            g0 = {ex: sim.stats()[ex]["trades_generated"].get(SYMBOL[ex], 0) for ex in EXCHANGES}
            for ex in EXCHANGES:
                sim.refuse_connections(ex, 60)
                sim.drop_connections(ex)
                sim.resume(ex)
            time.sleep(3.0)          # the outage itself: 3 s of trades missed (window_s >= 3 asserted)
            for ex in EXCHANGES:
                sim.pause(ex)
            expected = {ex: sim.stats()[ex]["trades_generated"].get(SYMBOL[ex], 0) - g0[ex] for ex in EXCHANGES}
            connects = len(c.events("ws_connect"))
            subscribed = len(c.events("subscribed"))
            for ex in EXCHANGES:
                sim.refuse_connections(ex, 0)
            c.wait_for("ws_connect", count=connects + 3, timeout=15)
            c.wait_for("subscribed", count=subscribed + 3, timeout=15)   # streams live again
            for ex in EXCHANGES:
                sim.resume(ex)
            done = {l["exchange"]: l for l in c.wait_for("alignment_done", count=3, timeout=30)}
            settle(c, sim, EXCHANGES)                       # what followed the outage is read
            bybit_ids = _bybit_recent(sim, "BTCUSDT")
            assert c.stop() == 0
    finally:
        sim.stop()
    assert all(n > 5 for n in expected.values()), expected
    gaps = {l["exchange"]: l for l in c.events("gap_detected")
            if l["kind"] == "disconnect" and l["dataset"] == "trades"}
    for ex in EXCHANGES:
        d = done[ex]["details"][SYMBOL[ex]]
        assert d["alignment"] == "ok" and abs(d["missed"] - expected[ex]) <= 1, (ex, d, expected)
        assert gaps[ex]["missed"] == d["missed"]          # reported once, with the measured figure
        assert done[ex]["missed_total"] == d["missed"] and done[ex]["window_s"] >= 3.0
    assert not [l for l in c.events("gap_detected") if l["kind"] == "sequence"]
    trades = read_dataset(c.data_dir, "trades")
    # Binance and OKX: the ids in the hole are absent from raw/, and the ids on both sides present
    for ex in ("binance", "okx"):
        g = gaps[ex]
        lost = set(range(g["from_id"] + 1, g["from_id"] + g["missed"] + 1))
        t = trades.filter(pc.equal(trades.column("exchange"), ex))
        ids = set()
        for first, last in zip(t.column("first_trade_id").to_pylist(), t.column("last_trade_id").to_pylist()):
            ids.update(range(first, last + 1) if first is not None else [last])
        if ex == "binance":
            ids = {int(x) for x in t.column("trade_id").to_pylist()}
        assert g["from_id"] in ids and max(ids) > g["from_id"] + g["missed"]
        assert not ids & lost, ex
    # Bybit (UUIDs): the trades between the last one seen and the next one seen are not in raw/
    g = gaps["bybit"]
    i = bybit_ids.index(g["last_ws_id"])
    lost = bybit_ids[i + 1:i + 1 + g["missed"]]
    t = trades.filter(pc.equal(trades.column("exchange"), "bybit"))
    raw_ids = set(t.column("trade_id").to_pylist())
    assert len(lost) == expected["bybit"] and g["last_ws_id"] in raw_ids
    assert not raw_ids & set(lost)
    assert bybit_ids[i + 1 + g["missed"]] in raw_ids       # the first trade after the outage


def test_many_symbols_reconnecting_stay_within_budget_and_honour_429(tmp_path):
    """306 symbols drop at once, twice. Alignment spends at most the bucket (15 s of budget) plus
    the refill during alignment_max_wait, skips the rest and counts it; injected 429s with
    Retry-After stop every call for that long, then alignment goes on within its deadline; the simulator (weight limit lowered to 1000/min)
    never has to answer 429 on its own, nor 418."""
    from sim import Simulator
    sim = Simulator(exchanges=("binance",), symbols=300, rate=0.5, seed=4, binance_weight_limit=1000)
    sim.start()
    budget, max_wait = 600, 3
    try:
        with _collector(tmp_path, sim, ("binance",), symbols="ALL", datasets="trades",
                        rest_budget_per_min=budget, alignment_max_wait=max_wait, alignment_timeout=5) as c:
            c.wait_for("subscribed", count=2, timeout=30)   # 306 streams: 2 connections
            c.wait_for("clock_offset", timeout=20)
            for round_ in (1, 2):
                if round_ == 2:
                    sim.rest_fail("binance", 429, 2, headers={"Retry-After": "1"})
                sim.drop_connections("binance")
                done = c.wait_for("alignment_done", count=2 * round_, timeout=40)
            assert c.stop() == 0
        log = sim.rest_log("binance")
        st = sim.stats()["binance"]
    finally:
        sim.stop()
    weights = {"/fapi/v1/aggTrades": 20, "/fapi/v1/time": 1, "/fapi/v1/exchangeInfo": 1}
    calls = [(t, weights[p], s) for t, p, s in log]
    worst = max(sum(w for x, w, _s in calls if t <= x < t + 60) for t, _w, _s in calls)
    assert worst <= budget * 1.25 + 1                      # + exchangeInfo at start
    assert st["rest_418"] == 0 and st["rest_429"] == 2     # only the two injected ones
    # after each 429, nothing was sent for its Retry-After
    for i, (t, _p, s) in enumerate(log):
        if s == 429:
            assert log[i + 1][0] - t >= 0.95
    assert len(c.events("rest_backoff")) == 2
    summaries = done[-4:]
    assert sum(d["symbols"] for d in summaries[:2]) == 306 and sum(d["symbols"] for d in summaries[2:]) == 306
    for round_, pair in ((1, summaries[:2]), (2, summaries[2:])):   # both connections: one batch
        ok = sum(d["rest_ok"] for d in pair)
        # round 1 starts with a full bucket (150 = 7 calls); round 2 with what refilled since,
        # after 2 s of back-off; never more than the bucket plus its refill until the deadline
        assert (7 if round_ == 1 else 1) <= ok <= (budget / 4 + budget / 60 * (max_wait + 1)) / 20
        assert ok + sum(d["skipped"] for d in pair) == 306
    counters = c.events("collector_stop")[-1]["counters"]["binance"]
    assert counters["alignments_skipped"] == sum(d["skipped"] for d in summaries)
    assert counters["alignments"] == 4
