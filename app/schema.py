"""The v1 RAW schemas: the only place that knows column names, types, order and nullability.

Adapters append plain tuples (one per row, columns in schema order, without the constant
`exchange` column) holding values as the exchange sent them: decimal strings, millisecond
timestamps as ints or strings. Conversion to typed Arrow columns happens here, per batch, in
Arrow's C code (casts), never per value in Python on the fast path.
"""
from __future__ import annotations

from array import array
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from app import handoff

SCHEMA_VERSION = "1"
DATASETS = ("bbo", "trades", "mark_price", "funding", "open_interest")
ALL_DATASETS = DATASETS + ("frames",)
NS_PER_MS = 1_000_000
NS_PER_DAY = 86_400 * 1_000_000_000

# How a raw value becomes a typed value:
#   str   text as received            -> string
#   ns    int nanoseconds (ours)      -> int64
#   ms    exchange ms, int or string  -> int64 ns
#   int   int or numeric string       -> int64
#   dec   decimal string or number    -> float64 ("" means absent)
#   bool  JSON bool                   -> bool
_COMMON = [
    ("exchange", pa.string(), False, "str"),
    ("symbol", pa.string(), False, "str"),
    ("instrument", pa.string(), False, "str"),
    ("ts_event", pa.int64(), True, "ms"),
    ("ts_exchange", pa.int64(), True, "ms"),
    ("ts_recv", pa.int64(), False, "ns"),
    ("conn_id", pa.int64(), False, "int"),
    ("recv_seq", pa.int64(), False, "int"),
]

_SPECIFIC = {
    "bbo": [
        ("bid_px", pa.float64(), True, "dec"),
        ("bid_sz", pa.float64(), True, "dec"),
        ("ask_px", pa.float64(), True, "dec"),
        ("ask_sz", pa.float64(), True, "dec"),
        ("update_id", pa.int64(), True, "int"),
        ("seq", pa.int64(), True, "int"),
    ],
    "trades": [
        ("trade_id", pa.string(), False, "str"),
        ("price", pa.float64(), False, "dec"),
        ("size", pa.float64(), False, "dec"),
        ("side", pa.string(), False, "str"),
        ("first_trade_id", pa.int64(), True, "int"),
        ("last_trade_id", pa.int64(), True, "int"),
        ("trade_count", pa.int64(), True, "int"),
        ("is_block", pa.bool_(), True, "bool"),
    ],
    "mark_price": [
        ("mark_px", pa.float64(), False, "dec"),
        ("index_px", pa.float64(), True, "dec"),
        ("est_settle_px", pa.float64(), True, "dec"),
    ],
    "funding": [
        ("funding_rate", pa.float64(), True, "dec"),
        ("next_funding_time", pa.int64(), True, "ms"),
        ("funding_time", pa.int64(), True, "ms"),
        ("next_funding_rate", pa.float64(), True, "dec"),
        ("funding_interval_h", pa.int64(), True, "int"),
    ],
    "open_interest": [
        ("open_interest", pa.float64(), True, "dec"),
        ("open_interest_value", pa.float64(), True, "dec"),
    ],
    "frames": [
        ("exchange", pa.string(), False, "str"),
        ("conn_id", pa.int64(), False, "int"),
        ("recv_seq", pa.int64(), False, "int"),
        ("ts_recv", pa.int64(), False, "ns"),
        ("payload", pa.string(), False, "str"),
    ],
}


def _columns(dataset: str):
    return _SPECIFIC[dataset] if dataset == "frames" else _COMMON + _SPECIFIC[dataset]


SCHEMAS: dict[str, pa.Schema] = {
    ds: pa.schema([pa.field(n, t, nullable=nl) for n, t, nl, _ in _columns(ds)]) for ds in ALL_DATASETS
}
KINDS: dict[str, list[str]] = {ds: [k for *_, k in _columns(ds)] for ds in ALL_DATASETS}
# Index of a column inside an adapter's row tuple (rows omit the leading `exchange`).
ROW_INDEX: dict[str, dict[str, int]] = {
    ds: {n: i - 1 for i, (n, *_) in enumerate(_columns(ds))} for ds in DATASETS
}


def file_metadata(dataset: str, exchange: str, *, collector_version: str, instance_id: str,
                  run_id: str, shard: str = "0/1", replica: str = "") -> dict[bytes, bytes]:
    """The contract's keys, plus `shard` (i/N) and `replica` (a label, "" for none): added so that
    check_raw_sanity can tell which part of the universe a file covers, and which twin wrote it."""
    meta = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "exchange": exchange,
            "collector_version": collector_version, "instance_id": instance_id, "run_id": run_id,
            "shard": shard, "replica": replica}
    return {k.encode(): v.encode() for k, v in meta.items()}


REQUIRED_METADATA = ("schema_version", "dataset", "exchange", "collector_version", "instance_id", "run_id")
SCALE_METADATA = ("shard", "replica")          # since scale-out; files written before have neither


class RowError(ValueError):
    """A value that cannot become its column's type (or a missing required value)."""


def _blank_to_null(arr: pa.Array) -> pa.Array:
    """Exchanges send "" for an absent value (OKX nextFundingRate, Bybit pre-listing fields)."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _fast_array(values: list, field: pa.Field, kind: str) -> pa.Array:
    if kind == "str":
        try:
            arr = pa.array(values, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arr = pc.cast(pa.array(values), pa.string())  # ids sent as JSON integers
    elif kind in ("ns", "int", "bool"):
        try:
            arr = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            arr = pc.cast(_blank_to_null(pa.array(values, type=pa.string())), field.type)
    elif kind == "ms":
        try:
            arr = pa.array(values, type=pa.int64())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arr = pc.cast(_blank_to_null(pa.array(values, type=pa.string())), pa.int64())
        arr = pc.multiply_checked(arr, NS_PER_MS)
    elif kind == "dec":
        try:
            raw = pa.array(values, type=pa.string())
            try:
                arr = pc.cast(raw, pa.float64())        # one pass when no value is ""
            except pa.ArrowInvalid:
                arr = pc.cast(_blank_to_null(raw), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arr = pa.array(values, type=pa.float64())
    else:  # pragma: no cover - table above is closed
        raise AssertionError(kind)
    if not field.nullable and arr.null_count:
        raise RowError(f"null in non-nullable column {field.name}")
    return arr


def _convert_value(value, kind: str, nullable: bool, name: str):
    """Slow path for one value; used only when a batch holds a bad value, to find it."""
    if value is None or (value == "" and kind != "str"):
        if not nullable:
            raise RowError(f"missing {name}")
        return None
    if kind == "str":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise RowError(f"{name} is not a string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise RowError(f"{name} is not a bool")
        return value
    if isinstance(value, bool):
        raise RowError(f"{name} is a bool")
    if kind == "dec":
        if not isinstance(value, (str, int, float)):
            raise RowError(f"{name} is not a number")
        return float(value)
    if not isinstance(value, (str, int)):
        raise RowError(f"{name} is not an integer")
    number = int(value)
    if kind == "ms":
        number *= NS_PER_MS
    if not -(2**63) <= number < 2**63:
        raise RowError(f"{name} out of range")
    return number


def build_table(dataset: str, exchange: str, rows: list[tuple]) -> tuple[pa.Table, int]:
    """Adapter row tuples -> (typed table, number of rows rejected).

    The fast path converts whole columns in Arrow. If any value is bad, the batch is converted
    row by row so that only the bad rows are rejected (and counted), never the batch.
    """
    schema = SCHEMAS[dataset]
    fields, kinds_ = list(schema)[1:], KINDS[dataset][1:]
    columns = list(zip(*rows)) if rows else [[] for _ in kinds_]
    n = len(rows)
    try:
        arrays = [_fast_array(list(col), f, k) for col, f, k in zip(columns, fields, kinds_)]
    except (RowError, pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        good = []
        for row in rows:
            try:
                good.append(tuple(_convert_value(v, k, f.nullable, f.name)
                                  for v, f, k in zip(row, fields, kinds_)))
            except (RowError, ValueError, TypeError, OverflowError):
                continue
        columns = list(zip(*good)) if good else [[] for _ in kinds_]
        arrays = [pa.array(list(col), type=f.type) for col, f in zip(columns, fields)]
        n_good = len(good)
        rejected = n - n_good
        n = n_good
    else:
        rejected = 0
    arrays.insert(0, pa.repeat(pa.scalar(exchange, pa.string()), n))
    return pa.Table.from_arrays(arrays, schema=schema), rejected


class FrameColumns(NamedTuple):
    """Queue items of one exchange as Arrow columns: the frames dataset and the adapters' batch
    parsers (`parse_batch`) share them, so each payload is copied into Arrow once."""
    conn_id: pa.Array
    recv_seq: pa.Array
    ts_recv: pa.Array
    payload: pa.Array       # string: UTF-8 validated (invalid bytes escaped as \\xNN)
    bad_utf8: int           # frames whose payload was not valid UTF-8

    def __len__(self) -> int:
        return len(self.recv_seq)


def frame_columns(batches: list) -> FrameColumns:
    """handoff.FrameBatches (of one exchange) -> FrameColumns.

    recv_seq and ts_recv arrive as int64 arrays and become Arrow columns as they are. The
    payloads are joined with newlines into one buffer, validated as UTF-8 and split again by
    Arrow (C++, outside the GIL) instead of a Python-object conversion per payload. A payload
    holding a newline, or invalid UTF-8, takes the per-payload path; an invalid frame is still
    recorded (recv_seq stays gap-free) with its bad bytes escaped, and counted.
    """
    seqs, ts, conn_ids, payloads = array("q"), array("q"), array("q"), []
    for b in batches:
        seqs += b.recv_seq
        ts += b.ts_recv
        conn_ids += array("q", (b.conn_id,)) * len(b)
        payloads += b.payloads
    n = len(payloads)
    payload_arr = None
    bad = 0
    if n and type(payloads[0]) is bytes:
        try:
            data = pa.py_buffer(b"\n".join(payloads))       # one copy; Arrow takes it as is
            offsets = pa.array([0, data.size], type=pa.int64()).buffers()[1]
            joined = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])
            parts = pc.split_pattern(joined.cast(pa.large_string()), "\n").flatten()
            if len(parts) == n:
                payload_arr = parts.cast(pa.string())
        except (pa.ArrowInvalid, TypeError):
            pass
    if payload_arr is None:
        try:
            if n and isinstance(payloads[0], bytes):
                payload_arr = pc.cast(pa.array(payloads, type=pa.binary()), pa.string())
            else:
                payload_arr = pa.array(payloads, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            fixed = []
            for p in payloads:
                if isinstance(p, (bytes, bytearray)):
                    try:
                        p = p.decode("utf-8")
                    except UnicodeDecodeError:
                        p = p.decode("utf-8", "backslashreplace")
                        bad += 1
                fixed.append(p)
            payload_arr = pa.array(fixed, type=pa.string())
    return FrameColumns(handoff.int64_column(conn_ids), handoff.int64_column(seqs),
                        handoff.int64_column(ts), payload_arr, bad)


def frames_table_from(exchange: str, cols: FrameColumns) -> pa.Table:
    n = len(cols)
    return pa.Table.from_arrays([pa.repeat(pa.scalar(exchange, pa.string()), n), cols.conn_id,
                                 cols.recv_seq, cols.ts_recv, cols.payload], schema=SCHEMAS["frames"])


def frames_table(exchange: str, items: list[tuple]) -> tuple[pa.Table, int]:
    """Queue-item tuples -> (frames table, number of frames that were not valid UTF-8)."""
    if not items:
        return SCHEMAS["frames"].empty_table(), 0
    cols = frame_columns(handoff.from_items(items))
    return frames_table_from(exchange, cols), cols.bad_utf8


# ---- Arrow columns in, typed table out: the adapters' batch parsers (app/exchanges/batch.py) --
def _typed(expr: pc.Expression, source: pa.DataType, field: pa.Field, kind: str) -> pc.Expression:
    """An expression of JSON-parsed values (strings, ints, bools) -> the column's type, with the
    rules `_fast_array` applies to Python values ("" = absent, ms -> ns)."""
    text = pa.types.is_string(source) or pa.types.is_large_string(source)
    if kind == "str":
        return expr if pa.types.is_string(source) else expr.cast(pa.string())
    if text and kind != "bool":
        expr = pc.if_else(expr == "", pa.scalar(None, source), expr)
    if kind == "dec":
        return expr.cast(pa.float64())
    if kind == "bool":
        return expr if pa.types.is_boolean(source) else expr.cast(pa.bool_())
    if source != pa.int64():
        expr = expr.cast(pa.int64())
    return pc.multiply_checked(expr, pa.scalar(NS_PER_MS)) if kind == "ms" else expr


def typed_projection(dataset: str, exchange: str, columns: dict, source: pa.Schema) -> tuple[list, list]:
    """Acero projection building a dataset's table: columns maps a schema column to an input
    field name or to (expression, its type); absent columns are null. -> (expressions, names)."""
    exprs = [pc.scalar(exchange)]
    for field, kind in zip(list(SCHEMAS[dataset])[1:], KINDS[dataset][1:]):
        src = columns.get(field.name)
        if src is None:
            exprs.append(pc.scalar(pa.scalar(None, field.type)))
            continue
        expr, typ = (pc.field(src), source.field(src).type) if isinstance(src, str) else src
        exprs.append(_typed(expr, typ, field, kind))
    return exprs, SCHEMAS[dataset].names


def check_table(dataset: str, table: pa.Table) -> pa.Table:
    """The projected table with the dataset's exact schema. Raises RowError if a non-nullable
    column holds a null: batch parsers leave such frames to `parse` (so they are counted exactly
    as `build_table` counts them)."""
    schema = SCHEMAS[dataset]
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise RowError(f"null in non-nullable column {f.name}")
    return pa.Table.from_arrays(table.columns, schema=schema)


# Parquet encodings per column, chosen by measurement (bench/run.py prints bytes per row per
# dataset; docs/performance.md has the figures). Rows stay in arrival order, so symbols
# interleave and per-symbol sequences (update ids, trade ids, event times) are not monotone in a
# file: plain + zstd beats delta encoding for them. Dictionary only where values repeat a lot.
_DICTIONARY = {"exchange", "symbol", "instrument", "side", "conn_id", "trade_count", "is_block",
               "bid_px", "ask_px", "price"}      # top-of-book and trade prices: few ticks apart
# Top-of-book sizes as dictionary only where they are contract counts (OKX: few distinct values);
# Binance and Bybit quote base-asset quantities, where the dictionary overflows and falls back
# (20 s of the simulator's generator, bbo bytes vs plain zstd): OKX 0.68 -> 0.63, Bybit 0.65 ->
# 0.64, Binance 0.64 -> 0.67-0.70 (a `make bench` size phase read 0.705: over the 0.70 target).
_DICTIONARY_BY_EXCHANGE = {"okx": {"bid_sz", "ask_sz"}}
_ENCODING = {"ts_recv": "DELTA_BINARY_PACKED", "recv_seq": "DELTA_BINARY_PACKED",  # ~monotone
             "trade_id": "DELTA_LENGTH_BYTE_ARRAY", "payload": "DELTA_LENGTH_BYTE_ARRAY"}
# The finalizer's biggest job at each rotation is `frames` (every payload): no footer min/max for
# the payload (nobody filters on it) and zstd level 1 for that dataset. 300k Binance frames,
# write_table CPU, median of 5 runs (2026-11-25): 198 ms -> 187 (no payload statistics) -> 146
# ms (level 1), for 1.6 % more bytes. The datasets keep level 3: level 1 (the default) costs
# them ~5 % more bytes for about the same time.
_NO_STATISTICS = {"payload"}
ZSTD_LEVEL = 3
ZSTD_LEVEL_FRAMES = 1


def parquet_options(dataset: str, exchange: str | None = None) -> dict:
    names = SCHEMAS[dataset].names
    dictionary = _DICTIONARY | _DICTIONARY_BY_EXCHANGE.get(exchange, set())
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL_FRAMES if dataset == "frames" else ZSTD_LEVEL,
        "use_dictionary": [n for n in names if n in dictionary],
        "column_encoding": {n: _ENCODING[n] for n in names if n in _ENCODING},
        "write_statistics": [n for n in names if n not in _NO_STATISTICS],
    }


LEGACY_EXCHANGE_DIR = "exchange="   # the first layout's exchange directory: exchange=<x>


def exchange_dir(name: str) -> tuple[str, bool] | None:
    """(exchange, legacy) for a directory name under raw/v1/<dataset>/, None if it is none:
    `okx` -> ('okx', False); `exchange=okx` -> ('okx', True); hidden, `_x` or other `k=v` -> None."""
    if name.startswith(LEGACY_EXCHANGE_DIR):
        ex = name[len(LEGACY_EXCHANGE_DIR):]
        return (ex, True) if ex and "=" not in ex else None
    if not name or name[0] in "._" or "=" in name:
        return None
    return name, False


def partition_path(dataset: str, exchange: str, date: str) -> str:
    """raw/v1/<dataset>/<exchange>/date=<date>: the exchange directory is a plain name, not a Hive
    key `exchange=<x>`, since the files carry `exchange` as a column and pandas / pyarrow's
    read_table refuse a key of the same name (CONTRACT.md section 2). check_raw_sanity
    --migrate-layout moves the first layout (`exchange=<x>/`) to this one (app/migrate.py)."""
    return f"raw/v1/{dataset}/{exchange}/date={date}"
