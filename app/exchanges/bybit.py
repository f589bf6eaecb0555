"""Bybit v5 linear perpetuals (USDT and USDC settled): protocol only (see shared/exchanges/bybit.md).

One WebSocket path, `/v5/public/linear`, carries everything. Topics (= stream keys):

    bbo                               orderbook.1.<S>   (10 ms; re-sent after 3 s unchanged, same `u`)
    trades                            publicTrade.<S>   (event driven, <= 1024 trades per frame)
    mark_price, funding, open_interest  tickers.<S>     (one topic feeds all three; snapshot + deltas)

Keepalive is the client's JSON `{"op":"ping"}` every 20 s (the server cuts after 10 min without
ping-pong or data); there is no forced periodic close. Subscribe requests carry at most
ARGS_PER_REQUEST topics: the docs set no per-request limit for futures, but one bad topic fails the
whole request, so small requests keep the damage of one delisted symbol small. A connection holds at
most MAX_STREAMS_PER_CONNECTION topics and its args at most ARGS_CHARS_PER_CONNECTION characters
(Bybit: 21,000 per connection; counted conservatively as the JSON text of the args list).

Rows (one per message item, as received; no state is kept between frames; table: CHANNELS):

- orderbook.1: one `bbo` row per frame, snapshot or delta, resends included (same `u`):
  bid/ask = the FIRST entry of `b`/`a` exactly as sent, an empty side gives nulls.
  ts_event = `cts` (absent in frames before ~2024 -> null), ts_exchange = `ts`, update_id = `u`,
  seq = `seq`. Since 2025-03 L1 is snapshot-only, so a row is the top of book. Older captures hold
  L1 `delta` frames whose entries are changes (size "0" = level removed, empty side = unchanged,
  possibly two entries per side): their row is a verbatim projection of the delta's first entries,
  not a book state. Nothing is merged or invented; the exact frame is in `frames`.
- publicTrade: one `trades` row per `data` item: trade_id = `i` (UUID), price `p`, size `v` (base
  coin), side = `S` "Buy"/"Sell" -> "buy"/"sell" (taker side; any other value refuses the frame),
  ts_event = `T`, ts_exchange = `ts`, is_block = `BT`; first/last trade id and count are null
  (Bybit ids are UUIDs). A frame's items give all their rows or none.
- tickers (snapshot and delta alike, never merged; ts_event null, ts_exchange = `ts`):
  * `mark_price` row only when the frame carries a non-empty `markPrice` (mark_px is non-nullable), with
    index_px = `indexPrice` when the same frame carries it. A delta carrying only `indexPrice` gives
    no row: a mark price would have to be invented from an earlier frame. That index value is
    kept only in `frames`.
  * `funding` row when any of `fundingRate`, `nextFundingTime`, `fundingIntervalHour` is present:
    funding_rate, next_funding_time (the upcoming settlement `fundingRate` applies at),
    funding_interval_h ("" in either -> null); funding_time and next_funding_rate are null (Bybit
    sends neither).
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

import ujson

from app.exchanges import ConnectionPlan, Control, Discovery, FrameError, Instrument, Keepalive, RowSink, Stream
from app.exchanges.channels import (BOOL, INT, STR, Channel, Frame, Rows, Table, blank, env, first, get, lookup,
                                    need, nonblank, present)
from app.exchanges.common import (SHAPE_ERRORS, AdapterBase, chunks, json_object, listing, request_id,
                                  retry_after, split_by_path)

PATH = "/v5/public/linear"
ARGS_CHARS_PER_CONNECTION = 21_000          # documented limit on one connection's args
ARGS_PER_REQUEST = 10                       # one bad topic fails its whole request
_SETTLE = ("USDT", "USDC")

_TOPIC = Frame(opens=r'^\{"topic":"(?P<kind>{kinds})\.[^"]+"', envelope={"topic": STR, "ts": INT, "cts": INT},
               key=("topic",), path=PATH)
CHANNELS = Table("bybit", _TOPIC, [
    # documented: the snapshot is re-sent after 3 s unchanged
    Channel("orderbook.1", symbol=need("s"), cadence=3.0, rows={"bbo": {
        "ts_event": env("cts"), "ts_exchange": env("ts"),
        "bid_px": first("b", 0), "bid_sz": first("b", 1), "ask_px": first("a", 0), "ask_sz": first("a", 1),
        "update_id": get("u", INT), "seq": get("seq", INT)}}),
    Channel("publicTrade", symbol=need("s"), many=True, rows={"trades": {
        "ts_event": get("T", INT), "ts_exchange": env("ts"), "trade_id": need("i"), "price": need("p"),
        "size": need("v"), "side": lookup("S", {"Buy": "buy", "Sell": "sell"}), "is_block": get("BT", BOOL)}}),
    Channel("tickers", symbol=need("symbol"), cadence=1.0, rows={
        "mark_price": Rows({"ts_exchange": env("ts"), "mark_px": get("markPrice"), "index_px": get("indexPrice")},
                           when=nonblank("markPrice")),
        "funding": Rows({"ts_exchange": env("ts"), "funding_rate": get("fundingRate"),
                         "next_funding_time": blank("nextFundingTime"),
                         "funding_interval_h": blank("fundingIntervalHour")},
                        when=present("fundingRate", "nextFundingTime", "fundingIntervalHour")),
        "open_interest": Rows({"ts_exchange": env("ts"), "open_interest": get("openInterest"),
                               "open_interest_value": get("openInterestValue")},
                              when=present("openInterest", "openInterestValue"))}),
])


class BybitAdapter(AdapterBase):
    NAME = "bybit"
    KEEPALIVE = Keepalive("text", '{"op":"ping"}', 20.0)
    MAX_CONNECTION_AGE_S = None                 # no documented forced close
    CONNECT_INTERVAL_S = 0.6                    # <= 500 new connections per 5 min per domain
    SUBSCRIBE_INTERVAL_S = 0.2                  # WS message rate undocumented; ACKs take ~200 ms
    SUBSCRIBE_IN_URL = False
    MAX_STREAMS_PER_CONNECTION = 200
    URGENT_SCREEN = None                        # no in-band event must bypass the writer
    GAP_RULES: dict = {}
    UNSUPPORTED_DATASETS: dict = {}
    MAPPED_FIELDS = CHANNELS.mapped_fields
    _CHANNELS = CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self._by_prefix = tuple((name + ".", rows) for name, rows in self._rows.items())

    @staticmethod
    def _unify(symbol: str) -> str:
        """`BTCUSDT` -> `BTC-USDT-PERP`, `BTCPERP` -> `BTC-USDC-PERP`; anything else (dated futures
        such as `BTCUSDT-14AUG26`) is not a perpetual and keeps its own name."""
        if symbol.endswith("USDT") and len(symbol) > 4:
            return f"{symbol[:-4]}-USDT-PERP"
        if symbol.endswith("PERP") and len(symbol) > 4:
            return f"{symbol[:-4]}-USDC-PERP"
        if symbol.endswith("USDC") and len(symbol) > 4:
            return f"{symbol[:-4]}-USDC-PERP"
        return symbol

    @staticmethod
    def _stream_key(channel: str, symbol: str) -> str:
        return f"{channel}.{symbol}"

    def discovery_request(self, cursor: str | None) -> tuple[str, dict]:
        params = {"category": "linear", "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        return "/v5/market/instruments-info", params

    def parse_discovery(self, body: dict) -> Discovery:
        if body.get("retCode", 0) != 0:
            raise ValueError(f"instruments-info retCode {body.get('retCode')}: {body.get('retMsg')}")
        result = body.get("result") or {}
        return Discovery(*listing(result.get("list", []), _instrument), result.get("nextPageCursor") or None)

    def plan_connections(self, streams: list[Stream], max_per_conn: int | None = None) -> list[ConnectionPlan]:
        """Cut by path and topic count, then further so that no connection's args exceed 21,000 chars."""
        return [ConnectionPlan(self.NAME, plan.path, part)
                for plan in split_by_path(self.NAME, streams, max_per_conn or self.MAX_STREAMS_PER_CONNECTION)
                for part in chunks(plan.streams, max_size=ARGS_CHARS_PER_CONNECTION - 2, size=_arg_chars)]

    def _request_parts(self, streams: list[Stream]) -> list[list[Stream]]:
        return chunks(streams, ARGS_PER_REQUEST)

    def _request(self, op: str, part: list[Stream], rid: int) -> str:
        return ujson.dumps({"op": op, "args": [s.key for s in part], "req_id": str(rid)})

    def parse(self, item: tuple, sink: RowSink) -> Control | None:
        _, conn_id, recv_seq, ts_recv, payload = item
        msg = json_object(payload)
        topic = msg.get("topic")
        if topic is None:
            return _control(msg)
        try:
            data = msg["data"]
            for prefix, rows in self._by_prefix:
                if topic.startswith(prefix):
                    break
            else:
                raise FrameError(f"unknown topic {topic!r}")
            rows(msg, data, ts_recv, conn_id, recv_seq, sink)
        except FrameError:
            raise
        except SHAPE_ERRORS as exc:   # wrong shapes inside a frame
            raise FrameError(f"malformed {topic!r} frame: {exc!r}") from None
        sink.last_seen[topic] = ts_recv
        return None

    # ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) ---
    # Trade ids are UUIDs, so a loss cannot be computed from two ids: we fetch the latest 1000
    # trades and count those between the last trade seen before the disconnect and the first one
    # after. Bybit limits per IP (600 requests / 5 s, 403 = banned >= 10 min) and per endpoint
    # (retCode 10006).

    def alignment_request(self, symbol: str) -> tuple[str, dict, int]:
        return "/v5/market/recent-trade", {"category": "linear", "symbol": symbol, "limit": 1000}, 1

    def parse_recent_trades(self, body: object) -> list[tuple[str, int]]:
        """Bybit answers newest first."""
        if type(body) is not dict or body.get("retCode", 0) != 0:
            raise ValueError(f"recent-trade: {str(body)[:200]}")
        rows = (body.get("result") or {}).get("list") or []
        return [(str(t["execId"]), int(t["time"])) for t in reversed(rows)]

    def time_request(self) -> tuple[str, dict, int]:
        return "/v5/market/time", {}, 1

    def parse_server_time(self, body: object) -> int:
        """`timeNano`; `timeSecond` as a fallback."""
        if type(body) is not dict or body.get("retCode", 0) != 0:
            raise ValueError(f"time: {str(body)[:200]}")
        result = body["result"]
        if result.get("timeNano"):
            return int(result["timeNano"])
        return int(result["timeSecond"]) * 1_000_000_000

    def rest_throttle(self, status: int, headers: dict, body: object, now: float) -> float | None:
        """403 = IP limit hit (Bybit says stop for at least 10 minutes); retCode 10006 (HTTP 200) =
        endpoint limit, until X-Bapi-Limit-Reset-Timestamp (ms)."""
        if status == 403:
            return 600.0
        if not (status == 429 or (type(body) is dict and body.get("retCode") == 10006)):
            return None
        ra = retry_after(headers)
        if ra is not None:
            return ra
        reset = headers.get("x-bapi-limit-reset-timestamp")
        if reset:
            try:
                return min(60.0, max(0.1, int(reset) / 1000.0 - now))
            except ValueError:
                pass
        return 1.0


def _arg_chars(stream: Stream) -> int:
    return len(stream.key) + 3          # quotes and a separating comma in the JSON args list


def _control(msg: dict) -> Control:
    op = msg.get("op")
    ret_msg = msg.get("ret_msg") or ""
    rid = request_id(msg.get("req_id"))
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


def _instrument(row: dict) -> Instrument | str:
    if row.get("contractType") != "LinearPerpetual":
        return f"contract_type:{row.get('contractType') or 'none'}"
    if row.get("status") != "Trading":
        return f"status:{row.get('status')}"
    if row.get("settleCoin") not in _SETTLE:
        return f"settle:{row.get('settleCoin')}"
    launch = row.get("launchTime")
    return Instrument(
        exchange="bybit", symbol=row["symbol"], base=row["baseCoin"], quote=row["settleCoin"],
        instrument=f"{row['baseCoin']}-{row['settleCoin']}-PERP", status=row["status"],
        contract_type=row["contractType"],
        tick_size=(row.get("priceFilter") or {}).get("tickSize"),
        lot_size=(row.get("lotSizeFilter") or {}).get("qtyStep"),
        listed_ms=int(launch) if launch else None,
        display_name=row.get("displayName") or None)
