"""Channel tables: an exchange's data channels declared once, as data; both parsers come from here.

Why: a channel's mapping (which field feeds which column, what is required, when a row exists)
used to be written twice, as tuples in the per-frame parser and as Arrow expressions for the batch
parser, kept equal only by a differential test. Now each exchange module declares one `Table`:

    Channel("aggTrade", event="aggTrade", path="/market", rows={
        "trades": {"ts_event": get("T", INT), "trade_id": need("a", INT), "side": flag("m", "sell", "buy"),
                   "trade_count": span("f", "l"), ...}})

and everything else is derived from it:

- the per-frame row builders (`Table.builders`): Python source generated from the table and
  compiled once per exchange (as `collections.namedtuple` and `dataclasses` do), so a frame costs
  what the hand-written tuples cost; a loop interpreting the table would cost a call per column
  per row, about twice the parse time;
- the batch parser's kinds (`Table.kinds`, run by app/exchanges/batch.py): the JSON shape to read,
  what a frame must hold for the batch path to take it, each column as an Arrow expression;
- MAPPED_FIELDS (--probe lists the fields a channel sends that no column reads) and the
  streams to subscribe per dataset (`Table.subscribed`).

Each source below (`need`, `get`, `blank`, `env`, `first`, `flag`, `lookup`, `span`, `first_id`,
and the row conditions `present`, `nonblank`) carries its Python reading, its Arrow reading and
what the batch path requires of a frame, so one entry is one column on both paths. The rule that
keeps the two paths identical (batch.py): the batch path takes a frame only when every value it
needs is present with its declared JSON type; everything else goes to the per-frame builder,
whose reading is the reference. Timestamps are declared as sent (ms: every exchange); the scale
to ns is the schema's (app/schema.py), like every other conversion to a column type.
"""
from __future__ import annotations

import linecache
import re
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from app import schema
from app.exchanges import FrameError
from app.exchanges import batch as B

STR, INT, BOOL, BOOK_SIDE = B.STRING, B.INT, B.BOOL, B.BOOK_SIDE
F = pc.field
_OURS = ("symbol", "instrument", "ts_recv", "conn_id", "recv_seq")   # columns no channel declares


class Access(NamedTuple):
    """One read of a frame value: in the data item (`d`) or in the envelope around it (`msg`)."""
    env: bool
    path: tuple[str, ...]
    required: bool                 # d["x"]: absent refuses the frame; else d.get("x"): absent is null
    type: pa.DataType | None       # the JSON type (envelope fields: the Frame declares theirs)

    def py(self) -> str:
        obj = "msg" if self.env else "d"
        if self.required:
            return obj + "".join(f"[{p!r}]" for p in self.path)
        (name,) = self.path
        return f"{obj}.get({name!r})"

    def column(self, prefix: str) -> str:
        """Its name in the batch path's flattened table ("data.b", "item.px", "ts", "arg.instId")."""
        return ".".join(self.path) if self.env else prefix + self.path[0]


class Source:
    """A column's value. `reads`: what it reads; `py(ctx)`: a Python expression (ctx.ref(access)
    is the value read); `arrow(ctx, kind)`: a flattened field name or (expression, Arrow type),
    `kind` being the column's conversion (schema.KINDS); `needs(ctx)`: what the batch path
    requires of a frame: ("valid", column) non-null, ("book", column, width) a book side,
    ("isin", column, values)."""
    reads: tuple[Access, ...]

    def py(self, ctx) -> str:
        raise NotImplementedError

    def arrow(self, ctx, kind: str):
        raise NotImplementedError

    def needs(self, ctx) -> list[tuple]:
        return [("valid", ctx.col(a)) for a in self.reads if a.required]


class _Value(Source):
    def __init__(self, access: Access):
        self.reads = (access,)

    def py(self, ctx) -> str:
        return ctx.ref(self.reads[0])

    def arrow(self, ctx, kind: str):
        return ctx.col(self.reads[0])


def need(name: str, type: pa.DataType = STR) -> Source:
    """A field every frame of the channel holds: absent, the frame is refused (counted unparsed)."""
    return _Value(Access(False, (name,), True, type))


def get(name: str, type: pa.DataType = STR) -> Source:
    """A field that may be absent (null)."""
    return _Value(Access(False, (name,), False, type))


def env(path: str, required: bool = False) -> Source:
    """A field of the envelope around the items ("ts", "arg.instId"); its type is the Frame's."""
    return _Value(Access(True, tuple(path.split(".")), required, None))


class _Blank(_Value):
    def py(self, ctx) -> str:
        return f"({ctx.ref(self.reads[0])} or None)"

    def arrow(self, ctx, kind: str):
        if kind == "str":       # the schema nulls "" itself for every other kind
            return B.blank_to_null(F(ctx.col(self.reads[0]))), STR
        return ctx.col(self.reads[0])


def blank(name: str) -> Source:
    """A text field that may be absent or blank: "" is null too (Bybit/OKX send "" for none)."""
    return _Blank(Access(False, (name,), False, STR))


class first(Source):
    """Value i of the first [price, size, ...] entry of a book side; an empty side gives null
    (`b[0][i] if b else None`). The side itself must be there."""

    def __init__(self, side: str, i: int):
        self.reads, self.i = (Access(False, (side,), True, BOOK_SIDE),), i

    def py(self, ctx) -> str:
        side = ctx.ref(self.reads[0], local=True)
        return f"({side}[0][{self.i}] if {side} else None)"

    def arrow(self, ctx, kind: str):
        return B.first_entry(ctx.col(self.reads[0]), self.i)

    def needs(self, ctx) -> list[tuple]:
        return [("book", ctx.col(self.reads[0]), self.i + 1)]


class flag(Source):
    """A JSON bool read as one of two values (Binance `m`, buyer is maker: the taker sold)."""

    def __init__(self, name: str, if_true: str, if_false: str):
        self.reads, self.values = (Access(False, (name,), True, BOOL),), (if_true, if_false)

    def py(self, ctx) -> str:
        return f"({self.values[0]!r} if {ctx.ref(self.reads[0])} else {self.values[1]!r})"

    def arrow(self, ctx, kind: str):
        return pc.if_else(F(ctx.col(self.reads[0])), pa.scalar(self.values[0]), pa.scalar(self.values[1])), STR


class lookup(Source):
    """A value of a closed set, renamed (Bybit `S`: "Buy" -> "buy"); any other value refuses the frame."""

    def __init__(self, name: str, mapping: dict):
        self.reads, self.mapping = (Access(False, (name,), True, STR),), dict(mapping)

    def py(self, ctx) -> str:
        return f"{ctx.const(self.mapping)}[{ctx.ref(self.reads[0])}]"

    def arrow(self, ctx, kind: str):
        field_ = F(ctx.col(self.reads[0]))
        pairs = list(self.mapping.items())
        expr = pa.scalar(pairs[-1][1])        # `needs` keeps only the known values
        for k, v in reversed(pairs[:-1]):
            expr = pc.if_else(field_ == pa.scalar(k), pa.scalar(v), expr)
        return expr, STR

    def needs(self, ctx) -> list[tuple]:
        return [("isin", ctx.col(self.reads[0]), tuple(self.mapping))]


class span(Source):
    """How many ids from `lo` to `hi` inclusive; null unless both are there (Binance aggTrade f..l)."""

    def __init__(self, lo: str, hi: str):
        self.reads = (Access(False, (lo,), False, INT), Access(False, (hi,), False, INT))

    def py(self, ctx) -> str:
        lo, hi = (ctx.ref(a, local=True) for a in self.reads)
        return f"({hi} - {lo} + 1 if {lo} is not None and {hi} is not None else None)"

    def arrow(self, ctx, kind: str):
        lo, hi = (F(ctx.col(a)) for a in self.reads)
        return hi - lo + pa.scalar(1), INT


class first_id(Source):
    """The first id of an aggregation ending at `last` with `count` ids (OKX trades: "tradeId 123
    with count 3 aggregates 123, 122 and 121"); null without a count. Ids sent as decimal text."""

    def __init__(self, last: str, count: str):
        self.reads = (Access(False, (last,), True, STR), Access(False, (count,), False, STR))

    def py(self, ctx) -> str:
        last, count = (ctx.ref(a, local=True) for a in self.reads)
        return f"(int({last}) - int({count}) + 1 if {count} else None)"

    def arrow(self, ctx, kind: str):
        last, count = (F(ctx.col(a)) for a in self.reads)
        return last.cast(INT) - B.blank_to_null(count).cast(INT) + pa.scalar(1), INT


class present:
    """Row condition: one of these fields is there (Bybit tickers deltas carry only what changed)."""

    def __init__(self, *names: str):
        self.reads = tuple(Access(False, (n,), False, STR) for n in names)

    def py(self, ctx) -> str:
        return "(" + " or ".join(f"{ctx.ref(a)} is not None" for a in self.reads) + ")"

    def arrow(self, ctx) -> pc.Expression:
        expr = None
        for a in self.reads:
            e = F(ctx.col(a)).is_valid()
            expr = e if expr is None else expr | e
        return expr


class nonblank:
    """Row condition: a text field holds a value (absent or "": no row, e.g. a non-nullable column)."""

    def __init__(self, name: str):
        self.reads = (Access(False, (name,), False, STR),)

    def py(self, ctx) -> str:
        return ctx.ref(self.reads[0])

    def arrow(self, ctx) -> pc.Expression:
        field_ = F(ctx.col(self.reads[0]))
        return field_.is_valid() & (field_ != "")


@dataclass(frozen=True)
class Rows:
    """One dataset's rows from a channel: column -> Source (columns left out are null); `when`:
    the condition for a row (None: every item gives one)."""
    columns: dict
    when: present | nonblank | None = None


@dataclass(frozen=True)
class Channel:
    """One data channel: the datasets it feeds and how (one row per item, per dataset)."""
    name: str                          # as stream keys and frames name it
    rows: dict                         # dataset -> Rows, or {column: Source} (no condition)
    cadence: float | None = None       # longest normal interval between frames; None: event driven
    path: str | None = None            # WebSocket path it is subscribed on (None: the Frame's)
    symbol: Source | None = None       # where the symbol is (None: the Frame's)
    event: str | None = None           # the value of the Frame's `event` field that names it
    many: bool = False                 # `data` is a list of items (else one object)
    also: tuple[str, ...] = ()         # other names of the same frames (batch grouping, probe)
    subscribed: bool = True            # False: parsed when received, never subscribed


@dataclass(frozen=True)
class Frame:
    """How an exchange wraps its items: the envelope of every data frame."""
    opens: str                         # regex of a data frame's first bytes; group `kind` = the
    #                                    channel name ("{kinds}": the table's names, escaped)
    envelope: dict                     # envelope field -> Arrow type (what `env` and `key` read)
    key: tuple[str, ...]               # envelope fields joined by ":" = the stream key
    symbol: Source | None = None       # default symbol source of the channels
    event: str | None = None           # item field naming the channel (Binance `e`)
    path: str | None = None            # default WebSocket path of the channels


class _Py:
    """Rendering context of one channel's Python: which reads are bound to local names."""

    def __init__(self, symbol: Access, ident: str, local: dict | None = None):
        self.symbol, self.ident, self.local = symbol, ident, local if local is not None else {}
        self.uses: dict[Access, int] = {}
        self.consts: dict[str, object] = {}

    def ref(self, a: Access, local: bool = False) -> str:
        self.uses[a] = self.uses.get(a, 0) + (2 if local else 1)   # read twice: bind it once
        if a == self.symbol:
            return "s"
        return self.local.get(a) or a.py()

    def const(self, value) -> str:
        name = f"_k{self.ident}_{len(self.consts)}"
        self.consts[name] = value
        return name


class _Arrow:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def col(self, a: Access) -> str:
        return a.column(self.prefix)


def _rows_of(ch: Channel) -> dict[str, Rows]:
    return {ds: r if isinstance(r, Rows) else Rows(r) for ds, r in ch.rows.items()}


class Table:
    """One exchange's channels, compiled: per-frame builders, batch kinds, probe fields, streams."""

    def __init__(self, exchange: str, frame: Frame, channels: list[Channel]):
        self.exchange, self.frame = exchange, frame
        self._event = Access(False, (frame.event,), True, STR) if frame.event else None
        self.channels = {ch.name: ch for ch in channels}
        self.subscribed: dict[str, Channel] = {}          # dataset -> the channel subscribed for it
        for ch in channels:
            if bool(frame.event) != bool(ch.event):
                raise ValueError(f"{exchange} {ch.name}: the Frame names channels by `{frame.event}`: give its value")
            for ds, rows in _rows_of(ch).items():
                unknown = set(rows.columns) - set(schema.SCHEMAS[ds].names[1:]) | set(rows.columns) & set(_OURS)
                if unknown:
                    raise ValueError(f"{exchange} {ch.name}: not {ds} columns a channel declares: {sorted(unknown)}")
                if ch.subscribed:
                    if ds in self.subscribed:
                        raise ValueError(f"{exchange}: {ds} subscribed on both {self.subscribed[ds].name} and {ch.name}")
                    self.subscribed[ds] = ch
        names = [n for ch in channels for n in (ch.name, *ch.also)]
        self.opens = frame.opens.replace("{kinds}", "|".join(re.escape(n) for n in names))
        self.kinds: dict[str, B.Kind] = {}
        self.mapped_fields: dict[str, frozenset] = {}
        for ch in channels:
            kind = self._kind(ch)
            for n in (ch.name, *ch.also):
                self.kinds[n] = kind
                self.mapped_fields[n] = frozenset(a.path[0] for a in self._reads(ch) if not a.env)
        self.source, self._factories = self._compile(channels)

    # ---- shared -------------------------------------------------------------------------------
    def _symbol(self, ch: Channel) -> Source:
        return ch.symbol or self.frame.symbol

    def _reads(self, ch: Channel) -> list[Access]:
        """Everything the channel reads, symbol and event field first, in a stable order."""
        out = list(self._symbol(ch).reads) + ([self._event] if self._event else [])
        for rows in _rows_of(ch).values():
            for src in rows.columns.values():
                out += src.reads
            if rows.when is not None:
                out += rows.when.reads
        return out

    # ---- batch --------------------------------------------------------------------------------
    def _kind(self, ch: Channel) -> B.Kind:
        ctx = _Arrow("item." if ch.many else "data.")
        fields: dict[str, pa.DataType] = {}
        used = {k.split(".")[0] for k in self.frame.key}
        for a in self._reads(ch):
            if a.env:
                if a.path[0] not in self.frame.envelope:
                    raise ValueError(f"{self.exchange} {ch.name}: {a.path[0]} is not in the Frame's envelope")
                used.add(a.path[0])
            elif fields.setdefault(a.path[0], a.type) != a.type:
                raise ValueError(f"{self.exchange} {ch.name}: {a.path[0]} read as two JSON types")
        item = pa.struct(list(fields.items()))
        json = {n: t for n, t in self.frame.envelope.items() if n in used}
        json["data"] = pa.list_(item) if ch.many else item
        symbol = self._symbol(ch)
        needs = symbol.needs(ctx)
        rows = {}
        for ds, r in _rows_of(ch).items():
            kinds = dict(zip(schema.SCHEMAS[ds].names, schema.KINDS[ds]))
            rows[ds] = B.Rows({c: src.arrow(ctx, kinds[c]) for c, src in r.columns.items()},
                              where=None if r.when is None else r.when.arrow(ctx))
            for src in r.columns.values():
                needs += src.needs(ctx)
        valid = _all(needs)
        if self._event:
            match = F(ctx.col(self._event)) == ch.event
            valid = match if valid is None else valid & match
        key = [F(k) for k in self.frame.key]
        stream = key[0] if len(key) == 1 else pc.binary_join_element_wise(*key, ":")
        return B.Kind(json=json, valid=valid, symbol=F(ctx.col(symbol.reads[0])), stream=stream, rows=rows,
                      items="data" if ch.many else None)

    # ---- per frame ----------------------------------------------------------------------------
    def builders(self, cache: dict, unified) -> dict:
        """channel name -> rows(msg, data, ts_recv, conn_id, recv_seq, sink): the channel's rows
        of one frame into sink, all or none (a bad item raises before any row is added). `data`
        is the item (or the list of items, `many`); cache/unified: the adapter's symbol names."""
        return {name: make(cache, unified) for name, make in self._factories.items()}

    def _compile(self, channels: list[Channel]) -> tuple[str, dict]:
        parts, consts = [], {}
        for i, ch in enumerate(channels):
            text, used = self._render(ch, f"_{i}_" + re.sub(r"\W", "_", ch.name))
            parts.append(text)
            consts.update(used)
        source = "\n\n".join(parts) + "\n"
        filename = f"<channels {self.exchange}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks
        space = {"FrameError": FrameError, **consts}
        exec(compile(source, filename, "exec"), space)                  # noqa: S102 - our own table
        return source, {ch.name: space[f"make_{i}_" + re.sub(r"\W", "_", ch.name)]
                        for i, ch in enumerate(channels)}

    def _render(self, ch: Channel, ident: str) -> tuple[str, dict]:
        symbol = self._symbol(ch).reads[0]
        counting = _Py(symbol, ident)
        self._tuples(ch, counting)                       # first pass: count each read's uses
        local, binds, hoisted = {}, [], []
        for a, n in counting.uses.items():
            if a == symbol:
                continue
            if a.env and ch.many:                        # one envelope per frame: read it once
                hoisted.append(a)
            elif n > 1:
                binds.append(a)
            else:
                continue
            local[a] = f"v{len(local)}"
        ctx = _Py(symbol, ident, local)
        rows = self._tuples(ch, ctx)
        sym = [("s", symbol.py()), ("inst", "cache.get(s) or unified(s)")]
        lets = [(local[a], a.py()) for a in binds]
        if not ch.many:
            per_frame, per_item = sym + lets, []
        else:                                            # an envelope symbol is read once too
            per_frame = [(local[a], a.py()) for a in hoisted] + (sym if symbol.env else [])
            per_item = ([] if symbol.env else sym) + lets
        lines = [f"def make{ident}(cache, unified):",
                 f"    def rows{ident}(msg, {'data' if ch.many else 'd'}, ts_recv, conn_id, recv_seq, sink):"]
        body = []
        if ch.many:
            body += ["if type(data) is not list:", f"    raise FrameError({ch.name + ' data is not a list'!r})"]
        body += [f"{name} = {expr}" for name, expr in per_frame]
        simple = len(rows) == 1 and rows[0][2] is None
        if not ch.many and simple:
            body.append(f"sink.{rows[0][0]}.append({rows[0][1]})")
        elif not ch.many:
            for k, (ds, tup, cond) in enumerate(rows):
                body.append(f"r{k} = {tup}" + (f" if {cond} else None" if cond else ""))
            for k, (ds, tup, cond) in enumerate(rows):
                body.append(f"if r{k} is not None: sink.{ds}.append(r{k})" if cond else f"sink.{ds}.append(r{k})")
        else:                     # a loop, not a comprehension: no function frame per frame (3.11)
            body += [f"o{k} = []" for k in range(len(rows))]
            body.append("for d in data:")
            body += [f"    {name} = {expr}" for name, expr in per_item]
            for k, (ds, tup, cond) in enumerate(rows):      # into o<k>: sink only once all are built
                body.append(f"    if {cond}: o{k}.append({tup})" if cond else f"    o{k}.append({tup})")
            body += [f"sink.{ds}.extend(o{k})" for k, (ds, _t, _c) in enumerate(rows)]
        lines += ["        " + b for b in body]
        lines += [f"    rows{ident}.__qualname__ = {self.exchange + '.' + ch.name!r}",
                  f"    return rows{ident}"]
        return "\n".join(lines), ctx.consts

    def _tuples(self, ch: Channel, ctx: _Py) -> list[tuple[str, str, str | None]]:
        """(dataset, the row tuple's Python, the condition's Python or None) per dataset."""
        out = []
        for ds, r in _rows_of(ch).items():
            cols = []
            for name in schema.SCHEMAS[ds].names[1:]:
                if name == "symbol":
                    cols.append("s")
                elif name == "instrument":
                    cols.append("inst")
                elif name in _OURS:
                    cols.append(name)
                else:
                    src = r.columns.get(name)
                    cols.append("None" if src is None else src.py(ctx))
            out.append((ds, "(" + ", ".join(cols) + ")", None if r.when is None else r.when.py(ctx)))
        return out


def _all(needs: list[tuple]) -> pc.Expression | None:
    """The batch path's requirements, each once (a book side: its widest use)."""
    merged: dict[tuple, object] = {}
    for need_ in needs:
        kind, col = need_[0], need_[1]
        if kind == "book":
            merged[(kind, col)] = max(merged.get((kind, col), 0), need_[2])
        else:
            merged.setdefault((kind, col), need_[2] if len(need_) > 2 else None)
    expr = None
    for (kind, col), arg in merged.items():
        if kind == "valid":
            e = F(col).is_valid()
        elif kind == "book":
            e = B.book_side_ok(col, arg)
        else:
            e = F(col).isin(list(arg))
        expr = e if expr is None else expr & e
    return expr
