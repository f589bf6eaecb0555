"""The adapter interface every exchange implements (`Adapter`), its shared types, and the registry.

Adapters are sans-I/O: pure code (and frozen data) that turns a discovery response into
instruments, instruments into streams and subscribe messages, and a received frame into rows.
Threads, sockets, queues and files live elsewhere; the pipeline never asks "which exchange", it
calls the adapter it was given, and every adapter has exactly the shape of `Adapter` (checked by
tests/test_adapters.py: names, signatures, nothing more), so no caller probes for a name.

An adapter is an object (`create(name)`), not a module: what it remembers (the unified name of
each symbol seen, the batch parser's instrument arrays) lives in the instance the composition root
creates, so two collectors in one process, or a test, never share it. What is frozen (constants,
the channel table of app/exchanges/channels.py) stays module-level.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from app.schema import FrameColumns

EXCHANGES = ("binance", "bybit", "okx")


@dataclass(frozen=True)
class Instrument:
    """One tradable linear perpetual as discovery returned it (reference data, never RAW)."""
    exchange: str
    symbol: str            # native symbol as used on the wire
    instrument: str        # unified "<BASE>-<QUOTE>-PERP"
    base: str
    quote: str             # margin/settle currency: USDT or USDC
    status: str
    contract_type: str
    tick_size: str | None = None
    lot_size: str | None = None
    contract_value: str | None = None       # OKX ctVal (contracts -> base units)
    contract_multiplier: str | None = None  # OKX ctMult
    listed_ms: int | None = None
    display_name: str | None = None         # e.g. Bybit "BTCUSDC" for BTCPERP


class Discovery(NamedTuple):
    instruments: list[Instrument]
    skipped: dict[str, int]          # reason -> count (inverse, dated, not trading, ...)
    next_cursor: str | None


@dataclass(frozen=True)
class Stream:
    """One subscription: a topic on one path, feeding one or more datasets for one symbol."""
    key: str                # the topic as the exchange names it (unique per exchange)
    symbol: str
    channel: str
    datasets: tuple[str, ...]
    path: str               # WebSocket path it must be subscribed on
    cadence_s: float | None = None   # longest normal interval between frames; None = event driven


@dataclass
class ConnectionPlan:
    exchange: str
    path: str
    streams: list[Stream] = field(default_factory=list)


@dataclass(frozen=True)
class Keepalive:
    kind: str | None          # "text": send `payload` as a text frame; "protocol": WebSocket ping
    payload: str = ""
    interval_s: float = 20.0


@dataclass(frozen=True)
class SequenceRule:
    """Exact loss detection for a dataset: ids that must follow each other per symbol.

    `column` holds the id; with `count_column`, id - count must equal the previous id
    (OKX aggregated trades); otherwise id must equal previous id + 1.
    """
    column: str
    count_column: str | None = None


class Control(NamedTuple):
    """A non-data frame the connection manager must know about."""
    kind: str                 # "ack" | "error" | "pong" | "notice" | "info"
    request_id: object = None
    detail: str = ""
    keys: tuple[str, ...] = ()    # stream keys concerned, when the exchange names them


class RowSink:
    """Per-exchange row buffers the adapters append to: one list of tuples per dataset.

    `last_seen` maps a stream key to the ts_recv of its latest data frame (silence watchdog).
    """
    __slots__ = ("bbo", "trades", "mark_price", "funding", "open_interest", "last_seen")

    def __init__(self):
        self.bbo: list[tuple] = []
        self.trades: list[tuple] = []
        self.mark_price: list[tuple] = []
        self.funding: list[tuple] = []
        self.open_interest: list[tuple] = []
        self.last_seen: dict[str, int] = {}

    def take(self) -> dict[str, list[tuple]]:
        """Hand over the buffered rows and start empty ones."""
        out = {"bbo": self.bbo, "trades": self.trades, "mark_price": self.mark_price,
               "funding": self.funding, "open_interest": self.open_interest}
        self.bbo, self.trades, self.mark_price, self.funding, self.open_interest = [], [], [], [], []
        return out

    def extend(self, other: "RowSink") -> None:
        """Add another sink's rows (a frame whose items are all valid)."""
        self.bbo += other.bbo
        self.trades += other.trades
        self.mark_price += other.mark_price
        self.funding += other.funding
        self.open_interest += other.open_interest

    def pending(self) -> int:
        return (len(self.bbo) + len(self.trades) + len(self.mark_price) + len(self.funding)
                + len(self.open_interest))


class BatchResult(NamedTuple):
    """What `parse_batch` made of a chunk of frames (the writer's fast path).

    `tables`: dataset -> typed tables (the dataset schemas), rows in frame order within
    each table; `leftover`: indices of the frames it did not handle (control messages, unknown
    shapes, bad values), which the writer passes to `parse` one by one, so every frame gets the
    same rows, errors and counts on both paths; `last_seen`: stream key -> latest ts_recv."""
    tables: dict
    leftover: list
    last_seen: dict


class FrameError(ValueError):
    """A frame the adapter cannot turn into rows or a known control message."""


@runtime_checkable
class Adapter(Protocol):
    """What the collector needs of an exchange. Constants first (protocol facts, per exchange):"""

    NAME: str                        # "binance" | "bybit" | "okx"
    KEEPALIVE: Keepalive             # what the client must send to stay connected
    MAX_CONNECTION_AGE_S: float | None   # rotate a connection before the server's forced close
    CONNECT_INTERVAL_S: float        # minimum spacing of new connections (per exchange, per IP)
    SUBSCRIBE_INTERVAL_S: float      # pause between subscribe messages on one connection
    SUBSCRIBE_IN_URL: bool           # the connection URL itself names the streams (no subscribe ACK)
    MAX_STREAMS_PER_CONNECTION: int  # streams (topics, args) one connection may hold
    URGENT_SCREEN: bytes | None      # bytes every plain data frame opens with; other frames go through
    #                                  urgent_control on the socket thread (None: nothing is urgent)
    GAP_RULES: Mapping[str, SequenceRule]     # dataset -> rule, where ids allow exact loss counts
    UNSUPPORTED_DATASETS: Mapping[str, str]   # dataset -> why the exchange cannot give it
    MAPPED_FIELDS: Mapping[str, frozenset[str]]   # channel -> fields of a data item parse reads
    #                                               (--probe lists the others it sees)

    # ---- connections and subscriptions ---------------------------------------------------------
    def ws_url(self, base: str, path: str, streams: Sequence[Stream] = ()) -> str:
        """Full WebSocket URL of a connection."""

    def discovery_request(self, cursor: str | None) -> tuple[str, dict]:
        """(path, params) of the instrument listing (cursor None = first page)."""

    def parse_discovery(self, body: dict) -> Discovery:
        """One page of the listing -> Discovery(instruments, skipped, next_cursor)."""

    def unified(self, symbol: str) -> str:
        """"<BASE>-<QUOTE>-PERP" for a native symbol."""

    def streams_for(self, inst: Instrument, datasets: Iterable[str]) -> list[Stream]:
        """The Streams that carry those datasets for one instrument."""

    def plan_connections(self, streams: list[Stream], max_per_conn: int | None = None) -> list[ConnectionPlan]:
        """Connections within the exchange's limits (max_per_conn None: MAX_STREAMS_PER_CONNECTION)."""

    def subscribe_messages(self, streams: list[Stream], first_id: int) -> list[tuple[str, int, tuple[str, ...]]]:
        """[(text, request id, stream keys)], ids counted up from first_id."""

    def unsubscribe_messages(self, streams: list[Stream], first_id: int) -> list[tuple[str, int, tuple[str, ...]]]:
        """Likewise, to unsubscribe."""

    # ---- frames ----------------------------------------------------------------------------------
    def parse(self, item: tuple, sink: RowSink) -> Control | None:
        """One queue item -> rows into sink (all of the frame's or none), or a Control."""

    def parse_batch(self, cols: FrameColumns) -> BatchResult:
        """The writer's fast path: many frames -> Arrow tables; frames it does not take are left
        to `parse`, so every frame gets the same rows, errors and counts on both paths."""

    def urgent_control(self, payload: bytes | str) -> Control | None:
        """A Control that cannot wait for the writer (OKX notice), or None."""

    # ---- REST, after a reconnect (app/alignment.py does the I/O) ---------------------------------
    def alignment_request(self, symbol: str) -> tuple[str, dict, int]:
        """(path, params, weight) of the latest trade(s) of a symbol."""

    def parse_recent_trades(self, body: object) -> list[tuple[str, int]]:
        """[(trade id, trade time ms)], oldest first."""

    def time_request(self) -> tuple[str, dict, int]:
        """(path, params, weight) of the server time."""

    def parse_server_time(self, body: object) -> int:
        """Server time in ns."""

    def rest_throttle(self, status: int, headers: dict, body: object, now: float) -> float | None:
        """Seconds to stop calling the exchange after this answer, or None if it is no rate limit
        (headers have lower-case names)."""


_CLASSES = {"binance": "BinanceAdapter", "bybit": "BybitAdapter", "okx": "OkxAdapter"}


def create(name: str) -> Adapter:
    """A new adapter for an exchange name (its own caches)."""
    if name not in EXCHANGES:
        raise KeyError(name)
    return getattr(importlib.import_module(f"app.exchanges.{name}"), _CLASSES[name])()




def _aliases(instruments: list[Instrument]) -> dict[str, Instrument]:
    aliases: dict[str, Instrument] = {}
    for inst in instruments:
        for alias in (inst.symbol, inst.instrument, f"{inst.base}{inst.quote}", inst.display_name):
            if alias:
                aliases.setdefault(alias.upper(), inst)
    return aliases


def close_matches(symbol: str, instruments: list[Instrument], n: int = 3) -> list[str]:
    """Listed names that look like a symbol the exchange does not list (a typo, a wrong quote)."""
    import difflib
    aliases = _aliases(instruments)
    out, seen = [], set()
    for alias in difflib.get_close_matches(symbol.strip().upper(), list(aliases), n=4 * n, cutoff=0.6):
        if aliases[alias].symbol not in seen:       # the best-matching name of each instrument
            seen.add(aliases[alias].symbol)
            out.append(alias)
    return out[:n]


def resolve_symbols(requested: list[str], instruments: list[Instrument]) -> tuple[list[Instrument], list[str]]:
    """Map user symbols (Binance form BTCUSDT/BTCUSDC, native form, or unified BTC-USDT-PERP)
    onto one exchange's instruments. Returns (found, not listed)."""
    if [s.upper() for s in requested] == ["ALL"]:
        return list(instruments), []
    aliases = _aliases(instruments)
    found, missing, seen = [], [], set()
    for sym in requested:
        inst = aliases.get(sym.strip().upper())
        if inst is None:
            missing.append(sym)
        elif inst.symbol not in seen:
            seen.add(inst.symbol)
            found.append(inst)
    return found, missing
