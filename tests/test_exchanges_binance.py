"""Binance USD-M adapter against the recorded frames in <shared>/samples/binance_*.jsonl."""
from __future__ import annotations

import functools
import json

import pytest

import samples
from samples import CONN_ID, GARBAGE, TS_FALLBACK_NS, as_dicts, json_lines, parse_file

samples.require_samples()

from app import schema  # noqa: E402
from app.exchanges import Control, FrameError, RowSink, SequenceRule, Stream, create, resolve_symbols  # noqa: E402
from app.exchanges import binance as binance_module  # noqa: E402

binance = create("binance")

BAD = (FrameError, ValueError, KeyError)
DATA_FILES = ("binance_bookTicker.jsonl", "binance_trade.jsonl", "binance_markPrice.jsonl")
AGG = "binance_aggTrade.jsonl"
AGG_LINE_WITHOUT_A = 1      # 2019 tardis frame without the aggregate id `a` (see test below)


@functools.cache
def parsed(name: str):
    return parse_file(binance, name)


@functools.cache
def parsed_agg():
    """aggTrade lines except line 1, which binance.parse rejects (no `a`)."""
    sink, per_line = RowSink(), {}
    for item in samples.items("binance", AGG):
        if item[2] == AGG_LINE_WITHOUT_A:
            continue
        before = len(sink.trades)
        assert binance.parse(item, sink) is None, item[2]
        per_line[item[2]] = len(sink.trades) - before
    return sink, per_line


def _events(frame):
    return frame["data"] if isinstance(frame["data"], list) else [frame["data"]]


# ---------------------------------------------------------------------------------------------
# interface

def test_module_exposes_the_adapter_interface():
    for attr in ("NAME", "KEEPALIVE", "MAX_CONNECTION_AGE_S", "CONNECT_INTERVAL_S", "SUBSCRIBE_INTERVAL_S", "GAP_RULES",
                 "ws_url", "discovery_request", "parse_discovery", "unified", "streams_for",
                 "plan_connections", "subscribe_messages", "unsubscribe_messages", "parse"):
        assert hasattr(binance, attr), attr
    assert binance.GAP_RULES == {"trades": SequenceRule("trade_id")}
    btc = [i for i in binance.parse_discovery(json_lines("binance_exchangeInfo.jsonl")[0]).instruments
           if i.symbol == "BTCUSDT"][0]
    streams = binance.streams_for(btc, ["trades", "mark_price"])
    assert binance.ws_url("wss://fstream.binance.com", "/market", streams) == \
        "wss://fstream.binance.com/market/stream?streams=btcusdt@aggTrade/btcusdt@markPrice@1s"
    assert binance.MAX_CONNECTION_AGE_S < 24 * 3600


@pytest.mark.parametrize("symbol, expected", [
    ("BTCUSDT", "BTC-USDT-PERP"), ("ETHUSDC", "ETH-USDC-PERP"), ("1000PEPEUSDT", "1000PEPE-USDT-PERP")])
def test_unified(symbol, expected):
    assert binance.unified(symbol) == expected


# ---------------------------------------------------------------------------------------------
# bookTicker -> bbo

def test_book_ticker_one_row_per_frame_field_by_field():
    name = "binance_bookTicker.jsonl"
    p = parsed(name)
    frames = json_lines(name)
    assert p.controls == [] and len(frames) == 1442
    rows = as_dicts("bbo", p.rows("bbo"))
    assert len(rows) == len(frames)
    for line, (frame, row) in enumerate(zip(frames, rows), start=1):
        d = frame["data"]
        assert p.rows_per_line[line]["bbo"] == 1
        assert row == {"symbol": d["s"], "instrument": binance.unified(d["s"]), "ts_event": d["T"],
                       "ts_exchange": d["E"], "ts_recv": samples.ts_recv(name, line), "conn_id": CONN_ID,
                       "recv_seq": line, "bid_px": d["b"], "bid_sz": d["B"], "ask_px": d["a"],
                       "ask_sz": d["A"], "update_id": d["u"], "seq": None}
    assert "!bookTicker" in p.sink.last_seen                  # line 902, the all-market stream
    assert set(p.sink.last_seen) == {f["stream"] for f in frames}


def test_book_ticker_hand_written_row():
    assert parsed("binance_bookTicker.jsonl").rows("bbo")[0] == (
        "BTCUSDT", "BTC-USDT-PERP", 1612137603568, 1612137603571, TS_FALLBACK_NS + 1, CONN_ID, 1,
        "33134.42", "0.170", "33139.39", "0.380", 185130926750, None)
    # line 902: `!bookTicker`
    assert parsed("binance_bookTicker.jsonl").rows("bbo")[901][:2] == ("BALUSDT", "BAL-USDT-PERP")


# ---------------------------------------------------------------------------------------------
# aggTrade / trade -> trades

def test_agg_trade_line_without_a_is_a_frame_error():
    """aggTrade line 1 (2019 tardis frame) has no aggregate id `a`, and trade_id may not be null:
    the frame is refused as a whole (counted unparsed, kept in `frames`), never given an invented id."""
    item = samples.items("binance", AGG)[AGG_LINE_WITHOUT_A - 1]
    sink = RowSink()
    with pytest.raises(FrameError):
        binance.parse(item, sink)
    assert sink.pending() == 0 and not sink.last_seen


def test_agg_trade_rows_field_by_field():
    sink, per_line = parsed_agg()
    frames = json_lines(AGG)
    assert "a" not in frames[0]["data"] and all("a" in f["data"] for f in frames[1:])
    assert len(sink.trades) == len(frames) - 1 == 510
    assert set(per_line.values()) == {1}
    for line, row in zip(range(2, len(frames) + 1), as_dicts("trades", sink.trades)):
        d = frames[line - 1]["data"]
        assert row == {"symbol": d["s"], "instrument": binance.unified(d["s"]), "ts_event": d["T"],
                       "ts_exchange": d["E"], "ts_recv": samples.ts_recv(AGG, line), "conn_id": CONN_ID,
                       "recv_seq": line, "trade_id": d["a"], "price": d["p"], "size": d["q"],
                       "side": "sell" if d["m"] else "buy", "first_trade_id": d["f"],
                       "last_trade_id": d["l"], "trade_count": d["l"] - d["f"] + 1, "is_block": None}
    # line 3, hand-written: m=true -> the aggressor sold
    assert sink.trades[1] == ("SANDUSDT", "SAND-USDT-PERP", 1617647797485, 1617647797640,
                              1617647798374118800, CONN_ID, 3, 9445517, "0.69067", "369", "sell",
                              12821738, 12821738, 1, None)
    assert {r[10] for r in sink.trades} == {"buy", "sell"}


def test_trade_rows_field_by_field():
    name = "binance_trade.jsonl"
    p = parsed(name)
    frames = json_lines(name)
    rows = as_dicts("trades", p.rows("trades"))
    assert p.controls == [] and len(rows) == len(frames) == 902
    for line, (frame, row) in enumerate(zip(frames, rows), start=1):
        d = frame["data"]
        assert row == {"symbol": d["s"], "instrument": binance.unified(d["s"]), "ts_event": d["T"],
                       "ts_exchange": d["E"], "ts_recv": samples.ts_recv(name, line), "conn_id": CONN_ID,
                       "recv_seq": line, "trade_id": d["t"], "price": d["p"], "size": d["q"],
                       "side": "sell" if d["m"] else "buy", "first_trade_id": None,
                       "last_trade_id": None, "trade_count": None, "is_block": None}
    # line 2 (INSURANCE_FUND, m=true) and line 5 (hft capture) by hand
    assert p.rows("trades")[1] == ("ETHUSDT", "ETH-USDT-PERP", 1596034530235, 1596034530241, TS_FALLBACK_NS + 2,
                                   CONN_ID, 2, 73701056, "2366.55", "0.070", "sell", None, None, None, None)
    assert p.rows("trades")[4] == ("BTCUSDT", "BTC-USDT-PERP", 1680652700452, 1680652700455, 1680652700441533000,
                                   CONN_ID, 5, 3535186032, "28145.10", "0.002", "sell", None, None, None, None)
    assert sum(1 for r in rows if r["side"] == "sell") == sum(1 for f in frames if f["data"]["m"]) == 485


# ---------------------------------------------------------------------------------------------
# markPrice -> mark_price + funding

def test_mark_price_rows_field_by_field():
    name = "binance_markPrice.jsonl"
    p = parsed(name)
    frames = json_lines(name)
    n_events = sum(len(_events(f)) for f in frames)
    assert n_events == 312                                      # line 4 carries two events
    assert len(p.rows("mark_price")) == len(p.rows("funding")) == n_events
    assert p.rows_per_line[4] == {"bbo": 0, "trades": 0, "mark_price": 2, "funding": 2, "open_interest": 0}
    marks, fundings = iter(as_dicts("mark_price", p.rows("mark_price"))), iter(as_dicts("funding", p.rows("funding")))
    for line, frame in enumerate(frames, start=1):
        for d in _events(frame):
            common = {"symbol": d["s"], "instrument": binance.unified(d["s"]), "ts_event": None,
                      "ts_exchange": d["E"], "ts_recv": samples.ts_recv(name, line), "conn_id": CONN_ID, "recv_seq": line}
            assert next(marks) == dict(common, mark_px=d["p"], index_px=d.get("i"), est_settle_px=d.get("P"))
            assert next(fundings) == dict(common, funding_rate=d["r"], next_funding_time=d["T"], funding_time=None,
                                          next_funding_rate=None, funding_interval_h=None)
    assert set(p.sink.last_seen) == {f["stream"] for f in frames}


def test_mark_price_hand_written_rows():
    p = parsed("binance_markPrice.jsonl")
    mark, funding = p.rows("mark_price"), p.rows("funding")
    # line 1: keys e,E,s,p,r,T only -> index and estimated settle price null
    assert mark[0] == ("BTCUSDT", "BTC-USDT-PERP", None, 1569888003001, TS_FALLBACK_NS + 1, CONN_ID, 1,
                       "8291.34697815", None, None)
    # line 4: `!markPrice@arr` with BTCUSDT and ETHUSDT in one frame -> rows 4 and 5 (0-based 3, 4)
    assert [r[0] for r in mark[3:5]] == ["BTCUSDT", "ETHUSDT"] and {r[6] for r in mark[3:5]} == {4}
    assert mark[4] == ("ETHUSDT", "ETH-USDT-PERP", None, 1617309024002, TS_FALLBACK_NS + 4, CONN_ID, 4,
                       "1981.15704420", "1978.08197502", "1974.79557094")
    assert funding[4] == ("ETHUSDT", "ETH-USDT-PERP", None, 1617309024002, TS_FALLBACK_NS + 4, CONN_ID, 4,
                          "0.00059142", 1617321600000, None, None, None)
    assert "!markPrice@arr" in p.sink.last_seen
    # lines 104-105: funding rollover. Line 104 (E 10 ms after settlement) still shows the settlement
    # that just passed; line 105 shows the next one. Both are stored as received.
    by_line = {r[6]: r for r in funding}
    assert by_line[104][3] == 1680652800010 and by_line[104][8] == 1680652800000
    assert by_line[105][3] == 1680652801000 and by_line[105][8] == 1680681600000
    assert by_line[104][8] < by_line[104][3]


# ---------------------------------------------------------------------------------------------
# control frames (no real Binance control frame was recorded: shapes from binance.md)

@pytest.mark.parametrize("frame, expected", [
    ('{"result":null,"id":1}', Control("ack", 1, "null")),
    ('{"result":["btcusdt@aggTrade"],"id":2}', Control("info", 2, '["btcusdt@aggTrade"]')),
    ('{"code":2,"msg":"Invalid request: unknown variant","id":3}', Control("error", 3, "2: Invalid request: unknown variant")),
])
def test_control_frames(frame, expected):
    sink = RowSink()
    assert binance.parse(("binance", 1, 1, 1, frame), sink) == expected
    assert sink.pending() == 0 and sink.last_seen == {}


# ---------------------------------------------------------------------------------------------
# garbage

BINANCE_GARBAGE = GARBAGE + [
    b'{"id":1}',
    b'{"data":{"e":"bookTicker","s":"BTCUSDT"}}',                                   # no stream name
    b'{"stream":"btcusdt@kline_1m","data":{"e":"kline","s":"BTCUSDT"}}',           # unknown event
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","p":"1","q":"1","m":true}}',
]


@pytest.mark.parametrize("payload", BINANCE_GARBAGE)
def test_garbage_raises_and_leaves_no_rows(payload):
    sink = RowSink()
    with pytest.raises(BAD):
        binance.parse(("binance", 1, 1, 1, payload), sink)
    assert sink.pending() == 0


@pytest.mark.parametrize("payload", [
    b'{"stream":"x","data":[5]}',
    b'{"stream":"x","data":"abc"}',
    b'{"e":"bookTicker","s":5}',
])
def test_wrong_shapes_raise_frame_error(payload):
    with pytest.raises(BAD):
        binance.parse(("binance", 1, 1, 1, payload), RowSink())


def test_bad_array_item_leaves_no_partial_rows():
    sink = RowSink()
    frame = (b'{"stream":"!markPrice@arr","data":[{"e":"markPriceUpdate","E":1,"s":"BTCUSDT","p":"1","r":"0","T":2},'
             b'{"e":"nope","s":"ETHUSDT"}]}')
    with pytest.raises(BAD):
        binance.parse(("binance", 1, 1, 1, frame), sink)
    assert sink.pending() == 0


# ---------------------------------------------------------------------------------------------
# Arrow tables

def test_build_table_exact_schema_and_no_rejects():
    sinks = [parsed(n).sink for n in DATA_FILES] + [parsed_agg()[0]]
    tables = {}
    for ds in ("bbo", "trades", "mark_price", "funding"):
        rows = [r for s in sinks for r in getattr(s, ds)]
        table, rejected = schema.build_table(ds, "binance", rows)
        assert table.schema.equals(schema.SCHEMAS[ds]), ds
        assert rejected == 0 and table.num_rows == len(rows), ds
        tables[ds] = table.to_pylist()
    assert all(getattr(s, "open_interest") == [] for s in sinks)
    bbo = tables["bbo"][0]
    assert bbo["bid_px"] == 33134.42 and bbo["ts_event"] == 1612137603568 * 1_000_000
    assert bbo["ts_exchange"] == 1612137603571 * 1_000_000 and bbo["update_id"] == 185130926750
    trade = tables["trades"][0]
    assert trade["trade_id"] == "10934580" and trade["ts_event"] == 1574381164086 * 1_000_000
    assert trade["price"] == 7627.60 and trade["side"] == "buy"
    agg = [r for r in tables["trades"] if r["trade_id"] == "9445517"][0]
    assert (agg["first_trade_id"], agg["last_trade_id"], agg["trade_count"]) == (12821738, 12821738, 1)
    assert tables["mark_price"][0]["index_px"] is None and tables["mark_price"][2]["est_settle_px"] == 58905.14663658
    assert tables["funding"][0]["next_funding_time"] == 1569916800000 * 1_000_000
    assert tables["funding"][0]["funding_rate"] == 0.0001


# ---------------------------------------------------------------------------------------------
# discovery, streams, subscribe messages

def test_parse_discovery_on_the_real_response():
    body = json_lines("binance_exchangeInfo.jsonl")[0]
    keep = [s for s in body["symbols"] if s["contractType"] == "PERPETUAL" and s["status"] == "TRADING"
            and s["marginAsset"] in ("USDT", "USDC") and s["quoteAsset"] in ("USDT", "USDC")]
    disc = binance.parse_discovery(body)
    assert len(disc.instruments) == len(keep) == 109
    assert sum(disc.skipped.values()) == len(body["symbols"]) - len(keep)
    assert disc.skipped == {"contract_type:CURRENT_QUARTER": 2, "margin:BUSD": 1, "contract_type:none": 1}
    assert disc.next_cursor is None
    btc = [i for i in disc.instruments if i.symbol == "BTCUSDT"][0]
    assert (btc.instrument, btc.base, btc.quote, btc.tick_size, btc.lot_size, btc.listed_ms) == \
        ("BTC-USDT-PERP", "BTC", "USDT", "0.01", "0.001", 1569398400000)
    for inst in disc.instruments:
        assert inst.instrument == binance.unified(inst.symbol)
    found, missing = resolve_symbols(["btcusdt", "ETH-USDT-PERP", "BTCUSDC"], disc.instruments)
    assert [i.symbol for i in found] == ["BTCUSDT", "ETHUSDT"] and missing == ["BTCUSDC"]


def test_streams_and_subscribe_messages():
    disc = binance.parse_discovery(json_lines("binance_exchangeInfo.jsonl")[0])
    btc = [i for i in disc.instruments if i.symbol == "BTCUSDT"][0]
    assert binance.streams_for(btc, schema.DATASETS) == [
        Stream("btcusdt@bookTicker", "BTCUSDT", "bookTicker", ("bbo",), "/public", None),
        Stream("btcusdt@aggTrade", "BTCUSDT", "aggTrade", ("trades",), "/market", None),
        Stream("btcusdt@markPrice@1s", "BTCUSDT", "markPrice@1s", ("mark_price", "funding"), "/market", 1.0),
    ]
    streams = [s for inst in disc.instruments for s in binance.streams_for(inst, schema.DATASETS)]
    plans = binance.plan_connections(streams)
    assert [s.key for p in plans for s in p.streams if p.path == "/public"] == \
        [s.key for s in streams if s.path == "/public"]
    for plan in plans:
        assert len(plan.streams) <= binance.MAX_STREAMS_PER_CONNECTION
        assert {s.path for s in plan.streams} == {plan.path}
        msgs = binance.subscribe_messages(plan.streams, 1)
        keys = []
        for text, rid, msg_keys in msgs:
            msg = json.loads(text)
            assert msg == {"method": "SUBSCRIBE", "params": list(msg_keys), "id": rid}
            assert len(msg_keys) <= binance_module.PARAMS_PER_REQUEST
            keys.extend(msg_keys)
        assert keys == [s.key for s in plan.streams]


def test_a_frame_with_a_bad_stream_name_leaves_no_row_behind():
    """A frame is all rows or none: a stream that is not a string (unhashable here) is refused
    before any row reaches the sink, so it is not both written and counted as unparsed."""
    from app.exchanges import FrameError, RowSink, create
    sink = RowSink()
    frame = (b'{"stream":["x"],"data":{"e":"aggTrade","E":1,"a":5,"s":"BTCUSDT","p":"1","q":"1",'
             b'"f":1,"l":2,"T":1,"m":false}}')
    with pytest.raises(FrameError):
        create("binance").parse(("binance", 1, 1, 1, frame), sink)
    assert sink.pending() == 0 and not sink.last_seen
