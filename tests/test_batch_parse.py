"""The writer's batch path (adapter.parse_batch + Arrow) must give exactly what per-frame parsing
gives: the same rows in the same order, the same controls, unparsed and rejected counts and
last_seen. Fed with every recorded sample frame of each exchange, the simulator's own frames,
and frames broken on purpose."""
from __future__ import annotations

import re

import pytest

from app import schema, settings as settings_mod, writer as writer_mod
from app.exchanges import create
from app.state import State
from app.storage import LocalStorage
from app.handoff import FrameQueue, from_items
from tests import samples

samples.require_samples()

FILES = {
    "binance": ["binance_bookTicker.jsonl", "binance_aggTrade.jsonl", "binance_markPrice.jsonl",
                "binance_trade.jsonl"],
    "bybit": ["bybit_orderbook.1.jsonl", "bybit_publicTrade.jsonl", "bybit_tickers.jsonl",
              "bybit_subscribe.jsonl"],
    "okx": ["okx_bbo-tbt.jsonl", "okx_trades.jsonl", "okx_mark-price.jsonl", "okx_funding-rate.jsonl",
            "okx_open-interest.jsonl", "okx_subscribe.jsonl", "okx_error.jsonl"],
}

BROKEN = {   # frames of batch-parsed kinds that per-frame parsing rejects, or treats specially
    "binance": [
        b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"a":5,"s":"BTCUSDT","q":"1","f":1,"l":1,"T":1,"m":true}}',
        b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":12,"s":"BTCUSDT","b":"","B":"1","a":"2","A":"1","T":1,"E":1}}',
        b'{"stream":"btcusdt@bookTicker","data":{"e":"markPriceUpdate","u":13,"s":"BTCUSDT","b":"1","B":"1","a":"2","A":"1"}}',
        b'{"stream":"btcusdt@bookTicker",\n"data":{"e":"bookTicker","u":15,"s":"BTCUSDT","b":"1","B":"1","a":"2","A":"1","T":1,"E":1}}',
        b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUpdate","E":1,"s":"BTCUSDT","r":"0.1","T":2}}',
        b'{"result":null,"id":7}',
    ],
    "bybit": [
        b'{"topic":"orderbook.1.BTCUSDT","type":"delta","ts":5,"data":{"s":"BTCUSDT","b":[["1"]],"a":[],"u":1,"seq":2}}',
        b'{"topic":"orderbook.1.BTCUSDT","type":"delta","ts":5,"data":{"s":"BTCUSDT","b":[],"a":[],"u":2,"seq":3}}',
        b'{"topic":"orderbook.1.BTCUSDT","type":"delta","ts":5,"data":{"s":"BTCUSDT","b":null,"a":[["2","1"]],"u":3}}',
        b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":6,"data":[{"T":1,"s":"BTCUSDT","S":"Buy","v":"1","p":"2","i":"a"},{"T":1,"s":"BTCUSDT","S":"Hold","v":"1","p":"2","i":"b"}]}',
        b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":6,"data":[]}',
        b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT","markPrice":"","fundingRate":""},"cs":1,"ts":7}',
        b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT","indexPrice":"3"},"cs":1,"ts":8}',
        b'{"topic":"tickers.BTCUSDT","type":"delta","data":{"markPrice":"3"},"cs":1,"ts":9}',
        b'{"op":"pong","ret_msg":"pong","conn_id":"x","success":true}',
    ],
    "okx": [
        b'{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT-SWAP"},"data":[{"asks":[],"bids":[["1","2","0","1"]],"ts":"5","seqId":1}]}',
        b'{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT-SWAP"},"data":[{"asks":[["1"]],"bids":[],"ts":"5"}]}',
        b'{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[{"tradeId":"9","px":"1","sz":"2","side":"buy","ts":"5","count":"3"},{"tradeId":"10","px":"1","sz":"2","side":"sell","ts":"5","count":""}]}',
        b'{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[{"tradeId":"11","sz":"2","side":"buy","ts":"5"}]}',
        b'{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[]}',
        b'{"arg":{"channel":"funding-rate","instId":"BTC-USDT-SWAP"},"data":[{"fundingRate":"","nextFundingTime":"","ts":"5"}]}',
        b'{"arg":{"channel":"open-interest","instId":"BTC-USDT-SWAP"},"data":[{"oiUsd":"5","ts":"5"}]}',
        b"pong",
    ],
}


GROUP_BREAKERS = {   # frames whose JSON types differ from their kind's declared shape: Arrow's reader
    # fails the whole group (every frame of that kind in the chunk) and all of it goes frame by
    # frame. Mixed into the samples, they would turn the comparison of that channel into
    # per-frame against per-frame; they get a chunk of their own (test_a_bad_group_falls_back...
    # covers the fall-back itself).
    "binance": [
        b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":"12","s":"BTCUSDT","b":"1","B":"1","a":"2","A":"1","T":1,"E":1}}',
        b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":14,"s":"BTCUSDT","b":"x","B":"1","a":"2","A":"1","T":1,"E":1}}',
    ],
    "bybit": [],
    "okx": [],
}

CHANNEL = {   # a data frame's channel (the batch path's kinds are per channel)
    "binance": re.compile(rb'^\{"stream":"[^"@]+@([^"]+)","data":\{'),
    "bybit": re.compile(rb'^\{"topic":"([^".]+)\.'),
    "okx": re.compile(rb'^\{"arg":\{"channel":"([^"]+)"'),
}


def _items(exchange: str, broken: bool = True, *, origin: list | None = None) -> list[tuple]:
    """Every sample line of the exchange, interleaved file by file, with the broken frames and
    garbage spread through; recv_seq renumbered in arrival order. `origin` gets, per item, True
    for a sample line, False for a broken or garbage frame."""
    lines = [list(samples.raw_lines(name)) for name in FILES[exchange]]
    extra = BROKEN[exchange] + samples.GARBAGE if broken else []
    mixed, from_sample = [], []
    while any(lines) or extra:
        for part in lines:
            if part:
                mixed.append(part.pop(0))
                from_sample.append(True)
        if extra:
            mixed.append(extra.pop(0))
            from_sample.append(False)
    if origin is not None:
        origin[:] = from_sample
    return [(exchange, 1 + i % 3, i + 1, 1_700_000_000_000_000_000 + i * 1000, p)
            for i, p in enumerate(mixed)]


def _sim_items(exchange: str, n: int = 3000) -> list[tuple]:
    """Frames as the bundled simulator makes them (many symbols, all channels)."""
    from bench.firehose import Firehose
    fh = Firehose([exchange], symbols=30)
    try:
        fh.start()
        ex = fh.sim._ex[exchange]
        got = []

        def capture():
            def publish(topic, text, rows, wtext=None):
                got.append((wtext or text).encode())
                return 1
            ex.index = {t: {} for t in _all_topics(ex)}
            ex.publish = publish
            now = 1_700_000_000_000
            for k in range(n // (3 * len(ex.insts)) + 1):
                for inst in ex.insts:
                    ex.ev_bbo(inst, now + k)
                    ex.ev_trade(inst, now + k)
                ex.periodic(now + k * 1001)
        fh.sim._lt.call(capture)
    finally:
        fh.stop()
    return [(exchange, 1, i + 1, 1_700_000_000_000_000_000 + i, p) for i, p in enumerate(got[:n])]


def _all_topics(ex) -> list[str]:
    topics = []
    for inst in ex.insts:
        topics += [v for k, v in inst.ex.items() if k.startswith("t_") and k not in ("t_trade", "t_ta")]
    return topics


def _run(tmp_path, exchange: str, items: list[tuple], batch: bool, *, chunks: list | None = None) -> dict:
    """The writer over `items` (or over each of `chunks` in turn, each parsed as one chunk):
    what it wrote, controls, counters, last_seen; with `batch`, also "left": per chunk the
    positions the batch parser left to per-frame parsing (None where it did not run)."""
    s = settings_mod.load(None, environ={}, dotenv_path=str(tmp_path / ".env")).replace(
        data_dir=str(tmp_path / ("batch" if batch else "frame")), exchanges=[exchange])
    state = State(exchanges=[exchange], queue=FrameQueue())
    controls = []
    w = writer_mod.Writer(s, FrameQueue(), state, LocalStorage(s, state), {exchange: create(exchange)},
                          on_control=lambda *a: controls.append(a), run_id="R", version="t")
    left: list = []
    if not batch:
        w.encoder.batch_parsers = {}
    else:
        parse_batch = w.encoder.batch_parsers[exchange]

        def recorded(cols):
            result = parse_batch(cols)
            left[-1] = list(result.leftover)
            return result
        w.encoder.batch_parsers[exchange] = recorded
    tables = {}
    w.observers.append(lambda ex, ds, t: tables.setdefault(ds, []).extend(t.to_pylist()))
    for chunk in chunks or [items]:
        left.append(None)
        w.process(from_items(chunk))
        w.parse_pending()
    counts = {c: state.total(c) for c in ("frames_unparsed", "rows_rejected", "frames_non_utf8",
                                           "frames_written", "rows_written")}
    out = {"tables": tables, "controls": controls, "counts": counts,
           "last_seen": dict(w.last_seen[exchange])}
    return dict(out, left=left) if batch else out


def _outcome(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "left"}


def _parses_alone(exchange: str, item: tuple) -> bool:
    """True if per-frame parsing takes the frame (rows or a control, no error)."""
    from app.exchanges import RowSink
    try:
        create(exchange).parse(item, RowSink())
    except Exception:  # noqa: BLE001 - refused: the batch path must leave it too
        return False
    return True


@pytest.mark.parametrize("exchange", ["binance", "bybit", "okx"])
def test_batch_path_equals_per_frame_on_samples(tmp_path, exchange, monkeypatch):
    """Chunk 1: every sample line, with the frames a batch refuses one by one and garbage mixed
    in; chunk 2: the frames that break a whole group. The comparison is only worth something
    where the batch path really parsed: it must have taken every sample frame of every channel
    it handles (all but those per-frame parsing refuses too). The writer's threshold below
    which it does not even try the batch path (a cost rule) is lifted: OKX's samples are fewer."""
    monkeypatch.setattr(writer_mod.encoding, "BATCH_MIN_FRAMES", 1)
    origin: list = []
    mixed = _items(exchange, origin=origin)
    breakers = [(exchange, 1, len(mixed) + i + 1, 1_700_000_000_000_000_000 + (len(mixed) + i) * 1000, p)
                for i, p in enumerate(GROUP_BREAKERS[exchange])]
    chunks = [mixed] + ([breakers] if breakers else [])
    ref = _run(tmp_path, exchange, [], False, chunks=chunks)
    got = _run(tmp_path, exchange, [], True, chunks=chunks)
    assert _outcome(got) == ref
    assert ref["counts"]["rows_written"] > 10 and ref["counts"]["frames_unparsed"] > 5
    assert got["left"][0] is not None, "the batch path did not run on the samples"
    left = set(got["left"][0])
    should_take = [i for i, it in enumerate(mixed) if origin[i] and BATCHED[exchange](it[4])
                   and _parses_alone(exchange, it)]
    channels = {CHANNEL[exchange].match(mixed[i][4]).group(1) for i in should_take}
    assert len(channels) >= 3, channels
    not_taken = {}
    for i in should_take:
        if i in left:
            ch = CHANNEL[exchange].match(mixed[i][4]).group(1)
            not_taken[ch] = not_taken.get(ch, 0) + 1
    assert not_taken == {}, f"sample frames the batch path left to per-frame parsing, per channel: {not_taken}"


BATCHED = {   # frames of the kinds each parse_batch takes (the rest always goes frame by frame)
    "binance": lambda p: p.startswith(b'{"stream":"') and not p.startswith(b'{"stream":"!')
    and any(k in p[:60] for k in (b'@bookTicker"', b'@aggTrade"', b'@markPrice')),
    "bybit": lambda p: p.startswith(b'{"topic":"'),
    "okx": lambda p: p.startswith(b'{"arg":'),
}


@pytest.mark.parametrize("exchange", ["binance", "bybit", "okx"])
def test_batch_path_takes_the_clean_frames(exchange):
    """Without broken frames poisoning a group, the batch path takes every frame of its kinds
    but one recorded aggTrade that lacks its id (per-frame parsing rejects it too)."""
    items = _items(exchange, broken=False)
    leftover = create(exchange).parse_batch(schema.frame_columns(from_items(items))).leftover
    batched = sum(1 for it in items if BATCHED[exchange](it[4]))
    assert batched > 10
    assert len(items) - len(leftover) >= batched - (1 if exchange == "binance" else 0)


@pytest.mark.parametrize("exchange", ["binance", "bybit", "okx"])
def test_batch_path_equals_per_frame_on_simulated_frames(tmp_path, exchange):
    items = _sim_items(exchange)
    ref, got = _run(tmp_path, exchange, items, False), _run(tmp_path, exchange, items, True)
    assert _outcome(got) == ref
    assert set(ref["tables"]) >= {"frames", "bbo", "trades", "mark_price"}
    leftover = create(exchange).parse_batch(schema.frame_columns(from_items(items))).leftover
    assert len(leftover) == 0


def test_a_bad_group_falls_back_without_losing_others(tmp_path):
    """One bookTicker with a string update id fails the whole bookTicker group in Arrow; those
    frames go frame by frame, the aggTrade group still takes the fast path."""
    book = b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%s,"s":"BTCUSDT","b":"1","B":"1","a":"2","A":"1","T":1,"E":1}}'
    agg = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"a":%d,"s":"BTCUSDT","p":"1","q":"1","f":1,"l":1,"T":1,"m":false}}'
    payloads = [book % b"1", agg % 1, book % b'"2"', agg % 2, book % b"3"] * 20
    items = [("binance", 1, i + 1, 10**18 + i, p) for i, p in enumerate(payloads)]
    result = create("binance").parse_batch(schema.frame_columns(from_items(items)))
    assert sorted(result.leftover) == [i for i, p in enumerate(payloads) if b"bookTicker" in p]
    assert sum(t.num_rows for t in result.tables["trades"]) == 40
    ref, got = _run(tmp_path, "binance", items, False), _run(tmp_path, "binance", items, True)
    assert _outcome(got) == ref
