"""The "clock jump of the host" fault, in process: the collector's writer (real spool and
Parquet files) and state monitor on an injected wall clock that jumps.

Why in process: a soak cannot step the host's clock (and must not), so the clock the writer and
the monitor read is injected (`Writer(clock=...)`, `Monitor(clock=...)`) and the frames are
stamped with it, exactly as the feed stamps ts_recv with the wall clock. Phases:
  A  the real time;
  B  a forward jump to one second before the next UTC midnight (a VM resumed, or NTP's first
     sync): rows cross into the next date during the phase;
  C  a step back of 30 s (an NTP correction): ts_recv goes back across midnight;
  D  back to the real time (a jump back of hours).
Checks: every frame fed is in Parquet exactly once (frames rows = fed, recv_seq without hole or
duplicate) and gives its rows; every file lies in the date partition of its rows' ts_recv; the
writer flushes (fsync) at least every flush_interval of *real* time through every jump, and
rotates at least every 2 x rotate_interval of real time (a clock that steps back must not hold
data in memory, nor keep files from being finalized, for as long as the step), and the state
monitor's heartbeat keeps its real-time cadence.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

EX = "binance"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


class JumpClock:
    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def ns(self) -> int:
        return time.time_ns() + int(self.offset * 1e9)


def run(flush_interval: float = 0.5, rotate_interval: float = 2.0, rate: float = 2000.0,
        phase_s: float = 3.0, step_back_s: float = 30.0) -> dict:
    import pyarrow.parquet as pq
    from app import settings as settings_mod
    from app.exchanges import create
    from app.handoff import FrameQueue, from_items
    from app.state import Monitor, State
    from app.storage import LocalStorage
    from app.writer import Writer
    from sim.binance import AGG, BOOK, WRAP

    work = tempfile.mkdtemp(prefix="clockjump-")
    cfg = os.path.join(work, "empty.ini")
    open(cfg, "w").close()
    data_dir = os.path.join(work, "data")
    s = settings_mod.load(cfg, environ={"DATA_DIR": data_dir, "EXCHANGES": EX, "INSTANCE_ID": "clockjump",
                                         "FLUSH_INTERVAL": str(flush_interval),
                                         "ROTATE_INTERVAL": str(rotate_interval), "HEARTBEAT_INTERVAL": "1"},
                          dotenv_path=os.path.join(work, ".env"))
    clock = JumpClock()
    q = FrameQueue(maxsize=1_000_000)
    state = State(version="soak", instance_id="clockjump", run_id="clockjump", exchanges=(EX,), queue=q,
                  clock=clock.time)
    storage = LocalStorage(s, state)
    writer = Writer(s, q, state, storage, {EX: create(EX)}, on_control=lambda *a: None, run_id="20000101T000000Zcafe",
                    version="soak", clock=clock.time)
    monitor = Monitor(state, s, clock=clock.time)
    flushes: list[float] = []               # monotonic time of each flush that wrote frames
    writer.observers.append(lambda ex, ds, table: flushes.append(time.monotonic()) if ds == "frames" else None)
    rotations: list[float] = []
    orig_rotate = writer.rotate

    def rotate():
        if writer.spools:
            rotations.append(time.monotonic())
        orig_rotate()
    writer.rotate = rotate
    writer.start()

    seq = 0
    ids = {sym: 1000 for sym in SYMBOLS}
    fed = {"frames": 0, "bbo": 0, "trades": 0}
    beats: list[tuple[str, float]] = []
    orig_hb = monitor.heartbeat

    def hb(now, *a, **k):
        beats.append((phase, time.monotonic()))
        return orig_hb(now, *a, **k)
    monitor.heartbeat = hb
    midnight = (int(time.time() // 86400) + 1) * 86400
    t_mono0 = time.monotonic()
    marks = {}
    next_tick = 0.0
    phase = "A"
    for phase in "ABCD":
        if phase == "B":
            clock.offset = midnight - 1.0 - time.time()      # one second before midnight
        elif phase == "C":
            clock.offset -= step_back_s                       # NTP steps back
        elif phase == "D":
            clock.offset = 0.0                                # back home: hours back
        marks[phase] = time.monotonic()
        end = time.monotonic() + phase_s
        while time.monotonic() < end:
            n = max(1, int(rate * 0.01))
            for i in range(n):
                seq += 1
                sym = SYMBOLS[seq % len(SYMBOLS)]
                ts = clock.ns()
                ms = ts // 1_000_000
                if seq % 3:
                    raw = BOOK % (seq, sym, "100.0", "1.0", "100.1", "2.0", ms - 1, ms)
                    stream = sym.lower() + "@bookTicker"
                    fed["bbo"] += 1
                else:
                    ids[sym] += 1
                    a = ids[sym]
                    raw = AGG % (ms, a, sym, "100.0", "0.5", a * 2, a * 2 + 1, ms - 1, "false")
                    stream = sym.lower() + "@aggTrade"
                    fed["trades"] += 1
                q.put(*from_items([(EX, 1, seq, ts, (WRAP % (stream, raw)).encode())]))
                fed["frames"] += 1
            if time.monotonic() >= next_tick:
                monitor.tick()
                next_tick = time.monotonic() + 0.25
            time.sleep(0.01)
    t_end = time.monotonic()
    writer.stop()
    # ---- read back ----
    files = []
    for root, _d, names in os.walk(os.path.join(data_dir, "raw")):
        files += [os.path.join(root, n) for n in names if n.endswith(".parquet")]
    frames_rows, seqs, rows, misplaced = 0, [], {"bbo": 0, "trades": 0}, []
    for p in files:
        t = pq.read_table(p)
        ds = p.split(os.sep + "raw" + os.sep + "v1" + os.sep)[1].split(os.sep)[0]
        date = [x for x in p.split(os.sep) if x.startswith("date=")][0][5:]
        days = {time.strftime("%Y-%m-%d", time.gmtime(v / 1e9)) for v in t.column("ts_recv").to_pylist()}
        if days != {date}:
            misplaced.append((os.path.basename(p), date, sorted(days)))
        if ds == "frames":
            frames_rows += t.num_rows
            seqs += t.column("recv_seq").to_pylist()
        elif ds in rows:
            rows[ds] += t.num_rows
    seqs.sort()
    dups = sum(1 for a, b in zip(seqs, seqs[1:]) if a == b)
    holes = (seqs[-1] - seqs[0] + 1 - len(set(seqs))) if seqs else 0
    dates = sorted({[x for x in p.split(os.sep) if x.startswith("date=")][0][5:] for p in files})

    def max_gap(times, t0, t1):
        pts = [t0] + [t for t in times if t0 <= t <= t1] + [t1]
        return round(max(b - a for a, b in zip(pts, pts[1:])), 2)
    flush_gaps = {ph: max_gap(flushes, marks[ph] + 0.05, (marks.get(nxt) or t_end))
                  for ph, nxt in zip("ABCD", ("B", "C", "D", None))}
    rot_gap = max_gap(rotations, t_mono0 + rotate_interval, t_end)
    beats_per_phase = {ph: sum(1 for p, _t in beats if p == ph) for ph in "ABCD"}
    shutil.rmtree(work, ignore_errors=True)
    checks = {
        "every frame written once": (frames_rows == fed["frames"] and dups == 0 and holes == 0,
                                     {"fed": fed["frames"], "written": frames_rows, "dups": dups, "holes": holes}),
        "rows of every frame": (rows == {"bbo": fed["bbo"], "trades": fed["trades"]}, {"rows": rows, "fed": fed}),
        "files in the date of their ts_recv (midnight crossed and re-crossed)": (
            not misplaced and len(dates) >= 2, {"dates": dates, "misplaced": misplaced[:3]}),
        f"a flush at least every flush_interval ({flush_interval}s) + 0.5 s of real time, in every phase": (
            all(g <= flush_interval + 0.5 for g in flush_gaps.values()), flush_gaps),
        f"a rotation at least every 2 x rotate_interval ({rotate_interval}s) of real time": (
            rot_gap <= 2 * rotate_interval + 0.5, rot_gap),
        "heartbeats keep their real-time cadence (heartbeat_interval 1 s)": (
            all(n >= max(1, int(phase_s) - 1) for n in beats_per_phase.values()), beats_per_phase),
    }
    return {"figures": {"fed": fed["frames"], "dates": dates, "flush_gap_s": flush_gaps,
                        "rotation_gap_s": rot_gap, "heartbeats_per_phase": beats_per_phase,
                        "phase_s": phase_s, "step_back_s": step_back_s},
            "checks": {k: {"pass": bool(ok), "detail": d} for k, (ok, d) in checks.items()}}


if __name__ == "__main__":
    import json
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(run(), indent=1, default=str))
