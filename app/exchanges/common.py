"""What the three adapters share: the base class of their common code, and small protocol helpers.

Why one place: the three exchanges differ in their facts (names, limits, frame layouts, the channel
table) and in little else; the code around the facts (symbol-name memo, streams from the table,
numbered subscribe requests, the batch path, Retry-After, counting what
discovery skips) was written three times and kept in step by hand. An exchange class sets its
constants, its `_CHANNELS` table and the few methods whose protocol differs; the rest is here.
Sans-I/O.
"""
from __future__ import annotations

import math

import ujson
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from app.exchanges import BatchResult, ConnectionPlan, Control, FrameError, Instrument, Stream
from app.exchanges import batch as B
from app.exchanges.channels import Table

if TYPE_CHECKING:
    from app.schema import FrameColumns


class AdapterBase:
    """The code every adapter shares. State (per instance, made by `app.exchanges.create`): the
    unified name of every symbol seen, what the batch path learns (instrument arrays, field
    order), and the per-frame row builders bound to the names."""

    NAME: str
    MAX_STREAMS_PER_CONNECTION: int
    _CHANNELS: Table                     # the exchange's channel table (app/exchanges/channels.py)

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._batch = B.Memo(self.unified)
        self._rows = self._CHANNELS.builders(self._names, self.unified)

    @staticmethod
    def _unify(symbol: str) -> str:
        """The exchange's naming rule (no memo)."""
        raise NotImplementedError

    @staticmethod
    def _stream_key(channel: str, symbol: str) -> str:
        raise NotImplementedError

    def unified(self, symbol: str) -> str:
        name = self._names.get(symbol)
        if name is None:
            name = self._names[symbol] = self._unify(symbol)
        return name

    # ---- connections and subscriptions ---------------------------------------------------------
    def ws_url(self, base: str, path: str, streams: Sequence[Stream] = ()) -> str:
        return f"{base.rstrip('/')}{path}"

    def streams_for(self, inst: Instrument, datasets: Iterable[str]) -> list[Stream]:
        """One Stream per channel the table subscribes for those datasets; a channel feeding
        several of them (Bybit tickers) is one stream naming them all, in the order asked."""
        by_key: dict[str, Stream] = {}
        for ds in datasets:
            ch = self._CHANNELS.subscribed.get(ds)
            if ch is None:
                continue
            key = self._stream_key(ch.name, inst.symbol)
            prev = by_key.get(key)
            by_key[key] = Stream(key, inst.symbol, ch.name, (prev.datasets if prev else ()) + (ds,),
                                 ch.path or self._CHANNELS.frame.path, ch.cadence)
        return list(by_key.values())

    def plan_connections(self, streams: list[Stream], max_per_conn: int | None = None) -> list[ConnectionPlan]:
        return split_by_path(self.NAME, streams, max_per_conn or self.MAX_STREAMS_PER_CONNECTION)

    def subscribe_messages(self, streams: list[Stream], first_id: int) -> list[tuple[str, int, tuple[str, ...]]]:
        return numbered(self._request_parts(streams), first_id, lambda part, rid: self._request("subscribe", part, rid))

    def unsubscribe_messages(self, streams: list[Stream], first_id: int) -> list[tuple[str, int, tuple[str, ...]]]:
        return numbered(self._request_parts(streams), first_id, lambda part, rid: self._request("unsubscribe", part, rid))

    def _request_parts(self, streams: list[Stream]) -> list[list[Stream]]:
        """The exchange's cut of streams into requests."""
        raise NotImplementedError

    def _request(self, op: str, part: list[Stream], rid: int) -> str:
        """The text of one (un)subscribe request (op: "subscribe" | "unsubscribe")."""
        raise NotImplementedError

    # ---- frames ----------------------------------------------------------------------------------
    def parse_batch(self, cols: FrameColumns) -> BatchResult:
        return B.parse_batch(cols, B.kinds_by_regex(cols, self._CHANNELS.opens), self._CHANNELS.kinds,
                             self.NAME, self._batch)

    def urgent_control(self, payload: bytes | str) -> Control | None:
        return None

    # ---- REST --------------------------------------------------------------------------------------
    def parse_recent_trades(self, body: object) -> list[tuple[str, int]]:
        raise NotImplementedError


# Exceptions a frame of the wrong shape raises inside a parser (a missing key, a list where an
# object was expected...): the parsers turn them into FrameError, one frame counted as unparsed.
SHAPE_ERRORS = (KeyError, TypeError, IndexError, AttributeError, ValueError)


def json_object(payload) -> dict:
    """A frame's JSON, which must be an object (anything else is a FrameError)."""
    msg = ujson.loads(payload)
    if type(msg) is not dict:
        raise FrameError("not a JSON object")
    return msg


def chunks(items: Sequence, max_count: float = math.inf, max_size: float = math.inf,
           size: Callable[[object], int] | None = None) -> list[list]:
    """Consecutive parts of at most max_count items and max_size total size (an item larger
    than max_size is a part of its own)."""
    parts, part, total = [], [], 0
    for item in items:
        n = size(item) if size is not None else 0
        if part and (len(part) >= max_count or total + n > max_size):
            parts.append(part)
            part, total = [], 0
        part.append(item)
        total += n
    if part:
        parts.append(part)
    return parts


def split_by_path(exchange: str, streams: list[Stream], max_per_conn: int) -> list[ConnectionPlan]:
    """Group streams by WebSocket path, then cut each group into connections of max_per_conn."""
    by_path: dict[str, list[Stream]] = {}
    for s in streams:
        by_path.setdefault(s.path, []).append(s)
    return [ConnectionPlan(exchange, path, part)
            for path, group in by_path.items() for part in chunks(group, max_per_conn)]


def numbered(parts: list[list[Stream]], first_id: int,
             text: Callable[[list[Stream], int], str]) -> list[tuple[str, int, tuple[str, ...]]]:
    """[(text, request id, stream keys)] with ids first_id, first_id + 1, ... (ACKs name the id)."""
    return [(text(part, first_id + i), first_id + i, tuple(s.key for s in part)) for i, part in enumerate(parts)]


def request_id(rid: object) -> object:
    """Our request id back from an ACK: ids go out as the decimal text of the int (Bybit req_id,
    OKX id accept text only)."""
    if type(rid) is str and rid.isdigit():
        return int(rid)
    return rid or None


def retry_after(headers: dict) -> float | None:
    """Seconds of a Retry-After header (names lower-case), when it holds a number."""
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        return None


def listing(rows: Iterable[dict], instrument: Callable[[dict], Instrument | str]) -> tuple[list[Instrument], dict[str, int]]:
    """Discovery rows -> (instruments, {reason: count} of the rows skipped). `instrument(row)`
    gives an Instrument, or the reason it is not one we record (inverse, dated, not trading...)."""
    found, skipped = [], {}
    for row in rows:
        got = instrument(row)
        if isinstance(got, str):
            skipped[got] = skipped.get(got, 0) + 1
        else:
            found.append(got)
    return found, skipped

