"""OKX v5 SWAP adapter against the recorded frames in <shared>/samples/okx_*.jsonl."""
from __future__ import annotations

import functools
import json

import pytest

import samples
from samples import CONN_ID, GARBAGE, TS_FALLBACK_NS, as_dicts, json_lines, parse_file

samples.require_samples()

from app import schema  # noqa: E402
from app.exchanges import (Control, FrameError, Instrument, RowSink, SequenceRule, Stream,  # noqa: E402
                           create, resolve_symbols)
from app.exchanges import okx as okx_module  # noqa: E402

okx = create("okx")

BAD = (FrameError, ValueError, KeyError)
DATA_FILES = ("okx_bbo-tbt.jsonl", "okx_trades.jsonl", "okx_mark-price.jsonl", "okx_funding-rate.jsonl",
              "okx_open-interest.jsonl")
DATASET_OF = {"bbo-tbt": "bbo", "trades": "trades", "mark-price": "mark_price",
              "funding-rate": "funding", "open-interest": "open_interest"}


@functools.cache
def parsed(name: str):
    return parse_file(okx, name)


# ---------------------------------------------------------------------------------------------
# interface

def test_module_exposes_the_adapter_interface():
    for attr in ("NAME", "KEEPALIVE", "MAX_CONNECTION_AGE_S", "CONNECT_INTERVAL_S", "SUBSCRIBE_INTERVAL_S", "GAP_RULES",
                 "ws_url", "discovery_request", "parse_discovery", "unified", "streams_for",
                 "plan_connections", "subscribe_messages", "unsubscribe_messages", "parse"):
        assert hasattr(okx, attr), attr
    assert okx.NAME == "okx"
    assert okx.KEEPALIVE.kind == "text" and okx.KEEPALIVE.payload == "ping"
    assert okx.KEEPALIVE.interval_s < 30                      # the server closes after 30 s idle
    assert okx.MAX_CONNECTION_AGE_S is None
    assert okx.GAP_RULES == {"trades": SequenceRule("last_trade_id", count_column="trade_count")}
    for rule_ds, rule in okx.GAP_RULES.items():               # the rule names real columns
        assert rule.column in schema.ROW_INDEX[rule_ds] and rule.count_column in schema.ROW_INDEX[rule_ds]
    assert okx.ws_url("wss://ws.okx.com", "/ws/v5/public") == "wss://ws.okx.com/ws/v5/public"


@pytest.mark.parametrize("symbol, expected", [
    ("BTC-USDT-SWAP", "BTC-USDT-PERP"), ("BTC-USDC-SWAP", "BTC-USDC-PERP"),
    ("1000PEPE-USDT-SWAP", "1000PEPE-USDT-PERP"),
    ("FIL-USDT-220325", "FIL-USDT-220325"),      # FUTURES: not a perpetual, own name kept
])
def test_unified(symbol, expected):
    assert okx.unified(symbol) == expected


# ---------------------------------------------------------------------------------------------
# data channels: counts and field-by-field invariants

@pytest.mark.parametrize("name", DATA_FILES)
def test_every_line_gives_one_row_per_data_item(name):
    p = parsed(name)
    assert p.controls == []
    frames = json_lines(name)
    for line, frame in enumerate(frames, start=1):
        ds = DATASET_OF[frame["arg"]["channel"]]
        assert p.rows_per_line[line][ds] == len(frame["data"]), line
        assert sum(p.rows_per_line[line].values()) == len(frame["data"]), line
    last = {f"{f['arg']['channel']}:{f['arg']['instId']}": samples.ts_recv(name, line)
            for line, f in enumerate(frames, start=1)}
    assert p.sink.last_seen == last


def _common(frame, name, line, ts_event, ts_exchange):
    inst_id = frame["arg"]["instId"]
    return {"symbol": inst_id, "instrument": okx.unified(inst_id), "ts_event": ts_event,
            "ts_exchange": ts_exchange, "ts_recv": samples.ts_recv(name, line), "conn_id": CONN_ID, "recv_seq": line}


def test_bbo_tbt_rows():
    name = "okx_bbo-tbt.jsonl"
    rows = as_dicts("bbo", parsed(name).rows("bbo"))
    expected = []
    for line, frame in enumerate(json_lines(name), start=1):
        for d in frame["data"]:
            b = d["bids"][0] if d["bids"] else [None, None]
            a = d["asks"][0] if d["asks"] else [None, None]
            expected.append(dict(_common(frame, name, line, d["ts"], None), bid_px=b[0], bid_sz=b[1],
                                 ask_px=a[0], ask_sz=a[1], update_id=None, seq=d.get("seqId")))
    assert rows == expected
    # line 1, hand-written (2022 frame without seqId)
    assert parsed(name).rows("bbo")[0] == ("BTC-USDT-SWAP", "BTC-USDT-PERP", "1651761120004", None,
                                          TS_FALLBACK_NS + 1, CONN_ID, 1, "38632.3", "990", "38632.4", "727",
                                          None, None)


def test_bbo_tbt_current_format_and_empty_side():
    # docs example (current format with seqId) and an empty bid side
    frame = ('{"arg":{"channel":"bbo-tbt","instId":"BCH-USDT-SWAP"},"data":[{"asks":[["111.06","55154","0","2"]],'
             '"bids":[],"ts":"1670324386802","seqId":363996337}]}')
    sink = RowSink()
    assert okx.parse(("okx", 3, 9, 11, frame), sink) is None
    assert sink.bbo == [("BCH-USDT-SWAP", "BCH-USDT-PERP", "1670324386802", None, 11, 3, 9,
                         None, None, "111.06", "55154", None, 363996337)]
    assert sink.last_seen == {"bbo-tbt:BCH-USDT-SWAP": 11}


def test_trades_rows():
    name = "okx_trades.jsonl"
    rows = as_dicts("trades", parsed(name).rows("trades"))
    expected = []
    for line, frame in enumerate(json_lines(name), start=1):
        for d in frame["data"]:
            assert "count" not in d                          # 2021 frames: no count
            expected.append(dict(_common(frame, name, line, d["ts"], None), trade_id=d["tradeId"],
                                 price=d["px"], size=d["sz"], side=d["side"], first_trade_id=None,
                                 last_trade_id=d["tradeId"], trade_count=None, is_block=None))
    assert rows == expected
    assert all(r["side"] in ("buy", "sell") for r in rows)
    assert [int(r["trade_id"]) for r in rows] == list(range(6845125, 6845130))
    assert parsed(name).rows("trades")[0] == (
        "XMR-USDT-SWAP", "XMR-USDT-PERP", "1626995753200", None, 1626995753337475000, CONN_ID, 1,
        "6845125", "196.11", "8", "buy", None, "6845125", None, None)
    assert parsed(name).rows("trades")[3][10] == "sell"      # line 4


def test_trades_with_count_fill_first_and_last_ids():
    # real 2026-07-26 data item (okx.md §5.2), and a docs-style aggregation of 3 matches
    frame = ('{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":['
             '{"instId":"BTC-USDT-SWAP","tradeId":"2805987683","px":"64472.1","sz":"0.02","side":"buy",'
             '"ts":"1785060302444","count":"1","source":"0","seqId":331550485845},'
             '{"instId":"BTC-USDT-SWAP","tradeId":"2805987686","px":"64472.0","sz":"3","side":"sell",'
             '"ts":"1785060302450","count":"3","source":"0","seqId":331550485846}]}')
    sink = RowSink()
    assert okx.parse(("okx", 1, 2, 3, frame.encode()), sink) is None
    assert sink.trades == [
        ("BTC-USDT-SWAP", "BTC-USDT-PERP", "1785060302444", None, 3, 1, 2, "2805987683", "64472.1", "0.02",
         "buy", 2805987683, "2805987683", "1", None),
        ("BTC-USDT-SWAP", "BTC-USDT-PERP", "1785060302450", None, 3, 1, 2, "2805987686", "64472.0", "3",
         "sell", 2805987684, "2805987686", "3", None),
    ]
    table, rejected = schema.build_table("trades", "okx", sink.trades)
    assert rejected == 0
    t = table.to_pylist()
    # the gap rule holds across the two rows: last_trade_id - trade_count == previous last_trade_id
    assert t[1]["last_trade_id"] - t[1]["trade_count"] == t[0]["last_trade_id"]
    assert t[1]["first_trade_id"] == t[0]["last_trade_id"] + 1


def test_mark_price_rows():
    name = "okx_mark-price.jsonl"
    rows = as_dicts("mark_price", parsed(name).rows("mark_price"))
    expected = [dict(_common(f, name, line, None, d["ts"]), mark_px=d["markPx"], index_px=None, est_settle_px=None)
                for line, f in enumerate(json_lines(name), start=1) for d in f["data"]]
    assert rows == expected
    # line 2 is a FUTURES instrument: parsed as received, instrument keeps its own name
    assert parsed(name).rows("mark_price")[1] == ("FIL-USDT-220325", "FIL-USDT-220325", None, "1640131204676",
                                                 TS_FALLBACK_NS + 2, CONN_ID, 2, "36.232", None, None)


def test_funding_rate_rows():
    name = "okx_funding-rate.jsonl"
    rows = parsed(name).rows("funding")
    fb = TS_FALLBACK_NS
    # line 1: old format with fundingRate and nextFundingRate; no ts in these frames
    assert rows[0] == ("WNCG-USDT-SWAP", "WNCG-USDT-PERP", None, None, fb + 1, CONN_ID, 1,
                       "0.00048105", None, "1640131200000", "0.00114", None)
    # line 2: no fundingRate at all -> null, never invented
    assert rows[1] == ("SOS-USDT-SWAP", "SOS-USDT-PERP", None, None, fb + 2, CONN_ID, 2,
                       None, None, "1640851200000", "0.0003", None)


def test_funding_rate_current_format():
    # docs example (current format): nextFundingRate "" and ts present
    frame = ('{"arg":{"channel":"funding-rate","instId":"BTC-USDT-SWAP"},"data":[{"formulaType":"noRate",'
             '"fundingRate":"0.0001875391284828","fundingTime":"1700726400000","impactValue":"",'
             '"instId":"BTC-USDT-SWAP","instType":"SWAP","interestRate":"","method":"current_period",'
             '"maxFundingRate":"0.00375","minFundingRate":"-0.00375","nextFundingRate":"",'
             '"nextFundingTime":"1700755200000","premium":"0.0001233824646391",'
             '"settFundingRate":"0.0001699799259033","settState":"settled","ts":"1700724675402"}]}')
    sink = RowSink()
    okx.parse(("okx", 1, 1, 1, frame), sink)
    assert sink.funding == [("BTC-USDT-SWAP", "BTC-USDT-PERP", None, "1700724675402", 1, 1, 1,
                             "0.0001875391284828", "1700755200000", "1700726400000", "", None)]
    table, rejected = schema.build_table("funding", "okx", sink.funding)
    row = table.to_pylist()[0]
    assert rejected == 0 and row["next_funding_rate"] is None
    assert row["funding_time"] == 1700726400000 * 1_000_000 < row["next_funding_time"]


def test_open_interest_rows():
    name = "okx_open-interest.jsonl"
    assert parsed(name).rows("open_interest") == [
        ("WNCG-USDT-SWAP", "WNCG-USDT-PERP", None, "1640131258756", TS_FALLBACK_NS + 1, CONN_ID, 1, "644195", None)]
    frame = ('{"arg":{"channel":"open-interest","instId":"BTC-USDT-SWAP"},"data":[{"instId":"BTC-USDT-SWAP",'
             '"instType":"SWAP","oi":"2216113.01000000309","oiCcy":"22161.1301000000309",'
             '"oiUsd":"1939251795.54769270396321","ts":"1743041250440"}]}')
    sink = RowSink()
    okx.parse(("okx", 1, 1, 1, frame), sink)
    assert sink.open_interest == [("BTC-USDT-SWAP", "BTC-USDT-PERP", None, "1743041250440", 1, 1, 1,
                                   "2216113.01000000309", "1939251795.54769270396321")]


def test_tickers_channel_is_not_ours():
    # we never subscribe `tickers`: such a frame is counted as unparsed (its text stays in `frames`)
    for line in samples.raw_lines("okx_tickers.jsonl"):
        sink = RowSink()
        with pytest.raises(FrameError):
            okx.parse(("okx", 1, 1, 1, line), sink)
        assert sink.pending() == 0 and sink.last_seen == {}


def test_str_payload_parses_like_bytes():
    for name in DATA_FILES:
        a, b = parsed(name), parse_file(okx, name, as_str=True)
        for ds in schema.DATASETS:
            assert a.rows(ds) == b.rows(ds)


# ---------------------------------------------------------------------------------------------
# control frames

def test_subscribe_acks_one_per_arg():
    p = parsed("okx_subscribe.jsonl")
    assert p.controls == [(1, Control("ack", None, "", ("books-l2-tbt:XMR-USDT-SWAP",))),
                          (2, Control("ack", None, "", ("trades:XMR-USDT-SWAP",)))]
    assert p.sink.pending() == 0 and p.sink.last_seen == {}


def test_error_event():
    p = parsed("okx_error.jsonl")
    assert len(p.controls) == 1
    line, c = p.controls[0]
    assert c.kind == "error" and c.request_id is None and c.keys == ()
    assert c.detail.startswith("64001: This channel has been migrated to the '/business' URL.")
    assert p.sink.pending() == 0


@pytest.mark.parametrize("frame, expected", [
    ('{"id":"12","event":"subscribe","arg":{"channel":"bbo-tbt","instId":"BTC-USDT-SWAP"},"connId":"accb8e21"}',
     Control("ack", 12, "", ("bbo-tbt:BTC-USDT-SWAP",))),
    ('{"id":"13","event":"unsubscribe","arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"connId":"a"}',
     Control("info", 13, "unsubscribe", ("trades:BTC-USDT-SWAP",))),
    ('{"id":"1512","event":"error","code":"60012","msg":"Invalid request","connId":"a4d3ae55"}',
     Control("error", 1512, "60012: Invalid request")),
    ('{"id":"14","event":"error","code":"60018","msg":"Wrong URL or channel:tickers,instId:NOPE-USDT-SWAP '
     'doesn\'t exist.","arg":{"channel":"tickers","instId":"NOPE-USDT-SWAP"},"connId":"a"}',
     Control("error", 14, "60018: Wrong URL or channel:tickers,instId:NOPE-USDT-SWAP doesn't exist.",
             ("tickers:NOPE-USDT-SWAP",))),
    ('{"event": "notice", "code": "64008", "msg": "The connection will soon be closed for a service upgrade. '
     'Please reconnect.", "connId": "a4d3ae55"}',
     Control("notice", None, "64008: The connection will soon be closed for a service upgrade. Please reconnect.")),
    ('{"event":"channel-conn-count","channel":"bbo-tbt","connCount":"2","connId":"a"}',
     Control("info", None, "channel-conn-count")),
])
def test_control_events(frame, expected):
    sink = RowSink()
    assert okx.parse(("okx", 1, 1, 1, frame), sink) == expected
    assert okx.parse(("okx", 1, 1, 1, frame.encode()), sink) == expected
    assert sink.pending() == 0 and sink.last_seen == {}


def test_pong():
    sink = RowSink()
    assert okx.parse(("okx", 1, 1, 1, b"pong"), sink) == Control("pong")
    assert okx.parse(("okx", 1, 1, 1, "pong"), sink) == Control("pong")
    assert sink.pending() == 0


# ---------------------------------------------------------------------------------------------
# garbage

OKX_GARBAGE = GARBAGE + [
    b"pong\n", b"ping", b"PONG",
    b'{"arg":{"channel":"trades","instId":"X-USDT-SWAP"}}',                    # neither data nor event
    b'{"data":[{"markPx":"1"}]}',                                              # data without arg
    b'{"arg":{"channel":"mark-price"},"data":[{"markPx":"1"}]}',               # arg without instId
    b'{"arg":{"channel":"mark-price","instId":"X-USDT-SWAP"},"data":{"markPx":"1"}}',   # data not a list
    b'{"arg":{"channel":"mark-price","instId":"X-USDT-SWAP"},"data":[5]}',
    b'{"arg":{"channel":"mark-price","instId":"X-USDT-SWAP"},"data":[{"ts":"1"}]}',     # no markPx
    b'{"arg":{"channel":"bbo-tbt","instId":"X-USDT-SWAP"},"data":[{"bids":[[]],"asks":[],"ts":"1"}]}',
    b'{"arg":{"channel":"bbo-tbt","instId":"X-USDT-SWAP"},"data":[{"bids":7,"asks":[],"ts":"1"}]}',
    b'{"arg":{"channel":"trades","instId":"X-USDT-SWAP"},"data":[{"tradeId":"5","px":"1","sz":"1",'
    b'"side":"buy","ts":"1"},{"tradeId":"x","px":"1","sz":"1","side":"buy","ts":"1","count":"2"}]}',  # no partial rows
    b'{"arg":{"channel":"open-interest","instId":"X-USDT-SWAP"},"data":[{"oiCcy":"1"}]}',
    b'{"arg":{"channel":"candle1m","instId":"X-USDT-SWAP"},"data":[["1","2"]]}',      # a channel we never use
    b'{"arg":{"channel":"trades","instId":["X"]},"data":[]}',
    b'{"arg":"trades","data":[]}',
    b'{"event":5}',
]


@pytest.mark.parametrize("payload", OKX_GARBAGE)
def test_garbage_raises_and_leaves_no_rows(payload):
    sink = RowSink()
    with pytest.raises(BAD):
        okx.parse(("okx", 1, 1, 1, payload), sink)
    assert sink.pending() == 0 and sink.last_seen == {}


# ---------------------------------------------------------------------------------------------
# Arrow tables

def test_build_table_exact_schema_and_no_rejects():
    sinks = [parsed(n).sink for n in DATA_FILES]
    tables = {}
    for ds in schema.DATASETS:
        rows = [r for s in sinks for r in getattr(s, ds)]
        assert rows, ds
        table, rejected = schema.build_table(ds, "okx", rows)
        assert table.schema.equals(schema.SCHEMAS[ds]), ds
        assert rejected == 0 and table.num_rows == len(rows), ds
        tables[ds] = table.to_pylist()
    assert tables["bbo"][0]["bid_px"] == 38632.3 and tables["bbo"][0]["ts_event"] == 1651761120004 * 1_000_000
    assert tables["bbo"][0]["seq"] is None and tables["bbo"][0]["ts_exchange"] is None
    tr = tables["trades"][0]
    assert tr["ts_event"] == 1626995753200 * 1_000_000 and tr["size"] == 8.0 and tr["last_trade_id"] == 6845125
    assert tr["trade_id"] == "6845125" and tr["first_trade_id"] is None and tr["trade_count"] is None
    assert tables["mark_price"][0]["mark_px"] == 2.1729
    assert tables["mark_price"][0]["ts_exchange"] == 1640131259180 * 1_000_000
    assert tables["funding"][1]["funding_rate"] is None and tables["funding"][1]["next_funding_rate"] == 0.0003
    assert tables["open_interest"][0]["open_interest"] == 644195.0
    assert tables["open_interest"][0]["open_interest_value"] is None


# ---------------------------------------------------------------------------------------------
# discovery

def test_discovery_request():
    assert okx.discovery_request(None) == ("/api/v5/public/instruments", {"instType": "SWAP"})


@pytest.mark.parametrize("line", [1, 2, 3, 4])
def test_parse_discovery_on_real_responses(line):
    body = json_lines("okx_instruments.jsonl")[line - 1]
    rows = body["data"]
    keep = [r for r in rows if r["instType"] == "SWAP" and r["ctType"] == "linear"
            and r["settleCcy"] in ("USDT", "USDC") and r["state"] == "live"
            and not r["instId"].endswith("-USD_UM-SWAP")]
    disc = okx.parse_discovery(body)
    assert len(disc.instruments) == len(keep) == {1: 98, 2: 122, 3: 126, 4: 126}[line]
    assert sum(disc.skipped.values()) == len(rows) - len(keep)
    assert disc.skipped == {"ct_type:inverse": len(rows) - len(keep)}
    assert disc.next_cursor is None
    for inst, row in zip(disc.instruments, keep):
        assert inst.symbol == row["instId"] and inst.instrument == okx.unified(row["instId"])
        assert (inst.contract_value, inst.contract_multiplier, inst.tick_size, inst.lot_size) == \
            (row["ctVal"], row["ctMult"], row["tickSz"], row["lotSz"])
        assert inst.listed_ms == (int(row["listTime"]) if row["listTime"] else None)
        assert inst.base == row["ctValCcy"] and inst.quote == row["settleCcy"]


def test_parse_discovery_btc_row_and_resolve():
    disc = okx.parse_discovery(json_lines("okx_instruments.jsonl")[3])
    btc = [i for i in disc.instruments if i.symbol == "BTC-USDT-SWAP"][0]
    assert btc == Instrument(exchange="okx", symbol="BTC-USDT-SWAP", instrument="BTC-USDT-PERP", base="BTC",
                             quote="USDT", status="live", contract_type="linear", tick_size="0.1",
                             lot_size="1", contract_value="0.01", contract_multiplier="1",
                             listed_ms=1611916828000)
    found, missing = resolve_symbols(["BTCUSDT", "eth-usdt-perp", "BTC-USDT-SWAP", "BTCUSDC"], disc.instruments)
    assert [i.symbol for i in found] == ["BTC-USDT-SWAP", "ETH-USDT-SWAP"] and missing == ["BTCUSDC"]


def test_parse_discovery_filters_and_errors():
    def row(inst_id, **kw):
        r = {"instId": inst_id, "instType": "SWAP", "ctType": "linear", "settleCcy": inst_id.split("-")[1],
             "state": "live", "ctVal": "0.0001", "ctMult": "1", "tickSz": "0.1", "lotSz": "1", "listTime": ""}
        r.update(kw)
        return r
    body = {"code": "0", "msg": "", "data": [
        row("BTC-USDC-SWAP", listTime="1666076190000"),
        row("BTC-USD_UM-SWAP", settleCcy="USD"),
        row("ETH-USD_UM-SWAP", settleCcy="USDⓈ"),
        row("BTC-USD-SWAP", ctType="inverse", settleCcy="BTC"),
        row("NEW-USDT-SWAP", state="preopen"),
        row("OLD-USDT-SWAP", state="suspend"),
    ]}
    disc = okx.parse_discovery(body)
    assert [(i.symbol, i.instrument, i.listed_ms) for i in disc.instruments] == [
        ("BTC-USDC-SWAP", "BTC-USDC-PERP", 1666076190000)]
    assert disc.skipped == {"usd_margined": 2, "ct_type:inverse": 1, "state:preopen": 1, "state:suspend": 1}
    found, _ = resolve_symbols(["BTCUSDC"], disc.instruments)
    assert [i.symbol for i in found] == ["BTC-USDC-SWAP"]
    with pytest.raises(ValueError):
        okx.parse_discovery({"code": "50011", "msg": "Too Many Requests", "data": []})


# ---------------------------------------------------------------------------------------------
# streams, connections, subscribe messages

def _inst(inst_id: str) -> Instrument:
    base, quote, _ = inst_id.split("-")
    return Instrument("okx", inst_id, okx.unified(inst_id), base, quote, "live", "linear")


def test_streams_for():
    streams = okx.streams_for(_inst("BTC-USDT-SWAP"), schema.DATASETS)
    p = "/ws/v5/public"
    assert streams == [
        Stream("bbo-tbt:BTC-USDT-SWAP", "BTC-USDT-SWAP", "bbo-tbt", ("bbo",), p, 60.0),
        Stream("trades:BTC-USDT-SWAP", "BTC-USDT-SWAP", "trades", ("trades",), p, None),
        Stream("mark-price:BTC-USDT-SWAP", "BTC-USDT-SWAP", "mark-price", ("mark_price",), p, 10.0),
        Stream("funding-rate:BTC-USDT-SWAP", "BTC-USDT-SWAP", "funding-rate", ("funding",), p, 90.0),
        Stream("open-interest:BTC-USDT-SWAP", "BTC-USDT-SWAP", "open-interest", ("open_interest",), p, None),
    ]


def test_stream_keys_match_parsed_last_seen():
    for name in DATA_FILES:
        frame = json_lines(name)[0]
        inst_id, channel = frame["arg"]["instId"], frame["arg"]["channel"]
        keys = {s.key for s in okx.streams_for(_inst(inst_id) if inst_id.endswith("SWAP") else
                                               Instrument("okx", inst_id, inst_id, "X", "USDT", "live", "linear"),
                                               schema.DATASETS)}
        assert f"{channel}:{inst_id}" in keys
        assert f"{channel}:{inst_id}" in parsed(name).sink.last_seen


def test_many_instruments_fit_the_request_limits():
    insts = [_inst(f"{'1000000' if i % 2 else ''}SYM{i:04d}-USDT-SWAP") for i in range(700)]
    streams = [s for inst in insts for s in okx.streams_for(inst, schema.DATASETS)]
    plans = okx.plan_connections(streams)
    assert [s for p in plans for s in p.streams] == streams
    assert all(len(p.streams) <= okx.MAX_STREAMS_PER_CONNECTION and p.path == "/ws/v5/public" for p in plans)
    for plan in plans:
        msgs = okx.subscribe_messages(plan.streams, 1)
        assert len(msgs) * 3 < 480                   # room to resubscribe within the hourly budget
        keys = []
        for text, rid, msg_keys in msgs:
            msg = json.loads(text)
            assert msg["id"] == str(rid) and msg["id"].isalnum() and len(msg["id"]) <= 32
            assert msg["op"] == "subscribe"
            assert 0 < len(msg["args"]) <= okx_module.ARGS_PER_REQUEST
            assert len(json.dumps(msg["args"], separators=(",", ":")).encode()) <= 64 * 1024
            assert tuple(f"{a['channel']}:{a['instId']}" for a in msg["args"]) == msg_keys
            assert set(msg["args"][0]) == {"channel", "instId"}
            keys.extend(msg_keys)
        assert keys == [s.key for s in plan.streams]
    # one ACK per arg maps back to the request id and the stream key
    text, rid, keys = okx.subscribe_messages(plans[0].streams, 41)[0]
    arg = json.loads(text)["args"][0]
    ack = json.dumps({"id": str(rid), "event": "subscribe", "arg": arg, "connId": "c"})
    assert okx.parse(("okx", 1, 1, 1, ack), RowSink()) == Control("ack", 41, "", (keys[0],))
    unsub = okx.unsubscribe_messages(plans[0].streams[:2], 9)
    assert [json.loads(t) for t, _, _ in unsub] == [
        {"id": "9", "op": "unsubscribe", "args": [{"channel": s.channel, "instId": s.symbol}
                                                  for s in plans[0].streams[:2]]}]


def test_request_byte_limit_binds_for_long_args():
    long = [Stream(f"trades:{'X' * 900}{i}-USDT-SWAP", f"{'X' * 900}{i}-USDT-SWAP", "trades", ("trades",),
                   "/ws/v5/public") for i in range(100)]
    msgs = okx.subscribe_messages(long, 1)
    assert len(msgs) > 1
    for text, _, _ in msgs:
        assert len(json.dumps(json.loads(text)["args"], separators=(",", ":")).encode()) <= 64 * 1024
