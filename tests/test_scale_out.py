"""Scale-out, tested on one machine as it would run on many: 3 shards x 2 replicas of the real
bin/collector (`--shard i/3 --replica a|b`, each its own process, spool and status port) against
the simulator (all three exchanges), uploading to one bucket/prefix of a real S3-protocol server
(moto); one replica is SIGKILLed mid-run and restarted with the same instance id (its spool is
recovered); then bin/check_raw_sanity checks the bucket as a whole.

Why one test this long: what scale-out promises only shows on the union of the instances: every
requested symbol recorded by the shard that owns it, a replica's outage covered by its twin (so
not offline and no id gap), and every message counted once although two replicas stored it. The
report is compared with what the simulator sent: `sim.stats()` counts rows per socket written
(so twice for a message both replicas got: that is the report's `rows`), and the messages
themselves are recorded here as the simulator writes them (once per message: that is what the
report's `unique_rows` must be, with the dataset's identity applied by the real adapters)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from app import schema, sharding
from app.exchanges import RowSink, create
from app.handoff import Frame
from tests.helpers import ROOT, CollectorProcess, sim_env, sim_text_frames_sent, wait_until
from tests.s3server import running_s3

EXCHANGES = ("binance", "bybit", "okx")
DATASETS = ("bbo", "trades", "mark_price", "funding", "open_interest")
SHARDS, REPLICAS = 3, ("a", "b")
BASES = ("BTC", "ETH", "XRP", "DOGE", "ADA")        # requested: every shard of 3 owns some on every exchange
LISTED = BASES + ("SOL",)                            # the simulator lists one more (not requested)
VICTIM = "s1b"                                      # the replica killed mid-run (its twin is s1a)
OFFLINE_S = 2.5                                     # check_raw_sanity --offline-threshold
OUTAGE_S = 5.0                                      # the victim stays down at least this long


def native(ex: str, base: str) -> str:
    return f"{base}-USDT-SWAP" if ex == "okx" else f"{base}USDT"


def record_messages(sim) -> tuple[dict[str, list[str]], dict[tuple[str, str], int]]:
    """Every message the simulator writes to at least one socket, once: its publish() writes a
    message to every subscribed socket (both replicas of a shard), send_to() (a snapshot on
    subscribe) to one. Wraps the two methods of each simulated exchange (runs in its loop thread).
    -> (exchange -> messages, (exchange, dataset) -> rows written to two sockets or more)"""
    sent: dict[str, list[str]] = {ex: [] for ex in EXCHANGES}
    twice: dict[tuple[str, str], int] = {}
    for name in EXCHANGES:
        ex = sim._get(name)           # the simulator's exchange object: no public hook for this
        out = sent[name]

        def publish(topic, text, rows, wtext=None, _orig=ex.publish, _out=out, _name=name):
            n = _orig(topic, text, rows, wtext)
            if n:
                _out.append(wtext if wtext is not None else text)   # Binance: the combined-stream form
            if n >= 2:
                for ds, k in rows:
                    twice[(_name, ds)] = twice.get((_name, ds), 0) + k
            return n

        def send_to(conn, topic, text, rows, _orig=ex.send_to, _out=out):
            ok = _orig(conn, topic, text, rows)
            if ok:
                _out.append(text)
            return ok
        ex.publish, ex.send_to = publish, send_to
    return sent, twice


def unique_rows(sent: dict[str, list[str]]) -> dict[tuple[str, str], int]:
    """(exchange, dataset) -> distinct messages: the rows the real adapter makes of each message
    sent, one per identity (trades: symbol + trade id; bbo: symbol + update id, else seq;
    others: symbol + the exchange's message time; rows without one count each)."""
    out = {}
    for ex, texts in sent.items():
        adapter, sink = create(ex), RowSink()
        for i, text in enumerate(texts):
            adapter.parse(Frame(ex, 1, i + 1, 0, text), sink)
        for ds, rows in sink.take().items():
            idx = schema.ROW_INDEX[ds]
            ids, alone = set(), 0
            for row in rows:
                sym = row[idx["symbol"]]
                if ds == "trades":
                    key = (sym, str(row[idx["trade_id"]]))
                elif ds == "bbo":
                    u, s = row[idx["update_id"]], row[idx["seq"]]
                    key = (sym, "u", int(u)) if u not in (None, "") else ((sym, "s", int(s)) if s not in (None, "") else None)
                else:
                    te = row[idx["ts_exchange"]]
                    key = (sym, int(te)) if te not in (None, "") else None
                if key is None:
                    alone += 1
                else:
                    ids.add(key)
            if rows:
                out[(ex, ds)] = len(ids) + alone
    return out


def gauge(m: dict, name: str, ex: str) -> float:
    return sum(x["value"] for x in m["gauges"][name] if x["exchange"] == ex)


@pytest.mark.timeout(300)
def test_three_shards_two_replicas_one_bucket(tmp_path):
    from sim import Simulator
    # every shard must own symbols on every exchange, or it would rightly record nothing there
    for ex in EXCHANGES:
        owners = {sharding.shard_of(ex, native(ex, b), SHARDS) for b in BASES}
        assert owners == set(range(SHARDS)), f"{ex}: choose BASES so that every shard gets some ({owners})"
    names = [f"s{i}{r}" for i in range(SHARDS) for r in REPLICAS]
    with running_s3() as s3, Simulator(exchanges=EXCHANGES, symbols=list(LISTED), rate=2.0, seed=21,
                                        cadence_scale=0.2) as sim:
        sent_msgs, twice = record_messages(sim)
        bucket, prefix = s3.new_bucket(), "fleet/raw-data"
        env = {**sim_env(sim, EXCHANGES), **s3.env(bucket, prefix), "SYMBOLS": ",".join(native("binance", b) for b in BASES),
               "FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "3", "UPLOAD_RETRY_MIN": "0.2", "UPLOAD_RETRY_MAX": "1"}

        def start(name: str) -> CollectorProcess:
            shard, replica = int(name[1]), name[2]
            (tmp_path / name).mkdir(exist_ok=True)            # its own spool (data_dir) and log
            return CollectorProcess(tmp_path / name, env, ["--shard", f"{shard}/{SHARDS}", "--replica", replica,
                                                          "--instance-id", name]).start()

        procs = {name: start(name) for name in names}
        try:
            def uploaded_every_exchange(c: CollectorProcess, run_id: str | None = None, timeout: float = 90) -> None:
                for ex in EXCHANGES:
                    c.wait_for("file_uploaded", lambda l, ex=ex: f"/{ex}/date=" in l["key"]
                               and "/raw/v1/frames/" not in l["key"] and (run_id is None or run_id in l["key"]),
                               timeout=timeout)
            for c in procs.values():
                uploaded_every_exchange(c)
            # both replicas recorded some of every dataset (funding comes every 6-18 s here)
            wait_until(lambda: all(twice.get((ex, ds), 0) > 0 for ex in EXCHANGES for ds in DATASETS
                                   if (ex, ds) != ("binance", "open_interest")), 60,
                       what="rows of every dataset written to both replicas of a shard")
            for name, c in procs.items():
                plans = {l["exchange"]: l for l in c.events("plan")}
                assert all(plans[ex]["shard"] == f"{name[1]}/{SHARDS}" and plans[ex]["symbols"] > 0
                           and plans[ex]["universe"] == len(BASES) for ex in EXCHANGES), plans

            # the kill: first pause the simulator until every frame it wrote was read and the
            # victim spooled all of it, so what the victim received is known exactly (its
            # counters die with it) and nothing is in flight to its sockets
            for ex in EXCHANGES:
                sim.pause(ex)
            paused = time.monotonic()
            victim = procs[VICTIM]
            seen: dict = {}

            def drained():
                ms = {n: c.metrics() for n, c in procs.items()}
                seen.update(ms)
                vm = ms[VICTIM]
                return (all(sum(m["counters"][ex]["frames_received"] for m in ms.values()) >= sim_text_frames_sent(sim, ex)
                            for ex in EXCHANGES)
                        and vm["gauges"]["writer_lag_seconds"] == 0
                        and all(vm["counters"][ex].get("frames_written", 0) >= vm["counters"][ex]["frames_received"]
                                for ex in EXCHANGES))
            wait_until(drained, 10, what="every frame read, the victim's all spooled")
            dead_received = {ex: seen[VICTIM]["counters"][ex]["frames_received"] for ex in EXCHANGES}
            dead_conns = {ex: gauge(seen[VICTIM], "connections", ex) for ex in EXCHANGES}
            open_before = {ex: sim.stats()[ex]["connections_open"] for ex in EXCHANGES}
            victim.kill()                                                   # SIGKILL
            killed = time.monotonic()
            wait_until(lambda: all(sim.stats()[ex]["connections_open"] == open_before[ex] - dead_conns[ex]
                                   for ex in EXCHANGES), 10, what="the simulator to see the victim's sockets closed")
            for ex in EXCHANGES:
                sim.resume(ex)
            pause_s = time.monotonic() - paused
            assert pause_s < OFFLINE_S - 0.5, f"the pause around the kill took {pause_s:.1f} s"
            # the twin goes on recording the victim's symbols for the measured outage
            twin = procs["s1a"]
            twin_at_kill = {ex: twin.frames_received(ex) for ex in EXCHANGES}
            wait_until(lambda: time.monotonic() - killed >= OUTAGE_S
                       and all(twin.frames_received(ex) > twin_at_kill[ex] + 10 for ex in EXCHANGES),
                       OUTAGE_S + 20, what="the outage window, with the twin recording")
            # restart with the same instance id and data_dir: the killed run's spool is recovered
            procs[VICTIM] = restarted = start(VICTIM)
            recovered = restarted.wait_for("spool_recovery_done", timeout=60)[0]
            assert recovered["files"] > 0
            new_run = restarted.wait_for("collector_start", timeout=30)[0]["run_id"]
            uploaded_every_exchange(restarted, new_run)

            # settle: no new data; every live collector read what was written to it
            for ex in EXCHANGES:
                sim.pause(ex)

            def all_read():
                return all(sum(c.frames_received(ex) for c in procs.values()) + dead_received[ex]
                           >= sim_text_frames_sent(sim, ex) for ex in EXCHANGES)
            wait_until(all_read, 20, what="every frame written by the simulator read by a collector")
            for c in procs.values():
                c.proc.send_signal(signal.SIGTERM)
            for name, c in procs.items():
                assert c.wait(90) == 0, (name, "".join(c.raw[-20:]))
            stats = sim.stats()
        finally:
            for c in procs.values():
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait(10)
        for name, c in procs.items():          # every file reached the bucket
            assert not [f for _r, _d, fs in os.walk(os.path.join(c.data_dir, "raw")) for f in fs
                        if f.endswith(".parquet")], name
        keys = s3.objects(bucket, prefix + "/")
        days = sorted({k.split("date=")[1][:10] for k in keys if "/date=" in k})
        # bin/check_raw_sanity over the bucket, with the collectors' settings (endpoint, symbols)
        check_env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "STORAGE_"))}
        check_env.update(s3.env(bucket, prefix), SYMBOLS=env["SYMBOLS"])
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "check_raw_sanity"),
                            "--root", f"s3://{bucket}/{prefix}", "--from", days[0], "--to", days[-1], "--json",
                            "--offline-threshold", f"{OFFLINE_S}s", "--no-day-edges"],
                           capture_output=True, text=True, env=check_env, cwd=str(tmp_path), timeout=180)
        check_s = time.monotonic() - t0
    assert p.stdout, p.stderr
    rep = json.loads(p.stdout)
    # clean: nothing lost, nothing offline, nothing counted twice
    assert rep["findings"] == [] and p.returncode == 0, (rep["findings"], rep["notes"], check_s)
    assert rep["violations"] == [] and rep["accounting"]["lost_frames"] == 0
    assert rep["sequence_gaps"] == [] and rep["time_gaps"] == [] and rep["offline"]["windows"] == []
    # coverage: every requested symbol recorded, by the shard that owns it; every shard twice
    for ex in EXCHANGES:
        cov = rep["coverage"]["exchanges"][ex]
        assert cov["universe"]["status"] == "known" and cov["universe"]["symbols"] == len(BASES), cov["universe"]
        assert cov["universe_recorded"] == len(BASES) and cov["not_recorded"] == [] and cov["foreign"] == []
        assert cov["shard_counts"] == [SHARDS] and cov["missing_shards"] == [] and not cov["resharded"]
        assert [(s["shard"], s["replicas"], s["instances"]) for s in cov["shards"]] == [
            (f"{i}/{SHARDS}", list(REPLICAS), [f"s{i}{r}" for r in REPLICAS]) for i in range(SHARDS)]
        assert cov["outside_universe"]["symbols"] == 0                   # SOL is listed, not requested
        assert sorted(rep["offline"]["by_shard"][ex]) == [f"{i}/{SHARDS}" for i in range(SHARDS)]
    # the victim's outage: a replica window per exchange, covered by its twin, not offline (a
    # process starved of CPU for longer than the threshold would show too: covered as well)
    wins = rep["replicas"]["windows"]
    victim_wins = [w for w in wins if (w["shard"], w["replica"]) == (f"1/{SHARDS}", "b") and w["duration_s"] >= OUTAGE_S]
    assert sorted((w["exchange"], w["covered_by"]) for w in victim_wins) == [(ex, "a") for ex in EXCHANGES], wins
    assert all(w["covered_by"] for w in wins) and rep["replicas"]["not_covered"] == 0, wins
    insts = {i["instance_id"]: i for i in rep["instances"]}
    assert set(insts) == set(names)
    assert len(insts[VICTIM]["runs"]) == 2 and all(len(insts[n]["runs"]) == 1 for n in names if n != VICTIM)
    assert all(insts[n]["shard"] == f"{n[1]}/{SHARDS}" and insts[n]["replica"] == n[2]
               and insts[n]["exchanges"] == list(EXCHANGES) for n in names)
    # counts: every row written to a socket stored (rows), every message once (unique_rows)
    want_unique = unique_rows(sent_msgs)
    got = {(x["exchange"], x["dataset"]): x for x in rep["datasets"] if x["dataset"] != "frames"}
    for ex in EXCHANGES:
        for ds in DATASETS:
            if ex == "binance" and ds == "open_interest":
                assert (ex, ds) not in got and stats[ex]["rows"][ds] == 0
                continue
            x = got[(ex, ds)]
            assert x["rows"] == stats[ex]["rows"][ds], (ex, ds, x, stats[ex]["rows"][ds])
            assert x["unique_rows"] == want_unique[(ex, ds)], (ex, ds, x, want_unique[(ex, ds)])
            assert x["duplicates_across_instances"] > 0, (ex, ds, x)
            assert x["rows"] == x["unique_rows"] + x["duplicates_across_instances"] + x["duplicates_within_instance"]
