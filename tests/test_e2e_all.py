"""End to end with all three exchanges at once, against the simulator on loopback."""
from __future__ import annotations

import time

from app.exchanges import create
from app.gaps import SequenceTracker
from tests.helpers import count_rows, read_dataset, settle, sim_collector, wait_until

EXCHANGES = ("binance", "bybit", "okx")
DATASETS = ("bbo", "trades", "mark_price", "funding", "open_interest")


def start_collector(tmp_path, sim, **env):
    return sim_collector(tmp_path, sim, defaults={"FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "3",
                                                  "RECONNECT_MIN": "0.2", "RECONNECT_MAX": "2"}, **env)


def quiesce_and_stop(c, sim) -> dict:
    settle(c, sim, EXCHANGES)
    assert c.stop() == 0
    return c.events("collector_stop")[-1]["counters"]


def subscribed_on_sim(sim, ex) -> int:
    return sum(len(conn["subscriptions"]) for conn in sim.connections(ex))


def test_all_symbols_three_exchanges(tmp_path):
    from sim import Simulator
    with Simulator(exchanges=EXCHANGES, symbols=300, rate=1.0, seed=3, cadence_scale=0.5) as sim:
        with start_collector(tmp_path, sim, symbols="ALL") as c:
            plans = {l["exchange"]: l for l in c.wait_for("plan", count=3, timeout=60)}
            for ex in EXCHANGES:
                assert plans[ex]["symbols"] >= 300, plans[ex]
                wait_until(lambda: subscribed_on_sim(sim, ex) == plans[ex]["streams"], 90,
                           what=f"{ex}: all {plans[ex]['streams']} streams subscribed")
            wait_until(lambda: all(c.frames_received(ex) > 1000 for ex in EXCHANGES), 30,
                       what="data from every exchange")
            counters = quiesce_and_stop(c, sim)
        assert not c.events("subscription_error")
        assert not c.events("ws_disconnect") or all(not l["was_connected"] or l["reason"] == "stop"
                                                    for l in c.events("ws_disconnect"))
        stats = sim.stats()
    # discovery skipped what is out of scope, and said so
    disc = {l["exchange"]: l for l in c.events("discovery")}
    assert disc["okx"]["skipped"] and disc["bybit"]["instruments"] >= 300
    for ex in EXCHANGES:
        assert counters[ex]["frames_dropped"] == 0
        for ds in DATASETS:
            sent = stats[ex]["rows"].get(ds, 0)
            if ex == "binance" and ds == "open_interest":
                assert sent == 0 and count_rows(c.data_dir, ds, ex) == 0
                continue
            assert sent > 0, (ex, ds)
            assert count_rows(c.data_dir, ds, ex) == sent, (ex, ds)
    # instruments are unified across exchanges: BTC-USDC-PERP exists on all three
    bbo = read_dataset(c.data_dir, "bbo")
    pairs = set(zip(bbo.column("exchange").to_pylist(), bbo.column("instrument").to_pylist()))
    assert {("binance", "BTC-USDC-PERP"), ("bybit", "BTC-USDC-PERP"), ("okx", "BTC-USDC-PERP")} <= pairs


def test_keepalive_keeps_idle_connections_open(tmp_path):
    """The simulator closes clients that do not ping (Bybit, OKX rules, shortened); ours never are."""
    from sim import Simulator
    with Simulator(exchanges=EXCHANGES, rate=5.0, bybit_idle_timeout=3.0, okx_idle_timeout=3.0) as sim:
        with start_collector(tmp_path, sim, symbols="BTCUSDT,ETHUSDT", keepalive_interval=1) as c:
            c.wait_for("subscribed", lambda l: l["exchange"] == "okx", timeout=30)
            c.wait_for("subscribed", lambda l: l["exchange"] == "bybit", timeout=30)
            c.wait_for("subscribed", lambda l: l["exchange"] == "binance", count=2, timeout=30)
            connects = len(c.events("ws_connect"))
            for ex in EXCHANGES:
                sim.pause(ex)      # no data at all: only keepalive holds the sockets
            time.sleep(8)          # the behaviour under test: 8 s of no data, past both idle limits
            assert len(c.events("ws_connect")) == connects
            assert not c.events("ws_disconnect")
            assert sim.stats()["bybit"]["closed_idle"] == 0 and sim.stats()["okx"]["closed_idle"] == 0
            assert c.stop() == 0


def test_okx_upgrade_notice_moves_subscriptions_without_a_hole(tmp_path):
    from sim import Simulator
    with Simulator(exchanges=("okx",), rate=20.0, seed=5) as sim:
        with start_collector(tmp_path, sim, exchanges="okx", symbols="BTCUSDT,ETHUSDT") as c:
            line = c.wait_for("subscribed", timeout=30)[0]
            assert line["requested"] == line["live"] == 10 and line["rejected"] == 0
            wait_until(lambda: c.frames_received("okx") > 50, 15, what="data before the notice")
            assert sim.okx_notice(delay=3.0) >= 1
            c.wait_for("ws_rotate", lambda l: l["reason"] == "notice", timeout=10)
            c.wait_for("ws_disconnect", timeout=15)
            after = c.frames_received("okx")
            wait_until(lambda: c.frames_received("okx") > after + 50, 15, what="data on the new socket")
            settle(c, sim, ("okx",))
            assert c.stop() == 0
    trades = read_dataset(c.data_dir, "trades").sort_by("recv_seq")
    assert len(set(trades.column("conn_id").to_pylist())) >= 2      # both connections wrote
    tracker = SequenceTracker("okx", "trades", create("okx").GAP_RULES["trades"])
    assert tracker.observe(trades) == []
    # the BBO stream never paused across the switch: no interval longer than 1 s
    bbo = read_dataset(c.data_dir, "bbo").sort_by("ts_recv")
    for sym in ("BTC-USDT-SWAP", "ETH-USDT-SWAP"):
        ts = [t for s, t in zip(bbo.column("symbol").to_pylist(), bbo.column("ts_recv").to_pylist())
              if s == sym]
        assert ts and max(b - a for a, b in zip(ts, ts[1:])) < 1_000_000_000, sym
