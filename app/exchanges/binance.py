"""Binance USD-M futures: protocol only (see shared/exchanges/binance.md).

Routed entry points since 2026: bookTicker lives on `/public`, aggTrade and markPrice on
`/market`; a stream sent to the wrong one is ACKed and then silent, so the path is part of each
Stream. We connect to `<path>/stream` (combined mode: every frame names its stream) and
SUBSCRIBE in chunks; Binance counts every inbound message against 10/s per connection.
No open-interest stream exists on USD-M WebSocket: `open_interest` is never produced here.

Channels (stream `<symbol>@<channel>`; the data object's `e` names the event; table: CHANNELS):

    bbo                  bookTicker    /public   event driven
    trades               aggTrade      /market   event driven (`a` is +1 per symbol: GAP_RULES)
    mark_price, funding  markPrice@1s  /market   every 1 s (one event feeds both datasets)
    (trades)             trade         not subscribed; parsed when received (recorded captures hold it)

Rows (one per event, as received):

- bookTicker -> bbo: ts_event = `T` (transaction time), ts_exchange = `E`, bid/ask `b B a A`,
  update_id = `u`; seq null.
- aggTrade -> trades: trade_id = `a` (required: the 2019 frames without it are refused, never
  given an invented id), price `p`, size `q`, side = the taker's: `m` (buyer is maker) true ->
  "sell"; first/last trade id `f`/`l`, trade_count = l - f + 1 (null unless both are sent).
- trade -> trades: trade_id = `t`, the same otherwise; no aggregation ids.
- markPriceUpdate -> mark_price (mark_px `p`, index_px `i`, est_settle_px `P`) and funding
  (funding_rate `r`, next_funding_time `T`, the settlement `r` applies at); ts_exchange = `E`,
  ts_event null (the event has no separate time).
- `!bookTicker` / `!markPrice@arr` (all-market) frames carry a list of events: all rows or none.
  Raw (non-combined) frames are the event itself; their stream key is `<s>@<e>`.
"""
from __future__ import annotations

from collections.abc import Sequence

import ujson

from app.exchanges import (Control, Discovery, FrameError, Instrument, Keepalive, RowSink, SequenceRule,
                           Stream)
from app.exchanges.channels import INT, STR, Channel, Frame, Table, flag, get, need, span
from app.exchanges.common import SHAPE_ERRORS, AdapterBase, chunks, json_object, listing, retry_after

PARAMS_PER_REQUEST = 100                      # streams per SUBSCRIBE request
_QUOTES = ("USDT", "USDC")

_EVENT = Frame(opens=r'^\{"stream":"[^"@]+@(?P<kind>[^"]+)","data":\{', envelope={"stream": STR},
               key=("stream",), symbol=need("s"), event="e")
CHANNELS = Table("binance", _EVENT, [
    Channel("bookTicker", event="bookTicker", path="/public", rows={"bbo": {
        "ts_event": get("T", INT), "ts_exchange": get("E", INT), "bid_px": get("b"), "bid_sz": get("B"),
        "ask_px": get("a"), "ask_sz": get("A"), "update_id": get("u", INT)}}),
    Channel("aggTrade", event="aggTrade", path="/market", rows={"trades": {
        "ts_event": get("T", INT), "ts_exchange": get("E", INT), "trade_id": need("a", INT),
        "price": need("p"), "size": need("q"), "side": flag("m", "sell", "buy"),
        "first_trade_id": get("f", INT), "last_trade_id": get("l", INT), "trade_count": span("f", "l")}}),
    Channel("trade", event="trade", subscribed=False, rows={"trades": {
        "ts_event": get("T", INT), "ts_exchange": get("E", INT), "trade_id": need("t", INT),
        "price": need("p"), "size": need("q"), "side": flag("m", "sell", "buy")}}),
    Channel("markPrice@1s", event="markPriceUpdate", also=("markPrice",), path="/market", cadence=1.0, rows={
        "mark_price": {"ts_exchange": get("E", INT), "mark_px": need("p"), "index_px": get("i"),
                       "est_settle_px": get("P")},
        "funding": {"ts_exchange": get("E", INT), "funding_rate": get("r"), "next_funding_time": get("T", INT)}}),
])


class BinanceAdapter(AdapterBase):
    NAME = "binance"
    KEEPALIVE = Keepalive("protocol", "", 30.0)   # server pings every 3 min; our pings prove liveness
    MAX_CONNECTION_AGE_S = 23.5 * 3600            # the server closes at 24 h: rotate before
    CONNECT_INTERVAL_S = 0.2                      # connection rate per IP unconfirmed: stay modest
    SUBSCRIBE_INTERVAL_S = 0.25                   # <= 10 inbound messages/s, pings included
    SUBSCRIBE_IN_URL = True                       # initial streams go in the URL; SUBSCRIBE for changes
    MAX_STREAMS_PER_CONNECTION = 200              # documented 1024 (2026) / 200 (older): be safe
    URGENT_SCREEN = None                          # no in-band event must bypass the writer
    GAP_RULES = {"trades": SequenceRule("trade_id")}   # aggTrade `a` is +1 per symbol
    UNSUPPORTED_DATASETS = {"open_interest": "Binance USD-M publishes no open-interest WebSocket stream"}
    MAPPED_FIELDS = CHANNELS.mapped_fields
    _CHANNELS = CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self._by_event = {CHANNELS.channels[name].event: rows for name, rows in self._rows.items()}

    @staticmethod
    def _unify(symbol: str) -> str:
        for quote in _QUOTES:
            if symbol.endswith(quote) and len(symbol) > len(quote):
                return f"{symbol[:-len(quote)]}-{quote}-PERP"
        return f"{symbol}-PERP"

    @staticmethod
    def _stream_key(channel: str, symbol: str) -> str:
        return f"{symbol.lower()}@{channel}"

    def ws_url(self, base: str, path: str, streams: Sequence[Stream] = ()) -> str:
        """`<path>/stream?streams=a/b/c`: the documented combined form (frames name their stream).
        A bare `/stream` followed by SUBSCRIBE is not documented for the routed paths."""
        return f"{base.rstrip('/')}{path}/stream?streams=" + "/".join(s.key for s in streams)

    def discovery_request(self, cursor: str | None) -> tuple[str, dict]:
        return "/fapi/v1/exchangeInfo", {}

    def parse_discovery(self, body: dict) -> Discovery:
        if not isinstance(body, dict) or not isinstance(body.get("symbols"), list):
            raise ValueError(f"exchangeInfo without symbols: {str(body)[:200]}")
        return Discovery(*listing(body.get("symbols", []), _instrument), None)

    def _request_parts(self, streams: list[Stream]) -> list[list[Stream]]:
        return chunks(streams, PARAMS_PER_REQUEST)

    def _request(self, op: str, part: list[Stream], rid: int) -> str:
        return ujson.dumps({"method": op.upper(), "params": [s.key for s in part], "id": rid})

    def parse(self, item: tuple, sink: RowSink) -> Control | None:
        _, conn_id, recv_seq, ts_recv, payload = item
        msg = json_object(payload)
        data = msg.get("data")
        by_event = self._by_event
        try:
            if data is not None:
                stream = msg["stream"]
                if type(stream) is not str:      # checked first: a frame is all rows or none
                    raise FrameError(f"stream is {type(stream).__name__}, not a string")
                if type(data) is list:      # all-market array: all items or none
                    part = RowSink()
                    for d in data:
                        rows = by_event.get(d["e"]) or _unknown(d, stream)
                        rows(msg, d, ts_recv, conn_id, recv_seq, part)
                    sink.extend(part)
                else:
                    rows = by_event.get(data["e"]) or _unknown(data, stream)
                    rows(msg, data, ts_recv, conn_id, recv_seq, sink)
                sink.last_seen[stream] = ts_recv
                return None
            if "e" in msg and "s" in msg:   # raw (non-combined) mode
                stream = f"{msg['s'].lower()}@{msg['e']}"
                rows = by_event.get(msg["e"]) or _unknown(msg, stream)
                rows(msg, msg, ts_recv, conn_id, recv_seq, sink)
                sink.last_seen[stream] = ts_recv
                return None
        except FrameError:
            raise
        except SHAPE_ERRORS as e:
            raise FrameError(f"malformed data frame: {e!r}") from None
        if "result" in msg and "id" in msg:
            return Control("ack" if msg["result"] is None else "info", msg["id"], ujson.dumps(msg["result"]))
        err = msg.get("error")
        if type(err) is dict:           # the routed endpoints wrap it: {"error":{"code","msg"},"id"}
            return Control("error", msg.get("id"), f"{err.get('code')}: {err.get('msg', '')}")
        if "code" in msg:
            return Control("error", msg.get("id"), f"{msg['code']}: {msg.get('msg', '')}")
        raise FrameError("unrecognised message")

    # ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) ---
    # Weights are Binance's (2400 per minute per IP, shared with everything else on the IP).

    def alignment_request(self, symbol: str) -> tuple[str, dict, int]:
        """The latest aggregated trade: its `a` continues the WS aggTrade ids."""
        return "/fapi/v1/aggTrades", {"symbol": symbol, "limit": 1}, 20

    def parse_recent_trades(self, body: object) -> list[tuple[str, int]]:
        """Binance answers oldest first."""
        if type(body) is not list:
            raise ValueError(f"aggTrades: unexpected answer {str(body)[:200]}")
        return [(str(t["a"]), int(t["T"])) for t in body]

    def time_request(self) -> tuple[str, dict, int]:
        return "/fapi/v1/time", {}, 1

    def parse_server_time(self, body: object) -> int:
        return int(body["serverTime"]) * 1_000_000      # Binance sends ms

    def rest_throttle(self, status: int, headers: dict, body: object, now: float) -> float | None:
        """429 = over the weight limit (the window is the calendar minute); 418 = banned (2 min -
        3 days): a Retry-After header wins when present."""
        if status not in (429, 418):
            return None
        ra = retry_after(headers)
        if ra is not None:
            return ra
        return 120.0 if status == 418 else 60.0 - now % 60.0 + 1.0


def _unknown(data: dict, stream: str):
    raise FrameError(f"unknown event {data['e']!r} on {stream}")


def _instrument(row: dict) -> Instrument | str:
    if row.get("contractType") != "PERPETUAL":
        return f"contract_type:{row.get('contractType') or 'none'}"
    if row.get("status") != "TRADING":
        return f"status:{row.get('status')}"
    if row.get("marginAsset") not in _QUOTES or row.get("quoteAsset") not in _QUOTES:
        return f"margin:{row.get('marginAsset')}"
    filters = {f.get("filterType"): f for f in row.get("filters", [])}
    return Instrument(
        exchange="binance", symbol=row["symbol"], base=row["baseAsset"], quote=row["quoteAsset"],
        instrument=f"{row['baseAsset']}-{row['quoteAsset']}-PERP", status=row["status"],
        contract_type=row["contractType"],
        tick_size=filters.get("PRICE_FILTER", {}).get("tickSize"),
        lot_size=filters.get("LOT_SIZE", {}).get("stepSize"),
        listed_ms=row.get("onboardDate"))
