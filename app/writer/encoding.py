"""Encoding: one exchange's chunk of frames -> one Arrow table per dataset -> spool files.

Why a room of its own: this is the only place that calls the adapters (`parse_batch`, `parse`)
and turns rows into tables (app/schema.py), and the only place that writes spool files. What
comes in is a chunk of FrameBatches (app/writer/batching.py decides when and how big); what goes
out is Arrow record batches appended to the open spools, and the spools handed to the syncer
(at every flush) and, closed, to the finalizer (at every rotation: app/writer/upload.py).

Speed: the payloads of a chunk become one Arrow string column; the adapter's `parse_batch` turns
them into typed tables with Arrow's JSON reader and compute functions (C++, outside the GIL, so
the socket threads keep reading meanwhile), and only what it cannot handle goes through the
per-frame `parse`, as a `Frame`. A chunk's tables are appended to the spools at once.

Durability: rows are appended, as Arrow record batches, to one spool file (Arrow IPC stream)
per (dataset, exchange, date). The writer spools whatever it received at least every
flush_interval (so a `kill -9` loses at most one flush interval) and then hands the spools to
the syncer thread, which fsyncs them right after (a power loss may lose about one more).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from app import logs, schema
from app.exchanges import RowSink
from app.handoff import FrameBatch, items_at

log = logs.get()

BATCH_MIN_FRAMES = 64       # below this, per-frame parsing is cheaper than the Arrow set-up
SPOOL_SUFFIX = ".arrows"
_SEP = "~"
_SPOOL_FIELDS = ("dataset", "exchange", "date", "instance_id", "run_id", "seq")


def date_of_day(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def split_by_date(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Partition rows by the UTC date of ts_recv (almost always a single date)."""
    if table.num_rows == 0:
        return []
    days = pc.divide(table.column("ts_recv"), schema.NS_PER_DAY)
    lo, hi = pc.min_max(days).values()
    if lo.as_py() == hi.as_py():
        return [(date_of_day(lo.as_py()), table)]
    return [(date_of_day(d), table.filter(pc.equal(days, d)))
            for d in range(lo.as_py(), hi.as_py() + 1) if pc.any(pc.equal(days, d)).as_py()]


# ---- frames -> tables ---------------------------------------------------------------------------
class Encoder:
    """Chunks of one exchange's frames -> {dataset: Arrow table}, through its adapter.

    The adapter's `parse_batch` (Arrow, mostly outside the GIL) takes what it can; the frames it
    leaves (control messages, odd shapes, bad values) go through `parse` one by one, exactly as
    without a batch parser. Control messages go to `on_control`; `last_seen` (per exchange, what
    the adapters record per stream) is shared with the feed."""

    def __init__(self, adapters: dict, datasets, state, on_control):
        self.state = state
        self.on_control = on_control
        self.datasets = set(datasets)     # a channel may feed more than was asked for
        self.parsers = {name: a.parse for name, a in adapters.items()}
        self.batch_parsers = {name: a.parse_batch for name, a in adapters.items()}
        self.sinks = {name: RowSink() for name in adapters}
        self.last_seen = {name: sink.last_seen for name, sink in self.sinks.items()}
        self._unparsed_log = logs.RateLimited(10.0)
        self._error_log = logs.RateLimited(10.0)

    def encode(self, ex: str, batches: list[FrameBatch]) -> tuple[str | None, dict[str, pa.Table]]:
        """-> (the UTC date of every frame of the chunk, None if it spans midnight; one table per
        dataset asked for, "frames" always first)."""
        cols = schema.frame_columns(batches)
        if cols.bad_utf8:
            self.state.count("frames_non_utf8", ex, cols.bad_utf8)
        parts: dict[str, list] = {"frames": [schema.frames_table_from(ex, cols)]}
        leftover = self._parse_batch(ex, cols, parts) if len(cols) >= BATCH_MIN_FRAMES else None
        frames = items_at(batches, range(len(cols)) if leftover is None else leftover)
        self._parse_each(ex, frames, parts)
        first_day, last_day = (v.as_py() // schema.NS_PER_DAY for v in pc.min_max(cols.ts_recv).values())
        date = date_of_day(first_day) if first_day == last_day else None
        return date, self._tables(parts)

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

    def _parse_each(self, ex: str, frames: list, parts: dict) -> None:
        """Frame by frame: rows (tuples) -> one table per dataset into parts; controls routed."""
        sink = self.sinks[ex]
        parse, on_control = self.parsers[ex], self.on_control
        for frame in frames:
            try:
                ctrl = parse(frame, sink)
            except Exception as e:  # noqa: BLE001 - a bad frame is counted, never fatal
                self.state.count("frames_unparsed", ex)
                payload = frame.payload
                self._unparsed_log(logging.WARNING, "frame_unparsed", key=ex, exchange=ex,
                                   conn_id=frame.conn_id, recv_seq=frame.recv_seq, error=repr(e)[:200],
                                   payload=bytes(payload[:200]).decode("utf-8", "backslashreplace")
                                   if isinstance(payload, (bytes, bytearray)) else str(payload)[:200])
                continue
            if ctrl is not None and ctrl.kind != "pong":
                try:
                    on_control(ex, frame.conn_id, ctrl)
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

    def _tables(self, parts: dict) -> dict[str, pa.Table]:
        """One table per dataset asked for (and "frames"). A dataset built from more than one
        part (batch kinds + per-frame leftovers) is put back in arrival order: recv_seq, with a
        stable sort, so the rows of one frame keep their order."""
        out = {}
        for dataset, tables in parts.items():
            if dataset != "frames" and dataset not in self.datasets:
                continue
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if len(tables) > 1 and dataset != "frames":
                table = table.take(pc.sort_indices(table.column("recv_seq")))
            if table.num_rows:
                out[dataset] = table
        return out


# ---- tables -> spool files ----------------------------------------------------------------------
def spool_name(dataset: str, exchange: str, date: str, instance_id: str, run_id: str, seq: int) -> str:
    return _SEP.join((dataset, exchange, date, instance_id, run_id, f"{seq:06d}")) + SPOOL_SUFFIX


def parse_spool_name(path: str) -> dict | None:
    """A spool file's name -> its fields (see spool_name); None if it is not one."""
    base = os.path.basename(path)
    if not base.endswith(SPOOL_SUFFIX):
        return None
    parts = base[:-len(SPOOL_SUFFIX)].split(_SEP)
    if len(parts) != len(_SPOOL_FIELDS):
        return None
    return dict(zip(_SPOOL_FIELDS, parts))


class Spool:
    """One open Arrow IPC stream file collecting a (dataset, exchange, date) for one file."""

    def __init__(self, directory: str, dataset: str, exchange: str, date: str, instance_id: str,
                 run_id: str, seq: int, metadata: dict[bytes, bytes]):
        self.path = os.path.join(directory, spool_name(dataset, exchange, date, instance_id, run_id, seq))
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


class Spools:
    """This run's open spool files, one per (dataset, exchange, date), numbered in the order they
    were opened. `write` appends a table (split by UTC date unless the caller knows the date),
    counts it and shows it to the observers; `sync` hands every open spool to the syncer (a
    flush); `close_all` ends them (a rotation) and returns their paths, for the finalizer."""

    def __init__(self, directory: str, state, syncer: "Syncer", *, instance_id: str, run_id: str,
                 version: str, shard: str = "0/1", replica: str = ""):
        self.directory = directory
        self.state = state
        self.syncer = syncer
        self.instance_id, self.run_id, self.version = instance_id, run_id, version
        self.shard, self.replica = shard, replica
        self.observers: list = []      # callables(exchange, dataset, table) per table spooled
        self._open: dict[tuple[str, str, str], Spool] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self):
        return iter(self._open.values())

    def write(self, ex: str, dataset: str, table: pa.Table, date: str | None = None) -> None:
        """`date`: the UTC date of every row when the caller knows it (a chunk within one day)."""
        for date, part in ([(date, table)] if date else split_by_date(table)):
            self._spool(dataset, ex, date).append(part)
        self.state.count("rows_written" if dataset != "frames" else "frames_written",
                         ex, table.num_rows, dataset if dataset != "frames" else "")
        for observe in self.observers:
            try:
                observe(ex, dataset, table)
            except Exception as e:  # noqa: BLE001
                log.error("observer_error", extra={"error": repr(e)})

    def _spool(self, dataset: str, exchange: str, date: str) -> Spool:
        key = (dataset, exchange, date)
        spool = self._open.get(key)
        if spool is None:
            self._seq += 1
            meta = schema.file_metadata(dataset, exchange, collector_version=self.version,
                                        instance_id=self.instance_id, run_id=self.run_id,
                                        shard=self.shard, replica=self.replica)
            spool = self._open[key] = Spool(self.directory, dataset, exchange, date,
                                            self.instance_id, self.run_id, self._seq, meta)
        return spool

    def sync(self) -> None:
        for spool in self._open.values():
            self.syncer.add(spool.path, spool.sync_fd())

    def close_all(self) -> list[str]:
        spools, self._open = self._open, {}
        for spool in spools.values():
            self.syncer.add(spool.path, spool.close())
        return [spool.path for spool in spools.values()]


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
