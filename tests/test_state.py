"""The state machine, the rolling 15-minute history and the heartbeat.

Unit tests drive Monitor.tick(now) with an injected clock (no sleeps, exact windows); the
integration tests run bin/collector against the simulator and read its state_change logs.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus

import pytest

from app import logs, settings as settings_mod
from app.state import DEGRADED, ERROR, OFFLINE, READY, Monitor, State
from app.handoff import FrameQueue, from_items

T0 = 1_800_000_000.0      # a whole minute (divisible by 60): bucket arithmetic stays readable


class FakeConn:
    """What state.py reads from a feed.Connection: counters, `connected`, status()."""

    def __init__(self, exchange: str, n: int = 1, connected: bool = True):
        self.exchange = exchange
        self.name = f"{exchange}-{n}"
        self.received = 0
        self.dropped = 0
        self.connected = connected
        self.subs: dict[str, tuple[str, str]] = {}     # stream key -> (status, reason)

    def subscriptions(self) -> dict:
        return dict(self.subs)

    def status(self) -> dict:
        return {"name": self.name, "exchange": self.exchange, "connected": self.connected,
                "frames": self.received, "dropped": self.dropped}


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Events(logging.Handler):
    """Captures the collector's log records (its logger does not propagate to caplog)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def named(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == event]


@pytest.fixture
def events():
    logger = logs.get()
    handler = Events()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def make_settings(tmp_path, **changes):
    os.chdir(tmp_path)                 # no settings.ini / .env of the repo
    base = settings_mod.load(environ={}, dotenv_path=str(tmp_path / "none.env"))
    return base.replace(**changes)


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """A State with one connected binance connection and a Monitor on an injected clock."""
    monkeypatch.chdir(tmp_path)

    def build(exchanges=("binance",), maxsize=100, writer_alive=None, **changes):
        clock = Clock()
        q = FrameQueue(maxsize=maxsize)
        st = State(version="9.9", instance_id="unit", run_id="r1", exchanges=exchanges, queue=q,
                   clock=clock)
        conns = {}
        for i, ex in enumerate(exchanges, 1):
            conns[ex] = FakeConn(ex, i)
            st.register_connection(conns[ex])
        changes.setdefault("heartbeat_interval", 30.0)
        s = make_settings(tmp_path, **changes)
        mon = Monitor(st, s, clock=clock, writer_alive=writer_alive)
        return st, mon, clock, conns, q
    return build


def run(mon, clock, seconds: int, each=None):
    """Advance the clock one second at a time, ticking like the monitor thread does."""
    for _ in range(seconds):
        clock.t += 1
        if each:
            each(clock.t)
        mon.tick()


# ---- states ---------------------------------------------------------------------------------

def test_starts_offline_then_ready_once_connected(rig, events):
    st, mon, clock, conns, _q = rig()
    conns["binance"].connected = False
    assert st.state == OFFLINE
    run(mon, clock, 2)
    assert st.state == OFFLINE and st.reasons == ["no_connection"]
    assert events.named("state_change") == []
    conns["binance"].connected = True
    run(mon, clock, 1)
    assert st.state == READY and st.reasons == []
    (change,) = events.named("state_change")
    assert (change.old, change.new, change.reasons) == (OFFLINE, READY, [])


def test_no_connection_at_all_is_offline(rig):
    st, mon, clock, conns, _q = rig(exchanges=("binance", "okx"))
    for c in conns.values():
        c.connected = False
    run(mon, clock, 1)
    assert st.state == OFFLINE


def test_one_exchange_down_is_degraded_and_named(rig, events):
    st, mon, clock, conns, _q = rig(exchanges=("binance", "okx"))
    run(mon, clock, 1)
    assert st.state == READY
    conns["okx"].connected = False
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["exchange_offline"]
    assert st.details["exchange_offline"] == ["okx"]
    change = events.named("state_change")[-1]
    assert (change.old, change.new, change.details) == (READY, DEGRADED, {"exchange_offline": ["okx"]})


def test_exchange_still_discovering_is_degraded(rig):
    st, mon, clock, conns, _q = rig(exchanges=("binance", "okx"))
    st.retire_connection(conns["okx"])         # okx never got a connection...
    st.discovery.update(binance={"status": "done"}, okx={"status": "done"})
    run(mon, clock, 1)
    assert st.state == READY                   # ...which alone is not a fault (nothing planned)
    st.discovery["okx"] = {"status": "retrying", "attempt": 2, "last_error": "HTTP 503"}
    run(mon, clock, 1)                         # ...but an exchange whose discovery fails is
    assert st.state == DEGRADED and st.reasons == ["discovering"]
    assert st.details["discovering"] == {"okx": {"status": "retrying", "attempt": 2, "last_error": "HTTP 503"}}
    st.discovery["okx"] = {"status": "done"}
    run(mon, clock, 1)
    assert st.state == READY


def test_drop_is_degraded_for_one_window_then_ready(rig, events):
    st, mon, clock, conns, _q = rig(degraded_window=60.0)
    run(mon, clock, 10)
    assert st.state == READY
    conns["binance"].dropped += 5              # between the ticks at T0+10 and T0+11
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["drops"]
    assert st.details["drops"] == {"binance": 5}
    run(mon, clock, 59)                        # T0+70: the drop is still inside the window
    assert st.state == DEGRADED
    run(mon, clock, 1)                         # T0+71: the window has passed it
    assert st.state == READY
    assert [(r.old, r.new) for r in events.named("state_change")] == [
        (OFFLINE, READY), (READY, DEGRADED), (DEGRADED, READY)]


def test_drops_of_a_retired_connection_still_count(rig):
    st, mon, clock, conns, _q = rig(degraded_window=10.0)
    run(mon, clock, 1)
    conns["binance"].dropped = 3
    st.retire_connection(conns["binance"])
    replacement = FakeConn("binance", 2)
    st.register_connection(replacement)
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.details["drops"] == {"binance": 3}


def test_queue_utilisation_above_ratio(rig):
    st, mon, clock, _conns, q = rig(maxsize=10, degraded_queue_ratio=0.8)
    for i in range(8):
        q.put(*from_items([("binance", 1, i, time.time_ns(), b"x")]))
    run(mon, clock, 1)
    assert st.state == READY                   # 80 % is not above 80 %
    q.put(*from_items([("binance", 1, 9, time.time_ns(), b"x")]))
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["queue_utilisation"]
    assert st.details["queue_utilisation"] == 0.9
    while not q.empty():
        q.get()
    run(mon, clock, 1)
    assert st.state == READY


def test_gap_rate_above_setting(rig):
    st, mon, clock, _conns, _q = rig(degraded_window=60.0, degraded_gap_rate=10.0)
    run(mon, clock, 1)
    st.count("gaps", "binance", 10, "trades")  # 10 per minute: not above the setting
    run(mon, clock, 1)
    assert st.state == READY
    st.count("gaps", "binance", 1, "bbo")
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["gap_rate"]
    assert st.details["gap_rate"] == {"per_min": 11.0, "by_exchange": {"binance": 11}}
    run(mon, clock, 60)
    assert st.state == READY


def test_gap_rate_is_per_minute_over_a_shorter_window(rig):
    st, mon, clock, _conns, _q = rig(degraded_window=30.0, degraded_gap_rate=10.0)
    run(mon, clock, 1)
    st.count("gaps", "binance", 6)             # 6 in 30 s = 12 per minute
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.details["gap_rate"]["per_min"] == 12.0


def test_streams_not_live_degrade_until_live_or_rejected(rig):
    """READY only once every requested stream is live or rejected-and-reported; a rotation's
    overlap counts each stream once, at its best status."""
    st, mon, clock, conns, _q = rig()
    conn = conns["binance"]
    conn.subs = {"a": ("live", ""), "b": ("pending", ""), "c": ("pending", "")}
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["streams_pending"]
    assert st.details["streams_pending"]["count"] == 2
    assert st.details["streams_pending"]["by_exchange"] == {conn.exchange: 2}
    conn.subs["b"] = ("live", "")
    conn.subs["c"] = ("rejected", "60018: doesn't exist")
    run(mon, clock, 1)
    assert st.state == READY
    assert st.details["streams_rejected"] == {conn.exchange: {"c": "60018: doesn't exist"}}
    sub = st.subscriptions()[conn.exchange]
    assert (sub["requested"], sub["live"], sub["pending"], sub["rejected"]) == (3, 2, 0, 1)
    replacement = FakeConn(conn.exchange, 9)
    replacement.subs = {"a": ("pending", ""), "b": ("pending", ""), "c": ("pending", "")}
    st.register_connection(replacement)
    run(mon, clock, 1)
    sub = st.subscriptions()[conn.exchange]
    assert (sub["requested"], sub["live"], sub["pending"], sub["rejected"]) == (3, 2, 1, 0)
    assert st.state == DEGRADED and st.details["streams_pending"]["count"] == 1


def test_silent_stream(rig):
    st, mon, clock, _conns, _q = rig()
    run(mon, clock, 1)
    st.silent_streams["binance"]["btcusdt@bookTicker"] = clock.t - 130
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["silent_streams"]
    assert st.details["silent_streams"] == {"binance": ["btcusdt@bookTicker"]}
    st.silent_streams["binance"].pop("btcusdt@bookTicker")
    run(mon, clock, 1)
    assert st.state == READY


def test_spool_near_budget_and_old_backlog(rig):
    st, mon, clock, _conns, _q = rig(degraded_spool_ratio=0.9, degraded_upload_age=600.0)
    run(mon, clock, 1)
    st.spool_usage = {"bytes": 89, "budget": 100, "ratio": 0.89, "near_full": False, "full": False}
    run(mon, clock, 1)
    assert st.state == READY
    st.spool_usage = {"bytes": 90, "budget": 100, "ratio": 0.9, "near_full": True, "full": False}
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["spool_near_full"]
    st.spool_usage = {"bytes": 100, "budget": 100, "ratio": 1.0, "near_full": True, "full": True}
    st.count("frames_dropped_spool_full", "binance", 7)
    run(mon, clock, 1)
    assert st.state == DEGRADED and set(st.reasons) == {"spool_full", "spool_drops"}
    assert st.details["spool_drops"] == {"binance": 7}
    st.spool_usage = {"bytes": 10, "budget": 100, "ratio": 0.1, "near_full": False, "full": False}
    st.upload_backlog = {"files": 3, "bytes": 10, "oldest_age_s": 601.0}
    run(mon, clock, 1)
    assert "upload_backlog" in st.reasons and "spool_full" not in st.reasons
    assert st.details["upload_backlog"] == {"files": 3, "bytes": 10, "oldest_age_s": 601.0}


def test_several_reasons_are_all_named(rig):
    st, mon, clock, conns, _q = rig(degraded_window=60.0)
    run(mon, clock, 1)
    conns["binance"].dropped = 1
    st.silent_streams["binance"]["x"] = 0.0
    run(mon, clock, 1)
    assert st.state == DEGRADED and st.reasons == ["drops", "silent_streams"]


@pytest.mark.parametrize("field,reason", [("writer_error", "writer_error"), ("fatal_error", "fatal_error")])
def test_error_beats_everything(rig, events, field, reason):
    st, mon, clock, conns, _q = rig()
    run(mon, clock, 1)
    conns["binance"].connected = False         # OFFLINE too, but ERROR wins
    setattr(st, field, "finalize x: OSError(28, 'No space left on device')")
    run(mon, clock, 1)
    assert st.state == ERROR and st.reasons == [reason, "no_connection"]
    assert st.details[reason].startswith("finalize x")
    change = events.named("state_change")[-1]
    assert (change.old, change.new) == (READY, ERROR)
    assert change.levelno == logging.WARNING


def test_dead_writer_thread_is_error(rig):
    alive = [True]
    st, mon, clock, _conns, _q = rig(writer_alive=lambda: alive[0])
    run(mon, clock, 1)
    assert st.state == READY
    alive[0] = False
    run(mon, clock, 1)
    assert st.state == ERROR and st.reasons == ["writer_stopped"]


def test_stopping_freezes_the_state_except_for_errors(rig, events):
    alive = [True]
    st, mon, clock, conns, _q = rig(writer_alive=lambda: alive[0])
    run(mon, clock, 1)
    st.stopping = True
    conns["binance"].connected = False         # the collector closes its sockets to drain
    alive[0] = False                            # and the writer finishes
    run(mon, clock, 2)
    assert st.state == READY
    st.writer_error = "final flush failed"
    run(mon, clock, 1)
    assert st.state == ERROR


def test_reason_change_without_state_change_is_logged(rig, events):
    st, mon, clock, conns, _q = rig()
    run(mon, clock, 1)
    st.silent_streams["binance"]["a"] = 0.0
    run(mon, clock, 1)
    conns["binance"].dropped = 1
    run(mon, clock, 1)
    assert [r.new for r in events.named("state_change")] == [READY, DEGRADED]
    (again,) = events.named("state_reasons")
    assert again.state == DEGRADED and again.reasons == ["drops", "silent_streams"]


def test_thread_that_dies_is_a_fatal_error(rig):
    st, mon, clock, _conns, _q = rig()
    mon.start()
    try:
        def boom():
            raise RuntimeError("bug in a worker")
        t = threading.Thread(target=boom, name="worker-x")
        t.start()
        t.join()
        assert st.fatal_error and "worker-x" in st.fatal_error and "bug in a worker" in st.fatal_error
        mon.tick()
        assert st.state == ERROR and "fatal_error" in st.reasons
    finally:
        mon.stop(final_heartbeat=False)
    assert threading.excepthook != mon._thread_died


# ---- heartbeat ------------------------------------------------------------------------------

def test_heartbeat_every_interval_with_interval_figures(rig, events):
    st, mon, clock, conns, q = rig(heartbeat_interval=30.0, maxsize=10)
    conn = conns["binance"]

    def traffic(t):
        conn.received += 100
        st.count("rows_written", "binance", 50, "bbo")
        if t == T0 + 12:
            for i in range(7):
                q.put(*from_items([("binance", 1, i, time.time_ns(), b"x")]))   # a burst the writer then clears
        if t == T0 + 13:
            while not q.empty():
                q.get()
    run(mon, clock, 29, traffic)
    assert events.named("heartbeat") == []
    conn.dropped += 4
    st.count("gaps", "binance", 2, "trades")
    st.count("reconnects", "binance")
    st.count("files_written", "binance", 3, "bbo")
    st.count("bytes_written", "binance", 12345, "bbo")
    st.count("frames_unparsed", "binance", 1)
    run(mon, clock, 1, traffic)
    (hb,) = events.named("heartbeat")
    assert hb.interval_s == 30.0 and hb.uptime_s == 30.0 and hb.state == DEGRADED
    b = hb.exchanges["binance"]
    assert b["msgs"] == 3000 and b["msgs_per_s"] == 100.0 and b["rows_per_s"] == 50.0
    assert (b["drops"], b["gaps"], b["reconnects"], b["unparsed"]) == (4, 2, 1, 1)
    assert (b["files_written"], b["bytes_written"]) == (3, 12345)
    assert (b["connections"], b["connected"]) == (1, 1)
    assert hb.queue == {"size": 0, "capacity": 10, "utilisation": 0.0, "peak": 1.0}  # drops: was full
    assert (hb.files_written, hb.bytes_written) == (3, 12345)
    run(mon, clock, 29, traffic)
    assert len(events.named("heartbeat")) == 1
    run(mon, clock, 1, traffic)
    hb2 = events.named("heartbeat")[1]
    assert hb2.exchanges["binance"]["msgs"] == 3000 and hb2.exchanges["binance"]["drops"] == 0
    assert hb2.queue["peak"] == 0.0


def test_heartbeat_queue_peak_is_sampled_between_beats(rig, events):
    st, mon, clock, _conns, q = rig(heartbeat_interval=10.0, maxsize=10)

    def burst(t):
        if t == T0 + 4:
            for i in range(6):
                q.put(*from_items([("binance", 1, i, time.time_ns(), b"x")]))
        if t == T0 + 5:
            while not q.empty():
                q.get()
    run(mon, clock, 10, burst)
    (hb,) = events.named("heartbeat")
    assert hb.queue["utilisation"] == 0.0 and hb.queue["peak"] == 0.6


def test_heartbeat_on_time_despite_tick_jitter(rig, events):
    st, mon, clock, _conns, _q = rig(heartbeat_interval=5.0)
    for k in range(1, 21):
        clock.t = T0 + k + (-0.004 if k % 2 else 0.003)   # the 1 s loop wakes a few ms early/late
        mon.tick()
    beats = events.named("heartbeat")
    assert [round(b.uptime_s) for b in beats] == [5, 10, 15, 20]
    assert all(abs(b.interval_s - 5.0) < 0.01 for b in beats)


def test_heartbeat_after_a_stall_does_not_burst(rig, events):
    st, mon, clock, _conns, _q = rig(heartbeat_interval=5.0)
    run(mon, clock, 5)
    clock.t += 60                                         # stalled (SIGSTOP, swap) for a minute
    mon.tick()
    run(mon, clock, 4)
    assert len(events.named("heartbeat")) == 2           # one at 5 s, one after the stall
    run(mon, clock, 1)
    assert [b.interval_s for b in events.named("heartbeat")] == [5.0, 60.0, 5.0]


def test_writer_lag_is_the_oldest_unpersisted_frame(rig):
    st, mon, clock, _conns, q = rig()
    now_ns = int(clock.t * 1e9)
    assert st.queue_figures(now_ns)["writer_lag_s"] == 0.0
    st.writer_oldest_pending_ns = now_ns - 1_500_000_000
    q.put(*from_items([("binance", 1, 1, now_ns - 4_000_000_000, b"x")]))
    fig = st.queue_figures(now_ns)
    assert (fig["oldest_pending_age_s"], fig["oldest_queued_age_s"], fig["writer_lag_s"]) == (1.5, 4.0, 4.0)


def test_final_heartbeat_on_stop(rig, events):
    st, mon, clock, conns, _q = rig(heartbeat_interval=30.0)
    run(mon, clock, 5, lambda t: setattr(conns["binance"], "received", conns["binance"].received + 10))
    mon.stop()
    (hb,) = events.named("heartbeat")
    assert hb.final is True and hb.exchanges["binance"]["msgs"] == 50 and hb.interval_s == 5.0


# ---- the last 15 minutes --------------------------------------------------------------------

def test_history_keeps_fifteen_minute_buckets(rig):
    st, mon, clock, conns, q = rig(maxsize=10)
    conn = conns["binance"]

    def traffic(t):
        minute = int((t - T0 - 1) // 60)       # ticks T0+1..T0+60 are minute 0
        conn.received += minute + 1            # minute m gets (m + 1) messages a second
        if t == T0 + 60 * 19 + 30:
            conn.dropped += 2
            st.count("gaps", "binance", 3)
            st.count("reconnects", "binance")
            q.put(*from_items([("binance", 1, 1, time.time_ns(), b"x")]))
        if t == T0 + 60 * 19 + 31:
            q.get()
    run(mon, clock, 20 * 60 - 1, traffic)      # up to T0 + 19:59
    hist = mon.history()
    assert len(hist) == 15
    assert hist[0]["start"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 5 * 60))
    assert hist[-1]["start"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 19 * 60))
    # minute 5 (T0+5:00..5:59) holds ticks 5:00 (last of minute 4's rate) .. 5:59
    assert hist[0]["msgs"] == 5 + 59 * 6
    assert hist[-1]["msgs"] == 19 + 59 * 20         # the current minute, up to :59
    assert (hist[-1]["drops"], hist[-1]["gaps"], hist[-1]["reconnects"]) == (2, 3, 1)
    assert hist[-1]["queue_peak"] == 1.0            # a drop implies a full queue
    assert hist[-1]["by_exchange"]["binance"]["drops"] == 2
    assert all(h["drops"] == 0 and h["queue_peak"] == 0.0 for h in hist[:-1])


def test_history_fills_minutes_without_ticks_and_ages_out(rig):
    st, mon, clock, conns, _q = rig()
    run(mon, clock, 1, lambda t: setattr(conns["binance"], "received", 7))
    clock.t += 4 * 60                         # the process was stopped (SIGSTOP) for 4 minutes
    mon.tick()
    hist = mon.history()
    assert [h["msgs"] for h in hist] == [7, 0, 0, 0, 0]
    later = mon.history(now=clock.t + 14 * 60)   # only the last minute is still in range
    assert [h["msgs"] for h in later] == [0]
    assert mon.history(now=clock.t + 20 * 60) == []


def test_tick_is_cheap(rig):
    """Everything per second may be simple, but not slow: 3 exchanges x 100 connections."""
    st, mon, clock, _conns, _q = rig(exchanges=("binance", "bybit", "okx"))
    for ex in ("binance", "bybit", "okx"):
        for i in range(100):
            st.register_connection(FakeConn(ex, 100 + i))
            st.count("rows_written", ex, 5, "bbo")
    t0 = time.perf_counter()
    run(mon, clock, 50)
    per_tick = (time.perf_counter() - t0) / 50
    assert per_tick < 0.02, per_tick


# ---- the existing counting interface keeps working -------------------------------------------

def test_counting_interface_unchanged():
    st = State(exchanges=("binance", "okx"))
    c = FakeConn("binance")
    st.register_connection(c)
    c.received, c.dropped = 10, 2
    st.count("rows_written", "binance", 5, "bbo")
    st.count("rows_written", "binance", 1, "trades")
    st.count("gaps", "okx")
    assert st.frames("binance") == (10, 2)
    st.retire_connection(c)
    assert st.frames("binance") == (10, 2)
    assert st.total("frames_received") == 10 and st.total("rows_written", "binance") == 6
    assert st.total("rows_written", dataset="bbo") == 5
    counters = st.counters()
    assert counters["binance"]["rows_written"] == {"bbo": 5, "trades": 1}
    assert counters["okx"]["gaps"] == 1
    assert st.totals()["binance"]["rows"] == 6


# ---- integration: bin/collector against the simulator ---------------------------------------

import sim as sim_mod  # noqa: E402
from tests.helpers import SLOW_COLLECTOR, CollectorProcess, count_rows, sim_env  # noqa: E402


def _refuse(sim, exchange: str, refuse: bool) -> None:
    """Make the simulated exchange refuse (503) or accept new WebSocket handshakes."""
    ex = sim._get(exchange)

    def flip():
        if refuse:
            ex.admit = lambda conn: conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "maintenance\n")
        else:
            ex.__dict__.pop("admit", None)
    sim._lt.call(flip)


def _status(port: int, path: str = "/status"):
    import json
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(120)
def test_collector_states_against_simulator(tmp_path):
    """READY; a slow writer with a tiny queue drops -> DEGRADED(drops); quiet -> READY;
    the exchange refuses and drops every socket -> OFFLINE; it accepts again -> READY."""
    sim = sim_mod.Simulator(exchanges=("binance",), symbols=2, rate=20.0).start()
    try:
        sim.pause("binance")
        env = dict(sim_env(sim, ("binance",)), EXCHANGES="binance", SYMBOLS="BTCUSDT,ETHUSDT",
                   QUEUE_MAXSIZE="20", DEGRADED_WINDOW="3",
                   HEARTBEAT_INTERVAL="2", RECONNECT_MIN="0.2", RECONNECT_MAX="0.5",
                   FLUSH_INTERVAL="0.5", ROTATE_INTERVAL="2")
        # a writer that stalls 1 s after each take (bench/collector_slow.py): the queue fills
        with CollectorProcess(tmp_path, env, ["--writer-stall", "1.0"], program=SLOW_COLLECTOR) as cp:
            port = cp.wait_for("status_listen")[0]["port"]
            cp.wait_for("state_change", lambda l: l["new"] == READY, timeout=30)
            assert _status(port, "/healthz")[0] == 200

            sim.resume("binance")              # ~60 frames/s into a writer that takes <= 20/s
            deg = cp.wait_for("state_change", lambda l: l["new"] == DEGRADED, timeout=30)[0]
            assert "drops" in deg["reasons"] and deg["details"]["drops"]["binance"] > 0
            code, st = _status(port)
            assert code == 200 and st["state"] == DEGRADED and "drops" in st["reasons"]
            assert _status(port, "/healthz")[0] == 200           # degraded still records

            sim.pause("binance")               # no more traffic: no drops for a whole window
            cp.wait_for("state_change", lambda l: l["old"] == DEGRADED and l["new"] == READY, timeout=30)

            _refuse(sim, "binance", True)
            sim.drop_connections("binance")
            off = cp.wait_for("state_change", lambda l: l["new"] == OFFLINE, timeout=30)[0]
            assert off["reasons"][0] == "no_connection"
            code, body = _status(port, "/healthz")
            assert code == 503 and body["state"] == OFFLINE
            refused = len(cp.events("ws_reconnect_wait"))
            cp.wait_for("ws_reconnect_wait", timeout=30, count=refused + 3)   # refused again and again
            assert _status(port)[1]["state"] == OFFLINE                       # and still OFFLINE

            ready = len([l for l in cp.events("state_change") if l["new"] == READY])
            _refuse(sim, "binance", False)
            # READY again (through DEGRADED `streams_pending` when one connection is back first)
            cp.wait_for("state_change", lambda l: l["new"] == READY, timeout=30, count=ready + 1)
            assert cp.stop() == 0
            stop = cp.wait_for("collector_stop")[0]["counters"]["binance"]
            final = [h for h in cp.events("heartbeat") if h.get("final")]
            assert final and final[0]["state"] == READY       # draining is not an outage
        assert stop["frames_dropped"] > 0
        assert count_rows(cp.data_dir, "frames", "binance") + stop["frames_dropped"] == stop["frames_received"]
        assert [l["new"] for l in cp.events("state_change")][:2] == [READY, DEGRADED]
    finally:
        sim.stop()


@pytest.mark.timeout(90)
def test_collector_unwritable_raw_is_error(tmp_path):
    """data_dir/raw is a regular file: the first Parquet file cannot be written -> ERROR, 503.
    (Tests run as root, which ignores chmod; a file where a directory must be fails for root too.)"""
    sim = sim_mod.Simulator(exchanges=("binance",), symbols=1, rate=10.0).start()
    try:
        data = tmp_path / "data"
        data.mkdir()
        (data / "raw").write_text("not a directory\n")
        env = dict(sim_env(sim, ("binance",)), EXCHANGES="binance", SYMBOLS="BTCUSDT",
                   FLUSH_INTERVAL="0.5", ROTATE_INTERVAL="1", HEARTBEAT_INTERVAL="5")
        with CollectorProcess(tmp_path, env) as cp:
            port = cp.wait_for("status_listen")[0]["port"]
            err = cp.wait_for("state_change", lambda l: l["new"] == ERROR, timeout=30)[0]
            assert err["reasons"][0] == "writer_error"
            assert "NotADirectoryError" in err["details"]["writer_error"]
            code, body = _status(port, "/healthz")
            assert code == 503 and body["state"] == ERROR
            assert _status(port)[1]["writer_error"]
            cp.stop()
    finally:
        sim.stop()
