"""Writer durability: spool -> Parquet, torn spool after kill -9, date partitioning."""
import glob
import os
import time

import pyarrow.parquet as pq

from app import settings as settings_mod, writer as writer_mod
from app.exchanges import create
from app.state import State
from app.storage import LocalStorage
from app.handoff import FrameQueue, from_items

BOOK = b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%d,"s":"BTCUSDT","b":"100.1","B":"1","a":"100.2","A":"2","T":1700000000000,"E":1700000000001}}'


def make_writer(tmp_path, writer_cls=writer_mod.Writer, **over):
    s = settings_mod.load(None, environ={}, dotenv_path=str(tmp_path / ".env")).replace(
        data_dir=str(tmp_path), exchanges=["binance"], **over)
    q = FrameQueue(maxsize=1000)
    state = State(exchanges=["binance"], queue=q)
    controls = []
    w = writer_cls(s, q, state, LocalStorage(s, state), {"binance": create("binance")},
                   on_control=lambda *a: controls.append(a), run_id="RUN1", version="t")
    return w, q, state, controls


def items(n, start=1, ts=None):
    ts = ts or time.time_ns()
    return [("binance", 1, start + i, ts + i, BOOK % (start + i)) for i in range(n)]


def test_flush_then_rotate_writes_parquet(tmp_path):
    w, q, state, controls = make_writer(tmp_path)
    w.finalizer.start()
    w.process(from_items(items(10) + [("binance", 1, 11, time.time_ns(), b'{"result":null,"id":3}'),
                           ("binance", 1, 12, time.time_ns(), b'{garbage')]))
    w.flush()
    assert glob.glob(str(tmp_path / "spool" / "*.arrows"))
    w.rotate()
    w.finalizer.stop()
    bbo = glob.glob(str(tmp_path / "raw/v1/bbo/binance/date=*/i-*-RUN1-*.parquet"))
    frames = glob.glob(str(tmp_path / "raw/v1/frames/binance/date=*/*.parquet"))
    assert len(bbo) == 1 and len(frames) == 1
    t = pq.read_table(bbo[0])
    assert t.num_rows == 10 and t.column("update_id").to_pylist() == list(range(1, 11))
    meta = pq.read_schema(bbo[0]).metadata
    assert meta[b"run_id"] == b"RUN1" and meta[b"dataset"] == b"bbo" and meta[b"schema_version"] == b"1"
    f = pq.read_table(frames[0])
    assert f.column("recv_seq").to_pylist() == list(range(1, 13))    # control + garbage frames too
    assert state.total("frames_unparsed") == 1
    assert controls and controls[0][2].kind == "ack"
    assert not glob.glob(str(tmp_path / "spool" / "*.arrows"))


def test_torn_spool_is_recovered(tmp_path):
    w, q, state, _ = make_writer(tmp_path)
    w.process(from_items(items(5, 1)))
    w.flush()
    w.process(from_items(items(5, 6)))
    w.flush()
    spools = glob.glob(str(tmp_path / "spool" / "bbo~*.arrows"))
    assert len(spools) == 1
    # simulate kill -9 in the middle of a third append: a torn tail
    with open(spools[0], "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00\x00\x00partial")
    recovered = writer_mod.recover(str(tmp_path), LocalStorage(w.settings, state), state)
    assert recovered >= 2
    files = glob.glob(str(tmp_path / "raw/v1/bbo/**/*.parquet"), recursive=True)
    assert len(files) == 1
    assert pq.read_table(files[0]).column("update_id").to_pylist() == list(range(1, 11))
    assert "RUN1" in os.path.basename(files[0])


def test_split_by_date_at_midnight(tmp_path):
    midnight = 1_700_006_400 * 10**9   # 2023-11-15T00:00:00Z
    w, q, state, _ = make_writer(tmp_path)
    w.finalizer.start()
    w.process(from_items([("binance", 1, 1, midnight - 1, BOOK % 1), ("binance", 1, 2, midnight, BOOK % 2)]))
    w.flush()
    w.rotate()
    w.finalizer.stop()
    dates = sorted(os.path.basename(os.path.dirname(p)) for p in
                   glob.glob(str(tmp_path / "raw/v1/bbo/binance/*/*.parquet")))
    assert dates == ["date=2023-11-14", "date=2023-11-15"]


def test_run_drains_queue_on_stop(tmp_path):
    w, q, state, _ = make_writer(tmp_path)
    for batch in from_items(items(50)):
        q.put_nowait(batch)
    w.start()
    w.stop()
    files = glob.glob(str(tmp_path / "raw/v1/bbo/**/*.parquet"), recursive=True)
    assert sum(pq.read_metadata(p).num_rows for p in files) == 50
    assert state.total("rows_written", "binance", "bbo") == 50


def test_frames_queued_just_before_stop_reach_parquet(tmp_path, monkeypatch):
    """stop() right after the last frames were queued, no pause in between: the running writer
    takes them, and its final flush parses and spools them before the last rotation, so they are
    in Parquet. The parse interval and the flush interval are made longer than the test, so
    nothing but that final flush can write them."""
    from tests.helpers import wait_until
    monkeypatch.setattr(writer_mod.batching, "PARSE_INTERVAL_S", 3600.0)
    w, q, state, _ = make_writer(tmp_path, flush_interval=3600.0, rotate_interval=3600.0)
    for batch in from_items(items(20, 1)):
        q.put_nowait(batch)
    w.start()
    wait_until(lambda: w.frames_processed == 20, 10, interval=0.01, what="the first frames taken")
    for batch in from_items(items(30, 21)):      # queued while the writer runs ...
        q.put_nowait(batch)
    w.stop()                                     # ... and stopped at once
    assert not w.is_alive()
    files = glob.glob(str(tmp_path / "raw/v1/bbo/**/*.parquet"), recursive=True)
    ids = sorted(v for p in files for v in pq.read_table(p).column("update_id").to_pylist())
    assert ids == list(range(1, 51))
    frames = glob.glob(str(tmp_path / "raw/v1/frames/**/*.parquet"), recursive=True)
    assert sorted(v for p in frames for v in pq.read_table(p).column("recv_seq").to_pylist()) == list(range(1, 51))
    assert state.total("rows_written", "binance", "bbo") == 50
    assert not glob.glob(str(tmp_path / "spool" / "*.arrows"))


def test_backlog_is_parsed_in_chunks_of_writer_batch(tmp_path):
    """A writer behind takes bigger chunks, but not more than writer_batch frames at once (give
    or take one socket micro-batch: the bound on its Arrow memory); every frame lands, in order."""
    import pyarrow as pa
    w, q, state, _ = make_writer(tmp_path, writer_batch=100)
    # micro-batches of 50 frames, as two connections hand them over in turn
    frames = [(ex, 1 + (seq - 1) // 50 % 2, seq, ts, payload) for ex, _c, seq, ts, payload in items(350)]
    w.process(from_items(frames[:60]))         # below writer_batch: waits for the parse interval
    assert not glob.glob(str(tmp_path / "spool" / "bbo~*.arrows"))
    w.process(from_items(frames[60:]))         # a backlog of 350: parsed now, in chunks
    spools = glob.glob(str(tmp_path / "spool" / "bbo~*.arrows"))
    assert len(spools) == 1
    with pa.OSFile(spools[0], "rb") as f:
        batches = list(pa.ipc.open_stream(f))
    assert [b.num_rows for b in batches] == [100, 100, 100, 50]
    ids = [v for b in batches for v in b.column(b.schema.get_field_index("update_id")).to_pylist()]
    assert ids == list(range(1, 351))
    assert state.total("rows_written", "binance", "bbo") == 350


def test_writer_behind_gets_a_short_gil_switch_interval_until_caught_up(tmp_path):
    """While the oldest unparsed frame is older than BEHIND_S, the writer wins the GIL back sooner
    (a short switch interval); once it is under CAUGHT_UP_S the interpreter's default returns."""
    import sys
    default = sys.getswitchinterval()
    w, q, state, _ = make_writer(tmp_path, writer_batch=10_000)
    now = time.time_ns()
    try:
        w.process(from_items(items(20, 1, ts=now - int(0.5e9))))      # 0.5 s old: keeping up
        w._pace()
        assert sys.getswitchinterval() == default
        for batch in from_items(items(20, 21, ts=now - int(2e9))):      # 2 s old, still queued
            q.put_nowait(batch)
        w._pace()
        assert sys.getswitchinterval() == writer_mod.BEHIND_SWITCH_S
        w.parse_pending()
        w.process(q.take_all())
        w.parse_pending()
        w.process(from_items(items(20, 41, ts=time.time_ns() - int(1.0e9))))  # between the marks
        w._pace()
        assert sys.getswitchinterval() == writer_mod.BEHIND_SWITCH_S        # hysteresis: still behind
        w.parse_pending()
        w.process(from_items(items(20, 61, ts=time.time_ns())))
        w._pace()
        assert sys.getswitchinterval() == default
    finally:
        sys.setswitchinterval(default)
    w.parse_pending()
    w.process(from_items(items(5, 81, ts=time.time_ns() - int(3e9))))
    w._pace()
    assert sys.getswitchinterval() == writer_mod.BEHIND_SWITCH_S
    w.start()
    w.stop()
    assert sys.getswitchinterval() == default        # restored when the writer ends


def test_spools_are_fsynced_off_the_writer_thread_and_descriptors_closed(tmp_path, monkeypatch):
    """flush and rotate hand the spools to the syncer: the fsyncs run on its thread, every file
    is fsynced after its last hand-over (the rotation's, after the stream ended), hand-overs
    made while a pass runs are coalesced, and every descriptor is closed."""
    import threading
    events, release = [], threading.Event()      # ("add" | "fsync", path, thread name), in order
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")   # finalized already
        if "/spool/" in path:            # not the finalizer's Parquet files
            release.wait(10)             # hold the first pass, so later hand-overs coalesce
            events.append(("fsync", path, threading.current_thread().name))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    def spool_fds():
        return [f for f in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{f}").startswith(str(tmp_path / "spool"))]
    w, q, state, _ = make_writer(tmp_path)
    add = w.syncer.add
    monkeypatch.setattr(w.syncer, "add", lambda path, fd: (events.append(("add", path, "")), add(path, fd)))
    w.finalizer.start()
    for start in (1, 6, 11):             # the first pass is held; the other flushes pile up
        w.process(from_items(items(5, start)))
        w.flush()
    spools = sorted(glob.glob(str(tmp_path / "spool" / "*.arrows")))
    assert [os.path.basename(p).split("~")[0] for p in spools] == ["bbo", "frames"]
    assert len(spool_fds()) >= 2 * 2     # each open spool's own + the handed-over duplicates
    release.set()
    w.rotate()                           # the last hand-over of each spool: its own descriptor
    w.finalizer.stop()
    w.syncer.stop()
    synced = [e for e in events if e[0] == "fsync"]
    assert {thread for _, _, thread in synced} == {"syncer"}
    for p in spools:
        last_add = max(i for i, e in enumerate(events) if e[:2] == ("add", p))
        assert any(e[:2] == ("fsync", p) for e in events[last_add:]), p
    assert sum(e[0] == "add" for e in events) == 2 * 4
    assert len(synced) <= 2 * 3          # coalesced: 2 files x (3 flushes + rotation) otherwise
    assert spool_fds() == []
    assert not state.writer_error
    assert len(glob.glob(str(tmp_path / "raw/v1/bbo/**/*.parquet"), recursive=True)) == 1


def test_parse_time_is_counted_per_exchange_wall_and_cpu(tmp_path):
    """writer_parse_seconds (wall) and writer_parse_cpu_seconds (its CPU) grow with each parse:
    the gap between them is the writer's waiting, which /metrics and the bench report."""
    w, q, state, _ = make_writer(tmp_path)
    assert state.total("writer_parse_seconds") == 0
    w.process(from_items(items(2000)))
    w.parse_pending()
    wall, cpu = state.total("writer_parse_seconds", "binance"), state.total("writer_parse_cpu_seconds", "binance")
    assert 0 < cpu <= wall + 0.002          # thread CPU cannot exceed wall time (clock granularity)
    w.process(from_items(items(2000, start=2001)))
    w.parse_pending()
    assert state.total("writer_parse_seconds", "binance") > wall


def test_a_failed_spool_fsync_is_an_error_not_silence(tmp_path, monkeypatch):
    """EIO on fsync means the spool may not be on disk: writer_error is set (state ERROR), the
    descriptor is still closed, and the writer keeps going."""
    import errno
    real_fsync = os.fsync

    def fsync(fd):
        if "/spool/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    w, q, state, _ = make_writer(tmp_path)
    w.process(from_items(items(5, 1)))
    w.flush()
    w.syncer.stop()
    assert state.writer_error and "fsync" in state.writer_error and "I/O error" in state.writer_error
    w.process(from_items(items(5, 6)))      # parsing and spooling go on
    w.flush()
    assert state.total("rows_written", "binance") == 10


def test_the_injected_slow_writer_stalls_while_its_file_says_so_and_stops_at_once(tmp_path):
    """The soak's and the tests' slow writer (bench/collector_slow.py; production has no such
    knob): the Writer takes through a view of its queue that stalls after every take that found
    frames, for the seconds in the stall file. Meanwhile the real queue fills and drops; removing
    the file ends the stall and the writer catches up; the writer's stop ends a stall at once,
    and every frame taken still reaches Parquet."""
    from bench.collector_slow import SlowWriter, Stall
    from tests.helpers import wait_until
    stall_file = tmp_path / "stall"
    stall_file.write_text("3600")

    class Stalled(SlowWriter):
        stall = Stall(0.0, str(stall_file))
    w, q, state, _ = make_writer(tmp_path, writer_cls=Stalled)
    for batch in from_items(items(10, 1)):
        q.put_nowait(batch)
    w.start()
    wait_until(lambda: q.qsize() == 0, 10, interval=0.01, what="the first take")   # now stalled
    assert q.offer(from_items(items(1000, 11))[0]) == 0          # the queue fills ...
    assert q.offer(from_items(items(5, 1011))[0]) == 5           # ... and drops
    assert w.frames_processed == 0                                # still in the first stall
    stall_file.unlink()                                           # recovers without a restart
    wait_until(lambda: w.frames_processed == 1010, 10, interval=0.01, what="the backlog taken")
    stall_file.write_text("3600")
    for batch in from_items(items(5, 1016)):
        q.put_nowait(batch)
    wait_until(lambda: q.qsize() == 0, 10, interval=0.01, what="the take that stalls")
    t0 = time.monotonic()
    w.stop(timeout=30)
    assert not w.is_alive() and time.monotonic() - t0 < 10       # not 3600 s
    assert state.total("rows_written", "binance", "bbo") == 1015
    files = glob.glob(str(tmp_path / "raw/v1/bbo/**/*.parquet"), recursive=True)
    assert sum(pq.read_metadata(p).num_rows for p in files) == 1015
