"""The named fault scenarios of `make soak` (bench/soak.py), in schedule order.

Each scenario: `settings` (collector env it needs; a different set means a restart, done in a
segment of its own), `base_s` (fault + recovery at SOAK_MINUTES=3; stretched for longer soaks),
`run(soak, seg, seconds)` (plays the fault, notes what it measured in `seg.notes`, marks the end
of the fault with `soak.fault_done(seg)`), and `checks(soak, seg, figures)` (what must hold beyond
the reconciliation rules R1-R6 every segment gets). `expect_closes = False` means no socket may
close in the segment, so sent = received holds exactly there.

Run one alone: `python bench/soak.py --scenario reconnect_storm --minutes 1`.
"""
from __future__ import annotations

import glob
import os
import time

EXCHANGES = ("binance", "bybit", "okx")
CONNECT_INTERVAL = {"binance": 0.2, "bybit": 0.6, "okx": 0.4}   # the adapters' CONNECT_INTERVAL_S


class Scenario:
    name = ""
    spool_normal = True       # the spool is at its normal size here (measured for disk_full's budget)
    settings: dict | object = {}
    base_s = 10.0
    min_s = 5.0
    restarts = False
    in_process = False
    expect_closes = False

    def run(self, soak, seg, seconds: float) -> None:
        time.sleep(seconds)

    def checks(self, soak, seg, fig) -> dict:
        return {}


# ---- helpers ---------------------------------------------------------------------------------------
def events(seg, name: str, **match) -> list[dict]:
    out = []
    for run in seg.runs:
        for l in run.events(name, seg.t0, seg.t1 if seg.snap1 else None):
            if all(l.get(k) == v for k, v in match.items()):
                out.append(l)
    return out


def counter_delta(seg, name: str, ex: str | None = None) -> int:
    """A collector counter's increase over the segment (runs that span it only)."""
    from bench.soak import _c, run_bounds
    total = 0
    for run in seg.runs:
        c0, c1, _k = run_bounds(seg, run)
        for e in ([ex] if ex else EXCHANGES):
            total += _c(c1, e, name) - _c(c0, e, name)
    return total


def sim_delta(seg, ex: str, counter: str) -> int:
    return seg.snap1["sim"][ex]["counters"].get(counter, 0) - seg.snap0["sim"][ex]["counters"].get(counter, 0)


def wait_metric(soak, fn, timeout: float, step: float = 0.25):
    """Poll the collector's /metrics until fn(metrics) is truthy; its value, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn(soak.col.metrics(timeout=2))
            if v:
                return v
        except Exception:  # noqa: BLE001
            pass
        time.sleep(step)
    return None


def total(m: dict, name: str) -> int:
    from bench.soak import _c
    return sum(_c(m["counters"], ex, name) for ex in EXCHANGES)


def backlog_empty(soak, timeout: float) -> float | None:
    t0 = time.monotonic()
    ok = wait_metric(soak, lambda m: m["gauges"].get("upload_backlog_files", 1) == 0 or None, timeout)
    return round(time.monotonic() - t0, 1) if ok else None


def reasons_seen(seg) -> set:
    out = set()
    for l in events(seg, "state_change") + events(seg, "state_reasons"):
        out.update(l.get("reasons") or [])
    return out


# ---- scenarios --------------------------------------------------------------------------------------
class ClockJump(Scenario):
    """Host clock jumps (forward across midnight, back by an NTP step, back home): the writer and
    the state monitor on an injected clock, in process (the collector's own threads, real files)."""
    name = "clock_jump"
    in_process = True
    base_s = 0.0

    def run_in_process(self, soak, seconds: float) -> dict:
        from bench.clockjump import run
        return run()


class Steady(Scenario):
    """No fault: the baseline, where every rule must hold exactly (sent = received)."""
    name = "steady"
    base_s = 8.0

    def checks(self, soak, seg, fig):
        t = fig["totals"]
        return {"no drops": (t["dropped"] + t["dropped_spool_full"] == 0, t["dropped"]),
                "no gaps": (t["gaps"] == 0, t["gaps"]),
                "READY throughout": (fig["states_visited"] == ["READY"], fig["states_visited"])}


class ReconnectStorm(Scenario):
    """Every connection of one exchange dropped at once, repeatedly (Binance x3, OKX x2, Bybit
    x1), with a REST 429 storm (Retry-After) on Binance and OKX after the first mass reconnect:
    backoff spreads the reconnects, REST alignment stays within its budget, no ban."""
    name = "reconnect_storm"
    base_s = 20.0
    min_s = 14.0
    expect_closes = True

    def run(self, soak, seg, seconds):
        plan = soak.knobs["storm_plan"]
        gap0 = max(soak.knobs["storm_gap"], seconds / (sum(r for _e, r in plan) + 3))
        drops = []
        t_start = time.time()
        for ex, rounds in plan:
            # the next drop once every connection could be back: the backoff doubles per round
            # (reconnect_min 0.5 s x 2^round, jittered), then the gate spaces them
            n = soak.col.plans.get(ex, {}).get("connections", 1)
            for i in range(rounds):
                gap = max(gap0, min(10.0, 0.5 * 2 ** i) + n * CONNECT_INTERVAL[ex] + 1.0)
                drops.append((ex, time.time()))
                soak.sim.call("drop_connections", ex)
                if i == 0 and ex in ("binance", "okx"):
                    # a 429 storm on REST right after the mass reconnect: alignment must back off
                    soak.sim.call("rest_fail", ex, 429, 6, None, {"Retry-After": "1"})
                time.sleep(gap)
        seg.notes["drops"] = drops
        soak.fault_done(seg)
        time.sleep(max(0.0, seconds - (time.time() - t_start)))
        seg.notes["rest_log"] = {ex: [r for r in soak.sim.call("rest_log", ex) if r[0] >= seg.t0]
                                 for ex in EXCHANGES}

    def checks(self, soak, seg, fig):
        from sim.binance import WEIGHTS
        out = {}
        budget = 600.0          # rest_budget_per_min (default)
        drops = seg.notes.get("drops", [])
        connects = events(seg, "ws_connect")
        disconnects = [l for l in events(seg, "ws_disconnect") if l.get("was_connected")]
        spreads = []
        for k, (ex, t) in enumerate(drops):
            # the connections this drop cut, and when each came back (backoff, then the gate)
            cut = {l["conn"] for l in disconnects if l.get("exchange") == ex and t <= l["_t"] <= t + 2}
            back = {}
            for l in connects:
                if l.get("conn") in cut and l["_t"] > t and l["conn"] not in back:
                    back[l["conn"]] = l["_t"] - t
            delays = sorted(back.values())
            spreads.append({"exchange": ex, "cut": len(cut), "back": len(back),
                            "first_s": round(delays[0], 2) if delays else None,
                            "last_s": round(delays[-1], 2) if delays else None})
            out[f"{ex} drop {k}: every cut connection back, none before the backoff (>= 0.25 s)"] = (
                bool(cut) and len(back) == len(cut) and delays[0] >= 0.25, spreads[-1])
        for k, sp in enumerate(spreads):
            # n connections cannot all be back in less than (n - 1) gate intervals (judged from
            # 3 on, with a margin: the gate spaces attempts, the log stamps finished handshakes)
            if sp["cut"] < 3:
                continue
            need = (sp["cut"] - 1) * CONNECT_INTERVAL[sp["exchange"]] * 0.5
            span = (sp["last_s"] or 0) - (sp["first_s"] or 0)
            out[f"{sp['exchange']} drop {k}: reconnects spread over >= {need:.1f} s (connect gate)"] = (
                span >= need, dict(sp, span_s=round(span, 2)))
        seg.notes["reconnect_spread"] = spreads
        out["no ban: Binance 418 / Bybit 403"] = (
            sim_delta(seg, "binance", "rest_418") == 0 and sim_delta(seg, "bybit", "rest_403") == 0,
            {"binance_418": sim_delta(seg, "binance", "rest_418"), "bybit_403": sim_delta(seg, "bybit", "rest_403")})
        for ex in EXCHANGES:
            log = seg.notes.get("rest_log", {}).get(ex, [])
            weights = [(t, WEIGHTS.get(p, 1) if ex == "binance" else 1) for t, p, _s in log]
            worst = 0
            for i, (t, _w) in enumerate(weights):
                worst = max(worst, sum(x for tt, x in weights[i:] if tt < t + 60))
            out[f"{ex} REST within budget (<= 1.25 x {budget:.0f}/min)"] = (worst <= budget * 1.25 + 5,
                                                                             {"worst_60s": worst,
                                                                              "requests": len(log)})
            r429 = [t for t, _p, s in log if s == 429]
            early = [t for t, _p, s in log for a in r429 if a < t < a + 0.95]
            if r429:
                out[f"{ex} 429 answers honoured (Retry-After 1 s)"] = (not early, {"429s": len(r429),
                                                                               "early_requests": len(early)})
        out["rest_backoff logged"] = (len(events(seg, "rest_backoff")) > 0, len(events(seg, "rest_backoff")))
        for ex, _r in soak.knobs["storm_plan"]:
            out[f"{ex} disconnect gaps reported"] = (fig["exchanges"][ex]["gaps"] > 0, fig["exchanges"][ex]["gaps"])
        return out


class HalfOpen(Scenario):
    """Half-open sockets: the server stops sending (and answering pings) on every OKX
    connection but keeps TCP open; the collector must call them dead after stale_timeout."""
    name = "half_open"
    base_s = 12.0
    min_s = 10.0
    expect_closes = True

    def run(self, soak, seg, seconds):
        hold = max(soak.knobs["stale_timeout"] + 3, seconds * 0.7)
        t = time.time()
        seg.notes["muted"] = soak.sim.call("half_open", "okx", hold)
        want = seg.notes["muted"]
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and len(soak.col.events("ws_stale", since=t)) < want:
            time.sleep(0.1)
        stale = soak.col.events("ws_stale", since=t)
        seg.notes["stale_detected_s"] = [round(l["_t"] - t, 2) for l in stale]
        soak.fault_done(seg)
        time.sleep(max(0.0, seconds - (time.time() - t)))

    def checks(self, soak, seg, fig):
        det = seg.notes.get("stale_detected_s", [])
        muted = seg.notes.get("muted", 0)
        return {"every muted socket declared stale": (muted > 0 and len(det) >= muted,
                                                      {"muted": muted, "stale": len(det)}),
                "within stale_timeout + 3 s": (bool(det) and max(det) <= soak.knobs["stale_timeout"] + 3, det),
                "okx reconnected": (fig["exchanges"]["okx"]["reconnects"] >= muted, fig["exchanges"]["okx"]["reconnects"])}


class SilentStream(Scenario):
    """One silent periodic stream (Binance BTCUSDT markPrice@1s: subscribed, nothing sent), one
    quiet event-driven stream beside it (BTCUSDT bookTicker: a quiet market, never reported) and
    one stream whose ids skip (OKX BTC-USDT-SWAP trades, 7 ids never sent): reported, exactly
    measured."""
    name = "silent_stream"
    base_s = 14.0
    min_s = 13.0
    stream = ("binance", "btcusdt@markPrice@1s")
    quiet = ("binance", "btcusdt@bookTicker")
    skip = ("okx", "trades:BTC-USDT-SWAP", 7)

    def run(self, soak, seg, seconds):
        hold = max(soak.knobs["silence_floor"] + 4, seconds * 0.75)
        t = time.time()
        soak.sim.call("silence", self.stream[0], self.stream[1], hold)
        soak.sim.call("silence", self.quiet[0], self.quiet[1], hold)
        soak.sim.call("skip_ids", *self.skip)
        seg.notes["silenced_at"] = t
        time.sleep(hold + 0.5)
        soak.fault_done(seg)
        time.sleep(max(0.0, seconds - (time.time() - t)))

    def checks(self, soak, seg, fig):
        t = seg.notes.get("silenced_at", seg.t0)
        silent = [l for l in events(seg, "stream_silent") if l.get("stream") == self.stream[1]]
        others = [l for l in events(seg, "stream_silent") if l.get("stream") != self.stream[1]]
        resumed = [l for l in events(seg, "stream_resumed") if l.get("stream") == self.stream[1]]
        skips = [l for l in events(seg, "gap_detected", exchange="okx", kind="sequence")
                 if l.get("symbol") == "BTC-USDT-SWAP"]
        return {"silence reported within silence_floor + 3 s": (
                    bool(silent) and silent[0]["_t"] - t <= soak.knobs["silence_floor"] + 3,
                    [round(l["_t"] - t, 1) for l in silent]),
                "no other stream reported silent (the quiet bookTicker included)": (
                    not others, [l.get("stream") for l in others[:5]]),
                "resumption reported": (bool(resumed), len(resumed)),
                "DEGRADED for silent_streams": ("silent_streams" in reasons_seen(seg), sorted(reasons_seen(seg))),
                "7 skipped ids measured exactly (live)": (sum(l.get("missed") or 0 for l in skips) == self.skip[2],
                                                          [l.get("missed") for l in skips])}


class CloseCodes(Scenario):
    """Server closes with each exchange's codes and notices: Binance 1001 (its 24 h close, code
    as our simulator sends it), Bybit 1001, OKX 64008 upgrade notice (then 1012: rotation, no
    hole) and OKX 4004 "No data received in 30s"."""
    name = "close_codes"
    base_s = 12.0
    min_s = 10.0
    expect_closes = True

    def run(self, soak, seg, seconds):
        marks = {}
        marks["binance_1001"] = time.time()
        soak.sim.call("close_connections", "binance", 1001, "Connection max age reached")
        marks["bybit_1001"] = time.time()
        soak.sim.call("close_connections", "bybit", 1001, "no ping received")
        time.sleep(1.0)
        marks["okx_notice"] = time.time()
        # OKX gives 60 s; compressed here, but long enough for every noticed connection to get
        # its replacement through the connect gate (0.4 s apart) and subscribed
        n = soak.col.plans.get("okx", {}).get("connections", 1)
        # (control messages reach the rotation logic through the writer: its lag counts too)
        delay = max(10.0, n * CONNECT_INTERVAL["okx"] * 2 + 5.0)
        seg.notes["okx_notice_delay_s"] = delay
        seg.notes["okx_noticed"] = soak.sim.call("okx_notice", delay)
        time.sleep(max(delay + 3.0, seconds * 0.45))
        marks["okx_4004"] = time.time()
        soak.sim.call("close_connections", "okx", 4004, "No data received in 30s.")
        seg.notes["marks"] = marks
        soak.fault_done(seg)
        time.sleep(max(0.0, seconds - (time.time() - marks["binance_1001"])))

    def checks(self, soak, seg, fig):
        m = seg.notes.get("marks", {})
        disc = events(seg, "ws_disconnect")
        codes = {ex: sorted({l.get("code") for l in disc if l.get("exchange") == ex and l.get("was_connected")} - {None})
                 for ex in EXCHANGES}
        rot = [l for l in events(seg, "ws_rotate", exchange="okx") if l.get("reason") == "notice"]
        # holes that began between the notice and the server's close of the noticed sockets
        # (the 4004 close comes 3 s after that)
        until = m.get("okx_notice", 0) + seg.notes.get("okx_notice_delay_s", 3.0) + 1.5 if m else 0
        notice_gaps = [l for l in events(seg, "gap_detected", exchange="okx", kind="disconnect")
                       if m and m["okx_notice"] * 1e9 <= (l.get("ts_from") or 0) < until * 1e9]
        return {"Binance 1001 seen and reconnected": (1001 in codes["binance"], codes["binance"]),
                "Bybit 1001 seen and reconnected": (1001 in codes["bybit"], codes["bybit"]),
                "OKX 4004 seen": (4004 in codes["okx"], codes["okx"]),
                "OKX notice: every noticed connection rotated": (
                    len(rot) >= (seg.notes.get("okx_noticed") or 1), {"noticed": seg.notes.get("okx_noticed"),
                                                                       "rotated": len(rot)}),
                "OKX notice: no hole (rotation overlaps)": (not notice_gaps, len(notice_gaps))}


# payloads for BadFrames: (label, exchange or None for all, payload)
_MB2 = 2 * 1024 * 1024
BAD = [
    ("malformed", None, '{"e":"bookTicker","u":1,"s":'),
    ("truncated", "binance", '{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":40017,"s":"BTCU'),
    ("truncated", "bybit", '{"topic":"orderbook.1.BTCUSDT","ts":1786310817583,"type":"snapshot","data":{"s":"BT'),
    ("truncated", "okx", '{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT-SWAP"},"data":[{"asks":[["6'),
    ("2MB", None, '{"padding":"' + "x" * _MB2 + '"}'),
    ("non_utf8", None, b'\xff\xfe{"e":"bookTicker","s":"\xc3\x28"}\x80'),
    ("types", "binance", '{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":"x","s":123,"b":[],'
                         '"B":{},"a":null,"A":true,"T":"t","E":null}}'),
    ("missing", "binance", '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT"}}'),
    ("types", "bybit", '{"topic":"orderbook.1.BTCUSDT","ts":"x","type":"snapshot","data":"str"}'),
    ("missing", "bybit", '{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1,"data":[{"T":1}]}'),
    ("types", "okx", '{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[{"px":{},"sz":[],'
                     '"tradeId":null,"ts":"z"}]}'),
    ("missing", "okx", '{"arg":{"channel":"bbo-tbt"},"data":[{}]}'),
]


class BadFrames(Scenario):
    """Malformed, truncated, 2 MB and non-UTF-8 frames, JSON with unexpected types or missing
    fields, on every connection of every exchange: all stored in `frames`, counted, never fatal."""
    name = "bad_frames"
    spool_normal = False      # a burst: the spool holds more than usual
    base_s = 6.0
    min_s = 5.0

    def run(self, soak, seg, seconds):
        sent = {}
        for label, ex, payload in BAD:
            for e in ([ex] if ex else EXCHANGES):
                n = soak.sim.raw(e, payload, 1) if isinstance(payload, bytes) else \
                    soak.sim.call("send_raw", e, payload, 1)
                sent[f"{e}:{label}"] = sent.get(f"{e}:{label}", 0) + (n or 0)
        seg.notes["raw_sent"] = sent
        soak.fault_done(seg)
        time.sleep(seconds)

    def checks(self, soak, seg, fig):
        sent = seg.notes.get("raw_sent", {})
        out = {}
        for ex in EXCHANGES:
            e = fig["exchanges"][ex]
            nonutf8 = sent.get(f"{ex}:non_utf8", 0)
            out[f"{ex}: bad frames counted (unparsed or rows rejected)"] = (
                e["unparsed"] + e["rows_rejected"] > 0, {"unparsed": e["unparsed"], "rows_rejected": e["rows_rejected"]})
            out[f"{ex}: non-UTF-8 frames counted"] = (e["non_utf8"] == nonutf8, {"counted": e["non_utf8"], "sent": nonutf8})
        out["never ERROR"] = ("ERROR" not in fig["states_visited"], fig["states_visited"])
        return out


class WriterStall(Scenario):
    """The writer stalls (bench/collector_slow.py's stall file) until the queue is full and frames
    are dropped (counted, recv_seq holes), then recovers without a restart."""
    name = "writer_stall"
    spool_normal = False      # a burst: the spool holds more than usual
    base_s = 16.0
    min_s = 12.0

    def run(self, soak, seg, seconds):
        t = time.time()
        before = wait_metric(soak, lambda m: {"d": total(m, "frames_dropped")}, 5)
        soak.set_writer_stall(3600)
        fill = soak.col.last_metrics["gauges"]["queue_capacity"] / max(1.0, soak.achieved_rate or 1000) \
            if soak.col.last_metrics else 10
        got = wait_metric(soak, lambda m: total(m, "frames_dropped") > (before or {}).get("d", 0) or None,
                          timeout=fill + 10)
        seg.notes["drops_after_s"] = round(time.time() - t, 1) if got else None
        time.sleep(2.0)
        soak.set_writer_stall(None)
        soak.fault_done(seg)
        t1 = time.monotonic()
        wait_metric(soak, lambda m: m["gauges"]["queue_size"] == 0 or None, 60)
        seg.notes["queue_drained_s"] = round(time.monotonic() - t1, 1)
        time.sleep(max(0.0, seconds - (time.time() - t)))

    def checks(self, soak, seg, fig):
        t = fig["totals"]
        return {"queue filled and dropped": (t["dropped"] > 0, t["dropped"]),
                "drops logged (queue_full_drop)": (len(events(seg, "queue_full_drop")) > 0,
                                                   len(events(seg, "queue_full_drop"))),
                "DEGRADED while dropping": ("DEGRADED" in fig["states_visited"], fig["states_visited"]),
                "recovered: READY again": (fig.get("ready_after_fault_s") is not None, fig.get("ready_after_fault_s"))}


class S3Slow(Scenario):
    """S3 slow: 0.5 s of latency on every request/response burst (TCP proxy), then normal."""
    name = "s3_slow"
    spool_normal = False
    base_s = 15.0
    min_s = 14.0

    def run(self, soak, seg, seconds):
        soak.proxy.set_delay(0.5)
        time.sleep(max(soak.knobs["rotate_interval"] + 2, seconds * 0.8))   # a rotation's files go up slowly
        soak.proxy.set_delay(0.0)
        soak.fault_done(seg)
        seg.notes["backlog_drained_s"] = backlog_empty(soak, 60)

    def checks(self, soak, seg, fig):
        up = counter_delta(seg, "files_uploaded")
        return {"uploads went on while slow": (up > 0, up),
                "backlog drained after": (seg.notes.get("backlog_drained_s") is not None, seg.notes.get("backlog_drained_s")),
                "no data dropped": (fig["totals"]["dropped"] + fig["totals"]["dropped_spool_full"] == 0,
                                    fig["totals"]["dropped"])}


class S3Outage(Scenario):
    """S3 outage: moto stopped (connections refused and cut) and restarted on the same port."""
    name = "s3_outage"
    spool_normal = False
    base_s = 50.0             # the longest fault: minutes in a 15-minute soak
    min_s = 20.0

    def run(self, soak, seg, seconds):
        # long enough for a file written during the outage to be older than degraded_upload_age
        down = max(soak.knobs["degraded_upload_age"] + soak.knobs["rotate_interval"] + 1, seconds * 0.8)
        soak.s3.stop()
        seg.notes["outage_s"] = round(down, 1)
        time.sleep(down)
        seg.notes["backlog_files_at_end"] = (soak.col.last_metrics or {}).get("gauges", {}).get("upload_backlog_files")
        soak.s3.start()
        soak.fault_done(seg)
        seg.notes["backlog_drained_s"] = backlog_empty(soak, 120)

    def checks(self, soak, seg, fig):
        fails = counter_delta(seg, "upload_failures")
        return {"uploads failed and were retried": (fails > 0, fails),
                "DEGRADED for the upload backlog": ("upload_backlog" in reasons_seen(seg), sorted(reasons_seen(seg))),
                "backlog drained after the outage": (seg.notes.get("backlog_drained_s") is not None,
                                                     seg.notes.get("backlog_drained_s")),
                "no data dropped": (fig["totals"]["dropped"] + fig["totals"]["dropped_spool_full"] == 0,
                                    fig["totals"]["dropped"])}


class SigTerm(Scenario):
    """SIGTERM while the writer flushes (sent as a spool file's size changes), clean exit 0 with
    everything written and uploaded, then a restart."""
    name = "sigterm"
    spool_normal = False      # a restart uploads what the last run left
    base_s = 8.0
    min_s = 6.0
    restarts = True
    expect_closes = True

    def run(self, soak, seg, seconds):
        time.sleep(max(2.0, seconds * 0.3))
        spool = os.path.join(soak.data_dir, "spool")

        def sizes():
            out = {}
            for p in glob.glob(os.path.join(spool, "*.arrows")):
                try:
                    out[p] = os.path.getsize(p)
                except OSError:
                    pass
            return out
        before = sizes()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sizes() == before:
            time.sleep(0.005)
        old = soak.col
        t = time.time()
        soak.fault_done(seg)
        seg.notes["exit_code"] = old.stop()
        stop = old.events("collector_stop")
        seg.notes["drain_s"] = stop[-1].get("drain_s") if stop else None
        seg.notes["stopped_in_s"] = round(time.time() - t, 2)
        seg.notes["restart_ready_s"] = soak.start_collector(old.overrides)
        time.sleep(max(0.0, seconds * 0.3))

    def checks(self, soak, seg, fig):
        return {"exit code 0": (seg.notes.get("exit_code") == 0, seg.notes.get("exit_code")),
                "collector_stop logged (drained)": (seg.notes.get("drain_s") is not None, seg.notes.get("drain_s")),
                "restarted and READY": (seg.notes.get("restart_ready_s") is not None, seg.notes.get("restart_ready_s"))}


class SigKill(Scenario):
    """SIGKILL while a Parquet file is being written (its temporary file exists), then a restart:
    the spool becomes Parquet, the torn temporary file is removed, the backlog is uploaded."""
    name = "sigkill"
    spool_normal = False      # a restart uploads what the last run left
    base_s = 12.0
    min_s = 10.0
    restarts = True
    expect_closes = True

    def run(self, soak, seg, seconds):
        rot = soak.knobs["rotate_interval"]
        pattern = os.path.join(soak.data_dir, "raw", "v1", "*", "*", "date=*", ".*.parquet.tmp")
        tmp = []
        for _attempt in range(3):
            nxt = (int(time.time() // rot) + 1) * rot
            time.sleep(max(0.0, nxt - time.time() - 0.05))
            deadline = time.time() + 2.5
            while time.time() < deadline:
                tmp = glob.glob(pattern)
                if tmp:
                    break
                time.sleep(0.002)
            if tmp:
                break
        old = soak.col
        old.kill()
        t = time.time()
        seg.notes["tmp_at_kill"] = [os.path.basename(p) for p in tmp]
        seg.notes["tmp_after_kill"] = len(glob.glob(pattern))
        seg.notes["spool_after_kill"] = len(glob.glob(os.path.join(soak.data_dir, "spool", "*.arrows")))
        soak.fault_done(seg)
        seg.notes["restart_ready_s"] = soak.start_collector(old.overrides)
        seg.notes["ready_after_kill_s"] = round(time.time() - t, 1)
        seg.notes["spool_recovered"] = len(soak.col.events("spool_recovered"))
        # the killed run's torn files only: the new run (rotating every few seconds in the short
        # soak) may legitimately be writing its own temporary file at this moment
        killed = f"-{old.run_id}-" if old.run_id else ""
        seg.notes["tmp_after_restart"] = len([p for p in glob.glob(pattern) if killed in p])
        time.sleep(max(0.0, seconds * 0.3))

    def checks(self, soak, seg, fig):
        n = seg.notes
        return {"killed while a Parquet file was being written": (bool(n.get("tmp_at_kill")), n.get("tmp_at_kill")),
                "spool recovered into Parquet at restart": (
                    n.get("spool_recovered", 0) >= 1 and n.get("spool_recovered", 0) >= n.get("spool_after_kill", 0),
                    {"spool_files": n.get("spool_after_kill"), "recovered": n.get("spool_recovered")}),
                "no temporary file of the killed run after restart": (n.get("tmp_after_restart") == 0,
                                                                     n.get("tmp_after_restart"))}


class ConnAge(Scenario):
    """The 24 h forced close, shortened: the simulator closes Binance connections at 20 s (1001),
    the collector rotates every connection at 12 s (connection_max_age): overlap, never a hole."""
    name = "conn_age"
    settings = {"CONNECTION_MAX_AGE": "12"}
    base_s = 25.0
    min_s = 20.0
    restarts = True
    expect_closes = True

    def run(self, soak, seg, seconds):
        soak.sim.set_cfg(binance_max_conn_age=20.0)
        try:
            time.sleep(seconds)
        finally:
            soak.sim.set_cfg(binance_max_conn_age=86400.0)
        soak.fault_done(seg)

    def checks(self, soak, seg, fig):
        rot = [l for l in events(seg, "ws_rotate", exchange="binance") if l.get("reason") == "max_age"]
        planned = soak.col.plans.get("binance", {}).get("connections", 1) if soak.col else 1
        server = sim_delta(seg, "binance", "closed_idle")
        holes = [l for l in events(seg, "gap_detected") if l.get("kind") == "disconnect"]
        out = {"every Binance connection rotated": (len(rot) >= planned, {"rotations": len(rot), "connections": planned}),
               "no server close (rotation came first)": (server == 0, server),
               "no disconnect gap": (not holes, len(holes))}
        for ex in ("binance", "okx"):
            tr = fig["exchanges"][ex].get("trades") or {}
            out[f"{ex}: no trade id missing"] = (tr.get("missed") == 0, tr)
        return out


def _spool_budget(soak) -> dict:
    """A spool budget a little above what normal operation uses (measured earlier in the soak,
    else estimated from the rate), so that an S3 outage fills it within seconds."""
    # measured: about 420 bytes of spool per frame per rotate interval (Arrow IPC, all datasets)
    peak = soak.spool_peak or int(420 * (soak.target_rate or 20000) * soak.knobs["rotate_interval"])
    return {"SPOOL_MAX_BYTES": str(int(peak * 1.1))}


class DiskFull(Scenario):
    """Local disk nearly full: a small spool budget (spool_max_bytes) and an S3 outage, so the
    spool fills: new data is dropped and counted (recv_seq holes), spooled files are kept; S3
    back, the backlog drains and data is accepted again."""
    name = "disk_full"
    spool_normal = False
    settings = staticmethod(_spool_budget)
    base_s = 30.0
    min_s = 25.0
    restarts = True

    def run(self, soak, seg, seconds):
        t = time.time()
        soak.s3.stop()
        got = wait_metric(soak, lambda m: total(m, "frames_dropped_spool_full") > 0 or None, max(35.0, seconds * 0.8))
        seg.notes["spool_full_after_s"] = round(time.time() - t, 1) if got else None
        time.sleep(max(2.0, seconds * 0.3))           # stay full a while: drops go on, counted
        soak.s3.start()
        soak.fault_done(seg)
        seg.notes["backlog_drained_s"] = backlog_empty(soak, 120)
        time.sleep(max(0.0, seconds - (time.time() - t)))

    def checks(self, soak, seg, fig):
        t = fig["totals"]
        rs = reasons_seen(seg)
        return {"spool filled: frames dropped and counted": (t["dropped_spool_full"] > 0, t["dropped_spool_full"]),
                "DEGRADED for the spool": (bool({"spool_full", "spool_near_full", "spool_drops"} & rs), sorted(rs)),
                "backlog drained, accepting again": (seg.notes.get("backlog_drained_s") is not None,
                                                     seg.notes.get("backlog_drained_s"))}


# The bursts that set the allocators' high-water marks (2 MB frames, a full queue) come first, so
# that a 15-minute soak measures RSS growth (minute 2 -> end) on what follows; restarts last.
SCENARIOS = [ClockJump(), Steady(), BadFrames(), WriterStall(), ReconnectStorm(), HalfOpen(), SilentStream(),
             CloseCodes(), S3Slow(), S3Outage(), SigTerm(), SigKill(), ConnAge(), DiskFull()]


def select(names: list[str]) -> list[Scenario]:
    if not names:
        return list(SCENARIOS)
    by = {s.name: s for s in SCENARIOS}
    bad = [n for n in names if n not in by]
    if bad:
        raise SystemExit(f"unknown scenario(s): {', '.join(bad)} (see --list)")
    return [s for s in SCENARIOS if s.name in names]


def scenario_checks(sc: Scenario, soak, fig) -> dict:
    """The scenario's own checks, and for scenarios where no socket may close: none did."""
    seg = next(s for s in soak.segments if s.name == fig["name"])
    out = {}
    if not sc.expect_closes:
        closes = {ex: fig["exchanges"][ex]["closes"] for ex in EXCHANGES}
        out["no socket closed (sent = received exactly)"] = (not any(closes.values()), closes)
    try:
        out.update(sc.checks(soak, seg, fig))
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failure with its reason
        out["checks ran"] = (False, repr(e))
    return out
