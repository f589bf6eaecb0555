"""Gap detector: unit tests on the tables a writer flush produces (injected clock, no threads),
then the collector as a subprocess against the simulator (ids removed, streams silenced)."""
from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest

from app import schema
from app import settings as settings_mod
from app.exchanges import Instrument, RowSink, create
from app.gaps import GapDetector
from app.state import State
from tests.helpers import CollectorProcess, settle, sim_env, wait_rows_parsed, wait_until

S = 1_000_000_000
T0 = 1_780_000_000 * S            # a fixed wall time (ns) for synthetic frames


def make_settings(**kw):
    base = dict(gap_time_factor=3.0, gap_time_floor=2.0, alignment_timeout=10.0, flush_interval=0.5)
    base.update(kw)
    return settings_mod.load(environ={}, dotenv_path="/nonexistent").replace(**base)


def inst(ex: str, symbol: str) -> Instrument:
    return Instrument(ex, symbol, "BTC-USDT-PERP", "BTC", "USDT", "live", "perp")


class Flush:
    """One writer flush for one exchange: frames -> adapter.parse -> the tables the observers get."""

    def __init__(self, ex: str):
        self.ex = ex
        self.adapter = create(ex)
        self.seq = itertools.count(1)

    def __call__(self, frames) -> dict:
        items = [(self.ex, conn, next(self.seq), int(ts), payload.encode()) for conn, ts, payload in frames]
        sink = RowSink()
        for it in items:
            self.adapter.parse(it, sink)
        tables = {"frames": schema.frames_table(self.ex, items)[0]}
        for ds, rows in sink.take().items():
            if rows:
                tables[ds] = schema.build_table(ds, self.ex, rows)[0]
        return tables


def agg(a: int, ts_ns: int, sym="BTCUSDT") -> str:
    ms = ts_ns // 1_000_000
    return ('{"stream":"%s@aggTrade","data":{"e":"aggTrade","E":%d,"a":%d,"s":"%s","p":"1.0","q":"1",'
            '"f":%d,"l":%d,"T":%d,"m":false}}' % (sym.lower(), ms, a, sym, a * 3, a * 3 + 2, ms))


def mark(ts_ns: int, sym="BTCUSDT") -> str:
    ms = ts_ns // 1_000_000
    return ('{"stream":"%s@markPrice@1s","data":{"e":"markPriceUpdate","E":%d,"s":"%s","p":"1.0",'
            '"P":"1.0","i":"1.0","r":"0.0001","T":%d}}' % (sym.lower(), ms, sym, ms + 3600_000))


def okx_trade(tid: int, count: int, ts_ns: int, inst_id="BTC-USDT-SWAP") -> str:
    return ('{"arg":{"channel":"trades","instId":"%s"},"data":[{"instId":"%s","tradeId":"%d","px":"1",'
            '"sz":"1","side":"buy","ts":"%d","count":"%d"}]}' % (inst_id, inst_id, tid, ts_ns // 1_000_000, count))


def okx_oi(ts_ns: int, inst_id="BTC-USDT-SWAP") -> str:
    return ('{"arg":{"channel":"open-interest","instId":"%s"},"data":[{"instId":"%s","instType":"SWAP",'
            '"oi":"1","oiCcy":"1","oiUsd":"1","ts":"%d"}]}' % (inst_id, inst_id, ts_ns // 1_000_000))


def bybit_trade(uid: str, ts_ns: int, sym="BTCUSDT") -> str:
    ms = ts_ns // 1_000_000
    return ('{"topic":"publicTrade.%s","type":"snapshot","ts":%d,"data":[{"T":%d,"s":"%s","S":"Buy",'
            '"v":"1","p":"1","i":"%s","BT":false}]}' % (sym, ms, ms, sym, uid))


class FakeWorker:
    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)


def detector(exchanges, symbols, datasets, clock, workers=None, **kw):
    adapters = {ex: create(ex) for ex in exchanges}
    streams = {ex: [st for sym in symbols[ex] for st in adapters[ex].streams_for(inst(ex, sym), datasets)]
               for ex in exchanges}
    state = State(exchanges=exchanges, clock=clock)
    det = GapDetector(make_settings(**kw), state, adapters, streams, clock=clock, workers=workers)
    return det, state, streams


def events(state, ex):
    return list(state.recent_gaps[ex])


# ---- sequence gaps ----------------------------------------------------------------------------------

def test_binance_aggtrade_ids_give_exact_sequence_gaps():
    now = [T0 / S]
    det, state, _ = detector(("binance",), {"binance": ["BTCUSDT", "ETHUSDT"]}, ["trades"], lambda: now[0])
    flush = Flush("binance")
    det.process("binance", flush([(1, T0 + i * S, agg(100 + i, T0 + i * S)) for i in range(5)]))
    # 105..107 never arrive; an ETH trade in between must not matter; a duplicate (overlap) neither
    gaps = det.process("binance", flush([(1, T0 + 6 * S, agg(7, T0 + 6 * S, "ETHUSDT")),
                                         (1, T0 + 7 * S, agg(104, T0 + 7 * S)),
                                         (1, T0 + 8 * S, agg(108, T0 + 8 * S)),
                                         (1, T0 + 9 * S, agg(109, T0 + 9 * S))]))
    assert [(g.kind, g.symbol, g.from_id, g.to_id, g.missed) for g in gaps] == [
        ("sequence", "BTCUSDT", 104, 108, 3)]
    assert gaps[0].ts_from == T0 + 4 * S and gaps[0].ts_to == T0 + 8 * S
    assert state.total("gaps", "binance", "trades") == 1
    rec = events(state, "binance")[0]
    assert rec["stream"] == "btcusdt@aggTrade" and rec["missed"] == 3
    st = state.gap_status("binance", now=now[0])
    assert st["gaps_15m"] == 1 and st["gaps_15m_by_kind"] == {"sequence": 1}


def test_okx_trade_count_chain():
    now = [T0 / S]
    det, state, _ = detector(("okx",), {"okx": ["BTC-USDT-SWAP"]}, ["trades"], lambda: now[0])
    flush = Flush("okx")
    # 10 (count 1), 13 (count 3: 11..13), 14, then 20 with count 2 (19..20): 15..18 missing
    gaps = det.process("okx", flush([(1, T0 + 1 * S, okx_trade(10, 1, T0)),
                                     (1, T0 + 2 * S, okx_trade(13, 3, T0)),
                                     (1, T0 + 3 * S, okx_trade(14, 1, T0)),
                                     (1, T0 + 4 * S, okx_trade(20, 2, T0))]))
    assert [(g.from_id, g.to_id, g.missed) for g in gaps] == [(14, 19, 4)]


# ---- time gaps --------------------------------------------------------------------------------------

def test_time_gap_on_a_cadenced_stream_but_never_on_event_driven_ones():
    """markPrice@1s (cadence 1 s): limit max(floor 2, 3 x 1) = 3 s. aggTrade and OKX open
    interest have no cadence: an 8 s silence there is a quiet market, not a gap."""
    now = [T0 / S]
    det, state, _ = detector(("binance", "okx"), {"binance": ["BTCUSDT"], "okx": ["BTC-USDT-SWAP"]},
                             ["trades", "mark_price", "open_interest"], lambda: now[0])
    fb, fo = Flush("binance"), Flush("okx")
    ticks = [0, 1, 2, 3, 11, 12]                        # 8 s without a mark price: one gap
    det.process("binance", fb([(1, T0 + t * S, mark(T0 + t * S)) for t in ticks[:4]]
                              + [(1, T0 + S // 2, agg(1, T0))]))
    gaps = det.process("binance", fb([(1, T0 + t * S, mark(T0 + t * S)) for t in ticks[4:]]
                                     + [(1, T0 + 12 * S, agg(2, T0 + 12 * S))]))
    assert [(g.kind, g.dataset, g.ts_from, g.ts_to) for g in gaps] == [
        ("time", "mark_price", T0 + 3 * S, T0 + 11 * S)]
    assert events(state, "binance")[0]["stream"] == "btcusdt@markPrice@1s"
    det.process("okx", fo([(2, T0, okx_oi(T0)), (2, T0 + S, okx_trade(5, 1, T0))]))
    assert det.process("okx", fo([(2, T0 + 9 * S, okx_oi(T0 + 9 * S)),
                                  (2, T0 + 9 * S, okx_trade(6, 1, T0 + 9 * S))])) == []
    # a silence just under the limit is not a gap either
    assert det.process("binance", fb([(1, T0 + 14.9 * S, mark(T0 + 14 * S))])) == []
    assert state.total("gaps") == 1


def test_multi_dataset_stream_is_timed_on_the_union_of_its_rows():
    """Binance markPrice feeds mark_price and funding: the stream is timed once, not per dataset."""
    now = [T0 / S]
    det, state, _ = detector(("binance",), {"binance": ["BTCUSDT"]}, ["mark_price", "funding"], lambda: now[0])
    fb = Flush("binance")
    det.process("binance", fb([(1, T0 + t * S, mark(T0 + t * S)) for t in range(3)]))
    gaps = det.process("binance", fb([(1, T0 + 10 * S, mark(T0 + 10 * S))]))
    assert [(g.kind, g.dataset) for g in gaps] == [("time", "mark_price")]


# ---- disconnects ------------------------------------------------------------------------------------

def _conn(ex, name, streams, last_frame_ns, stopped=False):
    return SimpleNamespace(exchange=ex, name=name, last_frame_ns=last_frame_ns, stopped=stopped,
                           plan=SimpleNamespace(streams=list(streams)), subscribed={}, connected=True)


def test_disconnect_reported_once_with_exact_count_and_no_bogus_sequence_or_time_gap():
    now = [T0 / S]
    worker = FakeWorker()
    det, state, streams = detector(("binance",), {"binance": ["BTCUSDT"]}, ["trades", "mark_price"],
                                   lambda: now[0], workers={"binance": worker})
    fb = Flush("binance")
    det.process("binance", fb([(1, T0 + t * S, mark(T0 + t * S)) for t in range(3)]
                              + [(1, T0 + i * S, agg(50 + i, T0 + i * S)) for i in range(3)]))
    # the socket dies at T0+3.5 s: close event first, the old connection's last rows flush later
    conn = _conn("binance", "binance-1", streams["binance"], T0 + 3 * S)
    det._on_close("binance", "binance-1", 1, T0 + 3 * S, T0 + 3.5 * S, streams["binance"], True, False)
    det.process("binance", fb([(1, T0 + 3 * S, agg(53, T0 + 3 * S))]))
    det._on_open("binance", "binance-1", 7, T0 + 9 * S, conn)
    assert [j.symbols for j in worker.jobs] == [[("BTCUSDT", "btcusdt@aggTrade")]]
    job = worker.jobs[0]
    # REST (while we are blind for the new trades) says the latest aggregate is 60
    det._on_aligned(job.outage_id, "BTCUSDT", {"status": "ok", "trades": [("60", 0)], "at_ns": T0 + 9 * S})
    now[0] = T0 / S + 9.2
    gaps = det.process("binance", fb([(7, T0 + 9.1 * S, '{"result":null,"id":1}'),
                                      (7, T0 + 9.3 * S, mark(T0 + 9 * S)),
                                      (7, T0 + 9.4 * S, agg(58, T0 + 9 * S)),
                                      (7, T0 + 9.5 * S, agg(59, T0 + 9 * S))]))
    assert gaps == []                      # neither the id jump 53 -> 58 nor the 6 s silence
    recs = sorted(events(state, "binance"), key=lambda r: r["stream"])
    assert [(r["kind"], r["stream"], r["missed"]) for r in recs] == [
        ("disconnect", "btcusdt@aggTrade", 4), ("disconnect", "btcusdt@markPrice@1s", None)]
    trade = recs[0]
    assert (trade["ts_from"], trade["ts_to"]) == (T0 + 3 * S, T0 + int(9.1 * S))   # last frame -> first frame
    assert (trade["from_id"], trade["to_id"], trade["method"], trade["rest_missed"]) == (53, 58, "ws_ids", 4)
    assert (trade["conn_id_before"], trade["conn_id_after"]) == (1, 7)
    done = state.last_alignment["binance"]
    assert done["missed_total"] == 4 and done["details"]["BTCUSDT"]["rest_latest_id"] == "60"
    assert state.total("gaps", "binance") == 2 and state.total("alignments", "binance") == 1
    # afterwards the stream is tracked normally again
    gaps = det.process("binance", fb([(7, T0 + 10 * S, agg(61, T0 + 10 * S))]))
    assert [(g.kind, g.missed) for g in gaps] == [("sequence", 1)]


def test_outages_still_open_at_stop_are_reported_not_dropped():
    """One connection dropped and never came back, another came back but nothing arrived yet:
    at shutdown both holes are reported, up to the stop, marked open_at_stop."""
    det, state, streams = detector(("okx",), {"okx": ["BTC-USDT-SWAP", "ETH-USDT-SWAP"]},
                                   ["open_interest"], time.time)
    btc, eth = streams["okx"]
    fo = Flush("okx")
    det.process("okx", fo([(3, T0, okx_oi(T0, "BTC-USDT-SWAP")), (4, T0, okx_oi(T0, "ETH-USDT-SWAP"))]))
    det.start()
    det.on_connection("close", _conn("okx", "okx-1", [btc], T0), 3)
    det.on_connection("close", _conn("okx", "okx-2", [eth], T0), 4)
    det.on_connection("open", _conn("okx", "okx-2", [eth], T0), 5)
    before_stop = time.time_ns()
    det.stop()
    recs = sorted(events(state, "okx"), key=lambda r: r["stream"])
    assert [(r["kind"], r["stream"], r.get("open_at_stop")) for r in recs] == [
        ("disconnect", "open-interest:BTC-USDT-SWAP", True), ("disconnect", "open-interest:ETH-USDT-SWAP", True)]
    assert all(r["ts_from"] == T0 and r["ts_to"] >= before_stop for r in recs)
    assert recs[1]["conn_id_after"] == 5 and state.total("gaps", "okx") == 2
    assert det.outages == {}


def test_quiet_symbol_after_reconnect_is_measured_by_rest_and_the_baseline_moves():
    now = [T0 / S]
    worker = FakeWorker()
    det, state, streams = detector(("okx",), {"okx": ["BTC-USDT-SWAP"]}, ["trades"], lambda: now[0],
                                   workers={"okx": worker})
    fo = Flush("okx")
    det.process("okx", fo([(3, T0, okx_trade(100, 2, T0))]))
    conn = _conn("okx", "okx-1", streams["okx"], T0)
    det._on_close("okx", "okx-1", 3, T0, T0 + S, streams["okx"], True, False)
    det._on_open("okx", "okx-1", 4, T0 + 2 * S, conn)
    det.process("okx", fo([(4, T0 + 2.1 * S, '{"event":"subscribe","arg":{"channel":"trades",'
                                              '"instId":"BTC-USDT-SWAP"},"connId":"x"}')]))
    now[0] = T0 / S + 2.5
    det._on_aligned(worker.jobs[0].outage_id, "BTC-USDT-SWAP",
                    {"status": "ok", "trades": [("104", 0), ("105", 0)], "at_ns": T0 + 2 * S})
    det.tick(now[0] + 1.0)                 # within the grace: a WS trade may still be in flight
    assert events(state, "okx") == []
    det.tick(now[0] + 1.6)
    (rec,) = events(state, "okx")
    assert (rec["kind"], rec["missed"], rec["method"], rec["first_ws_id"]) == ("disconnect", 5, "rest_ids", None)
    # the next trade continues REST's latest id: no sequence gap reported twice
    assert det.process("okx", fo([(4, T0 + 5 * S, okx_trade(106, 1, T0 + 5 * S))])) == []


def test_bybit_uuid_trades_are_counted_in_the_rest_list():
    now = [T0 / S]
    worker = FakeWorker()
    det, state, streams = detector(("bybit",), {"bybit": ["BTCUSDT"]}, ["trades"], lambda: now[0],
                                   workers={"bybit": worker})
    fy = Flush("bybit")
    det.process("bybit", fy([(1, T0, bybit_trade("u1", T0)), (1, T0 + S, bybit_trade("u2", T0 + S))]))
    conn = _conn("bybit", "bybit-1", streams["bybit"], T0 + S)
    det._on_close("bybit", "bybit-1", 1, T0 + S, T0 + 2 * S, streams["bybit"], True, False)
    det._on_open("bybit", "bybit-1", 2, T0 + 5 * S, conn)
    det._on_aligned(worker.jobs[0].outage_id, "BTCUSDT",
                    {"status": "ok", "trades": [(f"u{i}", 0) for i in range(1, 8)], "at_ns": T0 + 5 * S})
    det.process("bybit", fy([(2, T0 + 5.1 * S, '{"success":true,"ret_msg":"","op":"subscribe",'
                                                '"conn_id":"c","req_id":"1"}'),
                             (2, T0 + 5.2 * S, bybit_trade("u6", T0 + 5 * S))]))
    (rec,) = events(state, "bybit")
    assert (rec["missed"], rec["method"], rec["last_ws_id"], rec["first_ws_id"]) == (3, "rest_list", "u2", "u6")
    assert rec["from_id"] is None and rec["exact"] is True


def test_stopped_or_rotated_connection_is_no_outage_and_a_flap_is_one():
    now = [T0 / S]
    det, state, streams = detector(("binance",), {"binance": ["BTCUSDT"]}, ["mark_price"], lambda: now[0])
    conn = _conn("binance", "binance-1", streams["binance"], T0, stopped=True)
    det.on_connection("close", conn, 1, True)
    det._handle(det.q.get_nowait())
    assert det.outages == {}
    # dropped, reconnected, dropped again before any frame: one window, from the first last frame
    det._on_close("binance", "binance-1", 1, T0, T0 + S, streams["binance"], True, False)
    det._on_open("binance", "binance-1", 2, T0 + 2 * S, conn)
    det._on_close("binance", "binance-1", 2, T0 + 2 * S, T0 + 3 * S, streams["binance"], True, False)
    det._on_open("binance", "binance-1", 3, T0 + 4 * S, conn)
    fb = Flush("binance")
    det.process("binance", fb([(3, T0 + 4.5 * S, mark(T0 + 4 * S))]))
    (rec,) = events(state, "binance")
    assert (rec["ts_from"], rec["ts_to"], rec["conn_id_after"]) == (T0, T0 + int(4.5 * S), 3)


def test_listener_enqueues_only():
    det, _state, streams = detector(("binance",), {"binance": ["BTCUSDT"]}, ["trades"], time.time)
    conn = _conn("binance", "binance-1", streams["binance"], T0)
    det.on_connection("open", conn, 5)
    det.on_connection("close", conn, 5, True)
    kinds = [det.q.get_nowait()[0] for _ in range(2)]
    assert kinds == ["open", "close"] and det.outages == {}


# ---- the collector against the simulator ------------------------------------------------------------

@pytest.fixture
def sim():
    from sim import Simulator
    s = Simulator(exchanges=("binance", "okx"), symbols=["BTC", "ETH"], rate=20.0, seed=11,
                  okx_max_conn_per_sec=0)
    s.start()
    yield s
    s.stop()


def run_collector(tmp_path, sim, exchanges, **env):
    base = sim_env(sim, exchanges)
    base.update({"EXCHANGES": ",".join(exchanges), "SYMBOLS": "BTCUSDT,ETHUSDT",
                 "FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "5", "RECONNECT_MIN": "0.1",
                 "RECONNECT_MAX": "0.5", "GAP_TIME_FACTOR": "3", "GAP_TIME_FLOOR": "2",
                 "HEARTBEAT_INTERVAL": "60"})
    base.update({k.upper(): str(v) for k, v in env.items()})
    return CollectorProcess(tmp_path, base)


def test_skipped_ids_are_exact_sequence_gaps(tmp_path, sim):
    with run_collector(tmp_path, sim, ("binance", "okx"), datasets="trades") as c:
        c.wait_for("subscribed", count=2)
        c.wait_for("file_written", timeout=20)      # trades are flowing and flushed
        sim.skip_ids("binance", "btcusdt@aggTrade", 5)
        sim.skip_ids("okx", "trades:BTC-USDT-SWAP", 7)
        c.wait_for("gap_detected", lambda l: l["kind"] == "sequence", count=2, timeout=20)
        settle(c, sim, ("binance", "okx"))
        assert c.stop() == 0
    st = sim.stats()
    assert st["binance"]["skipped_ids"] == {"btcusdt@aggTrade": 5}
    assert st["okx"]["skipped_ids"] == {"trades:BTC-USDT-SWAP": 7}
    gaps = [(l["exchange"], l["symbol"], l["stream"], l["kind"], l["missed"], l["to_id"] - l["from_id"] - 1)
            for l in c.events("gap_detected")]
    assert sorted(gaps) == [("binance", "BTCUSDT", "btcusdt@aggTrade", "sequence", 5, 5),
                            ("okx", "BTC-USDT-SWAP", "trades:BTC-USDT-SWAP", "sequence", 7, 7)]
    counters = c.events("collector_stop")[-1]["counters"]
    assert counters["binance"]["gaps"] == {"trades": 1} and counters["okx"]["gaps"] == {"trades": 1}


def test_silenced_stream_is_one_time_gap_and_a_quiet_symbol_none(tmp_path, sim):
    """Same 6 s silence: a gap on the 1 s mark-price stream (limit 3 s); not on a quiet book (OKX
    bbo-tbt re-sends every 60 s: limit 180 s) nor on an event-driven stream (trades, bookTicker)."""
    silenced = [("binance", "ethusdt@aggTrade"), ("binance", "ethusdt@bookTicker"),
                ("binance", "btcusdt@markPrice@1s"), ("okx", "bbo-tbt:ETH-USDT-SWAP"),
                ("okx", "trades:ETH-USDT-SWAP")]

    def frames(ex, topic):
        return sim.stats()[ex]["frames"].get(topic, 0)
    with run_collector(tmp_path, sim, ("binance", "okx"), datasets="bbo,trades,mark_price") as c:
        c.wait_for("subscribed", count=3)
        # every stream to be silenced has delivered, and its rows reached the gap detector
        wait_until(lambda: all(frames(ex, t) >= 3 for ex, t in silenced), 20, what="the streams flowing")
        wait_rows_parsed(c, sim, ("binance", "okx"), ("bbo", "trades", "mark_price"))
        for ex, topic in silenced:
            sim.silence(ex, topic, 6)
        before = {k: frames(*k) for k in silenced}
        c.wait_for("gap_detected", timeout=20)
        # everything silenced has resumed, been read and (at stop) parsed and observed
        wait_until(lambda: all(frames(*k) > before[k] for k in silenced), 20, what="every stream resumed")
        settle(c, sim, ("binance", "okx"))
        assert c.stop() == 0
    gaps = c.events("gap_detected")
    assert [(g["exchange"], g["stream"], g["kind"]) for g in gaps] == [
        ("binance", "btcusdt@markPrice@1s", "time")]
    assert 5.0 <= gaps[0]["duration_s"] <= 10.0      # 6 s silence + cadence + scheduling slack
