"""The writer thread: queue -> adapters (in batches) -> Arrow -> spool -> Parquet.

Durability: every `flush_interval` the rows of the interval are appended, as Arrow record
batches, to one spool file (Arrow IPC stream) per (dataset, exchange, date) and fsynced, so a
`kill -9` loses at most one flush interval. Every `rotate_interval` (aligned to the wall clock)
the spools are closed and handed to the finalizer thread, which writes each as one zstd Parquet
file under a temporary name and renames it: a visible Parquet file is always complete. Parquet
encoding runs off the writer thread (and mostly outside the GIL), so rotation never stalls
parsing. At start, spool left by a killed run is turned into Parquet first (`recover`).
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections import deque

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app import logs, schema
from app.exchanges import RowSink

log = logs.get()
SPOOL_SUFFIX = ".arrows"
_SEP = "~"


def _date_of_day(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def split_by_date(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Partition rows by the UTC date of ts_recv (almost always a single date)."""
    if table.num_rows == 0:
        return []
    days = pc.divide(table.column("ts_recv"), schema.NS_PER_DAY)
    lo, hi = pc.min_max(days).values()
    if lo.as_py() == hi.as_py():
        return [(_date_of_day(lo.as_py()), table)]
    return [(_date_of_day(d), table.filter(pc.equal(days, d)))
            for d in range(lo.as_py(), hi.as_py() + 1) if pc.any(pc.equal(days, d)).as_py()]


class Spool:
    """One open Arrow IPC stream file collecting a (dataset, exchange, date) for one file."""

    def __init__(self, directory: str, dataset: str, exchange: str, date: str, instance_id: str,
                 run_id: str, seq: int, metadata: dict[bytes, bytes]):
        name = _SEP.join((dataset, exchange, date, instance_id, run_id, f"{seq:06d}")) + SPOOL_SUFFIX
        self.path = os.path.join(directory, name)
        self.dataset, self.exchange, self.date = dataset, exchange, date
        self.rows = 0
        self._file = open(self.path, "wb")
        self._writer = pa.ipc.new_stream(self._file, schema.SCHEMAS[dataset].with_metadata(metadata))

    def append(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._writer.close()
        self.sync()
        self._file.close()


def parse_spool_name(path: str) -> dict | None:
    base = os.path.basename(path)
    if not base.endswith(SPOOL_SUFFIX):
        return None
    parts = base[:-len(SPOOL_SUFFIX)].split(_SEP)
    if len(parts) != 6:
        return None
    return dict(zip(("dataset", "exchange", "date", "instance_id", "run_id", "seq"), parts))


def parquet_name(instance_id: str, run_id: str, seq: str | int) -> str:
    return f"i-{instance_id}-{run_id}-{int(seq):06d}.parquet"


def read_spool(path: str) -> pa.Table:
    """Every complete record batch of a spool file; a torn last batch (kill -9) is ignored."""
    batches = []
    meta_schema = None
    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError):
            return None
        meta_schema = reader.schema
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                break
    return pa.Table.from_batches(batches, schema=meta_schema)


def write_parquet_atomic(table: pa.Table, final_path: str, dataset: str | None) -> int:
    """Write under a temporary name, fsync, rename: the final name only ever holds a whole file."""
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(final_path), "." + os.path.basename(final_path) + ".tmp")
    opts = schema.parquet_options(dataset) if dataset else {"compression": "zstd"}
    pq.write_table(table, tmp, **opts)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final_path)
    dir_fd = os.open(os.path.dirname(final_path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return os.path.getsize(final_path)


class Finalizer(threading.Thread):
    """Turns closed spool files into Parquet and hands them to storage."""

    def __init__(self, data_dir: str, storage, state):
        super().__init__(name="finalizer", daemon=True)
        self.data_dir = data_dir
        self.storage = storage
        self.state = state
        self.jobs: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            path = self.jobs.get()
            if path is None:
                return
            try:
                self.finalize(path)
            except Exception as e:  # noqa: BLE001 - keep the spool; report, carry on
                self.state.writer_error = f"finalize {os.path.basename(path)}: {e!r}"
                log.error("finalize_failed", extra={"spool": path, "error": repr(e)})

    def finalize(self, path: str) -> str | None:
        info = parse_spool_name(path)
        table = read_spool(path)
        if info is None or table is None:
            log.error("spool_unreadable", extra={"spool": path})
            os.replace(path, path + ".bad")
            return None
        if table.num_rows == 0:
            os.remove(path)
            return None
        rel = os.path.join(schema.partition_path(info["dataset"], info["exchange"], info["date"]),
                           parquet_name(info["instance_id"], info["run_id"], info["seq"]))
        final = os.path.join(self.data_dir, rel)
        size = write_parquet_atomic(table, final, info["dataset"])
        os.remove(path)
        self.state.count("files_written", info["exchange"], 1, info["dataset"])
        self.state.count("bytes_written", info["exchange"], size, info["dataset"])
        log.info("file_written", extra={"path": final, "dataset": info["dataset"],
                                        "exchange": info["exchange"], "rows": table.num_rows,
                                        "bytes": size})
        self.storage.publish(final, rel)
        return final

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()


class Writer(threading.Thread):
    def __init__(self, settings, q: queue.Queue, state, storage, adapters: dict, on_control,
                 *, run_id: str, version: str, clock=time.time):
        super().__init__(name="writer", daemon=True)
        self.settings = settings
        self.queue = q
        self.state = state
        self.adapters = adapters
        self.on_control = on_control
        self.run_id = run_id
        self.version = version
        self.clock = clock
        self.instance_id = settings.instance_id
        self.data_dir = settings.data_dir
        self.spool_dir = os.path.join(self.data_dir, "spool")
        os.makedirs(self.spool_dir, exist_ok=True)
        self.parsers = {name: a.parse for name, a in adapters.items()}
        self.datasets = set(settings.datasets)   # a channel may feed more than was asked for
        self.sinks = {name: RowSink() for name in adapters}
        self.last_seen = {name: sink.last_seen for name, sink in self.sinks.items()}
        self.frames: dict[str, list] = {name: [] for name in adapters}
        self.spools: dict[tuple[str, str, str], Spool] = {}
        self.observers: list = []      # callables(exchange, dataset, table) after each flush
        self.storage = storage
        self.finalizer = Finalizer(self.data_dir, storage, state)
        self._seq = 0
        self._stopping = threading.Event()
        self._unparsed_log = logs.RateLimited(10.0)
        self._error_log = logs.RateLimited(10.0)
        self._pending_since_ns: int | None = None
        self._pending_frames = 0
        self.flushes = 0
        self.frames_processed = 0
        self.hold = threading.Event()      # tests: set to pause processing (simulates a slow disk)
        self.hold.set()

    # ---- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.finalizer.start()
        s = self.settings
        next_flush = self.clock() + s.flush_interval
        next_rotate = self._next_rotate(self.clock())
        q = self.queue
        while True:
            self.hold.wait()
            batch = self._take(q)
            if batch:
                self.process(batch)
                if s.writer_throttle_s:
                    time.sleep(s.writer_throttle_s)
            elif self._stopping.is_set():
                break
            else:
                time.sleep(0.005)
            now = self.clock()
            if now >= next_flush or self._pending_frames >= s.writer_batch * 5:
                self.flush()
                next_flush = now + s.flush_interval
            if now >= next_rotate:
                self.rotate()
                next_rotate = self._next_rotate(now)
        self.flush()
        self.rotate()
        self.finalizer.stop()

    def _take(self, q: queue.Queue) -> deque | None:
        """Swap out the queue's whole buffer in O(1) instead of get() per frame."""
        with q.mutex:
            if not q.queue:
                return None
            items = q.queue
            q.queue = deque()
            q.not_full.notify_all()
        return items

    def _next_rotate(self, now: float) -> float:
        r = self.settings.rotate_interval
        return (int(now // r) + 1) * r

    def stop(self, timeout: float = 60.0) -> None:
        """Drain what is queued, write every spool to Parquet, then return."""
        self._stopping.set()
        self.hold.set()
        self.join(timeout)

    # ---- per batch -----------------------------------------------------------------------------
    def process(self, batch) -> None:
        parsers, sinks, frames = self.parsers, self.sinks, self.frames
        on_control = self.on_control
        if self._pending_since_ns is None:
            self._pending_since_ns = batch[0][3]
            self.state.writer_oldest_pending_ns = self._pending_since_ns
        for item in batch:
            ex = item[0]
            frames[ex].append(item)
            try:
                ctrl = parsers[ex](item, sinks[ex])
            except Exception as e:  # noqa: BLE001 - a bad frame is counted, never fatal
                self.state.count("frames_unparsed", ex)
                self._unparsed_log(logging.WARNING, "frame_unparsed", key=ex, exchange=ex,
                                   conn_id=item[1], recv_seq=item[2], error=repr(e)[:200],
                                   payload=bytes(item[4][:200]).decode("utf-8", "backslashreplace")
                                   if isinstance(item[4], (bytes, bytearray)) else str(item[4])[:200])
                continue
            if ctrl is not None and ctrl.kind != "pong":
                try:
                    on_control(ex, item[1], ctrl)
                except Exception as e:  # noqa: BLE001
                    log.error("control_error", extra={"exchange": ex, "error": repr(e)})
        n = len(batch)
        self._pending_frames += n
        self.frames_processed += n

    def flush(self) -> None:
        """Append everything received since the last flush to the spools and fsync them."""
        if not self.storage.accepting():
            self._drop_spool_full()
            return
        wrote = False
        for ex in self.adapters:
            items = self.frames[ex]
            if not items:
                continue
            self.frames[ex] = []
            frames, bad_utf8 = schema.frames_table(ex, items)
            if bad_utf8:
                self.state.count("frames_non_utf8", ex, bad_utf8)
            tables = [("frames", frames)]
            for dataset, rows in self.sinks[ex].take().items():
                if rows and dataset in self.datasets:
                    table, rejected = schema.build_table(dataset, ex, rows)
                    if rejected:
                        self.state.count("rows_rejected", ex, rejected, dataset)
                        self._unparsed_log(logging.WARNING, "rows_rejected", key=(ex, dataset),
                                           exchange=ex, dataset=dataset, rows=rejected)
                    tables.append((dataset, table))
            for dataset, table in tables:
                self._append(dataset, ex, table)
                self.state.count("rows_written" if dataset != "frames" else "frames_written",
                                 ex, table.num_rows, dataset if dataset != "frames" else "")
                for observe in self.observers:
                    try:
                        observe(ex, dataset, table)
                    except Exception as e:  # noqa: BLE001
                        log.error("observer_error", extra={"error": repr(e)})
            wrote = True
        if wrote:
            for spool in self.spools.values():
                spool.sync()
            self.flushes += 1
        self._pending_since_ns = None
        self._pending_frames = 0
        self.state.writer_oldest_pending_ns = None

    def _drop_spool_full(self) -> None:
        """The spool is at its disk budget (storage.accepting() is False, e.g. a long S3
        outage): this flush's frames are dropped and counted per exchange; files already
        spooled are never touched."""
        for ex in self.adapters:
            items, self.frames[ex] = self.frames[ex], []
            self.sinks[ex].take()
            if items:
                self.state.count("frames_dropped_spool_full", ex, len(items))
                self._error_log(logging.ERROR, "spool_full_drop", key=ex, exchange=ex, frames=len(items))
        self._pending_since_ns = None
        self._pending_frames = 0
        self.state.writer_oldest_pending_ns = None

    def _append(self, dataset: str, exchange: str, table: pa.Table) -> None:
        for date, part in split_by_date(table):
            key = (dataset, exchange, date)
            spool = self.spools.get(key)
            if spool is None:
                self._seq += 1
                meta = schema.file_metadata(dataset, exchange, collector_version=self.version,
                                            instance_id=self.instance_id, run_id=self.run_id)
                spool = self.spools[key] = Spool(self.spool_dir, dataset, exchange, date,
                                                 self.instance_id, self.run_id, self._seq, meta)
            spool.append(part)

    def rotate(self) -> None:
        spools, self.spools = self.spools, {}
        for spool in spools.values():
            spool.close()
            self.finalizer.jobs.put(spool.path)


def recover(data_dir: str, storage, state, instance_id: str | None = None) -> int:
    """Turn spool files left by a killed run into Parquet; remove torn temporary files.

    With `instance_id`, only that instance's spool and temporary files are touched: processes
    with distinct instance ids may share one data_dir (supervisord: one program per exchange),
    and a starting sibling must not finalize or delete files another one is still writing."""
    spool_dir = os.path.join(data_dir, "spool")
    done = 0
    finalizer = Finalizer(data_dir, storage, state)
    if os.path.isdir(spool_dir):
        for name in sorted(os.listdir(spool_dir)):
            info = parse_spool_name(name)
            if instance_id is not None and (info is None or info["instance_id"] != instance_id):
                continue
            if name.endswith(SPOOL_SUFFIX):
                path = os.path.join(spool_dir, name)
                if finalizer.finalize(path):
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


# ".<parquet_name>.tmp": ".i-<instance>-<run id: YYYYMMDDTHHMMSSZ + 4 hex>-<seq>.parquet.tmp"
_TMP_NAME = re.compile(r"^\.i-(.+)-\d{8}T\d{6}Z[0-9a-f]{4}-\d+\.parquet\.tmp$")


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
                         final, None)
    storage.publish(final, rel)
    return final
