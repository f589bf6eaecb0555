"""Tests for the exchange simulator (sim/): real sockets on loopback, websocket-client as client.

Why: the collector's own test-suite trusts these behaviours (silent ACKs, per-arg ACKs, keepalive
closes, exact id gaps, row counts), so each is checked here against a live simulator.
"""
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import websocket

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sim import Simulator  # noqa: E402

SAMPLES = "/work/shared/samples"


@pytest.fixture(scope="module")
def sim():
    s = Simulator(rate=50.0, cadence_scale=0.1, okx_max_conn_per_sec=0).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_sim():
    s = Simulator(exchanges=("bybit", "okx"), rate=20.0, cadence_scale=0.1,
                  bybit_idle_timeout=1.0, okx_idle_timeout=1.0, okx_max_conn_per_sec=0).start()
    yield s
    s.stop()


def connect(url, timeout=3.0):
    return websocket.create_connection(url, timeout=timeout)


def recv_json(ws):
    return json.loads(ws.recv())


def assert_silent(ws, seconds):
    ws.settimeout(seconds)
    with pytest.raises(websocket.WebSocketTimeoutException):
        msg = ws.recv()
        pytest.fail(f"expected silence, got {msg[:200]!r}")


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


# --------------------------------------------------------------------------- Binance
def test_binance_public_stream_bookticker(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/public/stream")
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@bookTicker"], "id": 7}))
    assert recv_json(ws) == {"result": None, "id": 7}
    m = ws.recv()
    assert m.startswith('{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":')
    d = json.loads(m)["data"]
    assert list(d) == ["e", "u", "s", "b", "B", "a", "A", "T", "E"]
    assert float(d["b"]) < float(d["a"]) and float(d["B"]) > 0 and d["E"] >= d["T"]
    ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 8}))
    while True:
        r = recv_json(ws)
        if r.get("id") == 8:
            assert r["result"] == ["btcusdt@bookTicker"]
            break
    ws.close()


def test_binance_market_stream_aggtrade(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/market/stream")
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade", "ethusdc@markPrice@1s"],
                        "id": 1}))
    assert recv_json(ws) == {"result": None, "id": 1}
    ids, marks = [], 0
    while len(ids) < 5 or not marks:
        m = recv_json(ws)
        if m["stream"] == "btcusdt@aggTrade":
            d = m["data"]
            assert d["e"] == "aggTrade" and isinstance(d["m"], bool) and d["l"] >= d["f"]
            ids.append(d["a"])
        else:
            assert m["stream"] == "ethusdc@markPrice@1s"
            assert m["data"]["E"] % 100 == 0 and m["data"]["T"] % (8 * 3600_000) == 0
            marks += 1
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    ws.close()


def test_binance_url_streams_raw_mode(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/market/ws/ethusdt@aggTrade")
    d = recv_json(ws)
    assert d["e"] == "aggTrade" and d["s"] == "ETHUSDT"
    ws.close()


def test_binance_wrong_path_and_unknown_symbol_ack_then_silence(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/public/stream")
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 2}))
    assert recv_json(ws) == {"result": None, "id": 2}
    ws2 = connect(sim.urls["binance"]["ws"] + "/market/stream")
    ws2.send(json.dumps({"method": "SUBSCRIBE", "params": ["nopeusdt@aggTrade"], "id": 3}))
    assert recv_json(ws2) == {"result": None, "id": 3}
    assert_silent(ws, 1.0)
    assert_silent(ws2, 0.3)
    ws.close()
    ws2.close()


def test_binance_error_replies(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/public/ws")
    ws.send("{not json")
    assert recv_json(ws)["code"] == 3
    ws.send(json.dumps({"method": "NOPE", "id": 4}))
    r = recv_json(ws)
    assert r["code"] == 2 and r["id"] == 4
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": [], "id": -1}))
    assert recv_json(ws)["code"] == 2
    ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 5}))
    assert recv_json(ws)["code"] == 1
    ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["nope", True], "id": 6}))
    assert recv_json(ws)["code"] == 0
    ws.close()


# ----------------------------------------------------------------------------- Bybit
def test_bybit_subscribe_ack_data_and_ping(sim):
    ws = connect(sim.urls["bybit"]["ws"] + "/v5/public/linear")
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.BTCUSDT", "tickers.BTCPERP"],
                        "req_id": "r1"}))
    ack = recv_json(ws)
    assert ack["success"] is True and ack["ret_msg"] == "" and ack["req_id"] == "r1"
    assert ack["op"] == "subscribe" and ack["conn_id"]
    seen = {}
    while len(seen) < 2:
        m = ws.recv()
        d = json.loads(m)
        seen.setdefault(d["topic"], d)
        if d["topic"].startswith("orderbook"):
            assert m.index('"ts"') < m.index('"type"') and d["type"] == "snapshot" and "cts" in d
    assert seen["tickers.BTCPERP"]["type"] == "snapshot"
    assert isinstance(seen["tickers.BTCPERP"]["data"]["nextFundingTime"], str)
    ws.send(json.dumps({"op": "ping", "req_id": "p1"}))
    while True:
        d = recv_json(ws)
        if d.get("op") == "ping":
            assert d == {"success": True, "ret_msg": "pong", "conn_id": ack["conn_id"],
                         "req_id": "p1", "op": "ping"}
            break
    ws.close()


def test_bybit_bad_symbol_rejects_whole_request(sim):
    ws = connect(sim.urls["bybit"]["ws"] + "/v5/public/linear")
    ws.send(json.dumps({"op": "subscribe", "args": ["publicTrade.ETHUSDT", "orderbook.1.btcusdt"],
                        "req_id": "x"}))
    r = recv_json(ws)
    assert r["success"] is False and r["ret_msg"] == "error:handler not found,topic:orderbook.1.btcusdt"
    assert_silent(ws, 0.8)                     # publicTrade.ETHUSDT was not subscribed either
    ws.settimeout(3)
    ws.send(json.dumps({"op": "nope"}))
    assert recv_json(ws)["ret_msg"] == "error:invalid op"
    ws.send("garbage")
    assert recv_json(ws)["ret_msg"].startswith("Failed to decode incoming data:")
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT"]}))
    assert recv_json(ws)["success"] is True
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT"]}))
    while True:
        r = recv_json(ws)
        if "success" in r:
            assert r["ret_msg"] == "error:already subscribed,topic:orderbook.1.ETHUSDT"
            break
    ws.close()


def test_bybit_idle_close_without_ping(short_sim):
    before = short_sim.stats()["bybit"]["closed_idle"]
    ws = connect(short_sim.urls["bybit"]["ws"] + "/v5/public/linear", timeout=4)
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.BTCUSDT"]}))
    t0 = time.time()
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            ws.recv()                           # data flows, but no ping -> closed
    assert 0.8 < time.time() - t0 < 3.0
    assert short_sim.stats()["bybit"]["closed_idle"] == before + 1


# ------------------------------------------------------------------------------- OKX
def test_okx_per_arg_acks_and_errors(sim):
    ws = connect(sim.urls["okx"]["ws"] + "/ws/v5/public")
    ws.send(json.dumps({"id": "1", "op": "subscribe", "args": [
        {"channel": "trades", "instId": "BTC-USDT-SWAP"},
        {"channel": "bbo-tbt", "instId": "NOPE-USDT-SWAP"},
        {"channel": "trades-all", "instId": "BTC-USDT-SWAP"},
        {"channel": "open-interest", "instId": "ETH-USDT-SWAP"}]}))
    events = []
    while len(events) < 4:
        d = recv_json(ws)
        if "event" in d:
            events.append(d)
    assert events[0] == {"id": "1", "event": "subscribe",
                         "arg": {"channel": "trades", "instId": "BTC-USDT-SWAP"},
                         "connId": events[0]["connId"]}
    assert events[1]["event"] == "error" and events[1]["code"] == "60018"
    assert events[1]["msg"].startswith("Wrong URL or channel:bbo-tbt,instId:NOPE-USDT-SWAP doesn't exist.")
    assert events[2]["code"] == "64001"
    assert events[3]["event"] == "subscribe"
    ws.send("ping")
    while ws.recv() != "pong":
        pass
    ws.send("{bad")
    while True:
        d = recv_json(ws)
        if d.get("event") == "error":
            assert d["code"] == "60012"
            break
    ws.close()
    wb = connect(sim.urls["okx"]["ws"] + "/ws/v5/business")
    wb.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"},
                                                    {"channel": "trades-all", "instId": "BTC-USDT-SWAP"}]}))
    assert recv_json(wb)["code"] == "64002"
    assert recv_json(wb)["event"] == "subscribe"
    prev = None
    for _ in range(5):
        d = recv_json(wb)["data"]
        assert len(d) == 1 and isinstance(d[0]["tradeId"], str)
        tid = int(d[0]["tradeId"])
        assert prev is None or tid == prev + 1
        prev = tid
    wb.close()


def test_okx_idle_close_4004(short_sim):
    ws = connect(short_sim.urls["okx"]["ws"] + "/ws/v5/public", timeout=4)
    t0 = time.time()
    op, data = ws.recv_data(control_frame=True)
    assert op == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 4004
    assert 0.8 < time.time() - t0 < 3.0
    ws.close()


def test_okx_notice(short_sim):
    ws = connect(short_sim.urls["okx"]["ws"] + "/ws/v5/public", timeout=4)
    ws.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"}]}))
    recv_json(ws)
    assert short_sim.okx_notice(delay=0.3) == 1
    while True:
        d = recv_json(ws)
        if d.get("event") == "notice":
            assert d["code"] == "64008"
            break
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            ws.recv()


# ----------------------------------------------------------------- counting/faults
def _rows_binance(d, rows):
    e = d["data"]["e"]
    if e == "bookTicker":
        rows["bbo"] += 1
    elif e in ("aggTrade", "trade"):
        rows["trades"] += 1
    elif e == "markPriceUpdate":
        rows["mark_price"] += 1
        rows["funding"] += 1


def _rows_bybit(d, rows):
    t = d.get("topic", "")
    if t.startswith("orderbook"):
        rows["bbo"] += 1
    elif t.startswith("publicTrade"):
        rows["trades"] += len(d["data"])
    elif t.startswith("tickers"):
        x = d["data"]
        rows["mark_price"] += any(k in x for k in ("markPrice", "indexPrice"))
        rows["funding"] += any(k in x for k in ("fundingRate", "nextFundingTime", "fundingIntervalHour"))
        rows["open_interest"] += any(k in x for k in ("openInterest", "openInterestValue"))


OKX_DS = {"bbo-tbt": "bbo", "trades": "trades", "trades-all": "trades", "mark-price": "mark_price",
          "funding-rate": "funding", "open-interest": "open_interest"}


def _rows_okx(d, rows):
    if "arg" in d and "data" in d:
        rows[OKX_DS[d["arg"]["channel"]]] += len(d["data"])


def test_stats_rows_match_client_counts():
    s = Simulator(rate=30.0, cadence_scale=0.1, okx_max_conn_per_sec=0).start()
    try:
        socks = []
        b = connect(s.urls["binance"]["ws"] + "/public/stream?streams=btcusdt@bookTicker/ethusdc@bookTicker")
        m = connect(s.urls["binance"]["ws"] + "/market/stream?streams=btcusdt@aggTrade/ethusdt@markPrice@1s/btcusdc@markPrice")
        y = connect(s.urls["bybit"]["ws"] + "/v5/public/linear")
        y.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.BTCUSDT", "publicTrade.ETHPERP",
                                                       "tickers.BTCUSDT", "tickers.ETHUSDT"]}))
        o = connect(s.urls["okx"]["ws"] + "/ws/v5/public")
        o.send(json.dumps({"op": "subscribe", "args": [
            {"channel": c, "instId": "BTC-USDT-SWAP"} for c in
            ("bbo-tbt", "trades", "mark-price", "funding-rate", "open-interest")]}))
        socks = [(b, "binance", _rows_binance), (m, "binance", _rows_binance),
                 (y, "bybit", _rows_bybit), (o, "okx", _rows_okx)]
        counts = {ex: {k: 0 for k in OKX_DS.values()} for ex in ("binance", "bybit", "okx")}
        paused = threading.Event()

        def reader(ws, ex, fn):
            ws.settimeout(0.3)
            while True:
                try:
                    msg = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if paused.is_set():
                        return
                    continue
                fn(json.loads(msg), counts[ex])
        threads = [threading.Thread(target=reader, args=x) for x in socks]
        for t in threads:
            t.start()
        time.sleep(2.5)
        for ex in ("binance", "bybit", "okx"):
            s.pause(ex)
        paused.set()
        for t in threads:
            t.join(10)
        st = s.stats()
        for ex in ("binance", "bybit", "okx"):
            assert st[ex]["rows"] == counts[ex], ex
            assert sum(counts[ex].values()) > 20
        assert counts["bybit"]["open_interest"] > 0 and counts["okx"]["funding"] > 0
        for ws, _, _ in socks:
            ws.close()
    finally:
        s.stop()


def test_skip_ids_exact_gap(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/market/ws/bnbusdt@aggTrade" if False else
                 sim.urls["binance"]["ws"] + "/market/ws/btcusdc@aggTrade")
    ids = [recv_json(ws)["a"] for _ in range(3)]
    sim.skip_ids("binance", "btcusdc@aggTrade", 5)
    for _ in range(6):
        ids.append(recv_json(ws)["a"])
    gaps = [b - a - 1 for a, b in zip(ids, ids[1:]) if b - a != 1]
    assert gaps == [5]
    assert sim.stats()["binance"]["skipped_ids"]["btcusdc@aggTrade"] == 5
    ws.close()
    wo = connect(sim.urls["okx"]["ws"] + "/ws/v5/public")
    wo.send(json.dumps({"op": "subscribe", "args": [{"channel": "trades", "instId": "ETH-USDC-SWAP"}]}))
    recv_json(wo)
    prev = None
    missing = []
    for k in range(12):
        if k == 3:
            sim.skip_ids("okx", "trades:ETH-USDC-SWAP", 4)
        d = recv_json(wo)["data"][0]
        tid, cnt = int(d["tradeId"]), int(d["count"])
        if prev is not None and tid - cnt != prev:
            missing.append(tid - cnt - prev)
        prev = tid
    assert missing == [4]
    wo.close()


def test_half_open_stops_frames_socket_stays_open(sim):
    ws = connect(sim.urls["okx"]["ws"] + "/ws/v5/public")
    ws.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"}]}))
    recv_json(ws)
    recv_json(ws)
    sim.half_open("okx", 1.0)
    ws.settimeout(0.2)
    try:                                        # drain frames already in flight
        while True:
            ws.recv()
    except websocket.WebSocketTimeoutException:
        pass
    ws.send("ping")                             # not answered either
    assert_silent(ws, 1.2)
    assert ws.connected
    conns = [c for c in sim.connections("okx") if c["muted"]]
    assert conns and conns[0]["subscriptions"] == ["bbo-tbt:BTC-USDT-SWAP"]
    ws2 = connect(sim.urls["okx"]["ws"] + "/ws/v5/public")      # new sockets behave normally
    ws2.send("ping")
    assert ws2.recv() == "pong"
    ws2.close()
    ws.shutdown()                               # no close handshake: the server is mute


def test_silence_and_pause(sim):
    ws = connect(sim.urls["bybit"]["ws"] + "/v5/public/linear")
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT", "publicTrade.ETHUSDT"]}))
    sim.silence("bybit", "orderbook.1.ETHUSDT")
    t_end = time.time() + 0.3
    while time.time() < t_end:                  # drain frames already in flight
        ws.recv()
    topics = {recv_json(ws).get("topic") for _ in range(5)}
    assert topics == {"publicTrade.ETHUSDT"}
    sim.unsilence("bybit", "orderbook.1.ETHUSDT")
    while recv_json(ws).get("topic") != "orderbook.1.ETHUSDT":
        pass
    ws.close()


# ------------------------------------------------------------------------------ REST
def test_rest_discovery(sim):
    st, h, body = http_get(sim.urls["binance"]["rest"] + "/fapi/v1/exchangeInfo")
    assert st == 200 and "X-MBX-USED-WEIGHT-1M" in h
    ctypes = {(r["contractType"], r["status"], r["marginAsset"]) for r in json.loads(body)["symbols"]}
    assert {("PERPETUAL", "TRADING", "USDT"), ("PERPETUAL", "TRADING", "USDC"),
            ("TRADIFI_PERPETUAL", "TRADING", "USDT"), ("CURRENT_QUARTER", "TRADING", "USDT"),
            ("", "PENDING_TRADING", "USDT")} <= ctypes
    st, _, body = http_get(sim.urls["binance"]["rest"] + "/fapi/v1/aggTrades?symbol=NOPEUSDT&limit=1")
    assert st == 400 and json.loads(body)["code"] == -1121
    base = sim.urls["bybit"]["rest"] + "/v5/market/instruments-info?category=linear&limit=2"
    rows, cursor, pages = [], "", 0
    while True:
        st, _, body = http_get(base + (f"&cursor={cursor}" if cursor else ""))
        r = json.loads(body)["result"]
        rows += r["list"]
        pages += 1
        cursor = r["nextPageCursor"]
        if not cursor:
            break
    assert pages > 2 and len(rows) == len({r["symbol"] for r in rows})
    assert {"BTCPERP", "BTCUSDT"} <= {r["symbol"] for r in rows}
    assert any(r["contractType"] == "LinearFutures" for r in rows)
    assert [r["displayName"] for r in rows if r["symbol"] == "BTCPERP"] == ["BTCUSDC"]
    st, _, body = http_get(sim.urls["bybit"]["rest"] + "/v5/market/recent-trade?category=linear&symbol=NOPE")
    assert json.loads(body)["retCode"] == 10001
    st, _, body = http_get(sim.urls["okx"]["rest"] + "/api/v5/public/instruments?instType=SWAP")
    data = json.loads(body)["data"]
    assert {(r["ctType"], r["settleCcy"]) for r in data} >= {("linear", "USDT"), ("linear", "USDC"),
                                                            ("linear", "USD"), ("inverse", "BTC")}
    st, _, body = http_get(sim.urls["okx"]["rest"] + "/api/v5/market/trades?instId=NOPE-USDT-SWAP")
    assert json.loads(body)["code"] == "51001"


def test_rest_latest_trade_consistent_with_ws(sim):
    ws = connect(sim.urls["binance"]["ws"] + "/market/ws/ethusdt@aggTrade")
    a = recv_json(ws)["a"]
    sim.pause("binance")
    try:
        time.sleep(0.1)
        last = a
        ws.settimeout(0.2)
        try:
            while True:
                last = json.loads(ws.recv())["a"]
        except websocket.WebSocketTimeoutException:
            pass
        st, _, body = http_get(sim.urls["binance"]["rest"] + "/fapi/v1/aggTrades?symbol=ETHUSDT&limit=1")
        assert json.loads(body)[0]["a"] == last
    finally:
        sim.resume("binance")
        ws.close()


def test_rest_429_then_418():
    s = Simulator(exchanges=("binance", "okx"), binance_weight_limit=50).start()
    try:
        url = s.urls["binance"]["rest"] + "/fapi/v1/aggTrades?symbol=BTCUSDT&limit=1"
        codes = [http_get(url)[0] for _ in range(4)]
        assert codes == [200, 200, 429, 418]
        st, h, body = http_get(s.urls["binance"]["rest"] + "/fapi/v1/time")
        assert st == 418 and json.loads(body)["code"] == -1003
        st, _, body = http_get(url)
        assert s.stats()["binance"]["rest_429"] == 1 and s.stats()["binance"]["rest_418"] == 3
        s.rest_fail("okx", 429, 1)
        st, _, body = http_get(s.urls["okx"]["rest"] + "/api/v5/public/time")
        assert st == 429 and json.loads(body)["code"] == "50011"
        assert http_get(s.urls["okx"]["rest"] + "/api/v5/public/time")[0] == 200
    finally:
        s.stop()


# ---------------------------------------------------------------------------- replay
def test_replay_binance_bookticker_byte_identical():
    fn = os.path.join(SAMPLES, "binance_bookTicker.jsonl")
    with open(fn, encoding="utf-8", newline="") as fh:
        lines = [ln.rstrip("\r\n") for ln in fh if ln.strip()]
    streams = sorted({json.loads(ln)["stream"] for ln in lines})
    s = Simulator(exchanges=("binance",), replay={"binance": [fn]}, replay_rate=400.0).start()
    try:
        s.pause("binance")
        ws = connect(s.urls["binance"]["ws"] + "/public/stream?streams=" + "/".join(streams))
        raw = connect(s.urls["binance"]["ws"] + "/public/ws/btcusdt@bookTicker")
        s.resume("binance")
        got = []
        ws.settimeout(1.0)
        t_end = time.time() + 2.0
        while time.time() < t_end:
            got.append(ws.recv())
        s.pause("binance")
        ws.settimeout(0.3)
        try:
            while True:
                got.append(ws.recv())
        except websocket.WebSocketTimeoutException:
            pass
        assert len(got) > 100
        start = lines.index(got[0])
        assert got == lines[start:start + len(got)]            # exact bytes, file order, no loss
        assert s.stats()["binance"]["frames"] and sum(s.stats()["binance"]["frames"].values()) >= len(got)
        raw.settimeout(0.3)
        btc = [ln for ln in lines if ln.startswith('{"stream":"btcusdt@bookTicker"')]
        rgot = []
        try:
            while True:
                rgot.append(raw.recv())
        except websocket.WebSocketTimeoutException:
            pass
        for r in rgot:
            assert '{"stream":"btcusdt@bookTicker","data":%s}' % r in btc
        ws.close()
        raw.close()
    finally:
        s.stop()
