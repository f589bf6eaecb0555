"""bin/check_raw_sanity against data written by the real Writer (fed with exchange-shaped frames on
a simulated clock, so a 60 s outage costs no waiting), with injected faults, locally and on a
moto S3 server."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app import migrate, sanity, schema, settings as settings_mod, sharding, writer as writer_mod
from app.exchanges import Instrument, create
from app.state import State
from app.storage import LocalStorage
from app.handoff import FrameQueue, from_items
from tests.helpers import ROOT

DAY = "2024-03-05"
T0 = sanity.day_start_ns(DAY) + 10 * 3600 * 10**9        # 10:00:00Z
TICK = 500_000_000                                         # one frame per symbol per 0.5 s
TICKS_PER_FILE = 120                                       # 60 s files, as rotate_interval
EXCHANGES = ("binance", "bybit", "okx")
SYMS = {"binance": ["BTCUSDT", "ETHUSDT", "SOLUSDT"], "bybit": ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        "okx": ["BTC-USDT-SWAP", "ETH-USDT-SWAP", "SOL-USDT-SWAP"]}


class Market:
    """Exchange-side state that moves on whether or not we receive it (ids keep counting)."""

    def __init__(self):
        self.trade_id: dict = {}
        self.update_id: dict = {}

    def next(self, table, key, step=1):
        table[key] = table.get(key, 1000) + step
        return table[key]

    def frame(self, ex: str, si: int, tick: int, ts: int, *, bid="100.1", ask="100.2", price="100.15",
              skew_ms=0, id_skip=0) -> bytes | None:
        sym = SYMS[ex][si]
        ms = ts // 1_000_000 + skew_ms
        kind = (tick + si) % 4
        if ex == "binance":
            if kind in (0, 3):
                u = self.next(self.update_id, (ex, sym))
                return (f'{{"stream":"{sym.lower()}@bookTicker","data":{{"e":"bookTicker","u":{u},"s":"{sym}",'
                        f'"b":"{bid}","B":"1.5","a":"{ask}","A":"2.5","T":{ms},"E":{ms}}}}}').encode()
            if kind == 1:
                a = self.next(self.trade_id, (ex, sym), 1 + id_skip)
                return (f'{{"stream":"{sym.lower()}@aggTrade","data":{{"e":"aggTrade","E":{ms},"a":{a},"s":"{sym}",'
                        f'"p":"{price}","q":"0.5","f":{a * 3},"l":{a * 3 + 2},"T":{ms},"m":false}}}}').encode()
            return (f'{{"stream":"{sym.lower()}@markPrice@1s","data":{{"e":"markPriceUpdate","E":{ms},"s":"{sym}",'
                    f'"p":"100.12","i":"100.11","P":"100.13","r":"0.0001","T":1709625600000}}}}').encode()
        if ex == "bybit":
            if kind in (0, 3):
                u = self.next(self.update_id, (ex, sym))
                return (f'{{"topic":"orderbook.1.{sym}","type":"snapshot","ts":{ms},"data":{{"s":"{sym}",'
                        f'"b":[["{bid}","1.5"]],"a":[["{ask}","2.5"]],"u":{u},"seq":{u * 7}}},"cts":{ms}}}').encode()
            if kind == 1:
                n = self.next(self.trade_id, (ex, sym), 1 + id_skip)
                return (f'{{"topic":"publicTrade.{sym}","type":"snapshot","ts":{ms},"data":[{{"T":{ms},"s":"{sym}",'
                        f'"S":"Buy","v":"0.4","p":"{price}","L":"ZeroMinusTick",'
                        f'"i":"00000000-0000-0000-0000-{n:012d}","BT":false}}]}}').encode()
            return (f'{{"topic":"tickers.{sym}","type":"snapshot","data":{{"symbol":"{sym}","markPrice":"100.12",'
                    f'"indexPrice":"100.11","openInterest":"1000","openInterestValue":"100000",'
                    f'"nextFundingTime":"1709625600000","fundingRate":"0.0001"}},"cs":1,"ts":{ms}}}').encode()
        if kind in (0, 3) and not (kind == 3 and tick % 8 >= 4):
            if kind == 3:
                return (f'{{"arg":{{"channel":"funding-rate","instId":"{sym}"}},"data":[{{"fundingRate":"0.0001",'
                        f'"fundingTime":"1709625600000","instId":"{sym}","instType":"SWAP",'
                        f'"nextFundingRate":"0.0002","ts":"{ms}"}}]}}').encode()
            u = self.next(self.update_id, (ex, sym))
            return (f'{{"arg":{{"channel":"bbo-tbt","instId":"{sym}"}},"data":[{{"asks":[["{ask}","2","0","1"]],'
                    f'"bids":[["{bid}","1","0","1"]],"ts":"{ms}","seqId":{u}}}]}}').encode()
        if kind == 3:
            return (f'{{"arg":{{"channel":"open-interest","instId":"{sym}"}},"data":[{{"instId":"{sym}",'
                    f'"instType":"SWAP","oi":"1000","oiCcy":"10","oiUsd":"100000","ts":"{ms}"}}]}}').encode()
        if kind == 1:
            t = self.next(self.trade_id, (ex, sym), 2 + id_skip)      # count 2: ids advance by 2
            return (f'{{"arg":{{"channel":"trades","instId":"{sym}"}},"data":[{{"instId":"{sym}","tradeId":"{t}",'
                    f'"px":"{price}","sz":"8","side":"buy","ts":"{ms}","count":"2"}}]}}').encode()
        return (f'{{"arg":{{"channel":"mark-price","instId":"{sym}"}},"data":[{{"instId":"{sym}",'
                f'"instType":"SWAP","markPx":"100.12","ts":"{ms}"}}]}}').encode()


ACKS = {"binance": b'{"result":null,"id":1}',
        "bybit": b'{"success":true,"ret_msg":"","conn_id":"c1","req_id":"1","op":"subscribe"}',
        "okx": b'{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"connId":"a1"}'}


class Recorder:
    """One collector run: the real Writer (run_id, recv_seq from 1, its own conn ids) on a fake clock.

    `tweak(tick, ex, si)` may return None (frame received normally), "skip" (not received:
    the exchange is disconnected; its next frame arrives on a new connection), "drop" (received,
    numbered, then lost before the writer: a recv_seq hole) or a dict of Market.frame overrides.
    `shard`/`replica` go into every file's metadata (as `--shard`/`--replica` do); `lag_ns` is
    added to every ts_recv (a replica on another machine receives the same message a bit later).
    """

    def __init__(self, data_dir, run_id: str, exchanges=EXCHANGES, instance_id="t1", shard="0/1", replica="",
                 lag_ns=0):
        s = settings_mod.load(None, environ={}, dotenv_path=os.path.join(str(data_dir), ".env")).replace(
            data_dir=str(data_dir), exchanges=list(exchanges), instance_id=instance_id,
            shard=sharding.parse(shard), replica=replica)
        self.exchanges = exchanges
        self.instance_id = instance_id
        self.shard = sharding.parse(shard)
        self.lag_ns = lag_ns
        self.state = State(exchanges=list(exchanges), queue=FrameQueue())
        self.w = writer_mod.Writer(s, FrameQueue(), self.state, LocalStorage(s, self.state),
                                   {ex: create(ex) for ex in exchanges}, on_control=lambda *a: None,
                                   run_id=run_id, version="test")
        self.w.finalizer.start()
        self.seq = 0
        self.next_conn = 1
        self.conn: dict[str, int] = {}
        self.sent = 0
        self.dropped = 0

    def _conn(self, ex: str) -> int:
        if ex not in self.conn:
            self.conn[ex] = self.next_conn
            self.next_conn += 1
        return self.conn[ex]

    def item(self, ex: str, ts: int, payload: bytes, conn: int | None = None):
        self.seq += 1
        return (ex, conn or self._conn(ex), self.seq, ts, payload)

    def record(self, market: Market, t_from: int, t_to: int, tweak=None, extra=None) -> None:
        batch = []
        for tick in range(t_from, t_to):
            ts = T0 + tick * TICK
            for ex in self.exchanges:
                for si in range(len(SYMS[ex])):
                    how = tweak(tick, ex, si) if tweak else None
                    payload = market.frame(ex, si, tick, ts + si * 1000, **(how if isinstance(how, dict) else {}))
                    if how == "skip":
                        self.conn.pop(ex, None)          # reconnect (new conn_id) when it comes back
                        continue
                    if ex not in self.conn:              # a new connection: its subscribe ACK first
                        batch.append(self.item(ex, ts + si * 1000, ACKS[ex]))
                    it = self.item(ex, ts + si * 1000, payload)
                    if how == "drop":
                        self.dropped += 1
                        continue
                    batch.append(it)
            for it in (extra(self, tick) if extra else ()):
                batch.append(it)
            if (tick + 1) % TICKS_PER_FILE == 0 or tick == t_to - 1:
                self.sent += len(batch)
                self.w.process(from_items(batch))
                self.w.flush()
                self.w.rotate()
                batch = []

    def close(self) -> None:
        self.w.finalizer.stop()


def check(root, **kw) -> dict:
    kw.setdefault("dates", [DAY])
    kw.setdefault("day_edges", False)
    kw.setdefault("now_ns", T0 + 86_400 * 10**9 * 2)
    return sanity.check(sanity.Options(root=str(root), **kw))


def record_clean(data_dir, ticks=600, run_id="20240305T100000Zaaaa", **kw) -> Recorder:
    r = Recorder(data_dir, run_id, **kw)
    r.record(Market(), 0, ticks)
    r.close()
    return r


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    rec = record_clean(d)
    return d, rec


# ---- clean data -----------------------------------------------------------------------------------

def test_clean_day_exit_0_with_expected_counts(clean_dir):
    d, rec = clean_dir
    r = check(d)
    assert r["exit_code"] == 0, r["findings"]
    assert r["findings"] == [] and r["violations"] == []
    frames = sum(s["frames"] for s in r["summary"].values())
    assert frames == rec.sent == rec.seq == 600 * 9 + 3      # 9 symbols x 600 ticks + 3 ACKs
    assert r["accounting"]["lost_frames"] == 0
    (run,) = r["accounting"]["runs"]
    assert (run["first_seq"], run["last_seq"], run["frames"]) == (1, rec.seq, rec.seq)
    assert run["exchanges"] == list(EXCHANGES)
    # 5 minutes = 5 files per (dataset, exchange): binance has no open_interest
    assert r["summary"]["binance"]["files"] == 5 * 5
    assert r["summary"]["okx"]["files"] == 5 * 6 and r["summary"]["bybit"]["files"] == 5 * 6
    rows = {(x["exchange"], x["dataset"]): x["rows"] for x in r["datasets"]}
    assert rows[("binance", "trades")] == 600 * 3 // 4
    assert rows[("binance", "mark_price")] == rows[("binance", "funding")] == 600 * 3 // 4
    assert rows[("bybit", "bbo")] == 600 * 3 // 2
    assert r["summary"]["binance"]["rows"] == sum(
        v for (e, ds), v in rows.items() if e == "binance" and ds != "frames") == 900 + 3 * 450
    assert r["sequence_gaps"] == [] and r["time_gaps"] == [] and r["offline"]["windows"] == []
    assert r["content"] == [] and r["duplicates"] == []


def test_day_edges_count_as_offline(clean_dir):
    d, _ = clean_dir
    r = check(d, day_edges=True)
    assert r["exit_code"] == 1
    wins = r["offline"]["windows"]
    assert sorted((w["exchange"], w["edge"]) for w in wins) == sorted(
        [(ex, e) for ex in EXCHANGES for e in ("start", "end")])
    b = [w for w in wins if w["exchange"] == "binance" and w["edge"] == "start"][0]
    assert b["start"] == f"{DAY}T00:00:00.000Z" and b["end"] == f"{DAY}T10:00:00.000Z"
    # recorded 10:00:00 .. 10:04:59.5: downtime is the rest of the day
    assert r["offline"]["downtime_s"]["binance"][DAY] == pytest.approx(86_400 - 299.5, abs=0.01)
    # checking "today" (the day not over yet): no end edge, and the day is looked at from its
    # first file (10:00:00) on, not from midnight: the collector started then, nothing is offline
    r = check(d, day_edges=True, now_ns=T0 + 3600 * 10**9)
    assert r["offline"]["windows"] == [] and r["exit_code"] == 0, r["findings"]
    assert r["window"] == {"start": f"{DAY}T10:00:00.000Z", "end": f"{DAY}T11:00:00.000Z", "seconds": 3600.0,
                           "from": "first_file", "to": "now"}


def test_expected_exchange_without_frames_is_offline(tmp_path):
    record_clean(tmp_path, ticks=240, exchanges=("binance",))
    assert check(tmp_path)["exit_code"] == 0
    r = check(tmp_path, exchanges=["binance", "okx"])
    assert r["exit_code"] == 1
    (w,) = r["offline"]["windows"]
    assert (w["exchange"], w["edge"], w["duration_s"]) == ("okx", "no_frames", 86_400)
    assert r["summary"]["okx"]["files"] == 0 and r["summary"]["okx"]["downtime_s"] == 86_400


def test_exchange_filter_and_text_output(clean_dir, capsys):
    d, _ = clean_dir
    r = check(d, exchanges=["okx"])
    assert list(r["summary"]) == ["okx"] and r["exit_code"] == 0
    code = sanity.main(["--root", str(d), "--date", DAY, "--no-day-edges", "--exchange", "okx"])
    out = capsys.readouterr().out
    assert code == 0
    assert "okx" in out and "binance" not in out.split("result:")[0].split("exchange")[-1]
    assert "result: OK (exit 0)" in out
    assert sanity.main(["--root", str(d), "--date", DAY, "--no-day-edges", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert sanity.main(["--root", str(d), "--date", DAY, "--exchange", "bitmex"]) == 2
    assert "unknown exchange" in capsys.readouterr().err


# ---- faults ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory):
    """Run A 10:00:00-10:05:00 with drops, an OKX disconnect, a Binance trade-id jump and bad
    content; the collector then is killed for 60 s; run B 10:06:00-10:08:00."""
    d = tmp_path_factory.mktemp("faulty")
    m = Market()

    def tweak(tick, ex, si):
        if tick == 100 and ex == "binance" and si == 1:
            return "drop"                                   # hole of 1 between two binance frames
        if tick == 200 and (ex, si) in (("binance", 2), ("bybit", 0), ("bybit", 1)):
            return "drop"                                   # hole of 3: binance | bybit
        if 300 <= tick < 420 and ex == "okx":
            return "skip"                                   # OKX disconnected 60 s
        if tick == 453 and ex == "binance" and si == 0:     # (453+0)%4 == 1: a trade
            return {"id_skip": 7}                           # 7 aggTrade ids never sent
        if tick == 460 and ex == "binance" and si == 0:     # (460)%4 == 0: bbo
            return {"bid": "100.3", "ask": "100.2"}         # crossed
        if tick == 464 and ex == "binance" and si == 0:
            return {"bid": "100.2", "ask": "100.2"}         # locked
        if tick == 473 and ex == "okx" and si == 0:         # (473)%4 == 1: an OKX trade
            return {"price": "0"}                           # non-positive price
        if tick == 480 and ex == "bybit" and si == 2:       # (482)%4 == 2: tickers
            return {"skew_ms": 12_345}                      # 12.3 s clock skew
        return None

    def extra(rec, tick):
        if tick == 500:   # Bybit re-sends an unchanged snapshot (same u): a duplicate, not an error
            u = m.update_id[("bybit", "BTCUSDT")]
            ms = (T0 + tick * TICK) // 10**6
            p = (f'{{"topic":"orderbook.1.BTCUSDT","type":"snapshot","ts":{ms},"data":{{"s":"BTCUSDT",'
                 f'"b":[["100.1","1.5"]],"a":[["100.2","2.5"]],"u":{u},"seq":{u * 7 + 1}}},"cts":{ms}}}').encode()
            return [rec.item("bybit", T0 + tick * TICK + 5000, p)]
        if tick == 510:   # the clock stepped back 2 s on the binance connection
            return [rec.item("binance", T0 + tick * TICK - 2 * 10**9, b'{"result":null,"id":9}')]
        return []

    a = Recorder(d, "20240305T100000Zaaaa")
    a.record(m, 0, 600, tweak, extra)
    a.close()
    # collector killed at 10:05:00, restarted at 10:06:00; the market moved on meanwhile
    for tick in range(600, 720):
        for ex in EXCHANGES:
            for si in range(3):
                m.frame(ex, si, tick, T0)
    b = Recorder(d, "20240305T100600Zbbbb")
    b.record(m, 720, 960)
    b.close()
    return d, a, b


def test_faults_reported_with_counts_and_windows(faulty_dir):
    d, a, b = faulty_dir
    r = check(d)
    assert r["exit_code"] == 1 and r["violations"] == []
    # accounting: run A lost 4 frames in 2 holes, attributed by neighbours; run B none
    runs = {x["run_id"]: x for x in r["accounting"]["runs"]}
    ra, rb = runs["20240305T100000Zaaaa"], runs["20240305T100600Zbbbb"]
    assert (ra["lost_frames"], ra["holes"], rb["lost_frames"]) == (4, 2, 0)
    assert ra["frames"] == a.seq - 4 and rb["frames"] == b.seq
    w1, w2 = ra["windows"]
    assert (w1["lost"], w1["exchange"], w2["lost"], w2["exchange"]) == (1, "binance", 3, "binance|bybit")
    assert w1["ts_from"] == sanity.iso(T0 + 100 * TICK) and w1["ts_to"] == sanity.iso(T0 + 100 * TICK + 2000)
    assert r["accounting"]["by_exchange"] == {"binance": {"lost_frames": 1, "holes": 1},
                                              "binance|bybit": {"lost_frames": 3, "holes": 1}}
    assert r["summary"]["binance"]["lost_frames"] == 1
    # offline: OKX 60 s disconnect (last frame tick 299, next tick 420) and the 60 s kill for all
    wins = [(w["exchange"], w["start"], w["end"]) for w in r["offline"]["windows"]]
    okx_gap = (sanity.iso(T0 + 299 * TICK + 2000), sanity.iso(T0 + 420 * TICK))
    kill = {ex: (sanity.iso(T0 + 599 * TICK + 2000), sanity.iso(T0 + 720 * TICK)) for ex in EXCHANGES}
    assert ("okx", *okx_gap) in wins
    assert sorted(w for w in wins if w[1] >= sanity.iso(T0 + 599 * TICK)) == sorted(
        (ex, *kill[ex]) for ex in EXCHANGES)
    assert len(wins) == 4
    assert r["offline"]["downtime_s"]["okx"][DAY] == pytest.approx(2 * 60.5, abs=0.001)
    assert r["offline"]["downtime_s"]["binance"][DAY] == pytest.approx(60.5, abs=0.001)
    # sequence gaps: the Binance id jump, the OKX disconnect and the kill on both id streams
    seq = [(g["exchange"], g["symbol"], g["missed"], g["during_offline"]) for g in r["sequence_gaps"]]
    assert ("binance", "BTCUSDT", 7, False) in seq
    assert ("binance", "ETHUSDT", 1, False) in seq           # the frame dropped at tick 100 was a trade
    okx_missed = {g["symbol"]: g["missed"] for g in r["sequence_gaps"]
                  if g["exchange"] == "okx" and g["ts_from"] < sanity.iso(T0 + 420 * TICK)}
    assert okx_missed == {s: 2 * 30 for s in SYMS["okx"]}    # 30 trades of count 2 never received
    kill_gaps = [g for g in r["sequence_gaps"] if g["ts_to"] >= sanity.iso(T0 + 720 * TICK)]
    assert sorted((g["exchange"], g["missed"]) for g in kill_gaps) == sorted(
        [("binance", 30)] * 3 + [("okx", 60)] * 3)
    assert all(g["during_offline"] for g in kill_gaps)
    assert r["summary"]["binance"]["sequence_gaps"] == 5 and r["summary"]["binance"]["ids_missed"] == 98
    # time gaps: only cadenced streams, only during the outages
    tg = r["time_gaps"]
    assert tg and all(g["during_offline"] for g in tg)
    # (a stream feeding several datasets is timed on its first: markPrice/tickers -> mark_price)
    assert sorted((g["exchange"], g["dataset"], g["symbol"]) for g in tg) == sorted(
        [("binance", "mark_price", s) for s in SYMS["binance"]]
        + [("bybit", ds, s) for ds in ("bbo", "mark_price") for s in SYMS["bybit"]])
    # content: flagged with counts and first occurrence
    c = {(x["exchange"], x["dataset"], x["check"]): x for x in r["content"]}
    assert c[("binance", "bbo", "crossed_bbo")]["count"] == 1
    assert c[("binance", "bbo", "locked_bbo")]["count"] == 1
    assert c[("binance", "bbo", "crossed_bbo")]["first"]["ts_recv"] == sanity.iso(T0 + 460 * TICK)
    assert c[("okx", "trades", "non_positive_price")]["count"] == 1
    skew = {k: v for k, v in c.items() if k[2] == "clock_skew"}
    assert {k[:2] for k in skew} == {("bybit", "mark_price"), ("bybit", "funding"), ("bybit", "open_interest")}
    assert all(v["count"] == 1 and v["max_abs_s"] == pytest.approx(12.345, abs=0.001) for v in skew.values())
    back = c[("binance", "frames", "ts_recv_backwards")]
    assert back["count"] == 1 and back["max_abs_s"] == pytest.approx(2.0, abs=0.01)
    assert len(c) == 7
    # the re-sent snapshot: one instance recorded the same message twice
    assert r["duplicates"] == [{"exchange": "bybit", "dataset": "bbo", "rows": 1, "duplicates_across_instances": 0,
                                "duplicates_within_instance": 1}]


def test_streamed_batches_give_the_same_report(faulty_dir, monkeypatch):
    """Files larger than BATCH_ROWS are streamed batch by batch (bounded memory): every check
    carries its state across batches, so the findings are the same as file by file."""
    d, _, _ = faulty_dir
    whole = check(d)
    monkeypatch.setattr(sanity, "BATCH_ROWS", 37)
    streamed = check(d)
    for key in ("exit_code", "findings", "summary", "accounting", "sequence_gaps", "time_gaps", "offline",
                "content"):
        assert streamed[key] == whole[key], key


def test_corrupt_and_wrong_schema_files_exit_2(tmp_path, clean_dir):
    src, _ = clean_dir
    d = tmp_path / "data"
    shutil.copytree(src, d)
    def files(ds, ex="binance"):
        return sorted(glob.glob(str(d / f"raw/v1/{ds}/{ex}/date=*/*.parquet")))

    trades, bbo, mark, frames = files("trades"), files("bbo"), files("mark_price"), files("frames")
    frames_rows = pq.read_metadata(frames[2]).num_rows
    with open(frames[2], "r+b") as f:                  # frames unreadable: accounting incomplete
        f.truncate(1000)
    # a truncated file (a torn copy)
    with open(trades[1], "r+b") as f:
        f.truncate(os.path.getsize(trades[1]) // 2)
    # wrong schemas: an extra column, a missing column, a wrong type, a lost nullability
    t = pq.read_table(trades[2])
    meta = t.schema.metadata
    pq.write_table(t.append_column("extra", pa.array([1] * t.num_rows)).replace_schema_metadata(meta), trades[2])
    t = pq.read_table(trades[3])
    pq.write_table(t.drop_columns(["side"]).replace_schema_metadata(meta), trades[3])
    t = pq.read_table(mark[0])
    i = t.schema.get_field_index("mark_px")
    pq.write_table(t.set_column(i, pa.field("mark_px", pa.string(), False), t.column(i).cast(pa.string())), mark[0])
    t = pq.read_table(bbo[1])
    loose = pa.schema([f.with_nullable(True) for f in t.schema], metadata=t.schema.metadata)
    pq.write_table(pa.Table.from_arrays(t.columns, schema=loose), bbo[1])
    # right schema, metadata missing
    t = pq.read_table(bbo[2])
    pq.write_table(t.replace_schema_metadata({b"dataset": b"bbo", b"run_id": b"x"}), bbo[2])
    r = check(d)
    assert r["exit_code"] == 2
    v = {x["path"]: x for x in r["violations"]}
    assert v[trades[1]]["kind"] == "unreadable"
    assert (v[trades[2]]["kind"], v[trades[2]]["detail"]) == ("schema", "extra column extra")
    assert v[trades[3]]["detail"] == "missing column side"
    assert v[mark[0]]["detail"] == "column mark_px: type string, expected double"
    assert v[bbo[1]]["detail"].startswith("column exchange: nullable=True, expected False; column symbol:")
    assert v[bbo[2]] == dict(v[bbo[2]], kind="metadata", detail="missing key-value metadata schema_version, "
                             "exchange, collector_version, instance_id")
    assert v[frames[2]]["kind"] == "unreadable"
    assert r["violations_truncated"] == 0 and len(r["violations"]) == 7
    assert r["accounting"]["complete"] is False and r["accounting"]["lost_frames"] == frames_rows
    assert r["notes"] == ["1 frames file(s) could not be read: their recv_seq count as holes"]
    # files with a bad schema and the torn one are not read: their trade ids show as a gap
    assert sorted((g["symbol"], g["missed"]) for g in r["sequence_gaps"]) == [(s, 90) for s in SYMS["binance"]]
    assert r["datasets"] and r["summary"]["binance"]["files"] == 25      # every file is counted
    # a file under the wrong partition: its exchange column and metadata say binance
    other = str(d / f"raw/v1/funding/okx/date={DAY}/moved.parquet")
    shutil.copy(files("funding")[0], other)
    r = check(d, exchanges=["okx"])
    assert r["exit_code"] == 2
    assert sorted((x["kind"], x["detail"]) for x in r["violations"] if x["path"] == other) == [
        ("metadata", "exchange='binance', expected 'okx'"),
        ("partition", "exchange column holds 'binance'..'binance', directory is okx")]
    # frames of every exchange are read for the run's accounting, so the torn binance one shows too
    assert [x["path"] for x in r["violations"] if x["path"] != other] == [frames[2]]


def test_script_exit_codes_json_and_quiet(tmp_path, clean_dir):
    src, _ = clean_dir
    script = os.path.join(ROOT, "bin", "check_raw_sanity")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "STORAGE_"))}

    def run(*args, root=src):
        return subprocess.run([sys.executable, script, "--root", str(root), "--date", DAY, *args],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    p = run("--no-day-edges", "--quiet")
    assert (p.returncode, p.stdout) == (0, "")
    p = run("--json")                                   # day edges on: the rest of the day is offline
    assert p.returncode == 1
    rep = json.loads(p.stdout)
    assert rep["exit_code"] == 1 and len(rep["offline"]["windows"]) == 6
    p = run("--quiet")
    assert p.returncode == 1 and "offline windows" in p.stdout
    p = run(root=tmp_path / "nowhere")
    assert p.returncode == 2 and "root not found" in p.stdout


def test_recv_seq_holes_alone_are_reported_as_loss(tmp_path):
    """Frames numbered and then lost before the writer (no drop counted anywhere on disk): the
    only fault of the day, reported by bin/check_raw_sanity as lost frames (exit 1), per run and
    exchange, with the window; nothing else is flagged."""
    def tweak(tick, ex, si):
        # book frames ((tick + si) % 4 == 0) of the middle symbol: their loss leaves no id or
        # time gap, and the frames on both sides of each hole are of the same exchange
        return "drop" if (tick, ex, si) in ((39, "binance", 1), (79, "bybit", 1)) else None
    rec = Recorder(tmp_path, "20240305T100000Zcccc", exchanges=("binance", "bybit"))
    rec.record(Market(), 0, 240, tweak)
    rec.close()
    assert rec.dropped == 2
    r = check(tmp_path)
    assert r["findings"] == ["2 frame(s) lost (recv_seq holes)"] and r["exit_code"] == 1
    assert r["violations"] == [] and r["sequence_gaps"] == [] and r["time_gaps"] == []
    assert r["offline"]["windows"] == [] and r["content"] == []
    (run,) = r["accounting"]["runs"]
    assert (run["lost_frames"], run["holes"], run["frames"]) == (2, 2, rec.seq - 2)
    assert [(w["exchange"], w["lost"]) for w in run["windows"]] == [("binance", 1), ("bybit", 1)]
    assert r["summary"]["binance"]["lost_frames"] == 1 and r["summary"]["bybit"]["lost_frames"] == 1
    # the command line says so, with its exit code
    script = os.path.join(ROOT, "bin", "check_raw_sanity")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "STORAGE_"))}
    p = subprocess.run([sys.executable, script, "--root", str(tmp_path), "--date", DAY, "--no-day-edges"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "lost frames (recv_seq holes" in p.stdout
    assert p.stdout.rstrip().endswith("result: FINDINGS (exit 1): 2 frame(s) lost (recv_seq holes)"), p.stdout


# ---- the real collector against the simulator ------------------------------------------------------

def run_main(capsys, *argv) -> tuple[int, dict]:
    code = sanity.main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_collector_output_checks_clean_but_for_skipped_ids(tmp_path, capsys):
    """No false positives on what bin/collector really writes; the ids the exchange skipped are
    found exactly."""
    import datetime as dt
    from sim import Simulator
    from tests.helpers import CollectorProcess, settle, sim_env, wait_until
    sim = Simulator(exchanges=("binance",), rate=40.0, seed=7, cadence_scale=0.2)
    sim.start()
    topic = "btcusdt@aggTrade"

    def sent(t=topic):
        return sim.stats()["binance"]["frames"].get(t, 0)
    try:
        env = sim_env(sim, ("binance",))
        env.update({"EXCHANGES": "binance", "SYMBOLS": "BTCUSDT,ETHUSDT", "FLUSH_INTERVAL": "0.5",
                    "ROTATE_INTERVAL": "2"})
        with CollectorProcess(tmp_path, env) as c:
            c.wait_for("subscribed", count=2)
            wait_until(lambda: sent() >= 10 and sent("btcusdt@markPrice@1s") >= 5, 20,
                       what="trades and mark prices flowing")
            sim.skip_ids("binance", topic, 5)
            wait_until(lambda: sim.stats()["binance"]["skipped_ids"].get(topic) == 5, 20, what="5 ids skipped")
            after = sent()
            wait_until(lambda: sent() >= after + 5, 20, what="trades after the skipped ids")
            settle(c, sim)
            assert c.stop() == 0
        sent = sim.stats()["binance"]
    finally:
        sim.stop()
    today = dt.datetime.now(dt.timezone.utc).date()
    r = check(c.data_dir, dates=sanity.date_range(None, "yesterday", "today", today), now_ns=None)
    assert r["findings"] == ["1 sequence gap(s), 5 id(s) missed"] and r["exit_code"] == 1
    (g,) = r["sequence_gaps"]
    assert (g["exchange"], g["dataset"], g["symbol"], g["missed"]) == ("binance", "trades", "BTCUSDT", 5)
    assert r["summary"]["binance"]["frames"] == sum(sent["frames"].values()) + sent["control_frames"]
    assert r["summary"]["binance"]["rows"] == sum(sent["rows"].values())
    assert r["accounting"]["lost_frames"] == 0 and r["violations"] == [] and r["content"] == []
    # a fresh install: `make sanity` (no --date, day edges on) the day the collector first ran.
    # Only today has data, so today is checked, from its first file on: the hours before the
    # collector started are not an offline window (unless the run straddled midnight UTC)
    days = sorted({os.path.basename(os.path.dirname(p)) for p in glob.glob(f"{c.data_dir}/raw/v1/*/*/date=*/*")})
    if days == [f"date={today.isoformat()}"]:
        for argv in ([], ["--date", "today"]):
            code, rep = run_main(capsys, "--root", c.data_dir, "--json", *argv)
            assert code == 1 and rep["findings"] == ["1 sequence gap(s), 5 id(s) missed"], rep["findings"]
            assert rep["dates"] == [today.isoformat()] and rep["offline"]["windows"] == []
            assert rep["window"]["from"] == "first_file" and rep["window"]["to"] == "now"
            assert rep["window"]["seconds"] < 600                   # this run's minute, not the day so far
            assert rep["date_choice"] == (None if argv else {"date": today.isoformat(),
                                                             "why": "only today has data: checking today so far"})
        code = sanity.main(["--root", c.data_dir])
        out = capsys.readouterr().out
        assert code == 1 and f"checked {today.isoformat()}: only today has data: checking today so far" in out
        assert "(first file of the day)" in out
    else:                                     # the only way around: the run straddled midnight UTC
        assert days == [f"date={(today - dt.timedelta(days=1)).isoformat()}", f"date={today.isoformat()}"], days


# ---- S3 -------------------------------------------------------------------------------------------

def test_same_checks_on_s3(tmp_path, faulty_dir):
    from tests.s3server import running_s3
    src, a, b = faulty_dir
    d = tmp_path / "data"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("spool"))
    bad = sorted(glob.glob(str(d / "raw/v1/bbo/okx/date=*/*.parquet")))[0]
    with open(bad, "r+b") as f:
        f.truncate(100)
    local = check(d)
    with running_s3() as s3:
        bucket = s3.new_bucket()
        client = s3.client()
        for path in glob.glob(str(d / "raw/**/*.parquet"), recursive=True):
            client.upload_file(path, bucket, "pre/fix/" + os.path.relpath(path, d))
        env = dict(os.environ, **s3.env(bucket, "pre/fix"))
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "check_raw_sanity"),
                            "--root", f"s3://{bucket}/pre/fix", "--date", DAY, "--no-day-edges", "--json"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=180)
        assert p.returncode == 2, p.stderr
        remote = json.loads(p.stdout)
        # without --root: the settings' storage (STORAGE_BACKEND=s3, S3_BUCKET, S3_PREFIX); that
        # prefix holds nothing: "no data under <root>", a finding
        p2 = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "check_raw_sanity"), "--date", DAY, "--json"],
                            capture_output=True, text=True, env=dict(env, S3_PREFIX="other"), cwd=str(tmp_path),
                            timeout=60)
        assert p2.returncode == 1, p2.stderr
        rep2 = json.loads(p2.stdout)
        assert rep2["root"] == f"s3://{bucket}/other" and rep2["findings"] == [f"no data under s3://{bucket}/other"]
        p3 = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "check_raw_sanity"),
                             "--root", "s3://no-such-bucket/x", "--date", DAY],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
        assert p3.returncode == 2
    assert local["exit_code"] == 2
    for key in ("summary", "accounting", "sequence_gaps", "time_gaps", "content", "duplicates"):
        assert remote[key] == local[key], key
    assert remote["offline"]["windows"] == local["offline"]["windows"]
    assert [v["detail"] for v in remote["violations"]] and len(remote["violations"]) == 1
    assert remote["violations"][0]["path"].endswith(os.path.basename(bad))


# ---- which day, when no --date is given -------------------------------------------------------------

DAY2 = "2024-03-06"
TICKS_PER_DAY = 86_400 * 10**9 // TICK


def test_no_date_checks_the_last_complete_day_with_data(tmp_path, capsys):
    """No --date: the latest date partition before today, and the report says which day that was
    (before: always yesterday, so `make sanity` exited 1 with "no data" the day after an install)."""
    rec = Recorder(tmp_path, "20240305T100000Zdddd", exchanges=("binance", "okx"))
    m = Market()
    rec.record(m, 0, 240)                                            # DAY  10:00-10:02
    rec.record(m, TICKS_PER_DAY, TICKS_PER_DAY + 240)                # DAY2 10:00-10:02
    rec.close()
    day2_noon = sanity.day_start_ns(DAY2) + 12 * 3600 * 10**9
    r = check(tmp_path, dates=[], now_ns=day2_noon, day_edges=True)
    assert r["dates"] == [DAY] and r["date_choice"] == {"date": DAY, "why": "the last complete UTC day with data"}
    # a complete day: from midnight to midnight, its edges count as before
    assert r["window"] == {"start": f"{DAY}T00:00:00.000Z", "end": f"{DAY2}T00:00:00.000Z", "seconds": 86_400.0,
                           "from": "day_start", "to": "day_end"}
    assert sorted((w["exchange"], w["edge"]) for w in r["offline"]["windows"]) == [
        ("binance", "end"), ("binance", "start"), ("okx", "end"), ("okx", "start")]
    r = check(tmp_path, dates=[], now_ns=day2_noon + 2 * 86_400 * 10**9)
    assert r["dates"] == [DAY2] and r["exit_code"] == 0, r["findings"]
    assert r["summary"]["okx"]["frames"] == 240 * 3 and r["accounting"]["lost_frames"] == 0
    # the command line (real clock: 2024 is long over) says which day it checked
    code = sanity.main(["--root", str(tmp_path), "--no-day-edges"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"dates={DAY2} " in out and f"checked {DAY2}: the last complete UTC day with data (no --date given)" in out
    # an explicit date without data says where the data is
    r = check(tmp_path, dates=["2024-01-01"])
    assert r["exit_code"] == 1
    assert r["findings"] == [f"no data files for 2024-01-01 (data under {tmp_path}: {DAY}..{DAY2}, 2 day(s))"]


def test_only_today_has_data_checks_today_from_its_first_file(clean_dir):
    """The day a collector is installed: only today has data, so today is checked, from its
    first file (10:00) on; the ten hours before the collector started are no offline window."""
    d, _ = clean_dir
    now = T0 + 2 * 3600 * 10**9                                      # DAY 12:00 is "now"
    r = check(d, dates=[], now_ns=now, day_edges=True)
    assert r["dates"] == [DAY]
    assert r["date_choice"] == {"date": DAY, "why": "only today has data: checking today so far"}
    assert r["window"] == {"start": f"{DAY}T10:00:00.000Z", "end": f"{DAY}T12:00:00.000Z", "seconds": 7200.0,
                           "from": "first_file", "to": "now"}
    assert r["offline"]["windows"] == [] and r["offline"]["downtime_s"] == {}
    assert r["exit_code"] == 0 and r["findings"] == []
    text = sanity.render_text(r)
    assert f"checked {DAY}: only today has data: checking today so far (no --date given)" in text
    assert f"window: {DAY}T10:00:00.000Z (first file of the day) .. {DAY}T12:00:00.000Z (now)" in text


def test_today_window_for_an_expected_exchange_without_frames(tmp_path):
    """--date today with an exchange expected but silent: offline from the day's first file (the
    collector's start) to now, not from midnight."""
    record_clean(tmp_path, ticks=240, exchanges=("binance",))
    now = T0 + 3600 * 10**9                                          # DAY 11:00
    r = check(tmp_path, dates=[DAY], now_ns=now, day_edges=True, exchanges=["binance", "okx"])
    (w,) = r["offline"]["windows"]
    assert (w["exchange"], w["edge"], w["start"], w["end"]) == ("okx", "no_frames", f"{DAY}T10:00:00.000Z",
                                                                f"{DAY}T11:00:00.000Z")
    assert r["offline"]["downtime_s"] == {"okx": {DAY: 3600.0}}


def test_no_data_under_the_root(tmp_path, capsys):
    """An empty root: "no data under <root>", a finding (exit 1, as a day without data always
    was); a root that does not exist: a violation (exit 2: a wrong path or an unmounted disk
    must alert), which says the same."""
    empty = tmp_path / "data"
    empty.mkdir()
    code, rep = run_main(capsys, "--root", str(empty), "--json")
    assert code == 1 and rep["findings"] == [f"no data under {empty}"]
    assert rep["dates"] == [] and rep["date_choice"] is None and rep["files"]["checked"] == 0
    code = sanity.main(["--root", str(empty)])
    out = capsys.readouterr().out
    assert code == 1 and out.rstrip().endswith(f"result: FINDINGS (exit 1): no data under {empty}"), out
    code = sanity.main(["--root", str(empty), "--date", "today", "--exchange", "okx"])
    assert code == 1 and f"no data under {empty} for okx" in capsys.readouterr().out
    code = sanity.main(["--root", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert code == 2 and f"root not found (no data under {tmp_path / 'nowhere'})" in out


# ---- the first layout (exchange=<x>/): found, still read, moved by --migrate-layout ------------------

SCRIPT = os.path.join(ROOT, "bin", "check_raw_sanity")


def digests(d) -> dict[str, str]:
    """Relative path -> sha256 of every file under raw/."""
    out = {}
    for p in glob.glob(os.path.join(str(d), "raw", "**", "*"), recursive=True):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[os.path.relpath(p, str(d)).replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()
    return out


def to_old_layout(d) -> list[str]:
    """Rename raw/v1/<ds>/<x>/ to the first layout's raw/v1/<ds>/exchange=<x>/: the files the old
    writer wrote (the file schema has not changed, only the directory)."""
    moved = []
    for ds_dir in sorted(glob.glob(os.path.join(str(d), "raw", "v1", "*"))):
        for ex in sorted(os.listdir(ds_dir)):
            os.rename(os.path.join(ds_dir, ex), os.path.join(ds_dir, f"exchange={ex}"))
            moved.append(f"raw/v1/{os.path.basename(ds_dir)}/exchange={ex}")
    return moved


def old_rel(rel: str) -> str:
    parts = rel.split("/")
    return "/".join(parts[:3] + ["exchange=" + parts[3]] + parts[4:])


def copy_clean(tmp_path, clean_dir):
    src, _ = clean_dir
    d = tmp_path / "data"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("spool"))
    return d


def script(*args, cwd, env=None, timeout=180):
    env = env or {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "STORAGE_"))}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=str(cwd), timeout=timeout)


def test_old_layout_found_read_and_migrated_locally(tmp_path, clean_dir):
    d = copy_clean(tmp_path, clean_dir)
    want = digests(d)
    clean = check(d)
    old_dirs = to_old_layout(d)
    assert len(old_dirs) == 5 + 6 + 6                              # binance has no open_interest
    # what users hit with the first layout
    with pytest.raises(pa.ArrowTypeError, match="Field exchange has incompatible types"):
        pq.read_table(str(d / "raw/v1/bbo"))
    # check_raw_sanity finds it, still reads it, and names the one command that moves it
    r = check(d)
    cmd = f"bin/check_raw_sanity --migrate-layout --root {d}"
    assert r["exit_code"] == 1
    assert r["findings"] == [f"17 director(ies) in the old exchange=<x> layout (checked all the same; pandas "
                             f"and pyarrow.parquet.read_table cannot read them): move them with {cmd}"]
    assert r["layout"] == {"legacy_dirs": old_dirs, "legacy_files_checked": clean["files"]["checked"],
                           "in_both_layouts": 0, "migrate_command": cmd}
    for key in ("summary", "accounting", "sequence_gaps", "time_gaps", "offline", "content", "datasets"):
        assert r[key] == clean[key], key
    p = script("--root", str(d), "--date", DAY, "--no-day-edges", cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "old layout (exchange=<x>/ directories" in p.stdout and "  raw/v1/bbo/exchange=okx/\n" in p.stdout
    assert f"  move them to <dataset>/<exchange>/ with: {cmd}\n" in p.stdout
    # the command it printed moves every file, bytes untouched, old directories gone
    p = script(*cmd.split()[1:], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert digests(d) == want
    assert not glob.glob(str(d / "raw/v1/*/exchange=*"))
    n = len(want)
    assert f"result: moved {n} file(s) ({sum(os.path.getsize(d / k) for k in want):,} bytes)" in p.stdout
    assert "  raw/v1/bbo/exchange=okx/ -> raw/v1/bbo/okx/: moved 5 file(s)" in p.stdout
    # again: nothing to do
    p = script(*cmd.split()[1:], cwd=tmp_path)
    assert p.returncode == 0 and "nothing to migrate" in p.stdout, p.stdout
    assert digests(d) == want
    # clean again, and readable by pyarrow's read_table
    after = check(d)
    assert after["exit_code"] == 0 and after["findings"] == [] and after["layout"]["legacy_dirs"] == []
    assert after["summary"] == clean["summary"]
    assert pq.read_table(str(d / "raw/v1/bbo")).num_rows == sum(
        x["rows"] for x in clean["datasets"] if x["dataset"] == "bbo")


class Crash(BaseException):
    """The process dies here (not an error the migration could catch)."""


def test_migrate_local_crash_conflict_dry_run_and_leftovers(tmp_path, clean_dir, monkeypatch, capsys):
    d = copy_clean(tmp_path, clean_dir)
    want = digests(d)
    to_old_layout(d)
    rels = sorted(want)
    # a previous run stopped after putting one file in place (a manual copy, an interrupted S3 sync)
    os.makedirs(os.path.dirname(d / rels[-1]), exist_ok=True)
    shutil.copy2(d / old_rel(rels[-1]), d / rels[-1])
    # a crash after 7 moves: every file is still in (at least) one place, with its bytes
    real_replace, calls = os.replace, []

    def dying_replace(a, b):
        calls.append(a)
        if len(calls) > 7:
            raise Crash()
        return real_replace(a, b)
    monkeypatch.setattr(migrate.os, "replace", dying_replace)
    with pytest.raises(Crash):
        migrate.migrate_local(str(d))
    monkeypatch.setattr(migrate.os, "replace", real_replace)
    have = digests(d)
    for rel, h in want.items():
        assert have.get(rel) == h or have.get(old_rel(rel)) == h, rel
    assert sum(1 for rel in want if rel in have) == 1 + 7
    # in both layouts: checked once (at the new place), noted; the data checks as before
    r = check(d)
    # (bbo/exchange=binance, emptied by the crashed run, is still there: the next run removes it)
    assert r["layout"]["in_both_layouts"] == 1 and len(r["layout"]["legacy_dirs"]) == 17
    assert r["notes"] == ["1 file(s) in both layouts (a migration interrupted between copy and delete): "
                          "checked once, at the new place; --migrate-layout removes the old copy"]
    assert r["summary"] == check(copy_clean(tmp_path / "c", clean_dir))["summary"]
    # a different file at a new place: a conflict; nothing moved, nothing deleted
    victim = next(rel for rel in rels if rel not in have)
    os.makedirs(os.path.dirname(d / victim), exist_ok=True)
    (d / victim).write_bytes(b"not the same file")
    before = digests(d)
    assert migrate.run(str(d)) == 2
    out = capsys.readouterr().out
    assert f"CONFLICT {d / old_rel(victim)} -> {d / victim}" in out
    assert "1 conflict(s): a different file is already at the new place; nothing was moved or deleted" in out
    assert digests(d) == before
    os.remove(d / victim)
    # a dry run says what it would do and does nothing
    before = digests(d)
    assert migrate.run(str(d), dry_run=True) == 0
    out = capsys.readouterr().out
    assert "(dry run: nothing changed)" in out and f"result: would move {len(want) - 8} file(s)" in out
    assert digests(d) == before
    # run to the end: the rest moves, the copy already in place replaces its old twin
    res = migrate.migrate_local(str(d))
    assert res.exit_code == 0 and res.as_dict()["moved"] == len(want) - 8 and res.as_dict()["identical"] == 1
    assert digests(d) == want and not glob.glob(str(d / "raw/v1/*/exchange=*"))
    assert migrate.migrate_local(str(d)).as_dict()["moved"] == 0
    assert check(d)["exit_code"] == 0


def test_old_layout_on_s3_found_and_migrated(tmp_path, clean_dir):
    """The same on S3 (moto's server): found and still read by the check, moved by copy + HEAD
    (size, ETag or bytes) + delete, a second run is a no-op, a crash leaves every file somewhere,
    a conflict deletes nothing."""
    from tests.s3server import running_s3
    d = copy_clean(tmp_path, clean_dir)
    want = digests(d)
    clean = check(d)
    rels = sorted(want)
    prefix = "pre/fix"
    with running_s3() as s3:
        bucket = s3.new_bucket()
        client = s3.client()
        root = f"s3://{bucket}/{prefix}"
        for rel in rels:
            client.upload_file(str(d / rel), bucket, f"{prefix}/{old_rel(rel)}")
        # one object uploaded in parts (its ETag is no MD5: the copy is verified by its bytes)
        mp_rel = rels[-2]                                  # (the last ones moved: after the crash)
        mp = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{old_rel(mp_rel)}")
        part = client.upload_part(Bucket=bucket, Key=f"{prefix}/{old_rel(mp_rel)}", UploadId=mp["UploadId"],
                                  PartNumber=1, Body=(d / mp_rel).read_bytes())
        client.complete_multipart_upload(Bucket=bucket, Key=f"{prefix}/{old_rel(mp_rel)}", UploadId=mp["UploadId"],
                                         MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
        assert client.head_object(Bucket=bucket, Key=f"{prefix}/{old_rel(mp_rel)}")["ETag"].endswith('-1"')
        # an interrupted run copied one file and died before deleting the old key
        client.upload_file(str(d / rels[-1]), bucket, f"{prefix}/{rels[-1]}")
        env = dict(os.environ, **s3.env(bucket, prefix))

        def objects() -> dict[str, str]:
            return {k[len(prefix) + 1:]: hashlib.sha256(client.get_object(Bucket=bucket, Key=k)["Body"].read()).hexdigest()
                    for k in s3.objects(bucket, prefix + "/")}

        # the check finds the old layout, reads it (the file in both places once), prints the command
        p = script("--root", root, "--date", DAY, "--no-day-edges", "--json", cwd=tmp_path, env=env)
        assert p.returncode == 1, p.stderr
        rep = json.loads(p.stdout)
        assert rep["layout"]["migrate_command"] == f"bin/check_raw_sanity --migrate-layout --root {root}"
        assert len(rep["layout"]["legacy_dirs"]) == 17 and rep["layout"]["in_both_layouts"] == 1
        assert rep["summary"] == clean["summary"] and rep["accounting"]["lost_frames"] == 0
        # a different object at a new place, of the same size (only its bytes differ): a
        # conflict, nothing copied or deleted
        victim = rels[5]
        other = bytearray((d / victim).read_bytes())
        other[len(other) // 2] ^= 0xFF
        client.put_object(Bucket=bucket, Key=f"{prefix}/{victim}", Body=bytes(other))
        before = objects()
        p = script("--migrate-layout", "--root", root, cwd=tmp_path, env=env)
        assert p.returncode == 2 and f"CONFLICT s3://{bucket}/{prefix}/{old_rel(victim)}" in p.stdout, p.stdout
        assert objects() == before
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{victim}")
        # a dry run says what it would do and does nothing
        before = objects()
        p = script("--migrate-layout", "--dry-run", "--root", root, cwd=tmp_path, env=env)
        assert p.returncode == 0 and "(dry run: nothing changed)" in p.stdout, p.stdout + p.stderr
        assert "result: would move" in p.stdout and objects() == before
        # a crash mid-way (after 5 deletes nothing answers any more): every file is somewhere
        deleted = []

        class Dying:
            """The client of a process that dies after its 5th delete: nothing answers after it."""

            def __getattr__(self, name):
                fn = getattr(client, name)

                def call(*a, **kw):
                    if len(deleted) >= 5:
                        raise Crash()
                    out = fn(*a, **kw)
                    if name == "delete_object":
                        deleted.append(kw["Key"])
                    return out
                return call
        with pytest.raises(Crash):
            migrate.migrate_s3(root, workers=2, client=Dying())
        have = objects()
        for rel, h in want.items():
            assert have.get(rel) == h or have.get(old_rel(rel)) == h, rel
        # the migration, run as printed: everything moves, verified before each delete
        n_req = len(s3.requests)
        p = script("--migrate-layout", "--root", root, cwd=tmp_path, env=env)
        reqs = s3.requests[n_req:]
        assert p.returncode == 0, p.stdout + p.stderr
        assert objects() == want
        assert "result: moved" in p.stdout
        # each file copied by this run: PUT (copy) of the new key, HEAD of it, then DELETE of the
        # old key; one left in both places by the crash: only the DELETE of the old key
        to_copy = [rel for rel in rels if rel not in have]
        in_both = [rel for rel in rels if rel in have and old_rel(rel) in have]
        assert mp_rel in to_copy and rels[-1] in in_both and len(to_copy) + len(in_both) >= len(rels) - 6
        for rel in rels:
            new, old = f"/{bucket}/{prefix}/{rel}", f"/{bucket}/{prefix}/{old_rel(rel)}"
            seq = [(m, path == new) for m, path, _q in reqs if path in (new, old) and m != "GET"]
            if rel in to_copy:
                assert seq == [("PUT", True), ("HEAD", True), ("DELETE", False)], (rel, seq)
            elif rel in in_both:
                assert seq == [("DELETE", False)], (rel, seq)
            else:
                assert seq == [], (rel, seq)                 # moved before the crash
        # the copy of the object uploaded in parts has another ETag: its bytes were compared
        mp_new, mp_old = f"/{bucket}/{prefix}/{mp_rel}", f"/{bucket}/{prefix}/{old_rel(mp_rel)}"
        assert [(m, path == mp_new) for m, path, _q in reqs if path in (mp_new, mp_old)] == [
            ("PUT", True), ("HEAD", True), ("GET", False), ("GET", True), ("DELETE", False)]
        # again: a no-op
        p = script("--migrate-layout", "--root", root, cwd=tmp_path, env=env)
        assert p.returncode == 0 and "nothing to migrate" in p.stdout, p.stdout
        assert objects() == want
        # and the check is clean
        p = script("--root", root, "--date", DAY, "--no-day-edges", "--json", cwd=tmp_path, env=env)
        rep = json.loads(p.stdout)
        assert p.returncode == 0 and rep["findings"] == [] and rep["layout"]["legacy_dirs"] == [], rep["findings"]
        assert rep["summary"] == clean["summary"]


# ---- units ----------------------------------------------------------------------------------------

def test_run_seqs_holes_and_growth():
    import numpy as np
    rs = sanity.RunSeqs(5, 10)
    rs.mark(np.array([5, 6, 9], dtype=np.int64), 1)
    rs.mark(np.array([12, 13, 3], dtype=np.int64), 3)     # grows both ways
    rs.mark(np.array([6], dtype=np.int64), 1)
    first, last, holes = rs.holes()
    assert (first, last) == (3, 13) and rs.duplicates == 1 and rs.frames == 7
    assert holes == [(4, 4, 3, 1), (7, 8, 1, 1), (10, 11, 1, 3)]
    assert [sanity.hole_label(p, n) for *_, p, n in holes] == ["binance|okx", "binance", "binance|okx"]


def test_dates_and_durations():
    import datetime as dt
    today = dt.date(2024, 3, 5)
    assert sanity.date_range(None, None, None, today) == ["2024-03-04"]
    assert sanity.date_range("today", None, None, today) == ["2024-03-05"]
    assert sanity.date_range(None, "2024-03-03", None, today) == ["2024-03-03", "2024-03-04", "2024-03-05"]
    assert sanity.date_range(None, "2024-02-28", "2024-03-01", today) == ["2024-02-28", "2024-02-29", "2024-03-01"]
    with pytest.raises(ValueError):
        sanity.date_range(None, "2024-03-05", "2024-03-01", today)
    assert [sanity.parse_duration(x) for x in ("30s", "2m", "1h", "500ms", "7")] == [30, 120, 3600, 0.5, 7]
    assert schema.SCHEMAS["frames"].names == ["exchange", "conn_id", "recv_seq", "ts_recv", "payload"]


# ---- scale-out: shards and replicas writing to one root ---------------------------------------------

def record_together(recs, market, t_from, t_to, tweak=None, message=None) -> None:
    """Several collectors receiving the same exchange messages: each message is made once and
    handed to every recorder whose shard owns its symbol (both replicas of a shard get it, each
    at its own lag). `tweak(rec, tick, ex, si)`: None (received), "skip" (that recorder is
    disconnected from the exchange; it reconnects when it gets the next one) or "absent" (that
    recorder never subscribed the stream). `message(tick, ex, si)`: Market.frame's keywords for
    that message (e.g. a crossed book), or None."""
    batches = {id(r): [] for r in recs}
    exchanges = [ex for ex in EXCHANGES if any(ex in r.exchanges for r in recs)]
    for tick in range(t_from, t_to):
        ts = T0 + tick * TICK
        for ex in exchanges:
            for si, sym in enumerate(SYMS[ex]):
                payload = market.frame(ex, si, tick, ts + si * 1000, **((message and message(tick, ex, si)) or {}))
                for r in recs:
                    if ex not in r.exchanges or not r.shard.owns(ex, sym):
                        continue
                    how = tweak(r, tick, ex, si) if tweak else None
                    if how == "absent":
                        continue
                    if how == "skip":
                        r.conn.pop(ex, None)
                        continue
                    t, b = ts + si * 1000 + r.lag_ns, batches[id(r)]
                    if ex not in r.conn:
                        b.append(r.item(ex, t, ACKS[ex]))
                    b.append(r.item(ex, t, payload))
        if (tick + 1) % TICKS_PER_FILE == 0 or tick == t_to - 1:
            for r in recs:
                if batches[id(r)]:
                    r.sent += len(batches[id(r)])
                    r.w.process(from_items(batches[id(r)]))
                    r.w.flush()
                    r.w.rotate()
                batches[id(r)] = []


def instance_rows(root, instance_id: str) -> dict[tuple[str, str], int]:
    """(exchange, dataset) -> rows in the data files of one instance (names start i-<instance>-)."""
    out: dict = {}
    for p in glob.glob(os.path.join(str(root), "raw", "v1", "*", "*", "date=*", f"i-{instance_id}-*.parquet")):
        parts = p.split(os.sep)
        if parts[-4] == "frames":
            continue
        key = (parts[-3], parts[-4])
        out[key] = out.get(key, 0) + pq.read_metadata(p).num_rows
    return out


def data_rows(report) -> dict[tuple[str, str], dict]:
    return {(x["exchange"], x["dataset"]): x for x in report["datasets"] if x["dataset"] != "frames"}


def test_replica_hole_covered_by_its_twin_counts_nothing_twice(tmp_path, clean_dir, monkeypatch):
    """Two replicas of one shard (a, b: other machines, so b receives each message 3 ms later)
    record the same messages; b is disconnected from every exchange for 60 s. Judged on the
    union there is no hole: no offline window, no sequence or time gap, exit 0; b's window is
    reported per replica, covered by a; every message counts once (unique rows = what one
    complete recording holds), b's copies are duplicates across instances."""
    lag = 3_000_000
    a = Recorder(tmp_path, "20240305T100000Zaaaa", instance_id="ra", replica="a")
    b = Recorder(tmp_path, "20240305T100000Zbbbb", instance_id="rb", replica="b", lag_ns=lag)
    record_together([a, b], Market(), 0, 600, lambda r, tick, ex, si: "skip" if r is b and 200 <= tick < 320 else None)
    a.close()
    b.close()
    r = check(tmp_path)
    assert r["exit_code"] == 0 and r["findings"] == [], r["findings"]
    assert r["offline"]["windows"] == [] and r["sequence_gaps"] == [] and r["time_gaps"] == []
    assert r["content"] == [] and r["accounting"]["lost_frames"] == 0
    # b's window per exchange: from its last frame (tick 199, 3rd symbol) to its first after (tick 320)
    wins = r["replicas"]["windows"]
    assert sorted((w["exchange"], w["shard"], w["replica"], w["covered_by"], w["start"], w["end"]) for w in wins) == [
        (ex, "0/1", "b", "a", sanity.iso(T0 + 199 * TICK + 2000 + lag), sanity.iso(T0 + 320 * TICK + lag))
        for ex in EXCHANGES]
    assert all(w["duration_s"] == 60.5 and w["edge"] is None for w in wins)
    assert (r["replicas"]["covered"], r["replicas"]["not_covered"]) == (3, 0)
    assert r["offline"]["by_shard"]["okx"] == {"0/1": {"replicas": ["a", "b"], "instances": ["ra", "rb"],
                                                       "windows": 0, "downtime_s": {}}}
    # nothing counted twice: unique rows = one complete recording; b's rows are a's duplicates
    clean = data_rows(check(clean_dir[0]))
    got, rows_a, rows_b = data_rows(r), instance_rows(tmp_path, "ra"), instance_rows(tmp_path, "rb")
    assert set(got) == set(clean)
    for key, x in got.items():
        assert rows_a[key] == clean[key]["rows"] and 0 < rows_b[key] < rows_a[key], key
        assert x["rows"] == rows_a[key] + rows_b[key], key
        assert x["unique_rows"] == clean[key]["rows"], key
        assert (x["duplicates_across_instances"], x["duplicates_within_instance"]) == (rows_b[key], 0), key
    assert {(d["exchange"], d["dataset"]): d["rows"] for d in r["duplicates"]} == rows_b
    for ex in EXCHANGES:
        assert r["summary"][ex]["unique_rows"] == sum(v["rows"] for k, v in clean.items() if k[0] == ex)
    # the instances
    insts = {i["instance_id"]: i for i in r["instances"]}
    assert set(insts) == {"ra", "rb"}
    assert (insts["ra"]["shard"], insts["ra"]["replica"], insts["ra"]["runs"]) == ("0/1", "a", ["20240305T100000Zaaaa"])
    assert insts["rb"]["replica"] == "b" and insts["rb"]["exchanges"] == list(EXCHANGES)
    assert insts["ra"]["first_ts_recv"] == sanity.iso(T0) and insts["rb"]["first_ts_recv"] == sanity.iso(T0 + lag)
    assert insts["ra"]["rows"] == sum(rows_a.values()) and insts["rb"]["files"] == len(
        glob.glob(str(tmp_path / "raw/v1/*/*/date=*/i-rb-*.parquet")))
    cov = r["coverage"]["exchanges"]["binance"]
    assert cov["shard_counts"] == [1] and cov["shards"][0]["replicas"] == ["a", "b"] and not cov["resharded"]
    text = sanity.render_text(r)
    assert "replica windows (no frames from one replica; covered by its twin = not a loss):" in text
    assert f"okx      shard 0/1 replica b: {sanity.iso(T0 + 199 * TICK + 2000 + lag)}" in text and "covered by a" in text
    assert "instances:" in text and "  rb " in text
    # files of both instances overlap in time: read batch by batch (merged) and judged in small
    # slices, the report is the same
    monkeypatch.setattr(sanity, "BATCH_ROWS", 37)
    monkeypatch.setattr(sanity, "UNION_SLICE_ROWS", 100)
    streamed = check(tmp_path)
    for key in ("exit_code", "findings", "summary", "datasets", "accounting", "sequence_gaps", "time_gaps", "offline",
                "replicas", "content", "duplicates"):
        assert streamed[key] == r[key], key


def test_content_of_a_message_both_replicas_stored_is_flagged_once(tmp_path):
    """A crossed Binance book and a zero-price OKX trade reach both replicas: one message each,
    so one content flag each (judged on the first copy), however many copies are stored."""
    a = Recorder(tmp_path, "20240305T100000Zaaaa", instance_id="ra", replica="a")
    b = Recorder(tmp_path, "20240305T100000Zbbbb", instance_id="rb", replica="b", lag_ns=3_000_000)

    def message(tick, ex, si):
        if (tick, ex, si) == (20, "binance", 0):           # (20 + 0) % 4 == 0: a book
            return {"bid": "100.3", "ask": "100.2"}
        if (tick, ex, si) == (21, "okx", 0):               # (21 + 0) % 4 == 1: a trade
            return {"price": "0"}
        return None
    record_together([a, b], Market(), 0, 40, message=message)
    a.close()
    b.close()
    r = check(tmp_path)
    flags = {(c["exchange"], c["dataset"], c["check"]): c["count"] for c in r["content"]}
    assert flags == {("binance", "bbo", "crossed_bbo"): 1, ("okx", "trades", "non_positive_price"): 1}, flags


def test_both_replicas_down_is_offline_and_a_loss(tmp_path):
    """Replica a is down 10:00:50-10:02:30, b 10:01:40-10:03:20: the shard (their union) has no
    frame 10:01:40-10:02:30, an offline window (a finding) with the ids missed meanwhile; each
    replica's own window overlaps it, so neither is covered."""
    a = Recorder(tmp_path, "20240305T100000Zaaaa", instance_id="ra", replica="a")
    b = Recorder(tmp_path, "20240305T100000Zbbbb", instance_id="rb", replica="b", lag_ns=1_000_000)
    down = {"ra": range(100, 300), "rb": range(200, 400)}
    record_together([a, b], Market(), 0, 600,
                    lambda r, tick, ex, si: "skip" if tick in down[r.instance_id] else None)
    a.close()
    b.close()
    r = check(tmp_path)
    assert r["findings"] == ["6 sequence gap(s), 225 id(s) missed", "3 offline window(s)"] and r["exit_code"] == 1
    wins = {w["exchange"]: w for w in r["offline"]["windows"]}
    for ex in EXCHANGES:      # from b's last frame (tick 199) to a's first (tick 300)
        w = wins[ex]
        assert (w["shard"], w["replicas"], w["edge"]) == ("0/1", ["a", "b"], None)
        assert (w["start"], w["end"]) == (sanity.iso(T0 + 199 * TICK + 2000 + 1_000_000), sanity.iso(T0 + 300 * TICK))
    assert r["offline"]["by_shard"]["binance"]["0/1"]["windows"] == 1
    assert r["offline"]["downtime_s"]["okx"][DAY] == pytest.approx(50.499, abs=0.001)
    rw = r["replicas"]["windows"]
    assert sorted((w["exchange"], w["replica"], w["covered_by"]) for w in rw) == sorted(
        (ex, x, None) for ex in EXCHANGES for x in "ab")
    assert r["replicas"]["not_covered"] == 6
    # ids missed: 25 trades per symbol while both were down (OKX ids advance by 2 per trade)
    seq = sorted((g["exchange"], g["symbol"], g["missed"], g["during_offline"]) for g in r["sequence_gaps"])
    assert seq == sorted([("binance", s, 25, True) for s in SYMS["binance"]] + [("okx", s, 50, True) for s in SYMS["okx"]])


SHARD_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def write_listings(root, instance_id: str, bases=("BTC", "ETH", "SOL", "XRP"), days_before: int = 0) -> None:
    """Reference snapshots as discovery writes them (app.writer.write_reference), fetched at
    09:59 of DAY (or that many days before): XRP is listed but not requested."""
    s = settings_mod.load(None, environ={}, dotenv_path=os.path.join(str(root), ".env")).replace(data_dir=str(root))
    storage = LocalStorage(s, State(exchanges=list(EXCHANGES), queue=FrameQueue()))
    for ex in EXCHANGES:
        insts = [Instrument(ex, f"{b}-USDT-SWAP" if ex == "okx" else f"{b}USDT", f"{b}-USDT-PERP", b, "USDT",
                            "live", "perpetual") for b in bases]
        writer_mod.write_reference(str(root), storage, ex, insts, T0 - 60 * 10**9 - days_before * 86400 * 10**9,
                                   instance_id)


def test_missing_shard_and_symbols_recorded_by_no_shard(tmp_path, capsys):
    """Shards 0/3 and 2/3 ran, 1/3 never did, and 0/3 never got OKX SOL. With the universe known
    (requested symbols + the day's reference snapshots) each symbol without a row is a finding
    naming the shard that owns it and whether it wrote anything; a shard that owns no symbol of
    an exchange is idle there, not missing. Without the universe, every shard of 0..N-1 that
    wrote nothing is a finding."""
    owner = {ex: {s: sharding.shard_of(ex, s, 3) for s in SYMS[ex]} for ex in EXCHANGES}
    assert owner == {"binance": {"BTCUSDT": 2, "ETHUSDT": 0, "SOLUSDT": 0},
                     "bybit": {"BTCUSDT": 1, "ETHUSDT": 2, "SOLUSDT": 1},
                     "okx": {"BTC-USDT-SWAP": 2, "ETH-USDT-SWAP": 0, "SOL-USDT-SWAP": 0}}
    s0 = Recorder(tmp_path, "20240305T100000Zaaa0", instance_id="s0", shard="0/3")
    s2 = Recorder(tmp_path, "20240305T100000Zaaa2", instance_id="s2", shard="2/3")
    record_together([s0, s2], Market(), 0, 240,
                    lambda r, tick, ex, si: "absent" if r is s0 and (ex, si) == ("okx", 2) else None)
    s0.close()
    s2.close()
    write_listings(tmp_path, "s0")
    write_listings(tmp_path, "s2")
    r = check(tmp_path, symbols=SHARD_SYMBOLS)
    assert r["findings"] == ["1 offline window(s)", "bybit: shard(s) 1/3 wrote nothing",
                             "bybit: 2 symbol(s) of the universe recorded by no shard (owners 1/3)",
                             "okx: 1 symbol(s) of the universe recorded by no shard (owners 0/3)"], r["findings"]
    cov = r["coverage"]["exchanges"]
    assert cov["bybit"]["universe"] == {"status": "known", "symbols": 3, "snapshots": 2, "listed": 4, "not_listed": []}
    assert cov["bybit"]["not_recorded"] == [
        {"symbol": s, "owners": [{"shard": "1/3", "wrote_anything": False, "instances": []}]}
        for s in ("BTCUSDT", "SOLUSDT")]
    assert (cov["bybit"]["missing_shards"], cov["bybit"]["idle_shards"]) == (["1/3"], ["0/3"])
    assert (cov["bybit"]["shards_seen"], cov["bybit"]["shards_expected"]) == (1, 3)
    assert cov["okx"]["not_recorded"] == [
        {"symbol": "SOL-USDT-SWAP", "owners": [{"shard": "0/3", "wrote_anything": True, "instances": ["s0"]}]}]
    assert cov["okx"]["universe_recorded"] == 2 and cov["okx"]["missing_shards"] == []
    assert (cov["binance"]["universe_recorded"], cov["binance"]["idle_shards"]) == (3, ["1/3"])
    assert cov["binance"]["outside_universe"] == {"symbols": 0, "first": []} and cov["binance"]["foreign"] == []
    assert [s["shard"] for s in cov["binance"]["shards"] if s["seen"]] == ["0/3", "2/3"]
    # the shard that ran nothing on bybit is offline the whole window; idle shards are not
    (w,) = r["offline"]["windows"]
    assert (w["exchange"], w["shard"], w["edge"]) == ("bybit", "1/3", "no_frames")
    assert {i["instance_id"]: (i["shard"], i["exchanges"]) for i in r["instances"]} == {
        "s0": ("0/3", ["binance", "okx"]), "s2": ("2/3", list(EXCHANGES))}
    # the command line: --symbols (else the settings' symbols), the owners in the text
    code = sanity.main(["--root", str(tmp_path), "--date", DAY, "--no-day-edges", "--symbols", ",".join(SHARD_SYMBOLS)])
    out = capsys.readouterr().out
    assert code == 1
    assert "    SOLUSDT: recorded by no shard (shard 1/3 wrote nothing)" in out
    assert "    SOL-USDT-SWAP: recorded by no shard (shard 0/3 wrote files (s0))" in out
    assert "bybit    shard 1/3 " in out and "[no_frames]" in out
    # requested symbols unknown: coverage unknown (a note, not a finding); shards still are
    r = check(tmp_path)
    assert r["findings"] == ["4 offline window(s)", "binance: shard(s) 1/3 wrote nothing",
                             "bybit: shard(s) 0/3, 1/3 wrote nothing", "okx: shard(s) 1/3 wrote nothing"], r["findings"]
    assert r["coverage"]["exchanges"]["okx"]["universe"]["status"] == "unknown"
    assert r["coverage"]["notes"] == [
        "coverage unknown for binance, bybit, okx: no requested symbols given (--symbols, or the settings' symbols)"]
    # a fixed symbol list fetches the listing only at start: the latest earlier day's snapshot
    # is the universe of a day without one (two days before; an older one is not used)
    shutil.rmtree(tmp_path / "reference")
    write_listings(tmp_path, "s0", bases=("BTC",), days_before=5)
    write_listings(tmp_path, "s0", days_before=2)
    r = check(tmp_path, symbols=SHARD_SYMBOLS)
    assert r["coverage"]["exchanges"]["bybit"]["universe"] == {
        "status": "known", "symbols": 3, "snapshots": 1, "listed": 4, "not_listed": []}
    assert "bybit: 2 symbol(s) of the universe recorded by no shard (owners 1/3)" in r["findings"]
    # no reference snapshot of the day or before: unknown
    shutil.rmtree(tmp_path / "reference")
    r = check(tmp_path, symbols=SHARD_SYMBOLS)
    assert r["coverage"]["exchanges"]["bybit"]["universe"] == {
        "status": "unknown", "why": f"no reference snapshot of {DAY} or before under reference/bybit/"}
    assert r["coverage"]["notes"] == ["coverage unknown for binance, bybit, okx: no reference snapshot of 2024-03-05 "
                                      "or before (reference/<exchange>/instruments-<fetch time>-<instance>.parquet)"]
    assert not any("recorded by no shard" in f for f in r["findings"])


def test_resharding_in_the_day_is_a_finding_with_coverage_per_n(tmp_path, clean_dir):
    """The universe recorded by 2 shards until 10:02:30, by 3 from 10:02:00 (30 s of overlap, a
    rolling change): files of one exchange and day disagree on N, a finding; coverage per N says
    each configuration recorded every symbol; the overlap's copies are duplicates across
    instances, so unique rows are exactly one complete recording."""
    m = Market()
    two = [Recorder(tmp_path, f"20240305T100000Z0a2{i}", instance_id=f"n2s{i}", shard=f"{i}/2") for i in range(2)]
    three = [Recorder(tmp_path, f"20240305T100200Z0a3{i}", instance_id=f"n3s{i}", shard=f"{i}/3") for i in range(3)]
    record_together(two, m, 0, 240)
    record_together(two + three, m, 240, 300)
    record_together(three, m, 300, 600)
    for rec in two + three:
        rec.close()
    write_listings(tmp_path, "n2s0")
    r = check(tmp_path, symbols=SHARD_SYMBOLS)
    assert r["findings"] == [f"{ex}: files disagree on the number of shards (2, 3): resharded during the checked "
                             "days (coverage per N in the report)" for ex in EXCHANGES], r["findings"]
    for ex in EXCHANGES:
        cov = r["coverage"]["exchanges"][ex]
        assert cov["resharded"] and cov["shard_counts"] == [2, 3] and cov["universe_recorded"] == 3
        assert cov["per_n"] == {"2": {"not_recorded": []}, "3": {"not_recorded": []}}
        assert cov["not_recorded"] == [] and cov["foreign"] == []
    assert r["sequence_gaps"] == [] and r["offline"]["windows"] == []
    clean = data_rows(check(clean_dir[0]))
    got = data_rows(r)
    assert set(got) == set(clean)
    for key, x in got.items():
        assert x["unique_rows"] == clean[key]["rows"], key
        assert x["duplicates_across_instances"] > 0 and x["duplicates_within_instance"] == 0, key
        assert x["rows"] == x["unique_rows"] + x["duplicates_across_instances"], key


def test_duplicates_within_one_instance_across_files(tmp_path, monkeypatch):
    """A connection rotation's overlap: the new OKX connection (conn 99) receives again the
    messages of 10:00:56-10:01:00 just after the file of 10:00 was closed, so the copies are in
    the next file; and at 10:01:40 OKX re-sends the book of 10:01:10 unchanged (same seqId, a
    new message time). Duplicates within the instance (across files), not across instances; not
    a gap, not a finding; the same when the union is judged in many small slices (the re-send
    then lands in a later slice than its original: the identities carried over find it)."""
    rec = Recorder(tmp_path, "20240305T100000Zaaaa", exchanges=("okx",))
    m = Market()
    again: list = []
    book = None
    for tick in range(0, 240):
        batch = []
        for si in range(3):
            ts = T0 + tick * TICK + si * 1000
            p = m.frame("okx", si, tick, ts)
            if "okx" not in rec.conn:
                batch.append(rec.item("okx", ts, ACKS["okx"]))
            batch.append(rec.item("okx", ts, p))
            if 112 <= tick < 120:
                again.append(p)
            if (tick, si) == (140, 0):                 # (140 + 0) % 4 == 0: a bbo-tbt snapshot
                book = p
        if tick == 200:
            ms = (T0 + tick * TICK) // 10**6
            resent = book.replace(b'"ts":"%d"' % ((T0 + 140 * TICK) // 10**6), b'"ts":"%d"' % ms)
            assert resent != book
            batch.append(rec.item("okx", T0 + tick * TICK + 3000, resent))
        if 120 <= tick < 128:                          # 4 s later: received again on the new socket
            for k, p in enumerate(again[(tick - 120) * 3:(tick - 119) * 3]):
                batch.append(rec.item("okx", T0 + tick * TICK + 500 + k, p, conn=99))
        rec.w.process(from_items(batch))
        if (tick + 1) % TICKS_PER_FILE == 0:
            rec.w.flush()
            rec.w.rotate()
    rec.close()
    channels = {"bbo-tbt": "bbo", "trades": "trades", "mark-price": "mark_price", "funding-rate": "funding",
                "open-interest": "open_interest"}
    want: dict = {}
    for p in again:
        ds = channels[json.loads(p)["arg"]["channel"]]
        want[ds] = want.get(ds, 0) + 1
    assert len(again) == 24 and len(want) == 5
    want["bbo"] += 1                                   # the unchanged book re-sent
    r = check(tmp_path)
    assert r["exit_code"] == 0 and r["findings"] == [], r["findings"]
    assert r["sequence_gaps"] == [] and r["content"] == []
    assert {d["dataset"]: (d["rows"], d["duplicates_within_instance"], d["duplicates_across_instances"])
            for d in r["duplicates"]} == {ds: (n, n, 0) for ds, n in want.items()}
    got = data_rows(r)
    for ds, n in want.items():
        assert got[("okx", ds)]["unique_rows"] == got[("okx", ds)]["rows"] - n
    # two files: the copies (conn 99) are all in the second one
    files = sorted(glob.glob(str(tmp_path / "raw/v1/trades/okx/date=*/*.parquet")))
    conns = [set(pq.read_table(f, columns=["conn_id"]).column("conn_id").to_pylist()) for f in files]
    assert len(files) == 2 and 99 not in conns[0] and 99 in conns[1]
    # judged in slices of ~40 rows, read 37 rows at a time: the same figures
    monkeypatch.setattr(sanity, "BATCH_ROWS", 37)
    monkeypatch.setattr(sanity, "UNION_SLICE_ROWS", 40)
    monkeypatch.setattr(sanity, "UNION_MARGIN_S", 5.0)
    sliced = check(tmp_path)
    for key in ("findings", "datasets", "duplicates", "sequence_gaps", "content", "summary"):
        assert sliced[key] == r[key], key
