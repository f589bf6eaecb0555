"""Connections against the simulator's real servers, in-process, with no writer at all: what the
socket threads themselves must do (OKX's upgrade notice) and what the subscription bookkeeping
makes of the exchanges' real refusals."""
from __future__ import annotations

import time

import pytest

from app import settings as settings_mod
from app.exchanges import create
from app.feed import Manager
from app.handoff import FrameQueue
from app.state import State
from tests.helpers import sim_env, wait_until


@pytest.fixture
def okx_sim():
    from sim import Simulator
    with Simulator(exchanges=("okx",), rate=20.0, seed=3) as sim:
        yield sim


def _manager(tmp_path, sim, exchange, **flags):
    env = sim_env(sim, (exchange,))
    s = settings_mod.load(None, flags=dict({"exchanges": exchange, "data_dir": str(tmp_path)}, **flags),
                          environ=env, dotenv_path=str(tmp_path / ".env"))
    adapter = create(exchange)
    q = FrameQueue(maxsize=100_000)
    state = State(exchanges=(exchange,), queue=q)
    return Manager(s, {exchange: adapter}, q, state, {exchange: {}}), adapter, q


def test_okx_notice_rotates_from_the_socket_thread_without_the_writer(tmp_path, okx_sim):
    """Nothing parses the queue here: if rotation waited for the writer, it would never come."""
    manager, adapter, q = _manager(tmp_path, okx_sim, "okx")
    inst = [i for i in adapter.parse_discovery(_instruments(okx_sim)).instruments
            if i.symbol == "BTC-USDT-SWAP"]
    streams = adapter.streams_for(inst[0], ("bbo", "trades"))
    manager.start(adapter.plan_connections(streams, 200))
    try:
        conn = wait_until(lambda: manager.connections and manager.connections[0].connected
                          and manager.connections[0], what="connected")
        wait_until(lambda: q.qsize() > 0, what="frames queued")
        assert okx_sim.okx_notice(delay=30.0) >= 1
        replacement = wait_until(lambda: conn.replacement, 5, what="rotation on notice")
        wait_until(lambda: replacement.connected, what="replacement connected")
        assert conn.notice_seen
    finally:
        manager.stop()


def test_data_without_an_ack_makes_streams_live(tmp_path, okx_sim):
    """The ACKs are never read here (the consumer ignores control frames), only data: every
    stream still goes live, and none is re-sent or reported as unacknowledged."""
    from app.probe import Consumer
    manager, adapter, q = _manager(tmp_path, okx_sim, "okx", subscribe_timeout=1.0, subscribe_retries=0)
    insts = [i for i in adapter.parse_discovery(_instruments(okx_sim)).instruments
             if i.symbol in ("BTC-USDT-SWAP", "ETH-USDT-SWAP")]
    streams = [st for i in insts for st in adapter.streams_for(i, ("bbo", "mark_price"))]
    consumer = Consumer(q, {"okx": adapter}, {"okx": streams})
    consumer.on_control = lambda *a: None
    manager.last_seen = consumer.seen
    consumer.start()
    manager.start(adapter.plan_connections(streams, 200))
    try:
        conn = wait_until(lambda: manager.connections[0].book and manager.connections[0], what="open")
        wait_until(lambda: conn.book.counts()["live"] == 4, 15, what="all live from data")
        time.sleep(1.5)        # past subscribe_timeout: a stream live by its data is not re-sent
        assert conn.book.counts() == {"requested": 4, "live": 4, "pending": 0, "rejected": 0}
        assert conn.book.round_requests == 1
    finally:
        manager.stop()
        consumer.finish()


def _instruments(sim):
    import requests
    return requests.get(sim.urls["okx"]["rest"] + "/api/v5/public/instruments",
                        params={"instType": "SWAP"}, timeout=5).json()


# ---- the collector as users run it: rejected topics and quiet markets ------------------------------

def _wait_status(c, cond, timeout=30.0, what="status"):
    last = {}

    def check():
        nonlocal last
        last = c.get()
        return cond(last)
    try:
        wait_until(check, timeout, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: last /status {last}") from None
    return last


def _collector(tmp_path, sim, **env):
    from tests.helpers import sim_collector
    return sim_collector(tmp_path, sim, defaults={"SYMBOLS": "BTCUSDT,ETHUSDT", "FLUSH_INTERVAL": "0.5",
                                                  "SUBSCRIBE_TIMEOUT": "3", "SUBSCRIBE_RETRIES": "1"}, **env)


def test_rejected_topics_are_reported_and_cost_only_themselves(tmp_path):
    """Bybit fails the whole 10-topic request for one bad topic, OKX refuses one arg with 60018 and
    no `arg`: every other stream goes live, the bad ones are rejected with the exchange's words,
    and READY comes once nothing is pending."""
    from sim import Simulator
    bad = {"bybit": "orderbook.1.ETHUSDT", "okx": "trades:ETH-USDT-SWAP"}
    with Simulator(exchanges=("bybit", "okx"), rate=10.0,
                   reject_topics={ex: [t] for ex, t in bad.items()}) as sim:
        with _collector(tmp_path, sim, exchanges="bybit,okx") as c:
            for ex, topic in bad.items():
                line = c.wait_for("subscription_rejected", lambda l, ex=ex: l["exchange"] == ex)[0]
                assert line["stream"] == topic
            reasons = {l["exchange"]: l["reason"] for l in c.events("subscription_rejected")}
            assert "handler not found" in reasons["bybit"], reasons
            st = _wait_status(c, lambda s: s["state"] == "READY", what="READY after the round")
            topics = {"bybit": 6, "okx": 10}     # Bybit tickers carry three kinds in one topic
            for ex, topic in bad.items():
                subs = st["exchanges"][ex]["subscriptions"]
                n = topics[ex]
                assert (subs["requested"], subs["live"], subs["pending"], subs["rejected"]) == (n, n - 1, 0, 1), subs
                assert list(subs["rejected_streams"]) == [topic]
            assert "60018" in st["exchanges"]["okx"]["subscriptions"]["rejected_streams"][bad["okx"]]
            assert st["details"]["streams_rejected"]["bybit"] == \
                st["exchanges"]["bybit"]["subscriptions"]["rejected_streams"]
            rounds = {ex: [l for l in c.events("subscribed") if l["exchange"] == ex] for ex in bad}
            assert all(len(v) == 1 and v[0]["live"] == topics[ex] - 1 and v[0]["rejected"] == 1
                       for ex, v in rounds.items()), rounds
            gauges = c.metrics()["gauges"]
            rejected = {g["exchange"]: g["value"] for g in gauges["streams"] if g["status"] == "rejected"}
            assert rejected == {"bybit": 1, "okx": 1}
            assert c.stop() == 0
    # the good topics of Bybit's failed request were subscribed after all: their rows are on disk
    from tests.helpers import read_dataset
    bbo = read_dataset(c.data_dir, "bbo")
    pairs = set(zip(bbo.column("exchange").to_pylist(), bbo.column("symbol").to_pylist()))
    assert {("bybit", "BTCUSDT"), ("okx", "ETH-USDT-SWAP"), ("okx", "BTC-USDT-SWAP")} <= pairs
    assert ("bybit", "ETHUSDT") not in pairs


def test_a_quiet_market_is_not_degraded_but_a_silent_periodic_stream_is(tmp_path):
    """ETH sends no trades and no book changes on any exchange for the whole run, far longer than
    the silence floor (time compressed: floor 2 s, periods scaled by 0.1): READY throughout.
    Then BTC's mark price stops on Binance: that one is a fault, and is reported."""
    from sim import Simulator
    quiet = {"binance": ["ETHUSDT"], "bybit": ["ETHUSDT"], "okx": ["ETH-USDT-SWAP"]}
    with Simulator(rate=10.0, cadence_scale=0.1, quiet_symbols=quiet) as sim:
        with _collector(tmp_path, sim, silence_floor=2, silence_factor=3) as c:
            _wait_status(c, lambda s: s["state"] == "READY", what="READY")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6:           # 3x the floor, sampled as an operator would
                st = c.get()
                assert st["state"] == "READY", st["reasons"]
                time.sleep(0.5)                         # sampling interval, not a synchronisation
            assert not c.events("stream_silent")
            sim.silence("binance", "btcusdt@markPrice@1s", 30)
            line = c.wait_for("stream_silent", timeout=15)[0]
            assert line["stream"] == "btcusdt@markPrice@1s"
            st = _wait_status(c, lambda s: s["state"] == "DEGRADED", what="DEGRADED")
            assert st["details"]["silent_streams"] == {"binance": ["btcusdt@markPrice@1s"]}
            assert [l["stream"] for l in c.events("stream_silent")] == ["btcusdt@markPrice@1s"]
            assert c.stop() == 0
