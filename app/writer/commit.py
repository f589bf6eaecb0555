"""File commit: closed spool files -> Parquet files that are only ever seen whole.

Why a room of its own: the one rule every file under data_dir/raw and data_dir/reference obeys
lives here. A Parquet file is written under a temporary name (".<name>.tmp"), fsynced, renamed
to its final name, and its directory fsynced: a visible Parquet file is always complete, and a
crash leaves at most a temporary file, which `recover` removes at the next start. The rest of
the writer never names a Parquet file.

- `commit_spool`: a closed spool (Arrow IPC stream, app/writer/encoding.py) streamed into one
  zstd Parquet file, a row group of about ROW_GROUP_BYTES at a time, so memory is bounded by
  that, not by the rotate interval times the rate. Run by the finalizer thread
  (app/writer/upload.py) during a run, by `recover` at start.
- `recover`: a killed run's spool turned into Parquet before the new run starts.
- `write_reference`: a discovery snapshot (reference data, never RAW).

Each committed file is handed to storage (`storage.publish`: upload, or nothing for a local
root) by whoever committed it; this module does not import the upload room.
"""
from __future__ import annotations

import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq

from app import logs, schema
from app.writer.encoding import SPOOL_SUFFIX, parse_spool_name

log = logs.get()

ROW_GROUP_BYTES = 16 * 1024 * 1024   # Arrow bytes per Parquet row group: bounds the finalizer's memory
# ".<parquet_name>.tmp": ".i-<instance>-<run id: YYYYMMDDTHHMMSSZ + 4 hex>-<seq>.parquet.tmp"
_TMP_NAME = re.compile(r"^\.i-(.+)-\d{8}T\d{6}Z[0-9a-f]{4}-\d+\.parquet\.tmp$")


def parquet_name(instance_id: str, run_id: str, seq: str | int) -> str:
    return f"i-{instance_id}-{run_id}-{int(seq):06d}.parquet"


def write_parquet_atomic(table: pa.Table, final_path: str) -> int:
    """Reference data (never RAW: the datasets go through `spool_to_parquet`) under a temporary
    name, fsync, rename: the final name only ever holds a whole file. -> its size."""
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = _tmp_name(final_path)
    pq.write_table(table, tmp, compression="zstd")
    return _commit_tmp(tmp, final_path)


def _tmp_name(final_path: str) -> str:
    return os.path.join(os.path.dirname(final_path), "." + os.path.basename(final_path) + ".tmp")


def _commit_tmp(tmp: str, final_path: str) -> int:
    """fsync the finished temporary file, rename it to its final name, fsync the directory."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final_path)
    dir_fd = os.open(os.path.dirname(final_path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return os.path.getsize(final_path)


def spool_to_parquet(spool_path: str, final_path: str, dataset: str,
                     exchange: str) -> tuple[int, int] | None:
    """Stream a spool file into Parquet, one row group of about ROW_GROUP_BYTES at a time. Same
    atomic rule as write_parquet_atomic. -> (rows, bytes); (0, 0) and no file if it holds no row;
    None if unreadable. A torn last batch (kill -9 while appending) is ignored."""
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = _tmp_name(final_path)
    rows = 0
    writer = None
    with pa.OSFile(spool_path, "rb") as f:        # Arrow's file: reads without the GIL
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError):
            return None
        group: list = []
        group_bytes = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                batch = None
            except (pa.ArrowInvalid, OSError):
                batch = None                       # torn tail
            if batch is not None and batch.num_rows:
                group.append(batch)
                group_bytes += batch.nbytes
                rows += batch.num_rows
            if group and (batch is None or group_bytes >= ROW_GROUP_BYTES):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, reader.schema, **schema.parquet_options(dataset, exchange))
                table = pa.Table.from_batches(group, schema=reader.schema)
                writer.write_table(table, row_group_size=table.num_rows)
                group, group_bytes = [], 0
            if batch is None:
                break
    if writer is None:
        return 0, 0
    writer.close()
    return rows, _commit_tmp(tmp, final_path)


def commit_spool(path: str, data_dir: str, state) -> tuple[str, str] | None:
    """A closed spool file -> its Parquet file under data_dir; the spool is removed (renamed to
    "<spool>.bad" if unreadable). -> (the Parquet file's path, its key relative to data_dir), to
    be published; None if there is nothing to publish (no row, unreadable)."""
    info = parse_spool_name(path)
    done = None
    if info is not None:
        rel = os.path.join(schema.partition_path(info["dataset"], info["exchange"], info["date"]),
                           parquet_name(info["instance_id"], info["run_id"], info["seq"]))
        final = os.path.join(data_dir, rel)
        done = spool_to_parquet(path, final, info["dataset"], info["exchange"])
    if done is None:
        log.error("spool_unreadable", extra={"spool": path})
        os.replace(path, path + ".bad")
        return None
    rows, size = done
    os.remove(path)
    if not rows:
        return None
    state.count("files_written", info["exchange"], 1, info["dataset"])
    state.count("bytes_written", info["exchange"], size, info["dataset"])
    log.info("file_written", extra={"path": final, "dataset": info["dataset"],
                                    "exchange": info["exchange"], "rows": rows, "bytes": size})
    return final, rel


def recover(data_dir: str, storage, state, instance_id: str | None = None) -> int:
    """Turn spool files left by a killed run into Parquet (and publish them); remove torn
    temporary files. -> how many Parquet files were written.

    With `instance_id`, only that instance's spool and temporary files are touched: processes
    with distinct instance ids may share one data_dir (supervisord: one program per exchange),
    and a starting sibling must not finalize or delete files another one is still writing."""
    spool_dir = os.path.join(data_dir, "spool")
    done = 0
    if os.path.isdir(spool_dir):
        for name in sorted(os.listdir(spool_dir)):
            info = parse_spool_name(name)
            if instance_id is not None and (info is None or info["instance_id"] != instance_id):
                continue
            if name.endswith(SPOOL_SUFFIX):
                path = os.path.join(spool_dir, name)
                committed = commit_spool(path, data_dir, state)
                if committed:
                    storage.publish(*committed)
                    done += 1
                log.info("spool_recovered", extra={"spool": path})
    raw = os.path.join(data_dir, "raw")
    for root, _dirs, files in os.walk(raw):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                own = _TMP_NAME.match(f)
                if instance_id is not None and (own is None or own.group(1) != instance_id):
                    continue
                os.remove(os.path.join(root, f))
    return done


def write_reference(data_dir: str, storage, exchange: str, instruments: list, fetched_at_ns: int,
                    instance_id: str) -> str:
    """Discovery snapshot (reference data, never RAW) as Parquet under reference/<exchange>/."""
    fields = ["exchange", "symbol", "instrument", "base", "quote", "status", "contract_type",
              "tick_size", "lot_size", "contract_value", "contract_multiplier", "listed_ms",
              "display_name"]
    cols = {f: [getattr(i, f) for i in instruments] for f in fields}
    cols["listed_ms"] = [int(v) if v not in (None, "") else None for v in cols["listed_ms"]]
    table = pa.table({**{f: pa.array(v, type=pa.int64() if f == "listed_ms" else pa.string())
                         for f, v in cols.items()},
                      "fetched_at": pa.array([fetched_at_ns] * len(instruments), type=pa.int64())})
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(fetched_at_ns / 1e9))
    rel = f"reference/{exchange}/instruments-{stamp}-{instance_id}.parquet"
    final = os.path.join(data_dir, rel)
    write_parquet_atomic(table.replace_schema_metadata({b"fetched_at": str(fetched_at_ns).encode()}),
                         final)
    storage.publish(final, rel)
    return final
