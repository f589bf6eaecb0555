"""Batching: the writer thread. It takes frames from the queue, decides when and in which
chunks they are parsed, when the spools are flushed and when they are rotated, and paces its
own claim on the GIL.

Why a room of its own: this is the writer's timing, and only its timing. What a chunk becomes
(tables, spool files) is app/writer/encoding.py's; what a closed spool becomes (Parquet, then
storage) is app/writer/commit.py's and app/writer/upload.py's. Here:

- Taking: every queued FrameBatch at once (`take_all`, O(1)), into per-exchange pending lists.
- Chunking: pending frames are parsed every PARSE_INTERVAL_S (so a control message waits at most
  that long), at every flush, or as soon as writer_batch frames wait, in chunks of at most
  writer_batch frames: memory holds one chunk, not a flush interval.
- Flush (every flush_interval): whatever was received is in a spool, and the spools go to the
  syncer; a `kill -9` loses at most one flush interval.
- Rotation (every rotate_interval, aligned to the wall clock): the spools are closed and handed
  to the finalizer thread.
- Pacing (`Pacer`): a short GIL switch interval while the writer is behind, the interpreter's
  own again once it caught up and when it stops.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from app import logs
from app.handoff import FrameQueue
from app.writer.encoding import Encoder, Spools, Syncer
from app.writer.upload import Finalizer


PARSE_INTERVAL_S = 0.5      # pending frames (and so control messages) wait at most this long
IDLE_S = 0.005              # the queue was empty: look again after this long
# The writer's GIL priority (see Pacer): while frames wait longer than BEHIND_S, the switch
# interval drops to BEHIND_SWITCH_S, back to the interpreter's default under CAUGHT_UP_S.
BEHIND_S, CAUGHT_UP_S = 1.5, 0.75
BEHIND_SWITCH_S = 0.0005


class Pacer:
    """Gives the writer the GIL sooner while it is behind (`sys.setswitchinterval`, which is
    process-wide: `restore` when the writer ends).

    Every Arrow call of a chunk releases the GIL (~40 calls per exchange and chunk), and the
    writer must win it back from busy socket threads: it asks for a switch only after a switch
    interval (5 ms by default) in which no other thread took the GIL, so the wait is often longer
    (writer_parse_seconds vs writer_parse_cpu_seconds: ~half its parse time at the top rates
    while websocket-client parsed every frame, 6-17 % with one exchange and 19-46 % with three
    since the socket threads hand whole data frames over directly, `make bench` runs 8-14). When
    the writer is the bottleneck (three exchanges in one process) those waits decide whether it
    catches up; when it keeps up, a short interval only makes the socket threads switch more.
    So: a short interval while the oldest unparsed frame is older than BEHIND_S, the default
    again under CAUGHT_UP_S. Measured: `bench/writer.py --spin 1` parses OKX at 73k frames/s
    with 5 ms, 131k with 0.5 ms; at a fixed 105k frames/s on Binance (writer keeping up) a
    constant 0.5 ms cut what the sockets took in from 103-104k to 85-94k frames/s."""

    def __init__(self):
        self.behind = False
        self.default_switch = sys.getswitchinterval()

    def pace(self, oldest_ts_recv: int | None) -> None:
        """`oldest_ts_recv`: of the oldest frame not parsed yet (ns), None if there is none."""
        lag = (time.time_ns() - oldest_ts_recv) / 1e9 if oldest_ts_recv is not None else 0.0
        behind = lag > BEHIND_S or (self.behind and lag > CAUGHT_UP_S)
        if behind != self.behind:
            self.behind = behind
            sys.setswitchinterval(BEHIND_SWITCH_S if behind else self.default_switch)

    def restore(self) -> None:
        self.behind = False
        sys.setswitchinterval(self.default_switch)


class Writer(threading.Thread):
    """queue -> chunks -> encoder -> spools -> (rotation) finalizer.

    `q`: the collector's FrameQueue. The writer only calls its `take_all()` and
    `oldest_ts_recv()`, so a test or a bench may hand it a view of the queue instead (one that
    stalls after each take makes a slow writer: bench/collector_slow.py)."""

    def __init__(self, settings, q: FrameQueue, state, storage, adapters: dict, on_control,
                 *, run_id: str, version: str, clock=time.time):
        super().__init__(name="writer", daemon=True)
        self.settings = settings
        self.queue = q
        self.state = state
        self.storage = storage
        self.clock = clock
        self.run_id = run_id
        self.version = version
        self.instance_id = settings.instance_id
        self.data_dir = settings.data_dir
        self.spool_dir = os.path.join(self.data_dir, "spool")
        os.makedirs(self.spool_dir, exist_ok=True)
        self.encoder = Encoder(adapters, settings.datasets, state, on_control)
        self.syncer = Syncer(state)
        self.spools = Spools(self.spool_dir, state, self.syncer, instance_id=self.instance_id,
                             run_id=run_id, version=version, shard=str(settings.shard),
                             replica=settings.replica)
        self.finalizer = Finalizer(self.data_dir, storage, state)
        self.pacer = Pacer()
        # shared with the feed (last ids per stream) and the gap detector (tables spooled)
        self.last_seen = self.encoder.last_seen
        self.observers = self.spools.observers    # callables(exchange, dataset, table)
        # frames taken from the queue, not parsed yet (parsed per chunk: parse_pending)
        self.pending: dict[str, list] = {name: [] for name in adapters}
        self._unparsed = 0
        self._pending_since_ns: int | None = None
        self._pending_frames = 0
        self._stopping = threading.Event()
        self._drop_log = logs.RateLimited(10.0)
        self.flushes = 0
        self.frames_processed = 0

    @property
    def stopping(self) -> bool:
        """stop() was called: the writer drains the queue, writes every spool, ends."""
        return self._stopping.is_set()

    # ---- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.finalizer.start()
        try:
            self._loop()
            self.flush()
            self.rotate()
            self.finalizer.stop()
            self.syncer.stop()
        finally:
            self.pacer.restore()

    def _loop(self) -> None:
        s = self.settings
        next_flush = self.clock() + s.flush_interval
        next_rotate = self._next_rotate(self.clock())
        next_parse = 0.0
        last_now = self.clock()
        q = self.queue
        while True:
            batches = q.take_all()
            if batches:
                self.process(batches)
            elif self._stopping.is_set():
                return
            else:
                time.sleep(IDLE_S)
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

    def _pace(self) -> None:
        """The Pacer, told the age of the oldest frame not parsed yet (pending or queued)."""
        oldest = [b[0].ts_recv[0] for b in self.pending.values() if b]
        queued = self.queue.oldest_ts_recv()
        if queued is not None:
            oldest.append(queued)
        self.pacer.pace(min(oldest) if oldest else None)

    def _next_rotate(self, now: float) -> float:
        r = self.settings.rotate_interval
        return (int(now // r) + 1) * r

    def stop(self, timeout: float = 60.0) -> None:
        """Drain what is queued, write every spool to Parquet, then return."""
        self._stopping.set()
        self.join(timeout)

    # ---- per batch -----------------------------------------------------------------------------
    def process(self, batches) -> None:
        """FrameBatches from the queue -> per-exchange pending lists, parsed in chunks
        (`parse_pending`: every PARSE_INTERVAL_S, at flush, or here once writer_batch frames
        wait). Chunks grow with the backlog: each Arrow call releases the GIL and must win it
        back from busy socket threads (~40 calls per exchange and chunk, see Pacer), so a
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
                    self._spool_chunk(ex, chunk)
                    chunk, size = [], 0
            if chunk:
                self._spool_chunk(ex, chunk)
            # wall vs CPU: the gap is time spent waiting, mostly for the GIL (socket threads)
            self.state.count("writer_parse_seconds", ex, time.perf_counter() - wall)
            self.state.count("writer_parse_cpu_seconds", ex, time.thread_time() - cpu)
        self._unparsed = 0

    def _spool_chunk(self, ex: str, batches: list) -> None:
        date, tables = self.encoder.encode(ex, batches)
        for dataset, table in tables.items():
            self.spools.write(ex, dataset, table, date)

    def _drop_spool_full(self, ex: str, n: int) -> None:
        """The spool is at its disk budget (storage.accepting() is False, e.g. a long S3
        outage): these frames are dropped and counted per exchange; files already spooled are
        never touched."""
        self.state.count("frames_dropped_spool_full", ex, n)
        self._drop_log(logging.ERROR, "spool_full_drop", key=ex, exchange=ex, frames=n)

    def flush(self) -> None:
        """Parse and spool everything received since the last flush; the spools go to the syncer."""
        self.parse_pending()
        if self._pending_frames:
            self.spools.sync()
            self.flushes += 1
        self._pending_since_ns = None
        self._pending_frames = 0
        self.state.writer_oldest_pending_ns = None

    def rotate(self) -> None:
        """Close every spool (its last fsync is the syncer's) and hand it to the finalizer."""
        for path in self.spools.close_all():
            self.finalizer.jobs.put(path)
