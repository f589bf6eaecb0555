"""The adapter interface every exchange module implements, and the registry.

Exchange modules are sans-I/O: pure functions (and frozen data) that turn a discovery response
into instruments, instruments into streams and subscribe messages, and a received frame into
rows. Threads, sockets, queues and files live elsewhere; the pipeline never asks "which
exchange", it calls the module it was given.

Every module exposes the same names:

    NAME                      "binance" | "bybit" | "okx"
    KEEPALIVE                 Keepalive: what the client must send to stay connected
    MAX_CONNECTION_AGE_S      rotate a connection before the server's forced close (or None)
    CONNECT_INTERVAL_S        minimum spacing of new connections (per exchange, per IP)
    SUBSCRIBE_INTERVAL_S      pause between subscribe messages on one connection
    GAP_RULES                 {dataset: SequenceRule} for streams whose ids allow exact loss counts
    SUBSCRIBE_IN_URL          the connection URL itself names the streams (no subscribe ACK)
    REJECTS_WHOLE_REQUEST     an error answers the whole subscribe request (else: the args it names)
    URGENT_SCREEN             bytes every plain data frame opens with; other frames go through
                              urgent_control on the socket thread (None: nothing is urgent)
    MAPPED_FIELDS             {channel: fields of a data item that parse maps} (--probe lists the rest)
    ws_url(base, path, streams)  full WebSocket URL of a connection
    discovery_request(cursor) (path, params) of the instrument listing (cursor None = first page)
    parse_discovery(body)     Discovery(instruments, skipped, next_cursor)
    unified(symbol)           "<BASE>-<QUOTE>-PERP" for a native symbol
    streams_for(inst, datasets)  the Streams that carry those datasets for one instrument
    plan_connections(streams, max_per_conn)  [ConnectionPlan], within the exchange's limits
    subscribe_messages(streams, first_id)    [(text, request id, stream keys)]
    unsubscribe_messages(streams, first_id)  likewise
    parse(item, sink)         one queue item -> rows into sink; returns a Control or None
    urgent_control(payload)   a Control that cannot wait for the writer (OKX notice), or None
    parse_batch(cols)         optional fast path: schema.FrameColumns of many frames -> BatchResult
                              (Arrow tables; frames it does not handle are left to `parse`)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import NamedTuple

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


def load(name: str):
    """The adapter module for an exchange name."""
    if name not in EXCHANGES:
        raise KeyError(name)
    return importlib.import_module(f"app.exchanges.{name}")


def chunked(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def split_by_path(exchange: str, streams: list[Stream], max_per_conn: int) -> list[ConnectionPlan]:
    """Group streams by WebSocket path, then cut each group into connections of max_per_conn."""
    by_path: dict[str, list[Stream]] = {}
    for s in streams:
        by_path.setdefault(s.path, []).append(s)
    return [ConnectionPlan(exchange, path, part)
            for path, group in by_path.items() for part in chunked(group, max_per_conn)]


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
