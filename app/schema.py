"""The v1 RAW schemas: the only place that knows column names, types, order and nullability.

Adapters append plain tuples (one per row, columns in schema order, without the constant
`exchange` column) holding values as the exchange sent them: decimal strings, millisecond
timestamps as ints or strings. Conversion to typed Arrow columns happens here, per batch, in
Arrow's C code (casts), never per value in Python on the fast path.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

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
                  run_id: str) -> dict[bytes, bytes]:
    meta = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "exchange": exchange,
            "collector_version": collector_version, "instance_id": instance_id, "run_id": run_id}
    return {k.encode(): v.encode() for k, v in meta.items()}


REQUIRED_METADATA = ("schema_version", "dataset", "exchange", "collector_version", "instance_id", "run_id")


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
            arr = pc.cast(_blank_to_null(pa.array(values, type=pa.string())), pa.float64())
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
    arrays.insert(0, pa.array([exchange] * n, type=pa.string()))
    return pa.Table.from_arrays(arrays, schema=schema), rejected


def frames_table(exchange: str, items: list[tuple]) -> tuple[pa.Table, int]:
    """Queue items (exchange, conn_id, recv_seq, ts_recv, payload bytes|str) -> frames table.

    Payload bytes are validated as UTF-8 by Arrow's cast; a frame that is not valid UTF-8 is
    still recorded (so recv_seq stays gap-free) with its invalid bytes escaped as \\xNN, and
    reported back as the count of such frames.
    """
    n = len(items)
    if not n:
        return SCHEMAS["frames"].empty_table(), 0
    _, conn_ids, seqs, ts, payloads = zip(*items)
    bad = 0
    try:
        if isinstance(payloads[0], bytes):
            payload_arr = pc.cast(pa.array(payloads, type=pa.binary()), pa.string())
        else:
            payload_arr = pa.array(payloads, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        fixed = []
        for p in payloads:
            if isinstance(p, bytes):
                try:
                    p = p.decode("utf-8")
                except UnicodeDecodeError:
                    p = p.decode("utf-8", "backslashreplace")
                    bad += 1
            fixed.append(p)
        payload_arr = pa.array(fixed, type=pa.string())
    arrays = [
        pa.array([exchange] * n, type=pa.string()),
        pa.array(conn_ids, type=pa.int64()),
        pa.array(seqs, type=pa.int64()),
        pa.array(ts, type=pa.int64()),
        payload_arr,
    ]
    return pa.Table.from_arrays(arrays, schema=SCHEMAS["frames"]), bad


# Parquet encodings: dictionary for strings and repetitive prices, delta for monotone ints.
_DELTA_COLUMNS = {"ts_event", "ts_exchange", "ts_recv", "recv_seq", "update_id", "seq",
                  "first_trade_id", "last_trade_id", "next_funding_time", "funding_time"}


def parquet_options(dataset: str) -> dict:
    names = SCHEMAS[dataset].names
    delta = {n: "DELTA_BINARY_PACKED" for n in names if n in _DELTA_COLUMNS}
    return {
        "compression": "zstd",
        "use_dictionary": [n for n in names if n not in delta],
        "column_encoding": delta,
        "write_statistics": True,
    }


def partition_path(dataset: str, exchange: str, date: str) -> str:
    return f"raw/v1/{dataset}/exchange={exchange}/date={date}"
