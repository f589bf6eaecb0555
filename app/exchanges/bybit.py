"""Bybit v5 linear perpetuals (USDT and USDC settled): protocol only (see shared/exchanges/bybit.md).

One WebSocket path, `/v5/public/linear`, carries everything. Topics (= stream keys):

    bbo                               orderbook.1.<S>   (10 ms; re-sent after 3 s unchanged, same `u`)
    trades                            publicTrade.<S>   (event driven, <= 1024 trades per frame)
    mark_price, funding, open_interest  tickers.<S>     (one topic feeds all three; snapshot + deltas)

Keepalive is the client's JSON `{"op":"ping"}` every 20 s (the server cuts after 10 min without
ping-pong or data); there is no forced periodic close. Subscribe requests carry at most
ARGS_PER_REQUEST topics: the docs set no per-request limit for futures, but one bad topic fails the
whole request, so small requests keep the damage of one delisted symbol small. A connection holds at
most MAX_TOPICS_PER_CONNECTION topics and its args at most ARGS_CHARS_PER_CONNECTION characters
(Bybit: 21,000 per connection; counted conservatively as the JSON text of the args list).

Rows (one per message item, as received; no state is kept between frames):

- orderbook.1: one `bbo` row per frame, snapshot or delta, resends included (same `u`):
  bid/ask = the FIRST entry of `b`/`a` exactly as sent, an empty side gives nulls.
  ts_event = `cts` (absent in frames before ~2024 -> null), ts_exchange = `ts`, update_id = `u`,
  seq = `seq`. Since 2025-03 L1 is snapshot-only, so a row is the top of book. Older captures hold
  L1 `delta` frames whose entries are changes (size "0" = level removed, empty side = unchanged,
  possibly two entries per side): their row is a verbatim projection of the delta's first entries,
  not a book state. Nothing is merged or invented; the exact frame is in `frames`.
- publicTrade: one `trades` row per `data` item: trade_id = `i` (UUID), price `p`, size `v` (base
  coin), side = `S` lower-cased (taker side), ts_event = `T`, ts_exchange = `ts`, is_block = `BT`;
  first/last trade id and count are null (Bybit ids are UUIDs).
- tickers (snapshot and delta alike, never merged; ts_event null, ts_exchange = `ts`):
  * `mark_price` row only when the frame carries a non-empty `markPrice` (mark_px is non-nullable), with
    index_px = `indexPrice` when the same frame carries it. A delta carrying only `indexPrice` gives
    no row: a mark price would have to be invented from an earlier frame. That index value is
    kept only in `frames`.
  * `funding` row when any of `fundingRate`, `nextFundingTime`, `fundingIntervalHour` is present:
    funding_rate, next_funding_time (the upcoming settlement `fundingRate` applies at),
    funding_interval_h; funding_time and next_funding_rate are null (Bybit sends neither).
  * `open_interest` row when `openInterest` or `openInterestValue` is present: open_interest =
    `openInterest` (BOTH sides, base coin), open_interest_value = `openInterestValue` (settle coin).
  In rows from delta frames a null means "not in this frame (unchanged)", never "no value".
  `parse` emits every dataset a frame carries; keeping only the requested ones is the caller's
  business (Stream.datasets says which were asked for).

USDC perpetuals are named `<BASE>PERP` (displayName `<BASE>USDC`): unified `<BASE>-USDC-PERP`.

GAP_RULES is empty: publicTrade ids are UUIDs and its `seq` is shared by the fills of one matching
event and jumps (the cross sequence of the symbol); orderbook `u` advanced by exactly 1 per change
in one sample but the docs promise only "update id" (a jump is a suspected gap at most); tickers
`cs` only increases. None of them allows an exact loss count.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ujson

from app.exchanges import batch as B
from app.exchanges import (BatchResult, Control, ConnectionPlan, Discovery, FrameError, Instrument, Keepalive,
                           Stream, chunked, split_by_path)

NAME = "bybit"
PATH = "/v5/public/linear"
KEEPALIVE = Keepalive("text", '{"op":"ping"}', 20.0)
MAX_CONNECTION_AGE_S = None                 # no documented forced close
CONNECT_INTERVAL_S = 0.6                    # <= 500 new connections per 5 min per domain
SUBSCRIBE_IN_URL = False
REJECTS_WHOLE_REQUEST = True                # `success:false` for one bad topic fails them all
URGENT_SCREEN = None                          # no in-band event must bypass the writer
SUBSCRIBE_INTERVAL_S = 0.2                  # WS message rate undocumented; ACKs take ~200 ms
MAX_TOPICS_PER_CONNECTION = 200
ARGS_CHARS_PER_CONNECTION = 21_000          # documented limit on one connection's args
ARGS_PER_REQUEST = 10                       # one bad topic fails its whole request
GAP_RULES: dict = {}
UNSUPPORTED_DATASETS: dict = {}
_SETTLE = ("USDT", "USDC")

# Fields of each channel's data items that `parse` maps or reads (bin/collector --probe lists the
# others it sees, so a field an exchange adds is noticed).
MAPPED_FIELDS = {
    "orderbook.1": frozenset({"s", "b", "a", "u", "seq"}),
    "publicTrade": frozenset({"s", "T", "i", "p", "v", "S", "BT"}),
    "tickers": frozenset({"symbol", "markPrice", "indexPrice", "fundingRate", "nextFundingTime",
                          "fundingIntervalHour", "openInterest", "openInterestValue"}),
}

_CHANNELS = {  # dataset -> (topic prefix, cadence)
    "bbo": ("orderbook.1", 3.0),      # documented: the snapshot is re-sent after 3 s unchanged
    "trades": ("publicTrade", None),
    "mark_price": ("tickers", 1.0),
    "funding": ("tickers", 1.0),
    "open_interest": ("tickers", 1.0),
}
_SIDES = {"Buy": "buy", "Sell": "sell"}


def ws_url(base: str, path: str, streams=()) -> str:
    return f"{base.rstrip('/')}{path}"


def discovery_request(cursor: str | None) -> tuple[str, dict]:
    params = {"category": "linear", "limit": 1000}
    if cursor:
        params["cursor"] = cursor
    return "/v5/market/instruments-info", params


def parse_discovery(body: dict) -> Discovery:
    if body.get("retCode", 0) != 0:
        raise ValueError(f"instruments-info retCode {body.get('retCode')}: {body.get('retMsg')}")
    result = body.get("result") or {}
    found, skipped = [], {}
    for row in result.get("list", []):
        if row.get("contractType") != "LinearPerpetual":
            reason = f"contract_type:{row.get('contractType') or 'none'}"
        elif row.get("status") != "Trading":
            reason = f"status:{row.get('status')}"
        elif row.get("settleCoin") not in _SETTLE:
            reason = f"settle:{row.get('settleCoin')}"
        else:
            launch = row.get("launchTime")
            found.append(Instrument(
                exchange=NAME, symbol=row["symbol"], base=row["baseCoin"], quote=row["settleCoin"],
                instrument=f"{row['baseCoin']}-{row['settleCoin']}-PERP", status=row["status"],
                contract_type=row["contractType"],
                tick_size=(row.get("priceFilter") or {}).get("tickSize"),
                lot_size=(row.get("lotSizeFilter") or {}).get("qtyStep"),
                listed_ms=int(launch) if launch else None,
                display_name=row.get("displayName") or None))
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return Discovery(found, skipped, result.get("nextPageCursor") or None)


_unified_cache: dict[str, str] = {}


def unified(symbol: str) -> str:
    """`BTCUSDT` -> `BTC-USDT-PERP`, `BTCPERP` -> `BTC-USDC-PERP`; anything else (dated futures
    such as `BTCUSDT-14AUG26`) is not a perpetual and keeps its own name."""
    inst = _unified_cache.get(symbol)
    if inst is None:
        if symbol.endswith("USDT") and len(symbol) > 4:
            inst = f"{symbol[:-4]}-USDT-PERP"
        elif symbol.endswith("PERP") and len(symbol) > 4:
            inst = f"{symbol[:-4]}-USDC-PERP"
        elif symbol.endswith("USDC") and len(symbol) > 4:
            inst = f"{symbol[:-4]}-USDC-PERP"
        else:
            inst = symbol
        _unified_cache[symbol] = inst
    return inst


def streams_for(inst: Instrument, datasets) -> list[Stream]:
    by_key: dict[str, Stream] = {}
    for ds in datasets:
        if ds not in _CHANNELS:
            continue
        channel, cadence = _CHANNELS[ds]
        key = f"{channel}.{inst.symbol}"
        prev = by_key.get(key)
        by_key[key] = Stream(key, inst.symbol, channel, (prev.datasets if prev else ()) + (ds,), PATH, cadence)
    return list(by_key.values())


def _arg_chars(key: str) -> int:
    return len(key) + 3          # quotes and a separating comma in the JSON args list


def plan_connections(streams: list[Stream], max_per_conn: int = MAX_TOPICS_PER_CONNECTION):
    """Cut by path and topic count, then further so that no connection's args exceed 21,000 chars."""
    plans = []
    for plan in split_by_path(NAME, streams, max_per_conn):
        part, size = [], 2       # the list's brackets
        for s in plan.streams:
            n = _arg_chars(s.key)
            if part and size + n > ARGS_CHARS_PER_CONNECTION:
                plans.append(ConnectionPlan(NAME, plan.path, part))
                part, size = [], 2
            part.append(s)
            size += n
        if part:
            plans.append(ConnectionPlan(NAME, plan.path, part))
    return plans


def _requests(op: str, streams: list[Stream], first_id: int):
    out = []
    for i, part in enumerate(chunked(streams, ARGS_PER_REQUEST)):
        keys = tuple(s.key for s in part)
        out.append((ujson.dumps({"op": op, "args": list(keys), "req_id": str(first_id + i)}),
                    first_id + i, keys))
    return out


def subscribe_messages(streams: list[Stream], first_id: int):
    return _requests("subscribe", streams, first_id)


def unsubscribe_messages(streams: list[Stream], first_id: int):
    return _requests("unsubscribe", streams, first_id)


def _request_id(req_id):
    """Our req_ids are the decimal text of the int id subscribe_messages returned."""
    if type(req_id) is str and req_id.isdigit():
        return int(req_id)
    return req_id or None


def _control(msg: dict) -> Control:
    op = msg.get("op")
    ret_msg = msg.get("ret_msg") or ""
    rid = _request_id(msg.get("req_id"))
    if op == "ping" or op == "pong" or ret_msg == "pong":
        return Control("pong", rid, ret_msg)
    success = msg.get("success")
    if success is False and op == "subscribe" and ret_msg.startswith("error:already subscribed"):
        return Control("ack", rid, ret_msg)     # a retried request whose first ACK was late
    if success is False:
        return Control("error", rid, f"{op}: {ret_msg}" if op else ret_msg)
    if success is True:
        return Control("ack" if op == "subscribe" else "info", rid, ret_msg)
    raise FrameError("unrecognised message")


def urgent_control(payload) -> Control | None:
    return None


def _data(msg: dict, topic: str, ts_recv: int, conn_id: int, recv_seq: int, sink) -> None:
    data = msg["data"]
    ts = msg.get("ts")
    if topic.startswith("orderbook.1."):
        s = data["s"]
        inst = _unified_cache.get(s) or unified(s)
        b, a = data["b"], data["a"]
        if b:
            bid_px, bid_sz = b[0][0], b[0][1]
        else:
            bid_px = bid_sz = None
        if a:
            ask_px, ask_sz = a[0][0], a[0][1]
        else:
            ask_px = ask_sz = None
        sink.bbo.append((s, inst, msg.get("cts"), ts, ts_recv, conn_id, recv_seq,
                         bid_px, bid_sz, ask_px, ask_sz, data.get("u"), data.get("seq")))
    elif topic.startswith("publicTrade."):
        if type(data) is not list:
            raise FrameError("publicTrade data is not a list")
        cache, sides = _unified_cache, _SIDES
        # built completely before extending the sink, so a bad item leaves no partial frame behind
        rows = [(d["s"], cache.get(d["s"]) or unified(d["s"]), d.get("T"), ts, ts_recv, conn_id,
                 recv_seq, d["i"], d["p"], d["v"], sides[d["S"]], None, None, None, d.get("BT"))
                for d in data]
        sink.trades.extend(rows)
    elif topic.startswith("tickers."):
        s = data["symbol"]
        inst = _unified_cache.get(s) or unified(s)
        get = data.get
        mark = get("markPrice")
        rate, nft, hours = get("fundingRate"), get("nextFundingTime"), get("fundingIntervalHour")
        oi, oiv = get("openInterest"), get("openInterestValue")
        if mark:                      # "" or absent: nothing a non-null mark_px could hold
            sink.mark_price.append((s, inst, None, ts, ts_recv, conn_id, recv_seq,
                                    mark, get("indexPrice"), None))
        if rate is not None or nft is not None or hours is not None:
            sink.funding.append((s, inst, None, ts, ts_recv, conn_id, recv_seq,
                                 rate, nft or None, None, None, hours or None))
        if oi is not None or oiv is not None:
            sink.open_interest.append((s, inst, None, ts, ts_recv, conn_id, recv_seq, oi, oiv))
    else:
        raise FrameError(f"unknown topic {topic!r}")


def parse(item: tuple, sink) -> Control | None:
    """One queue item -> rows appended to sink, or a Control for a non-data frame."""
    _, conn_id, recv_seq, ts_recv, payload = item
    msg = ujson.loads(payload)
    if type(msg) is not dict:
        raise FrameError("not a JSON object")
    topic = msg.get("topic")
    if topic is not None:
        try:
            _data(msg, topic, ts_recv, conn_id, recv_seq, sink)
        except (TypeError, IndexError, AttributeError) as exc:   # wrong shapes inside a frame
            raise FrameError(f"malformed {topic!r} frame: {exc}") from None
        sink.last_seen[topic] = ts_recv
        return None
    return _control(msg)


# ---- batch parsing: the writer's fast path (declared per topic kind: app/exchanges/batch.py) ---
# The same mapping as `_data`; control messages and odd frames go to `parse`, one by one.

_S, _I, F = B.STRING, B.INT, B.F
_TICKER_FIELDS = ("symbol", "markPrice", "indexPrice", "fundingRate", "nextFundingTime",
                  "fundingIntervalHour", "openInterest", "openInterestValue")
_BATCH = {
    "orderbook.1": B.Kind(
        json={"topic": _S, "ts": _I, "cts": _I, "data": pa.struct([
            ("s", _S), ("b", B.BOOK_SIDE), ("a", B.BOOK_SIDE), ("u", _I), ("seq", _I)])},
        valid=F("data.s").is_valid() & B.book_side_ok("data.b") & B.book_side_ok("data.a"),
        symbol=F("data.s"), stream=F("topic"),
        rows={"bbo": B.Rows({"ts_event": "cts", "ts_exchange": "ts",
                             "bid_px": B.first_entry("data.b", 0), "bid_sz": B.first_entry("data.b", 1),
                             "ask_px": B.first_entry("data.a", 0), "ask_sz": B.first_entry("data.a", 1),
                             "update_id": "data.u", "seq": "data.seq"})}),
    "publicTrade": B.Kind(
        json={"topic": _S, "ts": _I, "data": pa.list_(pa.struct([
            ("T", _I), ("s", _S), ("S", _S), ("v", _S), ("p", _S), ("i", _S), ("BT", B.BOOL)]))},
        items="data",
        valid=(F("item.s").is_valid() & F("item.i").is_valid() & F("item.p").is_valid()
               & F("item.v").is_valid() & F("item.S").isin(list(_SIDES))),
        symbol=F("item.s"), stream=F("topic"),
        rows={"trades": B.Rows({"ts_event": "item.T", "ts_exchange": "ts", "trade_id": "item.i",
                                "price": "item.p", "size": "item.v",
                                "side": (pc.utf8_lower(F("item.S")), _S), "is_block": "item.BT"})}),
    "tickers": B.Kind(
        json={"topic": _S, "ts": _I, "data": pa.struct([(n, _S) for n in _TICKER_FIELDS])},
        valid=F("data.symbol").is_valid(), symbol=F("data.symbol"), stream=F("topic"),
        rows={
            "mark_price": B.Rows({"ts_exchange": "ts", "mark_px": "data.markPrice",
                                  "index_px": "data.indexPrice"},
                                 where=F("data.markPrice").is_valid() & (F("data.markPrice") != "")),
            "funding": B.Rows({"ts_exchange": "ts", "funding_rate": "data.fundingRate",
                               "next_funding_time": "data.nextFundingTime",
                               "funding_interval_h": "data.fundingIntervalHour"},
                              where=(F("data.fundingRate").is_valid() | F("data.nextFundingTime").is_valid()
                                     | F("data.fundingIntervalHour").is_valid())),
            "open_interest": B.Rows({"ts_exchange": "ts", "open_interest": "data.openInterest",
                                     "open_interest_value": "data.openInterestValue"},
                                    where=F("data.openInterest").is_valid() | F("data.openInterestValue").is_valid()),
        }),
}
_TOPIC = r'^\{"topic":"(?P<kind>orderbook\.1|publicTrade|tickers)\.[^"]+"'


def parse_batch(cols) -> BatchResult:
    """schema.FrameColumns of a chunk of frames -> BatchResult (see app/exchanges/batch.py)."""
    return B.parse_batch(cols, B.kinds_by_regex(cols, _TOPIC), _BATCH, NAME, unified)


# ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) -------
# Trade ids are UUIDs, so a loss cannot be computed from two ids: we fetch the latest 1000 trades
# and count those between the last trade seen before the disconnect and the first one after.
# Bybit limits per IP (600 requests / 5 s, 403 = banned >= 10 min) and per endpoint (retCode 10006).

def alignment_request(symbol: str) -> tuple[str, dict, int]:
    return "/v5/market/recent-trade", {"category": "linear", "symbol": symbol, "limit": 1000}, 1


def parse_recent_trades(body) -> list[tuple[str, int]]:
    """[(execId, trade time ms)], oldest first (Bybit answers newest first)."""
    if type(body) is not dict or body.get("retCode", 0) != 0:
        raise ValueError(f"recent-trade: {str(body)[:200]}")
    rows = (body.get("result") or {}).get("list") or []
    return [(str(t["execId"]), int(t["time"])) for t in reversed(rows)]


def parse_latest_trade(body) -> tuple[str, int] | None:
    trades = parse_recent_trades(body)
    return trades[-1] if trades else None


def time_request() -> tuple[str, dict, int]:
    return "/v5/market/time", {}, 1


def parse_server_time(body) -> int:
    """Server time in ns (`timeNano`; `timeSecond` as a fallback)."""
    if type(body) is not dict or body.get("retCode", 0) != 0:
        raise ValueError(f"time: {str(body)[:200]}")
    result = body["result"]
    if result.get("timeNano"):
        return int(result["timeNano"])
    return int(result["timeSecond"]) * 1_000_000_000


def rest_throttle(status: int, headers: dict, body, now: float) -> float | None:
    """Seconds to stop calling Bybit after this answer, or None. 403 = IP limit hit (Bybit says
    stop for at least 10 minutes); retCode 10006 (HTTP 200) = endpoint limit, until
    X-Bapi-Limit-Reset-Timestamp (ms). Headers have lower-case names."""
    ra = headers.get("retry-after")
    if status == 403:
        return 600.0
    limited = status == 429 or (type(body) is dict and body.get("retCode") == 10006)
    if not limited:
        return None
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass
    reset = headers.get("x-bapi-limit-reset-timestamp")
    if reset:
        try:
            return min(60.0, max(0.1, int(reset) / 1000.0 - now))
        except ValueError:
            pass
    return 1.0
