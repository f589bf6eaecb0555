"""Binance USD-M futures: protocol only (see shared/exchanges/binance.md).

Routed entry points since 2026: bookTicker lives on `/public`, aggTrade and markPrice on
`/market`; a stream sent to the wrong one is ACKed and then silent, so the path is part of each
Stream. We connect to `<path>/stream` (combined mode: every frame names its stream) and
SUBSCRIBE in chunks; Binance counts every inbound message against 10/s per connection.
No open-interest stream exists on USD-M WebSocket: `open_interest` is never produced here.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ujson

from app.exchanges import batch as B
from app.exchanges import (BatchResult, Control, Discovery, FrameError, Instrument, Keepalive, RowSink,
                           SequenceRule, Stream, chunked, split_by_path)

NAME = "binance"
KEEPALIVE = Keepalive("protocol", "", 30.0)   # server pings every 3 min; our pings prove liveness
MAX_CONNECTION_AGE_S = 23.5 * 3600            # the server closes at 24 h: rotate before
CONNECT_INTERVAL_S = 0.2                      # connection rate per IP unconfirmed: stay modest
SUBSCRIBE_IN_URL = True                       # initial streams go in the URL; SUBSCRIBE for changes
SUBSCRIBE_INTERVAL_S = 0.25                   # <= 10 inbound messages/s, pings included
MAX_STREAMS_PER_CONNECTION = 200              # documented 1024 (2026) / 200 (older): be safe
PARAMS_PER_REQUEST = 100
GAP_RULES = {"trades": SequenceRule("trade_id")}   # aggTrade `a` is +1 per symbol
REJECTS_WHOLE_REQUEST = True                  # an error answers the whole SUBSCRIBE request
URGENT_SCREEN = None                          # no in-band event must bypass the writer
UNSUPPORTED_DATASETS = {"open_interest": "Binance USD-M publishes no open-interest WebSocket stream"}
_QUOTES = ("USDT", "USDC")

# Fields of each channel's data object that `parse` maps or reads (bin/collector --probe lists the
# others it sees, so a field an exchange adds is noticed).
MAPPED_FIELDS = {
    "bookTicker": frozenset({"e", "s", "T", "E", "b", "B", "a", "A", "u"}),
    "aggTrade": frozenset({"e", "s", "T", "E", "a", "p", "q", "m", "f", "l"}),
    "trade": frozenset({"e", "s", "T", "E", "t", "p", "q", "m"}),
    "markPrice@1s": frozenset({"e", "s", "E", "p", "i", "P", "r", "T"}),
}

_CHANNELS = {  # dataset -> (stream suffix, path, cadence)
    "bbo": ("bookTicker", "/public", None),
    "trades": ("aggTrade", "/market", None),
    "mark_price": ("markPrice@1s", "/market", 1.0),
    "funding": ("markPrice@1s", "/market", 1.0),
}


def ws_url(base: str, path: str, streams=()) -> str:
    """`<path>/stream?streams=a/b/c`: the documented combined form (frames name their stream).
    A bare `/stream` followed by SUBSCRIBE is not documented for the routed paths."""
    return f"{base.rstrip('/')}{path}/stream?streams=" + "/".join(s.key for s in streams)


def discovery_request(cursor: str | None) -> tuple[str, dict]:
    return "/fapi/v1/exchangeInfo", {}


def parse_discovery(body: dict) -> Discovery:
    if not isinstance(body, dict) or not isinstance(body.get("symbols"), list):
        raise ValueError(f"exchangeInfo without symbols: {str(body)[:200]}")
    found, skipped = [], {}
    for row in body.get("symbols", []):
        if row.get("contractType") != "PERPETUAL":
            reason = f"contract_type:{row.get('contractType') or 'none'}"
        elif row.get("status") != "TRADING":
            reason = f"status:{row.get('status')}"
        elif row.get("marginAsset") not in _QUOTES or row.get("quoteAsset") not in _QUOTES:
            reason = f"margin:{row.get('marginAsset')}"
        else:
            filters = {f.get("filterType"): f for f in row.get("filters", [])}
            found.append(Instrument(
                exchange=NAME, symbol=row["symbol"], base=row["baseAsset"], quote=row["quoteAsset"],
                instrument=f"{row['baseAsset']}-{row['quoteAsset']}-PERP", status=row["status"],
                contract_type=row["contractType"],
                tick_size=filters.get("PRICE_FILTER", {}).get("tickSize"),
                lot_size=filters.get("LOT_SIZE", {}).get("stepSize"),
                listed_ms=row.get("onboardDate")))
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return Discovery(found, skipped, None)


_unified_cache: dict[str, str] = {}


def unified(symbol: str) -> str:
    inst = _unified_cache.get(symbol)
    if inst is None:
        for quote in _QUOTES:
            if symbol.endswith(quote) and len(symbol) > len(quote):
                inst = f"{symbol[:-len(quote)]}-{quote}-PERP"
                break
        else:
            inst = f"{symbol}-PERP"
        _unified_cache[symbol] = inst
    return inst


def streams_for(inst: Instrument, datasets) -> list[Stream]:
    by_key: dict[str, Stream] = {}
    for ds in datasets:
        if ds not in _CHANNELS:
            continue
        suffix, path, cadence = _CHANNELS[ds]
        key = f"{inst.symbol.lower()}@{suffix}"
        prev = by_key.get(key)
        by_key[key] = Stream(key, inst.symbol, suffix, (prev.datasets if prev else ()) + (ds,), path, cadence)
    return list(by_key.values())


def plan_connections(streams: list[Stream], max_per_conn: int = MAX_STREAMS_PER_CONNECTION):
    return split_by_path(NAME, streams, max_per_conn)


def _requests(method: str, streams: list[Stream], first_id: int):
    out = []
    for i, part in enumerate(chunked(streams, PARAMS_PER_REQUEST)):
        keys = tuple(s.key for s in part)
        out.append((ujson.dumps({"method": method, "params": list(keys), "id": first_id + i}),
                    first_id + i, keys))
    return out


def subscribe_messages(streams: list[Stream], first_id: int):
    return _requests("SUBSCRIBE", streams, first_id)


def unsubscribe_messages(streams: list[Stream], first_id: int):
    return _requests("UNSUBSCRIBE", streams, first_id)


def _event(data: dict, stream: str, ts_recv: int, conn_id: int, recv_seq: int, sink) -> None:
    e = data["e"]
    s = data["s"]
    inst = _unified_cache.get(s) or unified(s)
    if e == "bookTicker":
        sink.bbo.append((s, inst, data.get("T"), data.get("E"), ts_recv, conn_id, recv_seq,
                         data.get("b"), data.get("B"), data.get("a"), data.get("A"), data.get("u"), None))
    elif e == "aggTrade":
        f, l = data.get("f"), data.get("l")
        sink.trades.append((s, inst, data.get("T"), data.get("E"), ts_recv, conn_id, recv_seq,
                            data["a"], data["p"], data["q"], "sell" if data["m"] else "buy",
                            f, l, l - f + 1 if f is not None and l is not None else None, None))
    elif e == "trade":
        sink.trades.append((s, inst, data.get("T"), data.get("E"), ts_recv, conn_id, recv_seq,
                            data["t"], data["p"], data["q"], "sell" if data["m"] else "buy",
                            None, None, None, None))
    elif e == "markPriceUpdate":
        E = data.get("E")
        sink.mark_price.append((s, inst, None, E, ts_recv, conn_id, recv_seq,
                                data["p"], data.get("i"), data.get("P")))
        sink.funding.append((s, inst, None, E, ts_recv, conn_id, recv_seq,
                             data.get("r"), data.get("T"), None, None, None))
    else:
        raise FrameError(f"unknown event {e!r} on {stream}")


def parse(item: tuple, sink) -> Control | None:
    """One queue item -> rows appended to sink, or a Control for a non-data frame."""
    _, conn_id, recv_seq, ts_recv, payload = item
    msg = ujson.loads(payload)
    if type(msg) is not dict:
        raise FrameError("not a JSON object")
    data = msg.get("data")
    try:
        if data is not None:
            stream = msg["stream"]
            if type(data) is list:      # all-market array: all items or none
                part = RowSink()
                for d in data:
                    _event(d, stream, ts_recv, conn_id, recv_seq, part)
                sink.extend(part)
            else:
                _event(data, stream, ts_recv, conn_id, recv_seq, sink)
            sink.last_seen[stream] = ts_recv
            return None
        if "e" in msg and "s" in msg:   # raw (non-combined) mode
            stream = f"{msg['s'].lower()}@{msg['e']}"
            _event(msg, stream, ts_recv, conn_id, recv_seq, sink)
            sink.last_seen[stream] = ts_recv
            return None
    except (KeyError, TypeError, AttributeError) as e:
        raise FrameError(f"malformed data frame: {e!r}") from None
    if "result" in msg and "id" in msg:
        return Control("ack" if msg["result"] is None else "info", msg["id"], ujson.dumps(msg["result"]))
    err = msg.get("error")
    if type(err) is dict:           # the routed endpoints wrap it: {"error":{"code","msg"},"id"}
        return Control("error", msg.get("id"), f"{err.get('code')}: {err.get('msg', '')}")
    if "code" in msg:
        return Control("error", msg.get("id"), f"{msg['code']}: {msg.get('msg', '')}")
    raise FrameError("unrecognised message")


def urgent_control(payload) -> Control | None:
    return None


# ---- batch parsing: the writer's fast path (declared per stream kind: app/exchanges/batch.py) ---
# Kinds are parsed separately because their shapes clash (`a` is the ask price of a bookTicker
# but the id of an aggTrade). Other kinds, control messages and odd frames go to `parse`.

def _kind(event: str, fields: dict, required: tuple, rows: dict) -> B.Kind:
    return B.Kind(json={"stream": B.STRING, "data": pa.struct(list(fields.items()))},
                  valid=_all_valid(required) & (B.F("data.e") == event),
                  symbol=B.F("data.s"), stream=B.F("stream"), rows=rows)


def _all_valid(names: tuple):
    expr = B.F("data." + names[0]).is_valid()
    for name in names[1:]:
        expr = expr & B.F("data." + name).is_valid()
    return expr


_S, _I = B.STRING, B.INT
_MARK = _kind("markPriceUpdate", {"e": _S, "E": _I, "s": _S, "p": _S, "P": _S, "i": _S, "r": _S, "T": _I},
              ("s", "p"), {
                  "mark_price": B.Rows({"ts_exchange": "data.E", "mark_px": "data.p", "index_px": "data.i",
                                        "est_settle_px": "data.P"}),
                  "funding": B.Rows({"ts_exchange": "data.E", "funding_rate": "data.r",
                                     "next_funding_time": "data.T"})})
_BATCH = {  # stream suffix -> Kind (the same mapping as `_event`)
    "bookTicker": _kind("bookTicker", {"e": _S, "u": _I, "s": _S, "b": _S, "B": _S, "a": _S, "A": _S,
                                       "T": _I, "E": _I}, ("s",), {
        "bbo": B.Rows({"ts_event": "data.T", "ts_exchange": "data.E", "bid_px": "data.b",
                       "bid_sz": "data.B", "ask_px": "data.a", "ask_sz": "data.A", "update_id": "data.u"})}),
    "aggTrade": _kind("aggTrade", {"e": _S, "E": _I, "a": _I, "s": _S, "p": _S, "q": _S, "f": _I, "l": _I,
                                   "T": _I, "m": B.BOOL}, ("s", "a", "p", "q", "m"), {
        "trades": B.Rows({"ts_event": "data.T", "ts_exchange": "data.E", "trade_id": "data.a",
                          "price": "data.p", "size": "data.q",
                          "side": (pc.if_else(B.F("data.m"), pa.scalar("sell"), pa.scalar("buy")), _S),
                          "first_trade_id": "data.f", "last_trade_id": "data.l",
                          "trade_count": (B.F("data.l") - B.F("data.f") + pa.scalar(1), _I)})}),
    "markPrice@1s": _MARK,
    "markPrice": _MARK,
}
_STREAM = r'^\{"stream":"[^"@]+@(?P<kind>[^"]+)","data":\{'


def parse_batch(cols) -> BatchResult:
    """schema.FrameColumns of a chunk of frames -> BatchResult (see app/exchanges/batch.py)."""
    return B.parse_batch(cols, B.kinds_by_regex(cols, _STREAM), _BATCH, NAME, unified)


# ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) -------
# Weights are Binance's (2400 per minute per IP, shared with everything else on the IP).

def alignment_request(symbol: str) -> tuple[str, dict, int]:
    """(path, params, weight) of the latest aggregated trade: its `a` continues the WS aggTrade ids."""
    return "/fapi/v1/aggTrades", {"symbol": symbol, "limit": 1}, 20


def parse_recent_trades(body) -> list[tuple[str, int]]:
    """[(trade id, trade time ms)], oldest first (Binance answers ascending)."""
    if type(body) is not list:
        raise ValueError(f"aggTrades: unexpected answer {str(body)[:200]}")
    return [(str(t["a"]), int(t["T"])) for t in body]


def parse_latest_trade(body) -> tuple[str, int] | None:
    trades = parse_recent_trades(body)
    return trades[-1] if trades else None


def time_request() -> tuple[str, dict, int]:
    return "/fapi/v1/time", {}, 1


def parse_server_time(body) -> int:
    """Server time in ns (Binance sends ms)."""
    return int(body["serverTime"]) * 1_000_000


def rest_throttle(status: int, headers: dict, body, now: float) -> float | None:
    """Seconds to stop calling this exchange after this answer, or None if it is no rate limit.
    429 = over the weight limit (the window is the calendar minute); 418 = banned (2 min - 3 days):
    a Retry-After header wins when present (headers have lower-case names)."""
    if status not in (429, 418):
        return None
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass
    return 120.0 if status == 418 else 60.0 - now % 60.0 + 1.0
