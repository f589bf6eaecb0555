"""The writer thread: queue -> adapters (in batches) -> Arrow -> spool -> Parquet.

Speed: frames are taken from the queue all at once and parsed in chunks (every
PARSE_INTERVAL_S, or once writer_batch frames wait): the payloads become one Arrow string
column, the adapter's `parse_batch` turns them into typed tables with Arrow's JSON reader and
compute functions (C++, outside the GIL, so the socket threads keep reading meanwhile), and
only what it cannot handle goes through the per-frame `parse`. Each chunk's tables are
appended to the spools at once, so memory holds one chunk, not a flush interval.

Durability: rows are appended, as Arrow record batches, to one spool file (Arrow IPC stream) per
(dataset, exchange, date); whatever was received is in a spool at the latest every
`flush_interval` (so a `kill -9` loses at most one flush interval), and the syncer thread fsyncs
the spools right after (a power loss may lose about one more). Every `rotate_interval` (aligned
to the wall clock) the spools are closed and handed to the finalizer thread, which streams each
into one zstd Parquet file (a row group at a time) under a temporary name and renames it: a
visible Parquet file is always complete. Parquet encoding runs off the writer thread (and mostly
outside the GIL), so rotation never stalls parsing. At start, spool left by a killed run is
turned into Parquet first (`recover`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app import logs, schema
from app.handoff import FrameQueue, items_at
from app.exchanges import RowSink

log = logs.get()

SPOOL_SUFFIX = ".arrows"
PARSE_INTERVAL_S = 0.5      # pending frames (and so control messages) wait at most this long
BATCH_MIN_FRAMES = 64       # below this, per-frame parsing is cheaper than the Arrow set-up
ROW_GROUP_BYTES = 16 * 1024 * 1024   # Arrow bytes per Parquet row group: bounds the finalizer's memory
_SEP = "~"
# The writer's GIL priority (see Writer._pace): while frames wait longer than BEHIND_S, the switch
# interval drops to BEHIND_SWITCH_S, back to the interpreter's default under CAUGHT_UP_S.
BEHIND_S, CAUGHT_UP_S = 1.5, 0.75
BEHIND_SWITCH_S = 0.0005


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
        # Arrow's own file (writes outside the GIL): through a Python file object every buffer
        # written took the GIL back, ~20 times per table (5 ms each while socket threads run).
        # fsync goes through a second descriptor of the same file.
        self._file = pa.OSFile(self.path, "wb")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._writer = pa.ipc.new_stream(self._file, schema.SCHEMAS[dataset].with_metadata(metadata))

    def append(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def sync_fd(self) -> int:
        """A new descriptor of the file, for the Syncer (which closes it)."""
        return os.dup(self._fd)

    def close(self) -> int:
        """End the stream. -> the file's descriptor, for its last fsync (the Syncer's now)."""
        self._writer.close()
        self._file.close()
        return self._fd


class Syncer(threading.Thread):
    """fsyncs spool files off the writer thread. An fsync waits for the disk, and then the
    writer waits for the GIL again: at a flush of 15 spools (three exchanges at 100k frames/s)
    that was ~0.1 s of the writer's time, every flush_interval, while the queue grew; on a
    slow disk it would be the writer's whole budget. Descriptors handed over (`add`) are
    fsynced and closed in the next pass; a file added again before that is fsynced once."""

    def __init__(self, state):
        super().__init__(name="syncer", daemon=True)
        self.state = state
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._launched = False

    def add(self, path: str, fd: int) -> None:
        """Takes ownership of fd (a descriptor of the file at path)."""
        with self._lock:
            if self._stopping:              # nothing runs passes any more: fsync here
                self._sync(path, fd)
                return
            old = self._pending.pop(path, None)
            self._pending[path] = fd
            if not self._launched:
                self._launched = True
                self.start()
        if old is not None:
            os.close(old)
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
                stopping = self._stopping
            for path, fd in pending.items():
                self._sync(path, fd)
            if stopping:
                return

    def _sync(self, path: str, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:       # the data may not be on disk: say so, loudly
            self.state.writer_error = f"fsync {os.path.basename(path)}: {e!r}"
            log.error("spool_fsync_failed", extra={"spool": path, "error": repr(e)})
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        """fsync what was handed over, then end."""
        with self._lock:
            self._stopping = True
            launched = self._launched
        if launched:
            self._wake.set()
            self.join()


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


def write_parquet_atomic(table: pa.Table, final_path: str) -> int:
    """Reference data (never RAW: the datasets go through `spool_to_parquet`) under a temporary
    name, fsync, rename: the final name only ever holds a whole file."""
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = _tmp_name(final_path)
    pq.write_table(table, tmp, compression="zstd")
    return _publish_tmp(tmp, final_path)


def _tmp_name(final_path: str) -> str:
    return os.path.join(os.path.dirname(final_path), "." + os.path.basename(final_path) + ".tmp")


def _publish_tmp(tmp: str, final_path: str) -> int:
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
    """Stream a spool file into Parquet, one row group of about ROW_GROUP_BYTES at a time, so
    the finalizer's memory is bounded by that, not by the rotate interval times the rate. Same
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
    return rows, _publish_tmp(tmp, final_path)


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
        done = None
        if info is not None:
            rel = os.path.join(schema.partition_path(info["dataset"], info["exchange"], info["date"]),
                               parquet_name(info["instance_id"], info["run_id"], info["seq"]))
            final = os.path.join(self.data_dir, rel)
            done = spool_to_parquet(path, final, info["dataset"], info["exchange"])
        if done is None:
            log.error("spool_unreadable", extra={"spool": path})
            os.replace(path, path + ".bad")
            return None
        rows, size = done
        os.remove(path)
        if not rows:
            return None
        self.state.count("files_written", info["exchange"], 1, info["dataset"])
        self.state.count("bytes_written", info["exchange"], size, info["dataset"])
        log.info("file_written", extra={"path": final, "dataset": info["dataset"],
                                        "exchange": info["exchange"], "rows": rows,
                                        "bytes": size})
        self.storage.publish(final, rel)
        return final

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()


class Writer(threading.Thread):
    def __init__(self, settings, q: FrameQueue, state, storage, adapters: dict, on_control,
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
        self.batch_parsers = {name: a.parse_batch for name, a in adapters.items()
                              if hasattr(a, "parse_batch")}
        self.datasets = set(settings.datasets)   # a channel may feed more than was asked for
        self.sinks = {name: RowSink() for name in adapters}
        self.last_seen = {name: sink.last_seen for name, sink in self.sinks.items()}
        # frames taken from the queue, not parsed yet (parsed per chunk: parse_pending)
        self.pending: dict[str, list] = {name: [] for name in adapters}
        self._unparsed = 0
        self.spools: dict[tuple[str, str, str], Spool] = {}
        self.observers: list = []      # callables(exchange, dataset, table) per table spooled
        self.storage = storage
        self.finalizer = Finalizer(self.data_dir, storage, state)
        self.syncer = Syncer(state)
        self._seq = 0
        self._stopping = threading.Event()
        self._unparsed_log = logs.RateLimited(10.0)
        self._error_log = logs.RateLimited(10.0)
        self._pending_since_ns: int | None = None
        self._pending_frames = 0
        self.flushes = 0
        self.frames_processed = 0
        self._behind = False
        self._default_switch = sys.getswitchinterval()
        self.hold = threading.Event()      # tests: set to pause processing (simulates a slow disk)
        self.hold.set()

    # ---- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.finalizer.start()
        s = self.settings
        next_flush = self.clock() + s.flush_interval
        next_rotate = self._next_rotate(self.clock())
        next_parse = 0.0
        last_now = self.clock()
        q = self.queue
        while True:
            self.hold.wait()
            batch = q.take_all()
            if batch:
                self.process(batch)
                if s.writer_throttle_s or s.writer_throttle_file:
                    self._throttle()
            elif self._stopping.is_set():
                break
            else:
                time.sleep(0.005)
            now = self.clock()
            if now < last_now:                 # the wall clock stepped back (NTP, VM): re-arm the
                next_parse = next_flush = now  # deadlines, or data would wait in memory (and files
                next_rotate = self._next_rotate(now)   # stay open) for as long as the step
            last_now = now
            if now >= next_parse:              # control messages wait at most PARSE_INTERVAL_S
                self._pace()
                self.parse_pending()
                next_parse = now + PARSE_INTERVAL_S
            if now >= next_flush or self._pending_frames >= s.writer_batch * 2:
                self.flush()
                next_flush = now + s.flush_interval
            if now >= next_rotate:
                self.rotate()
                next_rotate = self._next_rotate(now)
        self.flush()
        self.rotate()
        self.finalizer.stop()
        self.syncer.stop()
        sys.setswitchinterval(self._default_switch)

    def _pace(self) -> None:
        """Give the writer the GIL sooner while it is behind. Every Arrow call of a chunk releases
        the GIL (~40 calls per exchange and chunk), and the writer must win it back from busy
        socket threads: it asks for a switch only after a switch interval (5 ms by default) in
        which no other thread took the GIL, so the wait is often longer (writer_parse_seconds vs
        writer_parse_cpu_seconds: ~half its parse time at the top rates while websocket-client
        parsed every frame, 6-17 % with one exchange and 19-46 % with three since the socket
        threads hand whole data frames over directly, `make bench` runs 8-14). When the
        writer is the bottleneck (three exchanges in one process) those waits decide whether it
        catches up; when it keeps up, a short interval only makes the socket threads switch
        more. So: a short interval while the oldest unparsed frame is older than BEHIND_S, the
        default again under CAUGHT_UP_S. Measured: `bench/writer.py --spin 1` parses OKX at 73k frames/s with
        5 ms, 131k with 0.5 ms; at a fixed 105k frames/s on Binance (writer keeping up) a
        constant 0.5 ms cut what the sockets took in from 103-104k to 85-94k frames/s."""
        oldest = [b[0].ts_recv[0] for b in self.pending.values() if b]
        queued = self.queue.oldest_ts_recv()
        if queued is not None:
            oldest.append(queued)
        lag = (time.time_ns() - min(oldest)) / 1e9 if oldest else 0.0
        behind = lag > BEHIND_S or (self._behind and lag > CAUGHT_UP_S)
        if behind != self._behind:
            self._behind = behind
            sys.setswitchinterval(BEHIND_SWITCH_S if behind else self._default_switch)

    def _throttle(self) -> None:
        """Testing only: sleep after a batch, writer_throttle_s or the seconds written in
        writer_throttle_file (re-read every 0.2 s while sleeping: lowering it or removing the
        file ends the sleep), so a soak can make the queue fill and then recover at run time."""
        s = self.settings
        if not s.writer_throttle_file:
            time.sleep(s.writer_throttle_s)
            return

        def seconds() -> float:
            try:
                with open(s.writer_throttle_file) as f:
                    return max(0.0, float(f.read().strip() or 0))
            except (OSError, ValueError):
                return s.writer_throttle_s
        end = time.monotonic() + seconds()
        while not self._stopping.is_set() and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            end = min(end, time.monotonic() + seconds())

    def _next_rotate(self, now: float) -> float:
        r = self.settings.rotate_interval
        return (int(now // r) + 1) * r

    def stop(self, timeout: float = 60.0) -> None:
        """Drain what is queued, write every spool to Parquet, then return."""
        self._stopping.set()
        self.hold.set()
        self.join(timeout)

    # ---- per batch -----------------------------------------------------------------------------
    def process(self, batches) -> None:
        """FrameBatches from the queue -> per-exchange pending lists, parsed in chunks
        (`parse_pending`: every PARSE_INTERVAL_S, at flush, or here once writer_batch frames
        wait). Chunks grow with the backlog: each Arrow call releases the GIL and must win it
        back from busy socket threads (~40 calls per exchange and chunk, see `_pace`), so a
        writer that falls behind takes more frames at once and spends fewer hand-backs per
        frame. Capped at 50k frames, it fell behind for good at 95k frames/s (queue full within
        a minute); capped at writer_batch (100k), it stays within ~1-2 s,
        while at moderate rates chunks stay small (memory: one 0.5 s chunk)."""
        if not batches:
            return
        if self._pending_since_ns is None:
            self._pending_since_ns = batches[0].ts_recv[0]
            self.state.writer_oldest_pending_ns = self._pending_since_ns
        pending = self.pending
        n = 0
        for b in batches:
            pending[b.exchange].append(b)
            n += len(b)
        self._pending_frames += n
        self._unparsed += n
        self.frames_processed += n
        if self._unparsed >= self.settings.writer_batch:
            self.parse_pending()

    def parse_pending(self) -> None:
        """Parse what is pending and append it to the spools (fsynced after the next flush), in
        chunks of at most writer_batch frames: only one chunk of Arrow data is ever in memory."""
        accepting = self.storage.accepting()
        chunk_frames = self.settings.writer_batch
        for ex, batches in self.pending.items():
            if not batches:
                continue
            self.pending[ex] = []
            if not accepting:
                self._drop_spool_full(ex, sum(map(len, batches)))
                continue
            wall, cpu = time.perf_counter(), time.thread_time()
            chunk, size = [], 0
            for b in batches:
                chunk.append(b)
                size += len(b)
                if size >= chunk_frames:
                    self._parse_chunk(ex, chunk)
                    chunk, size = [], 0
            if chunk:
                self._parse_chunk(ex, chunk)
            # wall vs CPU: the gap is time spent waiting, mostly for the GIL (socket threads)
            self.state.count("writer_parse_seconds", ex, time.perf_counter() - wall)
            self.state.count("writer_parse_cpu_seconds", ex, time.thread_time() - cpu)
        self._unparsed = 0

    def _parse_chunk(self, ex: str, batches: list) -> None:
        """One exchange's frames -> the frames table and the datasets' tables -> the spools.

        The adapter's `parse_batch` (Arrow, mostly outside the GIL) takes what it can; the
        frames it leaves (control messages, odd shapes, bad values) go through `parse` one by
        one, exactly as without a batch parser."""
        cols = schema.frame_columns(batches)
        if cols.bad_utf8:
            self.state.count("frames_non_utf8", ex, cols.bad_utf8)
        parts: dict[str, list] = {"frames": [schema.frames_table_from(ex, cols)]}
        leftover = self._parse_batch(ex, cols, parts) if len(cols) >= BATCH_MIN_FRAMES else None
        items = items_at(batches, range(len(cols)) if leftover is None else leftover)
        self._parse_each(ex, items, parts)
        self._spool_parts(ex, cols, parts)

    def _parse_batch(self, ex: str, cols, parts: dict) -> list[int] | None:
        """The adapter's batch parser, if it has one: tables into parts; -> the frames it left."""
        batch_parse = self.batch_parsers.get(ex)
        if batch_parse is None:
            return None
        try:
            result = batch_parse(cols)
        except Exception as e:  # noqa: BLE001 - the per-frame path still parses everything
            self._error_log(logging.ERROR, "batch_parse_failed", key=ex, exchange=ex, error=repr(e)[:300])
            return None
        for dataset, tables in result.tables.items():
            parts.setdefault(dataset, []).extend(tables)
        self.sinks[ex].last_seen.update(result.last_seen)
        return result.leftover

    def _parse_each(self, ex: str, items: list, parts: dict) -> None:
        """Frame by frame: rows (tuples) -> one table per dataset into parts; controls routed."""
        sink = self.sinks[ex]
        parse, on_control = self.parsers[ex], self.on_control
        for item in items:
            try:
                ctrl = parse(item, sink)
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
        for dataset, rows in sink.take().items():
            if rows:
                table, rejected = schema.build_table(dataset, ex, rows)
                if rejected:
                    self.state.count("rows_rejected", ex, rejected, dataset)
                    self._unparsed_log(logging.WARNING, "rows_rejected", key=(ex, dataset),
                                       exchange=ex, dataset=dataset, rows=rejected)
                parts.setdefault(dataset, []).append(table)

    def _spool_parts(self, ex: str, cols, parts: dict) -> None:
        """Each dataset's table of the chunk -> its spool. A dataset built from more than one
        part (batch kinds + per-frame leftovers) is put back in arrival order: recv_seq, with a
        stable sort, so the rows of one frame keep their order."""
        first_day, last_day = (v.as_py() // schema.NS_PER_DAY for v in pc.min_max(cols.ts_recv).values())
        date = _date_of_day(first_day) if first_day == last_day else None   # else split per table
        for dataset, tables in parts.items():
            if dataset != "frames" and dataset not in self.datasets:
                continue
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if len(tables) > 1 and dataset != "frames":
                table = table.take(pc.sort_indices(table.column("recv_seq")))
            if table.num_rows:
                self._write(ex, dataset, table, date)

    def _write(self, ex: str, dataset: str, table: pa.Table, date: str | None = None) -> None:
        self._append(dataset, ex, table, date)
        self.state.count("rows_written" if dataset != "frames" else "frames_written",
                         ex, table.num_rows, dataset if dataset != "frames" else "")
        for observe in self.observers:
            try:
                observe(ex, dataset, table)
            except Exception as e:  # noqa: BLE001
                log.error("observer_error", extra={"error": repr(e)})

    def flush(self) -> None:
        """Parse and spool everything received since the last flush; the spools go to the syncer."""
        self.parse_pending()
        if self._pending_frames:
            for spool in self.spools.values():
                self.syncer.add(spool.path, spool.sync_fd())
            self.flushes += 1
        self._pending_since_ns = None
        self._pending_frames = 0
        self.state.writer_oldest_pending_ns = None

    def _drop_spool_full(self, ex: str, n: int) -> None:
        """The spool is at its disk budget (storage.accepting() is False, e.g. a long S3
        outage): these frames are dropped and counted per exchange; files already spooled are
        never touched."""
        self.state.count("frames_dropped_spool_full", ex, n)
        self._error_log(logging.ERROR, "spool_full_drop", key=ex, exchange=ex, frames=n)

    def _append(self, dataset: str, exchange: str, table: pa.Table, date: str | None = None) -> None:
        """`date`: the UTC date of every row when the caller knows it (a chunk within one day)."""
        for date, part in ([(date, table)] if date else split_by_date(table)):
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
            self.syncer.add(spool.path, spool.close())
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
                         final)
    storage.publish(final, rel)
    return final
