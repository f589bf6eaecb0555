"""Bybit v5 linear adapter against the recorded frames in <shared>/samples/bybit_*.jsonl."""
from __future__ import annotations

import functools
import json

import pytest

import samples
from samples import CONN_ID, GARBAGE, TS_FALLBACK_NS, as_dicts, json_lines, parse_file

samples.require_samples()

from app import schema  # noqa: E402
from app.exchanges import (Control, FrameError, Instrument, RowSink, Stream, create,  # noqa: E402
                           resolve_symbols)
from app.exchanges import bybit as bybit_module  # noqa: E402

bybit = create("bybit")

BAD = (FrameError, ValueError, KeyError)


@functools.cache
def parsed(name: str):
    return parse_file(bybit, name)


# ---------------------------------------------------------------------------------------------
# interface

def test_module_exposes_the_adapter_interface():
    for attr in ("NAME", "KEEPALIVE", "MAX_CONNECTION_AGE_S", "CONNECT_INTERVAL_S", "SUBSCRIBE_INTERVAL_S", "GAP_RULES",
                 "ws_url", "discovery_request", "parse_discovery", "unified", "streams_for",
                 "plan_connections", "subscribe_messages", "unsubscribe_messages", "parse"):
        assert hasattr(bybit, attr), attr
    assert bybit.NAME == "bybit"
    assert bybit.MAX_CONNECTION_AGE_S is None
    assert bybit.GAP_RULES == {}
    assert bybit.KEEPALIVE.kind == "text" and bybit.KEEPALIVE.interval_s == 20.0
    assert json.loads(bybit.KEEPALIVE.payload) == {"op": "ping"}
    assert bybit.ws_url("wss://stream.bybit.com", "/v5/public/linear") == \
        "wss://stream.bybit.com/v5/public/linear"
    assert bybit.ws_url("ws://127.0.0.1:9000/", bybit_module.PATH) == "ws://127.0.0.1:9000/v5/public/linear"


@pytest.mark.parametrize("symbol, expected", [
    ("BTCUSDT", "BTC-USDT-PERP"), ("1000PEPEUSDT", "1000PEPE-USDT-PERP"),
    ("BTCPERP", "BTC-USDC-PERP"), ("1000PEPEPERP", "1000PEPE-USDC-PERP"),
    ("PERPUSDT", "PERP-USDT-PERP"),             # the PERP token, USDT settled
    ("BTCUSDT-14AUG26", "BTCUSDT-14AUG26"),     # dated future: not a perpetual, own name kept
])
def test_unified(symbol, expected):
    assert bybit.unified(symbol) == expected


# ---------------------------------------------------------------------------------------------
# orderbook.1 -> bbo

def test_orderbook_every_frame_gives_exactly_one_bbo_row():
    p = parsed("bybit_orderbook.1.jsonl")
    frames = json_lines("bybit_orderbook.1.jsonl")
    assert len(frames) == 121
    assert p.controls == []
    assert len(p.rows("bbo")) == len(frames)
    for line, counts in p.rows_per_line.items():
        assert counts == {"bbo": 1, "trades": 0, "mark_price": 0, "funding": 0, "open_interest": 0}, line
    assert set(p.sink.last_seen) == {f["topic"] for f in frames}


def test_orderbook_rows_field_by_field():
    name = "bybit_orderbook.1.jsonl"
    rows = as_dicts("bbo", parsed(name).rows("bbo"))
    for line, (frame, row) in enumerate(zip(json_lines(name), rows), start=1):
        d = frame["data"]
        assert row["symbol"] == d["s"] == frame["topic"].split(".", 2)[2]
        assert row["instrument"] == f"{d['s'][:-4]}-USDT-PERP"
        assert row["ts_event"] == frame.get("cts")          # absent in the 2023 frames -> None
        assert row["ts_exchange"] == frame["ts"]
        assert (row["ts_recv"], row["conn_id"], row["recv_seq"]) == (samples.ts_recv(name, line), CONN_ID, line)
        first_b = d["b"][0] if d["b"] else [None, None]
        first_a = d["a"][0] if d["a"] else [None, None]
        assert (row["bid_px"], row["bid_sz"]) == tuple(first_b), line
        assert (row["ask_px"], row["ask_sz"]) == tuple(first_a), line
        assert (row["update_id"], row["seq"]) == (d["u"], d["seq"])
        if row["bid_px"] is not None:
            assert isinstance(row["bid_px"], str)          # the exact decimal text


def test_orderbook_hand_written_rows():
    rows = parsed("bybit_orderbook.1.jsonl").rows("bbo")
    fb = TS_FALLBACK_NS
    # line 2: 2023 delta with an empty ask side -> ask nulls (no cts in 2023 frames)
    assert rows[1] == ("BTCUSDT", "BTC-USDT-PERP", None, 1680673821137, fb + 2, CONN_ID, 2,
                       "28552.00", "0.012", None, None, 7003306, 50193543147)
    # line 3: 2023 delta with two entries per side incl. size "0": the first entry of each side,
    # exactly as sent (a projection of the delta, not a book state)
    assert rows[2] == ("BTCUSDT", "BTC-USDT-PERP", None, 1682092584425, fb + 3, CONN_ID, 3,
                       "27994.60", "0", "27994.40", "0.058", 1188472, 11155892580)
    # line 4: 2025 snapshot with cts
    assert rows[3] == ("BANDUSDT", "BAND-USDT-PERP", 1749833474768, 1749833474773,
                       1749833474285131500, CONN_ID, 4, "0.6131", "17.9", "0.6134", "35.4",
                       24042997, 209972815373)


def test_orderbook_resend_with_same_u_is_kept():
    frames = json_lines("bybit_orderbook.1.jsonl")
    rows = as_dicts("bbo", parsed("bybit_orderbook.1.jsonl").rows("bbo"))
    seen, repeats = {}, 0
    for frame, row in zip(frames, rows):
        key = (frame["data"]["s"], frame["data"]["u"])
        if key in seen:
            repeats += 1
            assert row["update_id"] == seen[key]["update_id"] and row["seq"] != seen[key]["seq"]
        seen[key] = row
    assert repeats > 0                          # the 2025 capture holds 3 s resends


# ---------------------------------------------------------------------------------------------
# publicTrade -> trades

def test_public_trade_one_row_per_data_item():
    name = "bybit_publicTrade.jsonl"
    frames = json_lines(name)
    p = parsed(name)
    assert p.controls == []
    assert len(p.rows("trades")) == sum(len(f["data"]) for f in frames) == 149
    for line, frame in enumerate(frames, start=1):
        assert p.rows_per_line[line]["trades"] == len(frame["data"])
        assert sum(p.rows_per_line[line].values()) == len(frame["data"])


def test_public_trade_rows_field_by_field():
    name = "bybit_publicTrade.jsonl"
    rows = iter(as_dicts("trades", parsed(name).rows("trades")))
    for line, frame in enumerate(json_lines(name), start=1):
        for d in frame["data"]:
            row = next(rows)
            assert row["symbol"] == d["s"] == frame["topic"].split(".", 1)[1]
            assert row["instrument"] == bybit.unified(d["s"])
            assert (row["ts_event"], row["ts_exchange"]) == (d["T"], frame["ts"])
            assert (row["ts_recv"], row["conn_id"], row["recv_seq"]) == (samples.ts_recv(name, line), CONN_ID, line)
            assert (row["trade_id"], row["price"], row["size"]) == (d["i"], d["p"], d["v"])
            assert row["side"] in ("buy", "sell") and row["side"] == d["S"].lower()
            assert row["is_block"] is d["BT"]
            assert (row["first_trade_id"], row["last_trade_id"], row["trade_count"]) == (None, None, None)
    assert next(rows, None) is None


def test_public_trade_hand_written_rows():
    rows = parsed("bybit_publicTrade.jsonl").rows("trades")
    # line 1 (2023, no seq/RPI)
    assert rows[0] == ("LTCUSDT", "LTC-USDT-PERP", 1680688979983, 1680688979985, TS_FALLBACK_NS + 1,
                       CONN_ID, 1, "4c7b6bdc-b4a3-5716-9c7b-bbe01dc7072f", "94.53", "0.4", "buy",
                       None, None, None, False)
    # line 2 (2026)
    assert rows[1] == ("BTCUSDT", "BTC-USDT-PERP", 1786310819680, 1786310819681, 1786310819965676000,
                       CONN_ID, 2, "a9188a0a-82bc-50de-be60-03eedbe3cdd7", "65114.20", "0.004", "sell",
                       None, None, None, False)
    # line 3: five ETHUSDT fills of one matching event, in frame order
    line3 = [r for r in rows if r[6] == 3]
    assert [r[7] for r in line3] == ["19d7df56-4f10-5290-a969-d9d9f2c74cc3",
                                     "4d4ad26c-901f-5146-adc0-1db29b6b9ab6",
                                     "600c96a7-10e6-5814-80d5-a1427918f84f",
                                     "566d0d18-a763-5afc-8a7a-27e24ecdc3ea",
                                     "3f8f151c-8889-5f3a-84c1-9582dd71695b"]
    assert [r[9] for r in line3] == ["0.01", "1.30", "0.10", "0.10", "0.16"]
    assert {r[10] for r in line3} == {"buy"}


# ---------------------------------------------------------------------------------------------
# tickers -> mark_price, funding, open_interest

def _expected_ticker_counts(frames):
    mark = sum(1 for f in frames if "markPrice" in f["data"])
    funding = sum(1 for f in frames if {"fundingRate", "nextFundingTime", "fundingIntervalHour"} & set(f["data"]))
    oi = sum(1 for f in frames if {"openInterest", "openInterestValue"} & set(f["data"]))
    return mark, funding, oi


def test_tickers_row_counts():
    name = "bybit_tickers.jsonl"
    frames = json_lines(name)
    p = parsed(name)
    assert p.controls == []
    mark, funding, oi = _expected_ticker_counts(frames)
    assert (mark, funding, oi) == (52, 7, 60)      # 5 snapshots + 47 / 2 / 55 deltas
    assert len(p.rows("mark_price")) == mark
    assert len(p.rows("funding")) == funding
    assert len(p.rows("open_interest")) == oi
    assert p.rows("bbo") == [] and p.rows("trades") == []
    # every frame still counts as seen for its topic
    assert set(p.sink.last_seen) == {f["topic"] for f in frames}


def test_tickers_rows_field_by_field():
    name = "bybit_tickers.jsonl"
    p = parsed(name)
    rows = {ds: iter(as_dicts(ds, p.rows(ds))) for ds in ("mark_price", "funding", "open_interest")}
    for line, frame in enumerate(json_lines(name), start=1):
        d = frame["data"]
        common = {"symbol": d["symbol"], "instrument": bybit.unified(d["symbol"]), "ts_event": None,
                  "ts_exchange": frame["ts"], "ts_recv": samples.ts_recv(name, line), "conn_id": CONN_ID,
                  "recv_seq": line}
        if "markPrice" in d:
            assert next(rows["mark_price"]) == dict(common, mark_px=d["markPrice"],
                                                    index_px=d.get("indexPrice"), est_settle_px=None)
        if {"fundingRate", "nextFundingTime", "fundingIntervalHour"} & set(d):
            assert next(rows["funding"]) == dict(
                common, funding_rate=d.get("fundingRate"), next_funding_time=d.get("nextFundingTime"),
                funding_time=None, next_funding_rate=None, funding_interval_h=d.get("fundingIntervalHour"))
        if {"openInterest", "openInterestValue"} & set(d):
            assert next(rows["open_interest"]) == dict(common, open_interest=d.get("openInterest"),
                                                       open_interest_value=d.get("openInterestValue"))
    for it in rows.values():
        assert next(it, None) is None


def test_tickers_hand_written_rows():
    p = parsed("bybit_tickers.jsonl")
    per = p.rows_per_line
    by_line = {ds: {r[6]: r for r in p.rows(ds)} for ds in ("mark_price", "funding", "open_interest")}
    t2 = 1786310819526357000
    # line 2: full snapshot -> one row in each dataset
    assert by_line["mark_price"][2] == ("BTCUSDT", "BTC-USDT-PERP", None, 1786310817583, t2, CONN_ID, 2,
                                        "65117.44", "65137.76", None)
    assert by_line["funding"][2] == ("BTCUSDT", "BTC-USDT-PERP", None, 1786310817583, t2, CONN_ID, 2,
                                     "0.0001", "1786320000000", None, None, "8")
    assert by_line["open_interest"][2] == ("BTCUSDT", "BTC-USDT-PERP", None, 1786310817583, t2, CONN_ID, 2,
                                           "59891.732", "3899996265.01")
    # line 1 (2023 snapshot): no fundingIntervalHour
    assert by_line["funding"][1][7:] == ("0.0001", "1680681600000", None, None, None)
    # line 3: delta with bid/ask only -> no rows
    assert sum(per[3].values()) == 0
    # line 4: markPrice + openInterestValue delta -> mark row without index, OI row without openInterest
    assert by_line["mark_price"][4][7:] == ("65117.43", None, None)
    assert by_line["open_interest"][4][7:] == (None, "3899995666.09")
    assert per[4] == {"bbo": 0, "trades": 0, "mark_price": 1, "funding": 0, "open_interest": 1}
    # line 10: mark + index in one delta
    assert by_line["mark_price"][10][7:] == ("65118.03", "65138.36", None)
    # line 22: index-only delta -> no mark_price row (mark_px is non-nullable; never invented)
    assert sum(per[22].values()) == 0
    # line 85: fundingRate-only delta
    assert by_line["funding"][85] == ("ETHUSDT", "ETH-USDT-PERP", None, 1786310822174,
                                      by_line["funding"][85][4], CONN_ID, 85,
                                      "0.00004709", None, None, None, None)


def test_tickers_deltas_from_bybit_md():
    sink = RowSink()
    # real 2026-08-13 index-only delta (bybit.md §5.3): no row in any dataset, but the stream is alive
    frame = ('{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT","indexPrice":"63585.74"},'
             '"cs":764144450620,"ts":1786659827983}')
    assert bybit.parse(("bybit", 2, 3, 4, frame), sink) is None
    assert sink.pending() == 0 and sink.last_seen == {"tickers.BTCUSDT": 4}
    # an empty markPrice cannot fill the non-nullable mark_px: no mark row; the other keys still count
    frame = ('{"topic":"tickers.BTCPERP","type":"snapshot","data":{"symbol":"BTCPERP","markPrice":"",'
             '"openInterest":"1.5"},"cs":1,"ts":5}')
    bybit.parse(("bybit", 2, 3, 4, frame), sink)
    assert sink.mark_price == [] and sink.funding == []
    assert sink.open_interest == [("BTCPERP", "BTC-USDC-PERP", None, 5, 4, 2, 3, "1.5", None)]


# ---------------------------------------------------------------------------------------------
# control frames

def test_subscribe_acks_are_controls_without_rows():
    p = parsed("bybit_subscribe.jsonl")
    assert len(p.controls) == 13
    assert all(c == Control("ack", None, "", ()) for _, c in p.controls)
    assert p.sink.pending() == 0 and p.sink.last_seen == {}


@pytest.mark.parametrize("frame, expected", [
    # real pong, 2026-08-13 (bybit.md §3)
    ('{"success":true,"ret_msg":"pong","conn_id":"d9tc7k421nl91l9k6obg-s09y","req_id":"p1","op":"ping"}',
     Control("pong", "p1", "pong")),
    ('{"success":true,"ret_msg":"pong","conn_id":"465772b1","req_id":"","op":"ping"}', Control("pong", None, "pong")),
    ('{"success":true,"ret_msg":"","conn_id":"x","req_id":"17","op":"subscribe"}', Control("ack", 17, "")),
    ('{"success":false,"ret_msg":"error:handler not found,topic:orderbook.50.NOPEUSDT","conn_id":"x",'
     '"req_id":"18","op":"subscribe"}',
     Control("error", 18, "subscribe: error:handler not found,topic:orderbook.50.NOPEUSDT")),
    ('{"success":false,"ret_msg":"error:invalid op","conn_id":"x","op":"nope"}',
     Control("error", None, "nope: error:invalid op")),
    ('{"success":true,"ret_msg":"","conn_id":"x","req_id":"19","op":"unsubscribe"}', Control("info", 19, "")),
])
def test_control_frames(frame, expected):
    sink = RowSink()
    assert bybit.parse(("bybit", 1, 1, 5, frame.encode()), sink) == expected
    assert bybit.parse(("bybit", 1, 1, 5, frame), sink) == expected
    assert sink.pending() == 0 and sink.last_seen == {}


# ---------------------------------------------------------------------------------------------
# garbage

BYBIT_GARBAGE = GARBAGE + [
    b'{"conn_id":"x","op":"subscribe"}',
    b'{"topic":"orderbook.1.BTCUSDT","ts":1}',                      # no data
    b'{"topic":"orderbook.1.BTCUSDT","ts":1,"data":"x"}',
    b'{"topic":"orderbook.1.BTCUSDT","ts":1,"data":[1,2]}',
    b'{"topic":"orderbook.1.BTCUSDT","ts":1,"data":{"s":"BTCUSDT","b":[[]],"a":[],"u":1,"seq":1}}',
    b'{"topic":"orderbook.1.BTCUSDT","ts":1,"data":{"s":"BTCUSDT","b":5,"a":[],"u":1,"seq":1}}',
    b'{"topic":"orderbook.1.BTCUSDT","ts":1,"data":{"s":"BTCUSDT","a":[]}}',
    b'{"topic":"publicTrade.BTCUSDT","ts":1,"data":{"s":"BTCUSDT"}}',
    b'{"topic":"publicTrade.BTCUSDT","ts":1,"data":[{"T":1,"s":"BTCUSDT","S":"Buy","v":"1","p":"2","i":"a"},'
    b'{"T":1,"s":"BTCUSDT","S":"Hold","v":"1","p":"2","i":"b"}]}',       # second item bad: no partial rows
    b'{"topic":"publicTrade.BTCUSDT","ts":1,"data":[5]}',
    b'{"topic":"tickers.BTCUSDT","ts":1,"data":[]}',
    b'{"topic":"tickers.BTCUSDT","ts":1,"data":{"markPrice":"1"}}',    # no symbol
    b'{"topic":"kline.1.BTCUSDT","ts":1,"data":[]}',                    # a topic we never subscribe
    b'{"topic":"orderbook.50.BTCUSDT","ts":1,"data":{"s":"BTCUSDT","b":[],"a":[],"u":1,"seq":1}}',  # not L1
    b'{"topic":5,"data":{}}',
]


@pytest.mark.parametrize("payload", BYBIT_GARBAGE)
def test_garbage_raises_and_leaves_no_rows(payload):
    sink = RowSink()
    with pytest.raises(BAD):
        bybit.parse(("bybit", 1, 1, 5, payload), sink)
    assert sink.pending() == 0 and sink.last_seen == {}


def test_str_payload_parses_like_bytes():
    for name in ("bybit_orderbook.1.jsonl", "bybit_publicTrade.jsonl", "bybit_tickers.jsonl"):
        a, b = parsed(name), parse_file(bybit, name, as_str=True)
        for ds in schema.DATASETS:
            assert a.rows(ds) == b.rows(ds)


# ---------------------------------------------------------------------------------------------
# Arrow tables

def test_build_table_exact_schema_and_no_rejects():
    sinks = [parsed(n).sink for n in ("bybit_orderbook.1.jsonl", "bybit_publicTrade.jsonl", "bybit_tickers.jsonl")]
    tables = {}
    for ds in schema.DATASETS:
        rows = [r for s in sinks for r in getattr(s, ds)]
        table, rejected = schema.build_table(ds, "bybit", rows)
        assert table.schema.equals(schema.SCHEMAS[ds]), ds
        assert rejected == 0 and table.num_rows == len(rows), ds
        tables[ds] = table
    assert tables["bbo"].num_rows == 121 and tables["trades"].num_rows == 149

    bbo = tables["bbo"].to_pylist()
    assert bbo[3]["bid_px"] == 0.6131 and bbo[3]["ts_event"] == 1749833474768 * 1_000_000
    assert bbo[1]["ask_px"] is None and bbo[1]["ts_event"] is None
    assert bbo[2]["bid_sz"] == 0.0
    trades = tables["trades"].to_pylist()
    first = json_lines("bybit_publicTrade.jsonl")[0]["data"][0]
    assert trades[0]["ts_event"] == first["T"] * 1_000_000
    assert trades[0]["price"] == float(first["p"]) and trades[0]["exchange"] == "bybit"
    assert trades[0]["is_block"] is False
    funding = tables["funding"].to_pylist()
    snap = [r for r in funding if r["recv_seq"] == 2][0]
    assert snap["next_funding_time"] == 1786320000000 * 1_000_000 and snap["funding_interval_h"] == 8
    assert snap["funding_rate"] == 0.0001
    oi = tables["open_interest"].to_pylist()
    assert [r for r in oi if r["recv_seq"] == 4][0]["open_interest"] is None


# ---------------------------------------------------------------------------------------------
# discovery

def test_discovery_request():
    assert bybit.discovery_request(None) == ("/v5/market/instruments-info", {"category": "linear", "limit": 1000})
    assert bybit.discovery_request("abc") == ("/v5/market/instruments-info",
                                              {"category": "linear", "limit": 1000, "cursor": "abc"})


def test_parse_discovery_on_the_real_response():
    body = json_lines("bybit_instruments-info.jsonl")[0]
    rows = body["result"]["list"]
    keep = [r for r in rows if r["contractType"] == "LinearPerpetual" and r["status"] == "Trading"
            and r["settleCoin"] in ("USDT", "USDC")]
    disc = bybit.parse_discovery(body)
    assert len(disc.instruments) == len(keep) == 760
    assert sum(disc.skipped.values()) == len(rows) - len(keep)
    assert disc.skipped == {"contract_type:LinearFutures": 40}
    assert disc.next_cursor is None                     # nextPageCursor "" = last page
    assert [i.symbol for i in disc.instruments] == [r["symbol"] for r in keep]
    for inst in disc.instruments:
        assert inst.instrument == bybit.unified(inst.symbol)       # discovery and frames agree
        assert inst.exchange == "bybit" and inst.quote in ("USDT", "USDC")
    by_symbol = {i.symbol: i for i in disc.instruments}
    btc = by_symbol["BTCPERP"]
    assert btc == Instrument(exchange="bybit", symbol="BTCPERP", instrument="BTC-USDC-PERP", base="BTC",
                             quote="USDC", status="Trading", contract_type="LinearPerpetual",
                             tick_size="0.10", lot_size="0.001", listed_ms=1610604231000,
                             display_name="BTCUSDC")
    assert by_symbol["BTCUSDT"].instrument == "BTC-USDT-PERP" and by_symbol["BTCUSDT"].display_name is None
    assert sum(1 for i in disc.instruments if i.quote == "USDC") == 68

    found, missing = resolve_symbols(["BTCUSDC", "ETHUSDT", "BTC-USDC-PERP", "NOPEUSDT"], disc.instruments)
    assert [i.symbol for i in found] == ["BTCPERP", "ETHUSDT"] and missing == ["NOPEUSDT"]


def test_parse_discovery_pagination_and_errors():
    row = {"symbol": "X1USDT", "contractType": "LinearPerpetual", "status": "PreLaunch", "baseCoin": "X1",
           "settleCoin": "USDT"}
    disc = bybit.parse_discovery({"retCode": 0, "result": {"list": [row], "nextPageCursor": "c2"}})
    assert disc.instruments == [] and disc.skipped == {"status:PreLaunch": 1} and disc.next_cursor == "c2"
    with pytest.raises(ValueError):
        bybit.parse_discovery({"retCode": 10006, "retMsg": "Too many visits!", "result": {}})


# ---------------------------------------------------------------------------------------------
# streams, connections, subscribe messages

def _inst(symbol: str) -> Instrument:
    return Instrument("bybit", symbol, bybit.unified(symbol), symbol[:-4], "USDT", "Trading", "LinearPerpetual")


def test_streams_for():
    streams = bybit.streams_for(_inst("BTCUSDT"), schema.DATASETS)
    assert streams == [
        Stream("orderbook.1.BTCUSDT", "BTCUSDT", "orderbook.1", ("bbo",), "/v5/public/linear", 3.0),
        Stream("publicTrade.BTCUSDT", "BTCUSDT", "publicTrade", ("trades",), "/v5/public/linear", None),
        Stream("tickers.BTCUSDT", "BTCUSDT", "tickers", ("mark_price", "funding", "open_interest"),
               "/v5/public/linear", 1.0),
    ]
    assert [s.key for s in bybit.streams_for(_inst("ETHUSDT"), ["funding"])] == ["tickers.ETHUSDT"]
    assert bybit.streams_for(_inst("ETHUSDT"), ["nope"]) == []


def test_700_symbols_fit_the_connection_limits():
    insts = [_inst(f"{'1000000' if i % 2 else ''}SYM{i:04d}XYZUSDT") for i in range(700)]
    streams = [s for inst in insts for s in bybit.streams_for(inst, schema.DATASETS)]
    assert len(streams) == 2100
    for max_per_conn in (bybit.MAX_STREAMS_PER_CONNECTION, 5000):   # 5000: only the char limit binds
        plans = bybit.plan_connections(streams, max_per_conn)
        assert [s for p in plans for s in p.streams] == streams
        for plan in plans:
            assert plan.exchange == "bybit" and plan.path == "/v5/public/linear"
            assert 0 < len(plan.streams) <= max_per_conn
            assert len(json.dumps([s.key for s in plan.streams], separators=(",", ":"))) <= 21_000
            assert sum(len(s.key) for s in plan.streams) <= 21_000
    assert len(bybit.plan_connections(streams, 5000)) > 1

    plan = bybit.plan_connections(streams)[0]
    msgs = bybit.subscribe_messages(plan.streams, 100)
    assert [rid for _, rid, _ in msgs] == list(range(100, 100 + len(msgs)))
    keys = []
    for text, rid, msg_keys in msgs:
        msg = json.loads(text)
        assert msg == {"op": "subscribe", "args": list(msg_keys), "req_id": str(rid)}
        assert 0 < len(msg_keys) <= bybit_module.ARGS_PER_REQUEST
        keys.extend(msg_keys)
    assert keys == [s.key for s in plan.streams]
    # the ACK's req_id maps back to the int id
    ack = json.dumps({"success": True, "ret_msg": "", "conn_id": "c", "req_id": str(msgs[1][1]), "op": "subscribe"})
    assert bybit.parse(("bybit", 1, 1, 1, ack), RowSink()) == Control("ack", msgs[1][1], "")

    unsub = bybit.unsubscribe_messages(plan.streams[:3], 7)
    assert [json.loads(t) for t, _, _ in unsub] == [
        {"op": "unsubscribe", "args": [s.key for s in plan.streams[:3]], "req_id": "7"}]
