"""OKX v5 linear perpetual swaps (USDT and USDC margined): protocol only (see shared/exchanges/okx.md).

Every channel we use lives on `/ws/v5/public`. Stream keys are `<channel>:<instId>`
(`bbo-tbt:BTC-USDT-SWAP`); frames name both in their `arg`, so `parse` rebuilds the key.

    bbo            bbo-tbt        (10 ms on change; the latest snapshot is re-sent after ~60 s unchanged)
    trades         trades         (aggregated per taker order and price; event driven)
    mark_price     mark-price     (200 ms on change, otherwise every 10 s)
    funding        funding-rate   (every 30-90 s)
    open_interest  open-interest  (every 3 s *when it changes*: silence is normal, so no cadence)

Why `trades` and not `trades-all`: `trades` is on `/public` with the other four channels (one
connection family instead of two), sends fewer frames, and its `count` gives an exact loss rule
(`tradeId - count == previous tradeId`, derived from the documented aggregation "tradeId 123 with
count 3 aggregates 123, 122 and 121"). `trades-all` lives on `/business`, has no count, and its +1
rule is unconfirmed for SWAPs.

Keepalive: text `ping` every 20 s (the server closes after 30 s without data), answered by text
`pong`. No forced periodic close. Subscribe requests are limited to 480 per hour per connection and
64 KB of args each, so each request carries up to ARGS_PER_REQUEST args. OKX ACKs every arg with its
own event, so each ACK Control names its one stream key.

Rows (one per `data[]` item, as received; sizes and open interest in CONTRACTS):

- bbo-tbt -> bbo: bid/ask = first `[px, sz, "0", n]` entry of bids/asks (empty side -> nulls),
  ts_event = `ts` (matching-engine time), ts_exchange null (OKX sends no push time),
  seq = `seqId` (null in frames before 2022-H2), update_id null.
- trades -> trades: trade_id = `tradeId`, price `px`, size `sz` (contracts), side `side` (taker),
  ts_event = `ts` (fill time), ts_exchange null. last_trade_id = `tradeId` (the last id of the
  aggregation); trade_count = `count`, and first_trade_id = tradeId - count + 1, only when the frame
  carries `count` (frames before 2022 do not: then both are null, nothing is assumed). is_block null.
- mark-price -> mark_price: mark_px = `markPx`, ts_exchange = `ts` (data time); index and
  estimated settlement prices are not on this channel (null).
- funding-rate -> funding: funding_rate = `fundingRate` (absent in some old frames -> null),
  funding_time = `fundingTime`, next_funding_time = `nextFundingTime`, next_funding_rate =
  `nextFundingRate` (deprecated, usually ""), ts_exchange = `ts` when sent. NOTE: OKX's
  `fundingTime` is the UPCOMING settlement that `fundingRate` applies at (what Binance and Bybit
  write to next_funding_time) and `nextFundingTime` is the one after it. Names are kept as OKX
  sends them; across exchanges the settlement of funding_rate is coalesce(funding_time,
  next_funding_time). funding_interval_h is null (OKX sends no interval; it is the difference).
- open-interest -> open_interest: open_interest = `oi` (contracts), open_interest_value = `oiUsd`
  (USD; absent in old frames -> null). `oiCcy` (base coin = oi x ctVal x ctMult) is not stored: it
  is derivable from the reference data and the schema has no column for it.

Non-SWAP instruments (a FUTURES `FIL-USDT-220325` in the samples) still parse: it is what was
received; their `instrument` is their own instId, since they are not perpetuals.

Control frames: `subscribe` event -> "ack" (keys = the arg's stream key, request_id = our int id);
`unsubscribe` -> "info"; `error` -> "error" ("<code>: <msg>", keys when an arg is named);
`notice` (64008: closing for an upgrade in ~60 s) -> "notice"; text `pong` -> "pong"; any other
event (e.g. channel-conn-count) -> "info".
"""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import ujson

from app.exchanges import batch as B
from app.exchanges import (BatchResult, Control, Discovery, FrameError, Instrument, Keepalive, SequenceRule,
                           Stream, split_by_path)

NAME = "okx"
PATH = "/ws/v5/public"
KEEPALIVE = Keepalive("text", "ping", 20.0)       # server closes after 30 s of silence
MAX_CONNECTION_AGE_S = None                       # no documented forced close
CONNECT_INTERVAL_S = 0.4                          # <= 3 new connections per second per IP
SUBSCRIBE_IN_URL = False
REJECTS_WHOLE_REQUEST = False                     # every arg is ACKed or refused on its own
URGENT_SCREEN = b'{"arg"'                         # data frames open so; others may be a notice
SUBSCRIBE_INTERVAL_S = 0.25                       # "60014 requests too frequent" rate undocumented
MAX_STREAMS_PER_CONNECTION = 200                  # no documented cap on public channels; be modest
ARGS_PER_REQUEST = 100                            # 480 (un)subscribe requests per hour per connection
ARGS_BYTES_PER_REQUEST = 64 * 1024 - 512          # 64 KB args limit, with room for the envelope
GAP_RULES = {"trades": SequenceRule("last_trade_id", count_column="trade_count")}
UNSUPPORTED_DATASETS: dict = {}
_SETTLE = ("USDT", "USDC")

# Fields of each channel's data items that `parse` maps or reads (bin/collector --probe lists the
# others it sees, so a field an exchange adds is noticed).
MAPPED_FIELDS = {
    "bbo-tbt": frozenset({"asks", "bids", "ts", "seqId"}),
    "trades": frozenset({"tradeId", "px", "sz", "side", "ts", "count"}),
    "mark-price": frozenset({"markPx", "ts"}),
    "funding-rate": frozenset({"fundingRate", "nextFundingTime", "fundingTime", "nextFundingRate", "ts"}),
    "open-interest": frozenset({"oi", "oiUsd", "ts"}),
}

_CHANNELS = {  # dataset -> (channel, cadence)
    "bbo": ("bbo-tbt", 60.0),         # the latest snapshot is re-sent after ~60 s unchanged
    "trades": ("trades", None),
    "mark_price": ("mark-price", 10.0),
    "funding": ("funding-rate", 90.0),
    "open_interest": ("open-interest", None),
}
_PONG = Control("pong")


def ws_url(base: str, path: str, streams=()) -> str:
    return f"{base.rstrip('/')}{path}"


def discovery_request(cursor: str | None) -> tuple[str, dict]:
    return "/api/v5/public/instruments", {"instType": "SWAP"}   # one page holds all SWAPs


def parse_discovery(body: dict) -> Discovery:
    if str(body.get("code", "0")) != "0":
        raise ValueError(f"instruments code {body.get('code')}: {body.get('msg')}")
    found, skipped = [], {}
    for row in body.get("data", []):
        inst_id = row.get("instId") or ""
        if row.get("instType") != "SWAP":
            reason = f"inst_type:{row.get('instType')}"
        elif row.get("ctType") != "linear":
            reason = f"ct_type:{row.get('ctType') or 'none'}"
        elif inst_id.endswith("_UM-SWAP"):
            reason = "usd_margined"          # BTC-USD_UM-SWAP: USD / several stable coins
        elif row.get("settleCcy") not in _SETTLE:
            reason = f"settle:{row.get('settleCcy')}"
        elif row.get("state") != "live":
            reason = f"state:{row.get('state')}"
        else:
            base = inst_id.split("-", 1)[0]
            listed = row.get("listTime")
            found.append(Instrument(
                exchange=NAME, symbol=inst_id, instrument=f"{base}-{row['settleCcy']}-PERP",
                base=base, quote=row["settleCcy"], status=row["state"], contract_type=row["ctType"],
                tick_size=row.get("tickSz") or None, lot_size=row.get("lotSz") or None,
                contract_value=row.get("ctVal") or None,
                contract_multiplier=row.get("ctMult") or None,
                listed_ms=int(listed) if listed else None))
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return Discovery(found, skipped, None)


_unified_cache: dict[str, str] = {}


def unified(symbol: str) -> str:
    """`BTC-USDT-SWAP` -> `BTC-USDT-PERP`; a non-SWAP instId keeps its own name."""
    inst = _unified_cache.get(symbol)
    if inst is None:
        inst = f"{symbol[:-5]}-PERP" if symbol.endswith("-SWAP") and len(symbol) > 5 else symbol
        _unified_cache[symbol] = inst
    return inst


def streams_for(inst: Instrument, datasets) -> list[Stream]:
    out = []
    for ds in datasets:
        if ds not in _CHANNELS:
            continue
        channel, cadence = _CHANNELS[ds]
        out.append(Stream(f"{channel}:{inst.symbol}", inst.symbol, channel, (ds,), PATH, cadence))
    return out


def plan_connections(streams: list[Stream], max_per_conn: int = MAX_STREAMS_PER_CONNECTION):
    return split_by_path(NAME, streams, max_per_conn)


def _requests(op: str, streams: list[Stream], first_id: int):
    """Chunks of <= ARGS_PER_REQUEST args and <= ARGS_BYTES_PER_REQUEST bytes of args each."""
    parts, part, size = [], [], 0
    for s in streams:
        n = len(s.channel) + len(s.symbol) + 30    # {"channel":"..","instId":".."},
        if part and (len(part) >= ARGS_PER_REQUEST or size + n > ARGS_BYTES_PER_REQUEST):
            parts.append(part)
            part, size = [], 0
        part.append(s)
        size += n
    if part:
        parts.append(part)
    out = []
    for i, part in enumerate(parts):
        rid = first_id + i
        args = [{"channel": s.channel, "instId": s.symbol} for s in part]
        out.append((ujson.dumps({"id": str(rid), "op": op, "args": args}), rid,
                    tuple(s.key for s in part)))
    return out


def subscribe_messages(streams: list[Stream], first_id: int):
    return _requests("subscribe", streams, first_id)


def unsubscribe_messages(streams: list[Stream], first_id: int):
    return _requests("unsubscribe", streams, first_id)


def _request_id(rid):
    """Our ids are the decimal text of the int id subscribe_messages returned."""
    if type(rid) is str and rid.isdigit():
        return int(rid)
    return rid or None


_MISSING = re.compile(r"channel:([^,\s]+),instId:(\S+) doesn't exist")


def _control(msg: dict, event) -> Control:
    arg = msg.get("arg")
    keys = ()
    if type(arg) is dict and "channel" in arg:
        target = arg.get("instId") or arg.get("instFamily") or arg.get("instType") or ""
        keys = (f"{arg['channel']}:{target}",)
    elif event == "error":        # 60018 names the arg only in its message
        found = _MISSING.search(str(msg.get("msg", "")))
        if found:
            keys = (f"{found.group(1)}:{found.group(2)}",)
    rid = _request_id(msg.get("id"))
    if event == "subscribe":
        return Control("ack", rid, "", keys)
    if event == "error":
        return Control("error", rid, f"{msg.get('code')}: {msg.get('msg', '')}", keys)
    if event == "notice":
        return Control("notice", rid, f"{msg.get('code')}: {msg.get('msg', '')}", keys)
    if type(event) is str:        # unsubscribe, channel-conn-count, login, ...
        detail = f"{event} {msg['code']}: {msg.get('msg', '')}" if "code" in msg else event
        return Control("info", rid, detail, keys)
    raise FrameError("unrecognised event")


def urgent_control(payload) -> Control | None:
    """The notice (64008) read on the socket thread, so rotation starts before the next frame.
    Called for the frames that do not open with URGENT_SCREEN (ACKs, pongs, events)."""
    if payload.find(b'"notice"', 0, 64) == -1:
        return None
    try:
        msg = ujson.loads(payload)
    except ValueError:
        return None
    if type(msg) is dict and msg.get("event") == "notice":
        return _control(msg, "notice")
    return None


def _data(channel: str, inst_id: str, data: list, ts_recv: int, conn_id: int, recv_seq: int, sink) -> None:
    inst = _unified_cache.get(inst_id) or unified(inst_id)
    # every list is built completely before extending the sink: a bad item leaves no partial frame
    if channel == "bbo-tbt":
        rows = []
        for d in data:
            b, a = d["bids"], d["asks"]
            rows.append((inst_id, inst, d.get("ts"), None, ts_recv, conn_id, recv_seq,
                         b[0][0] if b else None, b[0][1] if b else None,
                         a[0][0] if a else None, a[0][1] if a else None, None, d.get("seqId")))
        sink.bbo.extend(rows)
    elif channel == "trades":
        rows = []
        for d in data:
            tid, count = d["tradeId"], d.get("count")
            first = int(tid) - int(count) + 1 if count else None
            rows.append((inst_id, inst, d.get("ts"), None, ts_recv, conn_id, recv_seq,
                         tid, d["px"], d["sz"], d["side"], first, tid, count or None, None))
        sink.trades.extend(rows)
    elif channel == "mark-price":
        sink.mark_price.extend([(inst_id, inst, None, d.get("ts"), ts_recv, conn_id, recv_seq,
                                 d["markPx"], None, None) for d in data])
    elif channel == "funding-rate":
        sink.funding.extend([(inst_id, inst, None, d.get("ts"), ts_recv, conn_id, recv_seq,
                              d.get("fundingRate"), d.get("nextFundingTime") or None,
                              d.get("fundingTime") or None, d.get("nextFundingRate"), None)
                             for d in data])
    elif channel == "open-interest":
        sink.open_interest.extend([(inst_id, inst, None, d.get("ts"), ts_recv, conn_id, recv_seq,
                                    d["oi"], d.get("oiUsd")) for d in data])
    else:
        raise FrameError(f"unknown channel {channel!r}")


def parse(item: tuple, sink) -> Control | None:
    """One queue item -> rows appended to sink, or a Control for a non-data frame."""
    _, conn_id, recv_seq, ts_recv, payload = item
    if payload == b"pong" or payload == "pong":
        return _PONG
    msg = ujson.loads(payload)
    if type(msg) is not dict:
        raise FrameError("not a JSON object")
    data = msg.get("data")
    if data is not None:
        try:
            arg = msg["arg"]
            channel, inst_id = arg["channel"], arg["instId"]
            if type(data) is not list:
                raise FrameError(f"{channel} data is not a list")
            _data(channel, inst_id, data, ts_recv, conn_id, recv_seq, sink)
        except (TypeError, IndexError, AttributeError) as exc:   # wrong shapes inside a frame
            raise FrameError(f"malformed data frame: {exc}") from None
        sink.last_seen[f"{channel}:{inst_id}"] = ts_recv
        return None
    event = msg.get("event")
    if event is None:
        raise FrameError("unrecognised message")
    return _control(msg, event)


# ---- batch parsing: the writer's fast path (declared per channel: app/exchanges/batch.py) ------
# Every channel's `data` is a list of items, each a row: the same mapping as `_data`. Control
# events, pongs and odd frames go to `parse`, one by one.

_S, _I, F = B.STRING, B.INT, B.F


def _kind(fields: dict, valid, rows: dict) -> B.Kind:
    return B.Kind(json={"arg": pa.struct([("channel", _S), ("instId", _S)]),
                        "data": pa.list_(pa.struct(list(fields.items())))},
                  items="data", valid=valid, symbol=F("arg.instId"),
                  stream=pc.binary_join_element_wise(F("arg.channel"), F("arg.instId"), ":"), rows=rows)


_BATCH = {
    "bbo-tbt": _kind(
        {"asks": B.BOOK_SIDE, "bids": B.BOOK_SIDE, "ts": _S, "seqId": _I},
        B.book_side_ok("item.bids") & B.book_side_ok("item.asks"),
        {"bbo": B.Rows({"ts_event": "item.ts", "bid_px": B.first_entry("item.bids", 0),
                        "bid_sz": B.first_entry("item.bids", 1), "ask_px": B.first_entry("item.asks", 0),
                        "ask_sz": B.first_entry("item.asks", 1), "seq": "item.seqId"})}),
    "trades": _kind(
        {"tradeId": _S, "px": _S, "sz": _S, "side": _S, "ts": _S, "count": _S},
        F("item.tradeId").is_valid() & F("item.px").is_valid() & F("item.sz").is_valid()
        & F("item.side").is_valid(),
        {"trades": B.Rows({"ts_event": "item.ts", "trade_id": "item.tradeId", "price": "item.px",
                           "size": "item.sz", "side": "item.side",
                           "first_trade_id": (F("item.tradeId").cast(_I)
                                              - B.blank_to_null(F("item.count")).cast(_I)
                                              + pa.scalar(1), _I),
                           "last_trade_id": "item.tradeId", "trade_count": "item.count"})}),
    "mark-price": _kind(
        {"markPx": _S, "ts": _S}, F("item.markPx").is_valid(),
        {"mark_price": B.Rows({"ts_exchange": "item.ts", "mark_px": "item.markPx"})}),
    "funding-rate": _kind(
        {"fundingRate": _S, "nextFundingTime": _S, "fundingTime": _S, "nextFundingRate": _S, "ts": _S},
        None,
        {"funding": B.Rows({"ts_exchange": "item.ts", "funding_rate": "item.fundingRate",
                            "next_funding_time": "item.nextFundingTime", "funding_time": "item.fundingTime",
                            "next_funding_rate": "item.nextFundingRate"})}),
    "open-interest": _kind(
        {"oi": _S, "oiUsd": _S, "ts": _S}, F("item.oi").is_valid(),
        {"open_interest": B.Rows({"ts_exchange": "item.ts", "open_interest": "item.oi",
                                  "open_interest_value": "item.oiUsd"})}),
}
_ARG = r'^\{"arg":\{"channel":"(?P<kind>[^"]+)","instId":"[^"]+"\},"data":\['


def parse_batch(cols) -> BatchResult:
    """schema.FrameColumns of a chunk of frames -> BatchResult (see app/exchanges/batch.py)."""
    return B.parse_batch(cols, B.kinds_by_regex(cols, _ARG), _BATCH, NAME, unified)


# ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) -------
# REST trades are per fill with the same tradeId space as the WS `trades` aggregation (whose
# tradeId is the last fill), so latest id - last WS id counts the fills missed.

def alignment_request(symbol: str) -> tuple[str, dict, int]:
    return "/api/v5/market/trades", {"instId": symbol, "limit": 1}, 1


def parse_recent_trades(body) -> list[tuple[str, int]]:
    """[(tradeId, fill time ms)], oldest first (OKX answers newest first)."""
    if type(body) is not dict or str(body.get("code", "0")) != "0":
        raise ValueError(f"market/trades: {str(body)[:200]}")
    return [(str(t["tradeId"]), int(t["ts"])) for t in reversed(body.get("data") or [])]


def parse_latest_trade(body) -> tuple[str, int] | None:
    trades = parse_recent_trades(body)
    return trades[-1] if trades else None


def time_request() -> tuple[str, dict, int]:
    return "/api/v5/public/time", {}, 1


def parse_server_time(body) -> int:
    """Server time in ns (OKX sends ms as a string)."""
    if type(body) is not dict or str(body.get("code", "0")) != "0":
        raise ValueError(f"time: {str(body)[:200]}")
    return int(body["data"][0]["ts"]) * 1_000_000


def rest_throttle(status: int, headers: dict, body, now: float) -> float | None:
    """Seconds to stop calling OKX after this answer, or None. Limits are per endpoint per 2 s;
    50011 (rate limit) and 50013 (busy) come as HTTP 429 or as HTTP 200. Headers lower-case."""
    code = str(body.get("code")) if type(body) is dict else None
    if status != 429 and code not in ("50011", "50013"):
        return None
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass
    return 2.0
