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

Rows (one per `data[]` item, as received, a frame's items all or none; sizes and open interest in
CONTRACTS; table: CHANNELS):

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
import ujson

from app.exchanges import Control, Discovery, FrameError, Instrument, Keepalive, RowSink, SequenceRule, Stream
from app.exchanges.channels import INT, STR, Channel, Frame, Table, blank, env, first, first_id, get, need
from app.exchanges.common import SHAPE_ERRORS, AdapterBase, chunks, json_object, listing, request_id, retry_after

PATH = "/ws/v5/public"
ARGS_PER_REQUEST = 100                            # 480 (un)subscribe requests per hour per connection
ARGS_BYTES_PER_REQUEST = 64 * 1024 - 512          # 64 KB args limit, with room for the envelope
_SETTLE = ("USDT", "USDC")
_PONG = Control("pong")

_ARG = Frame(opens=r'^\{"arg":\{"channel":"(?P<kind>[^"]+)","instId":"[^"]+"\},"data":\[',
             envelope={"arg": pa.struct([("channel", STR), ("instId", STR)])}, key=("arg.channel", "arg.instId"),
             symbol=env("arg.instId", required=True), path=PATH)
CHANNELS = Table("okx", _ARG, [
    # the latest snapshot is re-sent after ~60 s unchanged
    Channel("bbo-tbt", many=True, cadence=60.0, rows={"bbo": {
        "ts_event": get("ts"), "bid_px": first("bids", 0), "bid_sz": first("bids", 1),
        "ask_px": first("asks", 0), "ask_sz": first("asks", 1), "seq": get("seqId", INT)}}),
    Channel("trades", many=True, rows={"trades": {
        "ts_event": get("ts"), "trade_id": need("tradeId"), "price": need("px"), "size": need("sz"),
        "side": need("side"), "first_trade_id": first_id("tradeId", "count"), "last_trade_id": need("tradeId"),
        "trade_count": blank("count")}}),
    Channel("mark-price", many=True, cadence=10.0, rows={"mark_price": {
        "ts_exchange": get("ts"), "mark_px": need("markPx")}}),
    Channel("funding-rate", many=True, cadence=90.0, rows={"funding": {
        "ts_exchange": get("ts"), "funding_rate": get("fundingRate"), "next_funding_time": blank("nextFundingTime"),
        "funding_time": blank("fundingTime"), "next_funding_rate": get("nextFundingRate")}}),
    # every 3 s *when it changes*: silence is normal, so no cadence
    Channel("open-interest", many=True, rows={"open_interest": {
        "ts_exchange": get("ts"), "open_interest": need("oi"), "open_interest_value": get("oiUsd")}}),
])


class OkxAdapter(AdapterBase):
    NAME = "okx"
    KEEPALIVE = Keepalive("text", "ping", 20.0)       # server closes after 30 s of silence
    MAX_CONNECTION_AGE_S = None                       # no documented forced close
    CONNECT_INTERVAL_S = 0.4                          # <= 3 new connections per second per IP
    SUBSCRIBE_INTERVAL_S = 0.25                       # "60014 requests too frequent" rate undocumented
    SUBSCRIBE_IN_URL = False
    MAX_STREAMS_PER_CONNECTION = 200                  # no documented cap on public channels; be modest
    URGENT_SCREEN = b'{"arg"'                         # data frames open so; others may be a notice
    GAP_RULES = {"trades": SequenceRule("last_trade_id", count_column="trade_count")}
    UNSUPPORTED_DATASETS: dict = {}
    MAPPED_FIELDS = CHANNELS.mapped_fields
    _CHANNELS = CHANNELS

    @staticmethod
    def _unify(symbol: str) -> str:
        """`BTC-USDT-SWAP` -> `BTC-USDT-PERP`; a non-SWAP instId keeps its own name."""
        return f"{symbol[:-5]}-PERP" if symbol.endswith("-SWAP") and len(symbol) > 5 else symbol

    @staticmethod
    def _stream_key(channel: str, symbol: str) -> str:
        return f"{channel}:{symbol}"

    def discovery_request(self, cursor: str | None) -> tuple[str, dict]:
        return "/api/v5/public/instruments", {"instType": "SWAP"}   # one page holds all SWAPs

    def parse_discovery(self, body: dict) -> Discovery:
        if str(body.get("code", "0")) != "0":
            raise ValueError(f"instruments code {body.get('code')}: {body.get('msg')}")
        return Discovery(*listing(body.get("data", []), _instrument), None)

    def _request_parts(self, streams: list[Stream]) -> list[list[Stream]]:
        """<= ARGS_PER_REQUEST args and <= ARGS_BYTES_PER_REQUEST bytes of args each."""
        return chunks(streams, ARGS_PER_REQUEST, ARGS_BYTES_PER_REQUEST, _arg_bytes)

    def _request(self, op: str, part: list[Stream], rid: int) -> str:
        return ujson.dumps({"id": str(rid), "op": op, "args": [{"channel": s.channel, "instId": s.symbol} for s in part]})

    def urgent_control(self, payload: bytes | str) -> Control | None:
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

    def parse(self, item: tuple, sink: RowSink) -> Control | None:
        _, conn_id, recv_seq, ts_recv, payload = item
        if payload == b"pong" or payload == "pong":
            return _PONG
        msg = json_object(payload)
        data = msg.get("data")
        if data is not None:
            try:
                arg = msg["arg"]
                channel, inst_id = arg["channel"], arg["instId"]
                rows = self._rows.get(channel)
                if rows is None:
                    raise FrameError(f"unknown channel {channel!r}")
                rows(msg, data, ts_recv, conn_id, recv_seq, sink)
            except FrameError:
                raise
            except SHAPE_ERRORS as exc:   # wrong shapes inside a frame
                raise FrameError(f"malformed data frame: {exc!r}") from None
            sink.last_seen[f"{channel}:{inst_id}"] = ts_recv
            return None
        event = msg.get("event")
        if event is None:
            raise FrameError("unrecognised message")
        return _control(msg, event)

    # ---- post-reconnect alignment (sans-I/O; app/alignment.py does the REST calls, RAM only) ---
    # REST trades are per fill with the same tradeId space as the WS `trades` aggregation (whose
    # tradeId is the last fill), so latest id - last WS id counts the fills missed.

    def alignment_request(self, symbol: str) -> tuple[str, dict, int]:
        return "/api/v5/market/trades", {"instId": symbol, "limit": 1}, 1

    def parse_recent_trades(self, body: object) -> list[tuple[str, int]]:
        """OKX answers newest first."""
        if type(body) is not dict or str(body.get("code", "0")) != "0":
            raise ValueError(f"market/trades: {str(body)[:200]}")
        return [(str(t["tradeId"]), int(t["ts"])) for t in reversed(body.get("data") or [])]

    def time_request(self) -> tuple[str, dict, int]:
        return "/api/v5/public/time", {}, 1

    def parse_server_time(self, body: object) -> int:
        """OKX sends ms as a string."""
        if type(body) is not dict or str(body.get("code", "0")) != "0":
            raise ValueError(f"time: {str(body)[:200]}")
        return int(body["data"][0]["ts"]) * 1_000_000

    def rest_throttle(self, status: int, headers: dict, body: object, now: float) -> float | None:
        """Limits are per endpoint per 2 s; 50011 (rate limit) and 50013 (busy) come as HTTP 429 or
        as HTTP 200."""
        code = str(body.get("code")) if type(body) is dict else None
        if status != 429 and code not in ("50011", "50013"):
            return None
        ra = retry_after(headers)
        return ra if ra is not None else 2.0


def _arg_bytes(stream: Stream) -> int:
    return len(stream.channel) + len(stream.symbol) + 30    # {"channel":"..","instId":".."},


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
    rid = request_id(msg.get("id"))
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


def _instrument(row: dict) -> Instrument | str:
    inst_id = row.get("instId") or ""
    if row.get("instType") != "SWAP":
        return f"inst_type:{row.get('instType')}"
    if row.get("ctType") != "linear":
        return f"ct_type:{row.get('ctType') or 'none'}"
    if inst_id.endswith("_UM-SWAP"):
        return "usd_margined"          # BTC-USD_UM-SWAP: USD / several stable coins
    if row.get("settleCcy") not in _SETTLE:
        return f"settle:{row.get('settleCcy')}"
    if row.get("state") != "live":
        return f"state:{row.get('state')}"
    base = inst_id.split("-", 1)[0]
    listed = row.get("listTime")
    return Instrument(
        exchange="okx", symbol=inst_id, instrument=f"{base}-{row['settleCcy']}-PERP",
        base=base, quote=row["settleCcy"], status=row["state"], contract_type=row["ctType"],
        tick_size=row.get("tickSz") or None, lot_size=row.get("lotSz") or None,
        contract_value=row.get("ctVal") or None,
        contract_multiplier=row.get("ctMult") or None,
        listed_ms=int(listed) if listed else None)
