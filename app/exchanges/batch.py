"""The adapters' `parse_batch`: the writer's fast path, declared per kind of frame.

Why: parsing frame by frame costs several microseconds of Python per frame, all of it holding
the GIL the socket threads need. Frames of one kind (one channel of one exchange) share one JSON
shape, so a chunk of frames is grouped by kind and each group is parsed at once by Arrow's JSON
reader with an explicit schema; rows are then built by one Acero plan (filter + project) per
dataset. Each of those is one C++ call that runs outside the GIL: few, large calls, because
after every call the writer must win the GIL back from busy socket threads (a switch interval,
5 ms by default, or longer while other threads pass it among themselves).

Each kind (`Kind`, `Rows`) holds its JSON shape and, as Arrow expressions over the parsed fields,
what `parse` requires, the symbol, the stream key and each dataset's columns. Kinds are not
written by hand: app/exchanges/channels.py derives them from the exchange's channel table, the
same table the per-frame parser is derived from. `parse_batch(cols, kinds, specs, ...)` does the
rest.

The rule that keeps both paths identical: a frame is taken here only if every value it needs is
present with the expected JSON type. Anything else (control messages, unknown kinds, a group
whose types differ, a frame missing a required field or holding a value that does not convert)
is left to the adapter's per-frame `parse`, which gives it exactly the rows, errors and counts it
would get without this path (tests/test_batch_parse.py compares both on every sample frame).
Sans-I/O, like the rest of app/exchanges.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.acero as acero
import pyarrow.compute as pc
import pyarrow.json as pj

from app import schema
from app.exchanges import BatchResult

STRING, INT, BOOL = pa.string(), pa.int64(), pa.bool_()
BOOK_SIDE = pa.list_(pa.list_(pa.string()))       # [["price", "size", ...], ...]
F = pc.field                                      # F("data.b"): a parsed field, flattened name


@dataclass(frozen=True)
class Rows:
    """One dataset's rows from a kind: schema column -> input field name or (expression, its
    type); `where` selects the frames (or items) that give a row (None: all of them)."""
    columns: dict
    where: pc.Expression | None = None


@dataclass(frozen=True)
class Kind:
    """One kind of frame (a channel). Input field names are the JSON paths joined by dots
    ("data.b"); with `items`, the rows are the items of that list field, named "item.<name>",
    next to the frame's own fields. ts_recv, conn_id and recv_seq are always there."""
    json: dict                        # top-level field -> Arrow type (nested types allowed)
    valid: pc.Expression | None       # what `parse` needs (None: nothing); per item with `items`
    symbol: pc.Expression             # the exchange's symbol (-> symbol, instrument columns)
    stream: pc.Expression             # the stream key (last_seen)
    rows: dict[str, Rows]
    items: str | None = None          # a list field whose items are the rows
    options: pj.ParseOptions = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "options", pj.ParseOptions(
            explicit_schema=pa.schema(list(self.json.items())), unexpected_field_behavior="ignore"))

    def options_like(self, frame: str) -> pj.ParseOptions | None:
        """`options` with every object's fields in the order `frame` sends them (None: not a JSON
        object). Why: Arrow's reader tries the field after the previous one before looking a key
        up, so a schema in wire order parses a chunk ~5% faster (the result is the same)."""
        try:
            sample = json.loads(frame)
        except ValueError:
            return None
        if type(sample) is not dict:
            return None
        ordered = _in_order(pa.struct(list(self.json.items())), sample)
        return pj.ParseOptions(explicit_schema=pa.schema(list(ordered)), unexpected_field_behavior="ignore")


def _in_order(typ: pa.DataType, sample) -> pa.DataType:
    """typ with its struct fields in the order of the JSON value `sample` (fields it lacks last)."""
    if pa.types.is_struct(typ) and type(sample) is dict:
        pos = {k: i for i, k in enumerate(sample)}
        fields = sorted(typ, key=lambda f: pos.get(f.name, len(pos)))
        return pa.struct([f.with_type(_in_order(f.type, sample.get(f.name))) for f in fields])
    if pa.types.is_list(typ) and type(sample) is list and sample:
        return pa.list_(_in_order(typ.value_type, sample[0]))
    return typ


def blank_to_null(expr: pc.Expression) -> pc.Expression:
    """Exchanges send "" for an absent value."""
    return pc.if_else(expr == "", pa.scalar(None, STRING), expr)


def first_entry(side: str, i: int) -> tuple[pc.Expression, pa.DataType]:
    """Value i of the first [price, size, ...] entry of a book side; null for an empty side
    (as `b[0][i] if b else None`). Use with `book_side_ok(side)` in `valid`."""
    first = pc.list_element(pc.if_else(pc.list_value_length(F(side)) > 0, F(side),
                                       pa.scalar(None, BOOK_SIDE)), 0)
    return pc.list_element(first, i), STRING


def book_side_ok(side: str, width: int = 2) -> pc.Expression:
    """The side is a list and, when not empty, its first entry has `width` values."""
    n = pc.list_value_length(F(side))
    first = pc.list_element(pc.if_else(n > 0, F(side), pa.scalar(None, BOOK_SIDE)), 0)
    return F(side).is_valid() & ((n == 0) | pc.coalesce(pc.list_value_length(first) >= width, pa.scalar(False)))


def kinds_by_regex(cols, pattern: str) -> pa.Array:
    """The named group `kind` of `pattern` (anchored at the frame's start) per frame, "" if none."""
    kind = pc.coalesce(pc.struct_field(pc.extract_regex(F("payload"), pattern), "kind"), pa.scalar(""))
    return _plan(pa.table({"payload": cols.payload}), None, [kind], ["kind"]).column("kind").combine_chunks()


def lines_of(payloads: pa.Array) -> pa.Array:
    """Each string value followed by a newline: any slice of it is one `ndjson` buffer."""
    return pc.binary_join_element_wise(payloads, "", "\n")


def ndjson(lines: pa.Array) -> pa.Buffer:
    """A slice of `lines_of(...)` as newline-delimited JSON (the input of pyarrow.json.read_json),
    without a copy."""
    offsets = memoryview(lines.buffers()[1]).cast("i")            # int32 value offsets
    first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
    return lines.buffers()[2].slice(first, last - first)


def _plan(table: pa.Table, where: pc.Expression | None, exprs: list, names: list) -> pa.Table:
    """filter + project over a table, in one call (order kept: one thread, one source)."""
    nodes = [acero.Declaration("table_source", acero.TableSourceNodeOptions(table))]
    if where is not None:
        nodes.append(acero.Declaration("filter", acero.FilterNodeOptions(where)))
    nodes.append(acero.Declaration("project", acero.ProjectNodeOptions(exprs, names)))
    return acero.Declaration.from_sequence(nodes).to_table(use_threads=False)


class Instruments:
    """symbol -> unified instrument for one exchange, kept as Arrow arrays: the rows' plan looks
    each symbol up (`index_in`, inside the plan) and the instrument column is a dictionary array
    over the known instruments (cast to string by the dataset's projection). `unified` runs once
    per symbol ever seen, and a chunk costs no extra Arrow call (each one must win the GIL back)."""

    def __init__(self, unified: Callable[[str], str]):
        self.unified = unified
        self.symbols = pa.array([], type=STRING)
        self.instruments = pa.array([], type=STRING)

    def lookup(self, symbol: pc.Expression) -> pc.Expression:
        return pc.index_in(symbol, value_set=self.symbols)

    def column(self, rows: pa.Table) -> pa.ChunkedArray:
        """rows with "$symbol" and "$symbol_index" (`lookup` of the symbol) -> the instrument column."""
        index = rows.column("$symbol_index")
        if index.null_count > rows.column("$symbol").null_count:      # a symbol not seen before
            known = set(self.symbols.to_pylist())
            new = [v for v in pc.unique(rows.column("$symbol")).to_pylist() if v is not None and v not in known]
            self.symbols = pa.concat_arrays([self.symbols, pa.array(new, type=STRING)])
            self.instruments = pa.concat_arrays([self.instruments,
                                                 pa.array([self.unified(v) for v in new], type=STRING)])
            index = pc.index_in(rows.column("$symbol"), value_set=self.symbols)
        return pa.chunked_array([pa.DictionaryArray.from_arrays(chunk, self.instruments, safe=False)
                                 for chunk in index.chunks],
                                type=pa.dictionary(pa.int32(), STRING))


class Memo:
    """What the batch path learns as it runs, for one adapter (its instance holds it; the writer
    thread uses it): the instrument arrays, and each kind's schema in the exchange's field order."""

    def __init__(self, unified: Callable[[str], str]):
        self.instruments = Instruments(unified)
        self.options: dict[str, pj.ParseOptions] = {}

    def options_for(self, kind: str, spec: Kind, lines: pa.Array) -> pj.ParseOptions:
        options = self.options.get(kind)
        if options is None:
            options = spec.options_like(lines[0].as_py())
            if options is None:
                return spec.options
            self.options[kind] = options
        return options


def parse_batch(cols, kinds: pa.Array, specs: dict[str, Kind], exchange: str, memo: Memo) -> BatchResult:
    """schema.FrameColumns of a chunk + each frame's kind -> BatchResult.

    The chunk is grouped by kind with one stable sort and made newline-delimited in one call, so
    each kind's JSON text is a zero-copy slice (one copy of the payloads besides the chunk's own,
    not two); `$pos` carries each frame's position in the chunk (the leftovers are positions).
    `memo`: what the adapter's batch path has learned so far (instance state)."""
    order = pc.sort_indices(kinds)
    meta = pa.table({"ts_recv": cols.ts_recv, "conn_id": cols.conn_id, "recv_seq": cols.recv_seq}).take(order)
    meta = meta.append_column("$pos", order)
    lines = lines_of(cols.payload.take(order))
    counts = pc.value_counts(kinds)
    tables: dict[str, list] = {}
    taken_frames: list = []
    leftover: list = []
    start = 0
    for kind, n in sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())):
        group_pos = order.slice(start, n)
        spec = specs.get(kind)
        built = None
        if spec is not None:
            try:
                group = lines.slice(start, n)
                built, frames = _group(spec, memo.options_for(kind, spec, group), group, meta.slice(start, n),
                                       exchange, memo.instruments)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, schema.RowError,
                    OverflowError):
                built = None                               # the whole group goes to `parse`
        start += n
        if built is None:
            leftover.append(group_pos)
            continue
        for ds, table in built.items():
            if table.num_rows:
                tables.setdefault(ds, []).append(table)
        taken_frames.append(frames)
        if frames.num_rows < n:                            # some frames of the kind were refused
            taken = frames.column("$pos").combine_chunks()
            leftover.append(pc.filter(group_pos, pc.invert(pc.is_in(group_pos, value_set=taken))))
    last_seen: dict[str, int] = {}
    if taken_frames:
        latest = pa.concat_tables(taken_frames).group_by("$stream").aggregate([("ts_recv", "max")])
        last_seen = dict(zip(latest.column("$stream").to_pylist(), latest.column("ts_recv_max").to_pylist()))
    positions = sorted(p for part in leftover for p in part.to_pylist())
    return BatchResult(tables, positions, last_seen)


def _group(spec: Kind, options: pj.ParseOptions, lines: pa.Array, meta: pa.Table, exchange: str,
           instruments: Instruments):
    """One kind's frames (`lines_of` their payloads) -> ({dataset: table}, the frames taken:
    $pos, ts_recv, $stream)."""
    text = ndjson(lines)
    parsed = pj.read_json(pa.BufferReader(text), parse_options=options,
                          read_options=pj.ReadOptions(use_threads=False,
                                                      block_size=max(1 << 20, text.size + 1)))
    if parsed.num_rows != len(lines):
        raise pa.ArrowInvalid("a frame held a raw newline")
    frames = parsed.flatten()
    frames = pa.Table.from_arrays(frames.columns + meta.columns, names=frames.column_names + meta.column_names)
    if spec.items is None:
        # one plan: the frames `parse` would take, every field, their symbol and stream key
        rows_in = _plan(frames, spec.valid, [F(n) for n in frames.column_names]
                        + [spec.symbol, instruments.lookup(spec.symbol), spec.stream],
                        frames.column_names + ["$symbol", "$symbol_index", "$stream"])
        taken_frames = rows_in.select(["$pos", "ts_recv", "$stream"])
    else:
        # one row per item: the item's fields ("item.<name>") next to its frame's fields; a frame
        # is taken only if its list is there and every item is valid (`parse` builds a frame's
        # rows completely or not at all); a frame with an empty list is taken, with no rows
        lists = frames.column(spec.items)
        parent = pc.list_parent_indices(lists)
        flat = pc.list_flatten(lists)
        items = pa.Table.from_struct_array(flat)
        rows_in = frames.drop_columns([spec.items]).take(parent)
        rows_in = pa.Table.from_arrays(
            rows_in.columns + items.columns + [flat.is_valid()],
            names=rows_in.column_names + ["item." + n for n in items.column_names] + ["$item"])
        valid = F("$item") if spec.valid is None else F("$item") & spec.valid   # an object, as parse needs
        rows_in = _plan(rows_in, None, [F(n) for n in rows_in.column_names]
                        + [spec.symbol, instruments.lookup(spec.symbol), valid],
                        rows_in.column_names + ["$symbol", "$symbol_index", "$ok"])
        ok = rows_in.column("$ok")
        taken = F(spec.items).is_valid()
        if ok.null_count or sum(chunk.false_count for chunk in ok.chunks):
            bad = pc.unique(pc.filter(rows_in.column("$pos"), pc.invert(pc.fill_null(ok, False))))
            taken = taken & ~F("$pos").isin(bad)
            rows_in = rows_in.filter(pc.invert(pc.is_in(rows_in.column("$pos"), value_set=bad)))
        taken_frames = _plan(frames, taken, [F("$pos"), F("ts_recv"), spec.stream], ["$pos", "ts_recv", "$stream"])
    rows_in = rows_in.append_column("$instrument", instruments.column(rows_in))
    built = {}
    for ds, rows in spec.rows.items():
        columns = {"symbol": "$symbol", "instrument": "$instrument", "ts_recv": "ts_recv",
                   "conn_id": "conn_id", "recv_seq": "recv_seq", **rows.columns}
        exprs, names = schema.typed_projection(ds, exchange, columns, rows_in.schema)
        table = _plan(rows_in, rows.where, exprs, names)
        built[ds] = schema.check_table(ds, table)
    return built, taken_frames
