"""End to end, Binance USD-M: simulator (real WebSocket + REST on loopback) -> bin/collector
(a real subprocess) -> Parquet, read back with pyarrow and DuckDB."""
from __future__ import annotations

import glob
import os
import signal

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.exchanges import RowSink, create
from app.gaps import SequenceTracker
from tests.helpers import (SLOW_COLLECTOR, CollectorProcess, count_rows, parquet_files, read_dataset, settle,
                           sim_env, sim_quiet_baseline, wait_until)

SYMBOLS = "BTCUSDT,ETHUSDT,BTCUSDC"


@pytest.fixture
def sim():
    from sim import Simulator
    s = Simulator(exchanges=("binance",), rate=40.0, seed=7, cadence_scale=0.2)
    s.start()
    yield s
    s.stop()


def collector(tmp_path, sim, writer_stall: float | None = None, **env):
    """bin/collector with these settings; `writer_stall`: a writer that stalls this many seconds
    after each take (bench/collector_slow.py)."""
    base = sim_env(sim, ("binance",))
    base.update({"EXCHANGES": "binance", "SYMBOLS": SYMBOLS, "FLUSH_INTERVAL": "0.5",
                 "ROTATE_INTERVAL": "2", "RECONNECT_MIN": "0.1", "RECONNECT_MAX": "1"})
    base.update({k.upper(): str(v) for k, v in env.items()})
    if writer_stall is None:
        return CollectorProcess(tmp_path, base)
    return CollectorProcess(tmp_path, base, ["--writer-stall", str(writer_stall)], program=SLOW_COLLECTOR)


def settle_and_stop(c: CollectorProcess, sim, exchange="binance", since=None) -> dict:
    """Stop the exchange's data, wait until the collector has read every frame sent, SIGTERM (no
    pause before it: the writer's final flush must take the last frames), return final counters."""
    settle(c, sim, (exchange,), since=since)
    assert c.stop() == 0, "".join(c.raw[-20:])
    stop = c.events("collector_stop")
    assert stop, "no collector_stop log"
    return stop[-1]["counters"]


def sim_rows(sim, exchange="binance") -> dict:
    return sim.stats()[exchange]["rows"]


def wait_rows(sim, datasets=("bbo", "trades", "mark_price", "funding"), at_least=20, exchange="binance"):
    """Until the simulator has sent at least this many rows of each dataset (data is flowing)."""
    wait_until(lambda: all(sim_rows(sim, exchange)[ds] >= at_least for ds in datasets), 30,
               what=f"{at_least} rows of each of {datasets} sent")


def test_rows_equal_what_the_simulator_sent(tmp_path, sim):
    with collector(tmp_path, sim) as c:
        c.wait_for("subscribed", count=2)
        wait_rows(sim, at_least=50)
        counters = settle_and_stop(c, sim)
    sent = sim_rows(sim)
    data = c.data_dir
    for ds in ("bbo", "trades", "mark_price", "funding"):
        assert sent[ds] > 0, ds
        assert count_rows(data, ds, "binance") == sent[ds], ds
    assert not parquet_files(data, "open_interest", "binance")
    # DuckDB and pyarrow datasets read the layout as it is
    n = duckdb.sql(f"select count(*) from read_parquet('{data}/raw/v1/bbo/**/*.parquet', "
                   "hive_partitioning=1) where exchange = 'binance'").fetchall()[0][0]
    assert n == sent["bbo"]
    bbo = read_dataset(data, "bbo")
    assert set(bbo.column("instrument").unique().to_pylist()) == {"BTC-USDT-PERP", "ETH-USDT-PERP", "BTC-USDC-PERP"}
    # every frame received is in `frames`; recv_seq has no hole (no drops here)
    frames = read_dataset(data, "frames")
    seqs = sorted(frames.column("recv_seq").to_pylist())
    assert seqs == list(range(1, len(seqs) + 1))
    assert counters["binance"]["frames_received"] == len(seqs)
    assert counters["binance"]["frames_dropped"] == 0
    # values equal: re-parse the recorded payloads and compare with the bbo dataset row by row
    sink = RowSink()
    adapter = create("binance")
    for conn_id, seq, ts, payload in zip(*(frames.column(n).to_pylist()
                                           for n in ("conn_id", "recv_seq", "ts_recv", "payload"))):
        try:
            adapter.parse(("binance", conn_id, seq, ts, payload), sink)
        except Exception:
            pass
    expected = {r[6]: r for r in sink.bbo}          # recv_seq -> row tuple
    got = bbo.sort_by("recv_seq").to_pylist()
    assert len(got) == len(expected)
    for row in got[:200]:
        raw = expected[row["recv_seq"]]
        assert row["symbol"] == raw[0]
        assert row["bid_px"] == float(raw[7]) and row["ask_sz"] == float(raw[10])
        assert row["ts_event"] == raw[2] * 1_000_000 and row["ts_exchange"] == raw[3] * 1_000_000
        assert row["update_id"] == raw[11]
    # metadata on every file
    for path in glob.glob(f"{data}/raw/v1/**/*.parquet", recursive=True):
        meta = pq.read_schema(path).metadata
        assert meta[b"schema_version"] == b"1" and meta[b"exchange"] == b"binance"
    # the reference snapshot is outside raw/
    assert glob.glob(f"{data}/reference/binance/*.parquet")


def test_pressure_relief_counts_every_drop(tmp_path, sim):
    sim.set_rate(400.0)
    with collector(tmp_path, sim, queue_maxsize=20, writer_stall=0.05) as c:
        c.wait_for("queue_full_drop", timeout=30)
        wait_until(lambda: c.metrics()["counters"]["binance"]["frames_dropped"] >= 200, 30,
                   what="200 frames dropped under pressure")
        counters = settle_and_stop(c, sim)
    received = counters["binance"]["frames_received"]
    dropped = counters["binance"]["frames_dropped"]
    assert dropped > 0
    frames = read_dataset(c.data_dir, "frames")
    seqs = sorted(frames.column("recv_seq").to_pylist())
    holes = seqs[-1] - len(seqs)              # numbers never written
    assert len(seqs) + dropped == received
    assert holes + (received - seqs[-1]) == dropped
    # the socket thread was never blocked: everything the simulator sent was read
    st = sim.stats()["binance"]
    assert received == sum(st["frames"].values()) + st["control_frames"]


def test_reconnects_resubscribe_and_keepalive_survives(tmp_path, sim):
    with collector(tmp_path, sim, keepalive_interval=0.5) as c:
        c.wait_for("subscribed", count=2)
        for i in range(20):
            before = len(c.events("subscribed"))
            sim.drop_connections("binance")
            c.wait_for("subscribed", count=before + 2, timeout=20)
        # after 20 forced reconnects: every planned stream is subscribed on the simulator ...
        conns = sim.connections("binance")
        subs = {t for conn in conns for t in conn["subscriptions"]}
        planned = {f"{s.lower()}@{ch}" for s in SYMBOLS.split(",")
                   for ch in ("bookTicker", "aggTrade", "markPrice@1s")}
        assert planned <= subs
        # ... and live (data still arrives on each), and keepalive pings still flow
        pings0 = sum(conn["client_pings"] for conn in conns)
        start_rows = dict(sim_rows(sim))
        wait_until(lambda: sum(conn["client_pings"] for conn in sim.connections("binance")) > pings0
                   and all(sim_rows(sim)[ds] > start_rows[ds] for ds in ("bbo", "trades", "mark_price")),
                   10, what="more keepalive pings and rows after the reconnects")
        counters = settle_and_stop(c, sim)
    assert counters["binance"]["reconnects"] >= 20
    for ds in ("bbo", "trades", "mark_price"):
        assert count_rows(c.data_dir, ds, "binance") == sim_rows(sim)[ds]


def test_half_open_socket_is_detected(tmp_path, sim):
    """The simulator stops reading and writing both sockets (TCP stays up): no frame, no pong.
    Both are declared stale after stale_timeout, closed and replaced; data flows on the new
    sockets and every row sent reaches Parquet."""
    with collector(tmp_path, sim, stale_timeout=2, keepalive_interval=0.5) as c:
        c.wait_for("subscribed", count=2)
        first = {l["conn_id"] for l in c.events("ws_connect")}
        assert sim.half_open("binance", 30) == 2
        stale = c.wait_for("ws_stale", count=2, timeout=15)
        c.wait_for("ws_connect", count=4, timeout=20)
        n0 = sum(sim_rows(sim).values())
        wait_until(lambda: sum(sim_rows(sim).values()) > n0 + 20, 15, what="data after reconnect")
        live = [conn for conn in sim.connections("binance") if not conn["muted"]]
        assert len(live) == 2 and all(conn["frames_sent"] > 0 for conn in live)
        counters = settle_and_stop(c, sim)
    assert all(l["silent_s"] >= 2 for l in stale)
    gone = [l for l in c.events("ws_disconnect") if l["conn_id"] in first]
    assert len(gone) == 2 and all("stale" in l["reason"] for l in gone)
    assert {l["conn_id"] for l in c.events("ws_connect")} - first          # new sockets ...
    assert counters["binance"]["reconnects"] >= 2
    for ds in ("bbo", "trades", "mark_price"):                             # ... carried the data
        assert count_rows(c.data_dir, ds, "binance") == sim_rows(sim)[ds], ds


def test_malformed_frames_are_counted_and_kept(tmp_path, sim):
    bad = [b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTi', b"\xff\xfe\x00garbage",
           b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":"x"}}',
           b"[1,2,3]", b'{"big":"' + b"x" * (2 * 1024 * 1024) + b'"}']
    with collector(tmp_path, sim) as c:
        c.wait_for("subscribed", count=2)
        for payload in bad:
            sim.send_raw("binance", payload, n=1)
        wait_until(lambda: c.events("frame_unparsed"), 10, what="frame_unparsed log")
        counters = settle_and_stop(c, sim)
    conns = len({(l["conn_id"]) for l in c.events("ws_connect")})
    assert conns == 2                          # both connections kept: no reconnect
    expected_bad = len(bad) * 2                # send_raw reaches both sockets
    assert counters["binance"]["frames_unparsed"] == expected_bad
    frames = read_dataset(c.data_dir, "frames")
    assert frames.num_rows == counters["binance"]["frames_received"]
    assert pc.sum(pc.greater(pc.utf8_length(frames.column("payload")), 2_000_000)).as_py() == 2


def spool_batches(data_dir: str, dataset: str) -> int:
    """Record batches readable so far in the dataset's open spool file(s) (a torn tail ignored)."""
    import pyarrow as pa
    n = 0
    for path in glob.glob(os.path.join(data_dir, "spool", f"{dataset}~*.arrows")):
        try:
            with pa.OSFile(path, "rb") as f:
                reader = pa.ipc.open_stream(f)
                while True:
                    try:
                        reader.read_next_batch()
                    except StopIteration:
                        break
                    n += 1
        except (pa.ArrowInvalid, OSError):
            pass
    return n


def test_kill9_then_restart_recovers_spool(tmp_path, sim):
    c = collector(tmp_path, sim, rotate_interval=3600).start()
    try:
        c.wait_for("subscribed", count=2)
        # several flushes into the spool (record batches appended), no Parquet yet
        wait_until(lambda: spool_batches(c.data_dir, "bbo") >= 3, 20, what="3 batches in the bbo spool")
        c.stop(signal.SIGKILL)
    finally:
        if c.proc.poll() is None:
            c.kill()
    run1 = {f.split("~")[4] for f in os.listdir(os.path.join(c.data_dir, "spool"))}
    since = sim_quiet_baseline(sim)
    c2 = collector(tmp_path, sim).start()
    try:
        c2.wait_for("spool_recovered")
        c2.wait_for("subscribed", count=2)
        settle_and_stop(c2, sim, since=since)
    finally:
        if c2.proc.poll() is None:
            c2.kill()
    assert not glob.glob(os.path.join(c.data_dir, "spool", "*.arrows"))
    files = glob.glob(f"{c.data_dir}/raw/v1/**/*.parquet", recursive=True)
    by_run: dict[str, int] = {}
    for path in files:
        t = pq.read_table(path)            # every file readable
        run = pq.read_schema(path).metadata[b"run_id"].decode()
        by_run[run] = by_run.get(run, 0) + t.num_rows
    assert run1 <= set(by_run) and all(by_run[r] > 0 for r in run1)
    # the recovered frames of the killed run are a gap-free prefix of its recv_seq
    run1_files = [p for p in parquet_files(c.data_dir, "frames", "binance")
                  if pq.read_schema(p).metadata[b"run_id"].decode() in run1]
    seqs = sorted(s for p in run1_files for s in pq.read_table(p).column("recv_seq").to_pylist())
    assert seqs == list(range(1, len(seqs) + 1))


def test_silent_stream_is_reported(tmp_path, sim):
    """A periodic stream (markPrice@1s, cadence 1 s) that stops is reported once silent for
    max(silence_floor, factor x cadence), and its return too; an event-driven stream (aggTrade)
    silenced longer is not judged at all: a quiet market sends no trades."""
    with collector(tmp_path, sim, silence_floor=2, silence_factor=2) as c:
        c.wait_for("subscribed", count=2)
        sim.silence("binance", "ethusdt@aggTrade", 30)
        sim.silence("binance", "ethusdt@markPrice@1s", 30)
        line = c.wait_for("stream_silent", lambda l: l["stream"] == "ethusdt@markPrice@1s", timeout=20)[0]
        assert line["exchange"] == "binance" and line["silent_s"] >= 2
        sim.unsilence("binance", "ethusdt@markPrice@1s")
        c.wait_for("stream_resumed", lambda l: l["stream"] == "ethusdt@markPrice@1s", timeout=20)
        # by now aggTrade has been silent longer than markPrice was when it was reported
        assert [l["stream"] for l in c.events("stream_silent")] == ["ethusdt@markPrice@1s"]
        sim.unsilence("binance", "ethusdt@aggTrade")
        settle_and_stop(c, sim)


def test_rotation_before_forced_close_leaves_no_hole(tmp_path, sim):
    with collector(tmp_path, sim, connection_max_age=3) as c:
        c.wait_for("subscribed", count=2)
        first = {l["conn_id"] for l in c.events("ws_connect")}
        c.wait_for("ws_rotate", count=2, timeout=20)
        # the replaced connections close once their replacements deliver
        c.wait_for("ws_disconnect", lambda l: l["conn_id"] in first, count=2, timeout=20)
        settle_and_stop(c, sim)
    trades = read_dataset(c.data_dir, "trades").sort_by("recv_seq")
    tracker = SequenceTracker("binance", "trades", create("binance").GAP_RULES["trades"])
    assert tracker.observe(trades) == []
    assert len(set(trades.column("conn_id").to_pylist())) >= 2
