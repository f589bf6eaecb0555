"""The adapters' `parse_batch`: the writer's fast path, declared per kind of frame.

Why: parsing frame by frame costs several microseconds of Python per frame, all of it holding
the GIL the socket threads need. Frames of one kind (one channel of one exchange) share one JSON
shape, so a chunk of frames is grouped by kind and each group is parsed at once by Arrow's JSON
reader with an explicit schema; rows are then built by one Acero plan (filter + project) per
dataset. Each of those is one C++ call that runs outside the GIL: the number of calls per chunk
matters more than their size, because after every call the writer must win the GIL back from
busy socket threads (up to the 5 ms switch interval each time).

An adapter declares, per kind, its JSON shape and, as Arrow expressions over the parsed fields,
what `parse` requires, the symbol, the stream key and each dataset's columns (`Kind`, `Rows`).
`parse_batch(cols, kinds, specs, ...)` does the rest.

The rule that keeps both paths identical: a frame is taken here only if every value it needs is
present with the expected JSON type. Anything else (control messages, unknown kinds, a group
whose types differ, a frame missing a required field or holding a value that does not convert)
is left to the adapter's per-frame `parse`, which gives it exactly the rows, errors and counts it
would get without this path (tests/test_batch_parse.py compares both on every sample frame).
Sans-I/O, like the rest of app/exchanges.
"""
from __future__ import annotations

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
    return pc.fill_null(pc.struct_field(pc.extract_regex(cols.payload, pattern), "kind"), "")


def ndjson(payloads: pa.Array) -> pa.Buffer:
    """Newline-delimited JSON of string values: the input of pyarrow.json.read_json."""
    joined = pc.binary_join_element_wise(payloads, "", "\n")      # each value + "\n"
    offsets = memoryview(joined.buffers()[1]).cast("i")           # int32 value offsets
    first, last = offsets[joined.offset], offsets[joined.offset + len(joined)]
    return joined.buffers()[2].slice(first, last - first)


def _plan(table: pa.Table, where: pc.Expression | None, exprs: list, names: list) -> pa.Table:
    """filter + project over a table, in one call (order kept: one thread, one source)."""
    nodes = [acero.Declaration("table_source", acero.TableSourceNodeOptions(table))]
    if where is not None:
        nodes.append(acero.Declaration("filter", acero.FilterNodeOptions(where)))
    nodes.append(acero.Declaration("project", acero.ProjectNodeOptions(exprs, names)))
    return acero.Declaration.from_sequence(nodes).to_table(use_threads=False)


def _map_values(values: pa.ChunkedArray, fn: Callable[[str], str]) -> pa.Array:
    """fn applied to each distinct value (symbols -> unified instruments: a few hundred at most)."""
    distinct = pc.unique(values)
    mapped = pa.array([fn(v) for v in distinct.to_pylist()], type=STRING)
    return mapped.take(pc.index_in(values, value_set=distinct))


def parse_batch(cols, kinds: pa.Array, specs: dict[str, Kind], exchange: str,
                unified: Callable[[str], str]) -> BatchResult:
    """schema.FrameColumns of a chunk + each frame's kind -> BatchResult."""
    meta = pa.table({"ts_recv": cols.ts_recv, "conn_id": cols.conn_id, "recv_seq": cols.recv_seq})
    tables: dict[str, list] = {}
    handled: list = []
    last_seen: dict[str, int] = {}
    for kind in pc.unique(kinds).to_pylist():
        spec = specs.get(kind)
        if spec is None:
            continue
        idx = pc.indices_nonzero(pc.equal(kinds, kind))
        try:
            built, frames = _group(spec, cols.payload.take(idx), meta.take(idx), exchange, unified)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, schema.RowError,
                OverflowError):
            continue                                   # the whole group goes to `parse`
        for ds, table in built.items():
            if table.num_rows:
                tables.setdefault(ds, []).append(table)
        handled.extend(frames.column("recv_seq").chunks)
        latest = frames.group_by("stream").aggregate([("ts_recv", "max")])
        for key, t in zip(latest.column("stream").to_pylist(), latest.column("ts_recv_max").to_pylist()):
            if t > last_seen.get(key, 0):
                last_seen[key] = t
    if handled:
        # chunks, not ChunkedArrays: pa.chunked_array() would convert those value by value in Python
        done = pc.is_in(cols.recv_seq, value_set=pa.chunked_array(handled, type=INT).combine_chunks())
        leftover = pc.indices_nonzero(pc.invert(done)).to_pylist()
    else:
        leftover = list(range(len(cols)))
    return BatchResult(tables, leftover, last_seen)


def _group(spec: Kind, payloads: pa.Array, meta: pa.Table, exchange: str, unified):
    """One kind's frames -> ({dataset: table}, the frames taken: recv_seq, ts_recv, stream)."""
    text = ndjson(payloads)
    parsed = pj.read_json(pa.BufferReader(text), parse_options=spec.options,
                          read_options=pj.ReadOptions(use_threads=False,
                                                      block_size=max(1 << 20, text.size + 1)))
    if parsed.num_rows != len(payloads):
        raise pa.ArrowInvalid("a frame held a raw newline")
    frames = parsed.flatten()
    frames = pa.Table.from_arrays(frames.columns + meta.columns, names=frames.column_names + meta.column_names)
    if spec.items is None:
        rows_in = frames
        taken = spec.valid
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
        checked = _plan(rows_in, None, [F("recv_seq"), valid], ["recv_seq", "ok"])
        bad = pc.unique(pc.filter(checked.column("recv_seq"), pc.invert(pc.fill_null(checked.column("ok"), False))))
        taken = F(spec.items).is_valid() & ~F("recv_seq").isin(bad)
        rows_in = rows_in.filter(pc.invert(pc.is_in(rows_in.column("recv_seq"), value_set=bad))) if len(bad) else rows_in
    taken_frames = _plan(frames, taken, [F("recv_seq"), F("ts_recv"), spec.stream],
                         ["recv_seq", "ts_recv", "stream"])
    rows_in = _plan(rows_in, taken if spec.items is None else None,     # items: filtered above
                    [F(n) for n in rows_in.column_names] + [spec.symbol], rows_in.column_names + ["$symbol"])
    rows_in = rows_in.append_column("$instrument", _map_values(rows_in.column("$symbol"), unified))
    built = {}
    for ds, rows in spec.rows.items():
        columns = {"symbol": "$symbol", "instrument": "$instrument", "ts_recv": "ts_recv",
                   "conn_id": "conn_id", "recv_seq": "recv_seq", **rows.columns}
        exprs, names = schema.typed_projection(ds, exchange, columns, rows_in.schema)
        table = _plan(rows_in, rows.where, exprs, names)
        built[ds] = schema.check_table(ds, table)
    return built, taken_frames
