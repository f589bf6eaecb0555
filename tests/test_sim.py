"""Tests for the exchange simulator (sim/): real sockets on loopback, websocket-client as client.

Why: the collector's own test-suite trusts these behaviours (silent ACKs, per-arg ACKs, keepalive
closes, exact id gaps, row counts), so each is checked here against a live simulator.
"""
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import websocket

from sim import Simulator
from tests.helpers import SHARED, wait_until

SAMPLES = os.path.join(SHARED, "samples")


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
    """Default: the nested form the live server sends, {"error":{code,msg},"id"} (binance.md §4)."""
    ws = connect(sim.urls["binance"]["ws"] + "/public/ws")
    ws.send("{not json")
    assert recv_json(ws) == {"error": {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"},
                             "id": None}
    ws.send(json.dumps({"method": "NOPE", "id": 4}))
    r = recv_json(ws)
    assert r["error"]["code"] == 2 and r["id"] == 4 and list(r) == ["error", "id"]
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": [], "id": -1}))
    assert recv_json(ws) == {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned "
                                       "integer"}, "id": None}
    ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 5}))
    assert recv_json(ws)["error"]["code"] == 1
    ws.send(json.dumps({"method": "SET_PROPERTY", "params": ["nope", True], "id": 6}))
    assert recv_json(ws) == {"error": {"code": 0, "msg": "Unknown property"}, "id": 6}
    ws.close()


def read_until(ws, pred, timeout=5.0, what="frame"):
    """Frames (parsed) up to and including the first for which pred(frame) is true."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {what} within {timeout} s; got {len(out)} frames, last {out[-3:]!r}")
        ws.settimeout(left)
        try:
            m = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        out.append(m)
        if pred(m):
            return out


def sub_binance(ws, params, rid):
    ws.send(json.dumps({"method": "SUBSCRIBE", "params": params, "id": rid}))


def test_binance_reject_topic_wrapped_error_subscribes_nothing():
    s = Simulator(exchanges=("binance",), rate=50.0,
                  reject_topics={"binance": ["ethusdt@aggTrade"]}).start()
    try:
        s.reject("binance", "btcusdt@bookTicker")
        ws = connect(s.urls["binance"]["ws"] + "/public/stream")
        sub_binance(ws, ["ethusdt@bookTicker", "btcusdt@bookTicker"], 5)
        assert ws.recv() == '{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":5}'
        ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 6}))
        assert recv_json(ws) == {"result": [], "id": 6}        # no data came either: nothing subscribed
        s.reject("binance", "btcusdc@bookTicker", reason="Invalid request: stream refused")
        sub_binance(ws, ["btcusdc@bookTicker"], 7)
        assert recv_json(ws) == {"error": {"code": 2, "msg": "Invalid request: stream refused"}, "id": 7}
        wm = connect(s.urls["binance"]["ws"] + "/market/ws")      # constructor option
        sub_binance(wm, ["btcusdt@aggTrade", "ethusdt@aggTrade"], 8)
        assert recv_json(wm) == {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 8}
        wm.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 9}))
        assert recv_json(wm) == {"result": [], "id": 9}
        # named in the URL: never rejected, accepted and silent (a good stream beside it flows)
        wu = connect(s.urls["binance"]["ws"] + "/public/stream?streams=btcusdt@bookTicker/ethusdt@bookTicker")
        frames = [recv_json(wu) for _ in range(40)]
        assert {f["stream"] for f in frames} == {"ethusdt@bookTicker"}
        wu.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 10}))
        r = read_until(wu, lambda m: m.get("id") == 10)[-1]
        assert r["result"] == ["btcusdt@bookTicker", "ethusdt@bookTicker"]
        # unreject: the same request now succeeds and data flows
        s.unreject("binance", "btcusdt@bookTicker")
        sub_binance(ws, ["ethusdt@bookTicker", "btcusdt@bookTicker"], 11)
        assert recv_json(ws) == {"result": None, "id": 11}
        read_until(ws, lambda m: m.get("stream") == "btcusdt@bookTicker", what="btcusdt@bookTicker")
        for w in (ws, wm, wu):
            w.close()
    finally:
        s.stop()


def test_binance_flat_error_form_and_close_after_reject():
    s = Simulator(exchanges=("binance",), rate=20.0, binance_error_form="flat",
                  binance_reject_close=True, reject_topics={"binance": ["btcusdt@bookTicker"]}).start()
    try:
        ws = connect(s.urls["binance"]["ws"] + "/public/ws")
        ws.send("{not json")
        assert recv_json(ws) == {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}
        ws.send(json.dumps({"method": "NOPE", "id": 4}))
        r = recv_json(ws)
        assert r["code"] == 2 and r["id"] == 4 and list(r) == ["code", "msg", "id"]
        sub_binance(ws, ["btcusdt@bookTicker"], 3)
        assert recv_json(ws) == {"code": 2, "msg": "Invalid request: invalid stream", "id": 3}
        op, data = ws.recv_data(control_frame=True)
        assert op == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1008
        ws.close()
        assert s.stats()["binance"]["closed_policy"] == 1
    finally:
        s.stop()


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


def test_bybit_reject_topic_fails_whole_request():
    s = Simulator(exchanges=("bybit",), rate=50.0, reject_topics={"bybit": ["tickers.ETHUSDT"]}).start()
    try:
        s.reject("bybit", "publicTrade.BTCUSDT")
        ws = connect(s.urls["bybit"]["ws"] + "/v5/public/linear")
        ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT", "publicTrade.BTCUSDT"],
                            "req_id": "r7"}))
        raw = ws.recv()
        r = json.loads(raw)
        assert r == {"success": False, "ret_msg": "error:handler not found,topic:publicTrade.BTCUSDT",
                     "conn_id": r["conn_id"], "req_id": "r7", "op": "subscribe"}
        assert list(r) == ["success", "ret_msg", "conn_id", "req_id", "op"] and r["conn_id"]
        ws.send(json.dumps({"op": "ping", "req_id": "p1"}))
        assert recv_json(ws)["op"] == "ping"         # next frame: no snapshot, nothing subscribed
        assert s.connections("bybit")[0]["subscriptions"] == []
        ws.send(json.dumps({"op": "subscribe", "args": ["tickers.ETHUSDT"], "req_id": "r8"}))
        assert recv_json(ws)["ret_msg"] == "error:handler not found,topic:tickers.ETHUSDT"   # constructor
        s.reject("bybit", "orderbook.1.BTCUSDT", reason="Invalid symbol :[orderbook.1.BTCUSDT]")
        ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.BTCUSDT"], "req_id": "r9"}))
        assert recv_json(ws)["ret_msg"] == "Invalid symbol :[orderbook.1.BTCUSDT]"
        s.unreject("bybit", "publicTrade.BTCUSDT")
        ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT", "publicTrade.BTCUSDT"],
                            "req_id": "r10"}))
        got = read_until(ws, lambda m: m.get("topic") == "publicTrade.BTCUSDT", what="publicTrade.BTCUSDT")
        assert {"success": True, "ret_msg": "", "conn_id": r["conn_id"], "req_id": "r10",
                "op": "subscribe"} in got
        ws.close()
    finally:
        s.stop()


def test_bybit_ob_restart_u1(sim):
    ws = connect(sim.urls["bybit"]["ws"] + "/v5/public/linear")
    ws.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.BTCPERP"]}))
    first = read_until(ws, lambda m: "topic" in m, what="orderbook frame")[-1]
    assert first["data"]["u"] > 1000
    assert sim.bybit_ob_restart("BTCPERP") == 1
    got = read_until(ws, lambda m: m["data"]["u"] == 1, what="u=1 snapshot")
    assert got[-1]["type"] == "snapshot" and got[-1]["topic"] == "orderbook.1.BTCPERP"
    us = [1] + [recv_json(ws)["data"]["u"] for _ in range(15)]
    assert all(b - a in (0, 1) for a, b in zip(us, us[1:])), us      # +1 per change, equal on resend
    assert us[-1] > 1
    with pytest.raises(ValueError):
        sim.bybit_ob_restart("NOPEUSDT")
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


def test_okx_reject_topic_per_arg_60018_without_arg():
    s = Simulator(exchanges=("okx",), rate=50.0, okx_max_conn_per_sec=0,
                  reject_topics={"okx": ["trades:ETH-USDT-SWAP"]}).start()
    try:
        s.reject("okx", "bbo-tbt:BTC-USDT-SWAP")
        ws = connect(s.urls["okx"]["ws"] + "/ws/v5/public")
        ws.send(json.dumps({"id": "7", "op": "subscribe", "args": [
            {"channel": "trades", "instId": "BTC-USDT-SWAP"},
            {"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"},
            {"channel": "bbo-tbt", "instId": "ETH-USDT-SWAP"},
            {"channel": "trades", "instId": "ETH-USDT-SWAP"}]}))
        ev = [m for m in read_until(ws, lambda m: m.get("event") == "error" and "ETH" in m["msg"],
                                    what="4 events") if "event" in m]
        cid = ev[0]["connId"]
        msg = ("Wrong URL or channel:%s,instId:%s doesn't exist. Please use the correct URL, channel and "
               "parameters referring to API document.")
        assert ev == [
            {"id": "7", "event": "subscribe", "arg": {"channel": "trades", "instId": "BTC-USDT-SWAP"},
             "connId": cid},
            {"id": "7", "event": "error", "code": "60018", "msg": msg % ("bbo-tbt", "BTC-USDT-SWAP"),
             "connId": cid},
            {"id": "7", "event": "subscribe", "arg": {"channel": "bbo-tbt", "instId": "ETH-USDT-SWAP"},
             "connId": cid},
            {"id": "7", "event": "error", "code": "60018", "msg": msg % ("trades", "ETH-USDT-SWAP"),
             "connId": cid}]
        # the same frame shape as an unknown instId (what real OKX sends: no `arg`)
        ws.send(json.dumps({"id": "8", "op": "subscribe", "args": [{"channel": "bbo-tbt",
                                                                     "instId": "NOPE-USDT-SWAP"}]}))
        e = read_until(ws, lambda m: m.get("id") == "8")[-1]
        assert list(e) == list(ev[1]) == ["id", "event", "code", "msg", "connId"]
        assert s.connections("okx")[0]["subscriptions"] == ["trades:BTC-USDT-SWAP", "bbo-tbt:ETH-USDT-SWAP"]
        s.reject("okx", "mark-price:BTC-USDT-SWAP", reason="custom refusal")
        ws.send(json.dumps({"op": "subscribe", "args": [{"channel": "mark-price", "instId": "BTC-USDT-SWAP"}]}))
        e = read_until(ws, lambda m: m.get("event") == "error")[-1]
        assert e == {"event": "error", "code": "60018", "msg": "custom refusal", "connId": cid}
        s.unreject("okx", "bbo-tbt:BTC-USDT-SWAP")
        ws.send(json.dumps({"id": "9", "op": "subscribe", "args": [{"channel": "bbo-tbt",
                                                                     "instId": "BTC-USDT-SWAP"}]}))
        got = read_until(ws, lambda m: m.get("arg") == {"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"}
                         and "data" in m, what="bbo-tbt BTC data")
        assert {"id": "9", "event": "subscribe", "arg": {"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"},
                "connId": cid} in got
        ws.close()
    finally:
        s.stop()


def test_okx_seq_reset(sim):
    ws = connect(sim.urls["okx"]["ws"] + "/ws/v5/public")
    ws.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDC-SWAP"}]}))
    seqs = [m["data"][0]["seqId"] for m in read_until(ws, lambda m: "data" in m) if "data" in m]
    seqs += [recv_json(ws)["data"][0]["seqId"] for _ in range(4)]
    assert seqs == sorted(seqs)
    base = sim.okx_seq_reset("BTC-USDC-SWAP")
    assert base < min(seqs)
    got = read_until(ws, lambda m: m["data"][0]["seqId"] < min(seqs), what="lower seqId")
    after = [got[-1]["data"][0]["seqId"]] + [recv_json(ws)["data"][0]["seqId"] for _ in range(8)]
    assert after == sorted(after) and base < after[0] and after[-1] < min(seqs), (base, seqs, after)
    with pytest.raises(ValueError):
        sim.okx_seq_reset("NOPE-USDT-SWAP")
    ws.close()


def test_okx_notice_frame_close_and_seq_restart():
    """okx.md §3: 64008 notice on /public (and /private), socket closed `delay` s later; seqId may
    restart lower after it (okx_notice_seq_reset)."""
    s = Simulator(exchanges=("okx",), rate=20.0, okx_max_conn_per_sec=0, okx_notice_seq_reset=True).start()
    try:
        url = s.urls["okx"]["ws"]
        pub = connect(url + "/ws/v5/public")
        pub.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"}]}))
        ack = recv_json(pub)
        seqs = [recv_json(pub)["data"][0]["seqId"] for _ in range(3)]
        biz = connect(url + "/ws/v5/business")
        biz.send(json.dumps({"op": "subscribe", "args": [{"channel": "trades-all", "instId": "BTC-USDT-SWAP"}]}))
        assert recv_json(biz)["event"] == "subscribe"
        prv = connect(url + "/ws/v5/private")
        prv.send("ping")
        assert prv.recv() == "pong"
        t0 = time.monotonic()
        assert s.okx_notice(delay=0.6) == 2                      # public + private, not business
        while True:
            raw = pub.recv()
            if '"notice"' in raw:
                break
        assert raw == ('{"event":"notice","code":"64008","msg":"The connection will soon be closed for a '
                       'service upgrade. Please reconnect.","connId":"%s"}' % ack["connId"])
        assert json.loads(prv.recv())["code"] == "64008"
        pub.settimeout(3)
        while True:
            op, data = pub.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
        assert time.monotonic() - t0 >= 0.5
        assert int.from_bytes(data[:2], "big") == 1012
        for _ in range(3):                                       # business: no notice, still open
            assert "data" in recv_json(biz)
        biz.send("ping")
        assert read_until_raw(biz, "pong")
        pub2 = connect(url + "/ws/v5/public")
        pub2.send(json.dumps({"op": "subscribe", "args": [{"channel": "bbo-tbt", "instId": "BTC-USDT-SWAP"}]}))
        recv_json(pub2)
        first = recv_json(pub2)["data"][0]["seqId"]                # the initial push after the restart
        assert first < min(seqs), (first, seqs)
        for w in (pub, biz, prv, pub2):
            w.close()
    finally:
        s.stop()


def read_until_raw(ws, text, n=200):
    for _ in range(n):
        if ws.recv() == text:
            return True
    return False


# ------------------------------------------------------------------------- quiet symbols
def test_quiet_symbols_send_only_periodic_frames_and_resends():
    """A quiet symbol (constructor option) sends no event-driven frames while the periodic channels go
    on; the documented resends of an unchanged book (Bybit 3 s, OKX 60 s, x cadence_scale 0.04)
    repeat the initial snapshot unchanged.  An active symbol on the same sockets proves the sim runs."""
    s = Simulator(rate=40.0, cadence_scale=0.04, okx_max_conn_per_sec=0,
                  quiet_symbols={"binance": ["ETHUSDT"], "bybit": ["ETHUSDT"], "okx": ["ETH-USDT-SWAP"]}).start()
    try:
        url = s.urls
        # Binance: markPrice only
        wm = connect(url["binance"]["ws"] + "/market/stream?streams=ethusdt@markPrice@1s/ethusdt@aggTrade/"
                     "btcusdt@aggTrade")
        wp = connect(url["binance"]["ws"] + "/public/stream?streams=ethusdt@bookTicker/ethusdt@trade/"
                     "btcusdt@bookTicker")
        n = {}

        def count(*done):
            def pred(m):
                n[m["stream"]] = n.get(m["stream"], 0) + 1
                return all(n.get(k, 0) >= 20 for k in done)
            return pred
        read_until(wm, count("btcusdt@aggTrade", "ethusdt@markPrice@1s"), timeout=10)
        read_until(wp, count("btcusdt@bookTicker"), timeout=10)
        assert not {"ethusdt@aggTrade", "ethusdt@bookTicker", "ethusdt@trade"} & set(n), n
        # Bybit: tickers deltas (mark/index), orderbook.1 resends with the initial snapshot's u and book
        y = connect(url["bybit"]["ws"] + "/v5/public/linear")
        y.send(json.dumps({"op": "subscribe", "args": ["orderbook.1.ETHUSDT", "publicTrade.ETHUSDT",
                                                       "tickers.ETHUSDT", "publicTrade.BTCUSDT"]}))
        yb, yk, yt = [], [], 0

        def on_bybit(m):
            nonlocal yt
            t = m.get("topic", "")
            if t == "orderbook.1.ETHUSDT":
                yb.append(m)
            elif t == "tickers.ETHUSDT":
                yk.append(m)
            elif t == "publicTrade.BTCUSDT":
                yt += 1
            else:
                assert "topic" not in m, m                      # publicTrade.ETHUSDT never comes
            return len(yb) >= 4 and len(yk) >= 10 and yt >= 5
        read_until(y, on_bybit, timeout=10)
        assert yb[0]["type"] == "snapshot"
        book = [json.dumps([m["data"]["u"], m["data"]["b"], m["data"]["a"]]) for m in yb]
        assert len(set(book)) == 1, book                        # no change: same u, same book
        assert len({m["data"]["seq"] for m in yb}) == len(yb)   # resends: new seq each time
        assert yk[0]["type"] == "snapshot"
        for m in yk[1:]:
            assert m["type"] == "delta" and set(m["data"]) <= {
                "symbol", "markPrice", "indexPrice", "fundingRate", "nextFundingTime"}, m
        assert sum("markPrice" in m["data"] for m in yk[1:]) >= 5
        # OKX: mark-price goes on; bbo-tbt only the initial push and its ~60 s (x 0.04) resend
        o = connect(url["okx"]["ws"] + "/ws/v5/public")
        o.send(json.dumps({"op": "subscribe", "args": [
            {"channel": c, "instId": "ETH-USDT-SWAP"} for c in
            ("bbo-tbt", "trades", "open-interest", "mark-price", "funding-rate")] + [
            {"channel": "trades", "instId": "BTC-USDT-SWAP"}]}))
        od = {}

        def on_okx(m):
            if "data" in m:
                k = (m["arg"]["channel"], m["arg"]["instId"])
                od.setdefault(k, []).append(m["data"][0])
            return (len(od.get(("bbo-tbt", "ETH-USDT-SWAP"), ())) >= 2
                    and len(od.get(("mark-price", "ETH-USDT-SWAP"), ())) >= 20
                    and len(od.get(("trades", "BTC-USDT-SWAP"), ())) >= 5)
        read_until(o, on_okx, timeout=10, what="bbo-tbt resend, 20 mark-price, 5 BTC trades")
        bbo = od[("bbo-tbt", "ETH-USDT-SWAP")]
        assert [(d["asks"], d["bids"], d["seqId"]) for d in bbo] == [(bbo[0]["asks"], bbo[0]["bids"],
                                                                      bbo[0]["seqId"])] * len(bbo)
        assert ("trades", "ETH-USDT-SWAP") not in od
        assert len(od[("open-interest", "ETH-USDT-SWAP")]) == 1             # the initial push only
        st = s.stats()
        assert not st["binance"]["trades_generated"].get("ETHUSDT")
        assert not st["okx"]["trades_generated"].get("ETH-USDT-SWAP")
        for w in (wm, wp, y, o):
            w.close()
    finally:
        s.stop()


def test_quiet_runtime_expiry_and_unquiet():
    s = Simulator(exchanges=("binance",), rate=50.0, cadence_scale=0.1).start()
    try:
        wp = connect(s.urls["binance"]["ws"] + "/public/ws/btcusdt@bookTicker")
        wm = connect(s.urls["binance"]["ws"] + "/market/ws/btcusdt@markPrice@1s")
        recv_json(wp)
        # frames stamped (E) before quiet() returned may still come; none stamped after, until expiry
        tb = int(time.time() * 1000)
        s.quiet("binance", "BTCUSDT", seconds=1.0)
        ta = int(time.time() * 1000)
        es = [m["E"] for m in read_until(wp, lambda m: m["E"] > tb + 1000, what="bookTicker after expiry")]
        gap = [e for e in es if ta + 5 < e < tb + 990]
        assert not gap, (tb, ta, gap)
        marks = [m["E"] for m in read_until(wm, lambda m: m["E"] > tb + 900)]
        assert sum(ta < e < tb + 900 for e in marks) >= 3              # markPrice kept coming
        s.quiet("binance", "BTCUSDT")                                  # until unquiet
        t1 = int(time.time() * 1000)
        wm.settimeout(5)
        while recv_json(wm)["E"] < t1 + 500:                          # 0.5 s of markPrice
            pass
        t2 = int(time.time() * 1000)
        s.unquiet("binance", "BTCUSDT")
        es = [m["E"] for m in read_until(wp, lambda m: m["E"] > t2, what="bookTicker after unquiet")]
        assert not [e for e in es if t1 + 5 < e < t2 - 5], (t1, t2, es)
        with pytest.raises(ValueError):
            s.quiet("binance", "NOPEUSDT")
        wp.close()
        wm.close()
    finally:
        s.stop()


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
        # a stretch of generated data to reconcile, long enough for the rarer kinds
        wait_until(lambda: (lambda st: all(sum(st[ex]["rows"].values()) > 20 for ex in ("binance", "bybit", "okx"))
                            and st["bybit"]["rows"]["open_interest"] > 0 and st["okx"]["rows"]["funding"] > 0)(s.stats()),
                   30, what="rows of every exchange, Bybit open interest and OKX funding")
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
        last = a                        # frames already in flight when paused: drained here
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
        assert rgot, "the raw stream delivered nothing"
        for r in rgot:
            assert '{"stream":"btcusdt@bookTicker","data":%s}' % r in btc
        ws.close()
        raw.close()
    finally:
        s.stop()
