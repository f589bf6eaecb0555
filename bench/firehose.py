#!/usr/bin/env python3
"""Firehose: the bundled simulator's REST and subscribe handling, with data pushed as fast as asked.

Why: `make bench` must feed the real collector (discovery over REST, subscribe, keepalive) at
rates far above what the simulator's per-event generator can produce in Python. So this runs a
normal `sim.Simulator` (REST, handshakes, subscribe ACKs, keepalive rules, its own low-rate
periodic frames) with `rate=0`, and adds a pump on the simulator's asyncio loop:

* For every subscribed connection it pre-encodes a corpus of CORPUS_FRAMES WebSocket frames
  (made by the simulator's own generators, so the payloads are exactly what the simulator
  sends: real key order, realistic prices) for the topics that connection subscribed, mixed
  like production (MIX: mostly BBO, then trades, then mark price / tickers / funding / OI).
* Every TICK_S it writes the frames each connection is owed (a token bucket at its share of the
  target rate) as one slice of that pre-encoded corpus: one transport.write per connection per
  tick, no per-frame Python work. So one firehose process can send several times what one
  collector process can read; `bench/run.py` checks that with a raw socket sink.
* A reader that does not keep up is not buffered for: once a transport holds BUFFER_LIMIT
  bytes, its frames are not sent (and not counted), so `sent` is what readers really took and a
  step whose achieved rate falls short of the target shows the reader could not keep up.

Trade ids repeat every corpus cycle: the collector's gap detector sees lower ids as overlaps,
never as gaps; the bench measures throughput, not content.

Run as its own process (never in the collector's): it prints one JSON line with the URLs, then
answers JSON commands on stdin, one reply line each:

    {"op": "rate", "rate": 50000}      target frames/s for this process, split over its exchanges
                                       ("max": as fast as the readers take them)
    {"op": "sim_rate", "rate": 20}     the simulator's own generator, events/s per instrument:
                                       slow, but every value distinct (for realistic file sizes)
    {"op": "stats"}                    {"t", "sent", "bytes", "topics", "feeds", per exchange}
    {"op": "quit"}
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sim import Simulator  # noqa: E402
from sim.core import ws_frame  # noqa: E402

MIX = {"bbo": 0.75, "trades": 0.18, "other": 0.07}   # share of frames per kind, per exchange
CORPUS_FRAMES = 16384         # pre-encoded frames per connection (~3 MB), sent cyclically
TICK_S = 0.002                # pump period
IDLE_TICK_S = 0.05            # pump period while every rate is 0
BURST_S = 0.05                # a blocked connection keeps at most this much credit
BUFFER_LIMIT = 1 << 20        # bytes queued in a transport: beyond, the reader is behind
OTHER_VARIANTS = 6            # periodic frames (mark price, tickers...) per topic
SETTLE_S = 0.5                # a connection's subscriptions unchanged this long -> build its feed


def kind_of(sim_kind: str) -> str:
    return sim_kind if sim_kind in ("bbo", "trades") else "other"


class Feed:
    """One subscribed connection: its corpus and token bucket."""

    def __init__(self, conn, blob: bytes, offsets: list[int], signature):
        self.conn = conn
        self.blob = memoryview(blob)
        self.offsets = offsets            # offsets[i] = start of frame i; offsets[-1] = len(blob)
        self.n = len(offsets) - 1
        self.avg = len(blob) / max(1, self.n)
        self.pos = 0
        self.rate = 0.0
        self.credit = 0.0
        self.signature = signature
        self.sent = 0
        self.bytes = 0

    def write(self, n: int) -> None:
        """Write the next n corpus frames (wrapping around) to the transport."""
        t = self.conn.transport
        off, blob = self.offsets, self.blob
        self.sent += n
        while n > 0:
            k = min(n, self.n - self.pos)
            a, b = off[self.pos], off[self.pos + k]
            t.write(blob[a:b])
            self.bytes += b - a
            n -= k
            self.pos = (self.pos + k) % self.n


class ExchangePump:
    """Frames and feeds of one simulated exchange (runs on the simulator's loop only)."""

    def __init__(self, name: str, ex, seed: int):
        self.name = name
        self.ex = ex
        self.rng = random.Random(f"firehose-{seed}-{name}")
        self.feeds: dict[object, Feed] = {}
        self.pending: dict[object, tuple] = {}     # conn -> (subscription signature, since)
        self.rate = 0.0
        self.sent_closed = 0
        self.bytes_closed = 0

    # ---- corpus -------------------------------------------------------------------------------
    def _capture(self, fn) -> list:
        """Frames the simulator's generator `fn` publishes, instead of sending them."""
        got = []

        def publish(topic, text, rows, wtext=None):
            got.append((topic, text, wtext))
            return 1
        self.ex.publish = publish
        try:
            fn()
        finally:
            del self.ex.publish           # back to the class method
        return got

    def _others(self) -> dict[str, list]:
        """Mark price / tickers / funding / OI frames of every subscribed topic (periodic)."""
        ex = self.ex
        ex.mono = time.monotonic()
        now_ms = int(time.time() * 1000)
        step = int(1000 * ex.scale) + 1
        pool: dict[str, list] = {}
        for topic, text, wtext in self._capture(
                lambda: [ex.periodic(now_ms + i * step) for i in range(1, OTHER_VARIANTS + 1)]):
            pool.setdefault(topic, []).append((text, wtext))
        return pool

    def _topics_by_conn(self) -> dict:
        out: dict = {}
        for topic, conns in self.ex.index.items():
            for c in conns:
                out.setdefault(c, []).append(topic)
        return out

    def refresh(self) -> None:
        """Build the feed of every connection whose subscriptions changed and then stayed put
        for SETTLE_S (subscriptions arrive in chunks); drop closed ones."""
        by_conn = self._topics_by_conn()
        now = time.monotonic()
        for c in list(self.feeds):
            if c not in by_conn or c.transport is None or c.transport.is_closing():
                self._retire(self.feeds.pop(c))
        changed = False
        for c, topics in by_conn.items():
            sig = (len(topics), c.wrapped)
            f = self.feeds.get(c)
            if f is not None and f.signature == sig:
                continue
            seen = self.pending.get(c)
            if seen is None or seen[0] != sig:
                self.pending[c] = (sig, now)
                continue
            if now - seen[1] < SETTLE_S:
                continue
            del self.pending[c]
            feed = self._build(c, sorted(topics), sig)
            if feed is not None:
                if f is not None:
                    self._retire(f)
                self.feeds[c] = feed
                changed = True
        if changed:
            self.set_rate(self.rate)

    def _retire(self, f: Feed) -> None:
        self.sent_closed += f.sent
        self.bytes_closed += f.bytes

    def _build(self, conn, topics: list[str], sig) -> Feed | None:
        """CORPUS_FRAMES frames for this connection's topics, each made by the simulator's own
        generator (distinct prices, sizes, ids; event times advancing ~100 frames per ms)."""
        ex = self.ex
        by_kind: dict[str, list] = {}
        others = None
        for t in topics:
            target = ex.topic_target(t)
            if target is None:
                continue
            kind = kind_of(target[1])
            if kind == "other":
                others = self._others() if others is None else others
                if not others.get(t):
                    continue
            by_kind.setdefault(kind, []).append((t, target[0]))
        if not by_kind:
            return None
        weights = {k: MIX[k] * len(ts) for k, ts in by_kind.items()}
        kinds = list(weights)
        cum = [sum(weights[k] for k in kinds[:i + 1]) for i in range(len(kinds))]
        rng = self.rng
        ex.mono = time.monotonic()
        base_ms = int(time.time() * 1000)
        parts, offsets, size, turn = [], [0], 0, {}
        for i in range(CORPUS_FRAMES):
            r = rng.random() * cum[-1]
            kind = kinds[next(j for j, c in enumerate(cum) if r <= c)]
            topic, inst = rng.choice(by_kind[kind])
            now_ms = base_ms + i // 100
            if kind == "other":
                variants = others[topic]
                k = turn.get(topic, 0)
                turn[topic] = k + 1
                got = [(topic,) + variants[k % len(variants)]]
            elif kind == "bbo":
                got = self._capture(lambda: ex.ev_bbo(inst, now_ms))
            else:
                got = self._capture(lambda: ex.ev_trade(inst, now_ms))
            for t, text, wtext in got:
                if t != topic:
                    continue            # e.g. a raw @trade frame next to the aggTrade asked for
                frame = ws_frame((wtext if conn.wrapped and wtext else text).encode())
                parts.append(frame)
                size += len(frame)
                offsets.append(size)
        feed = Feed(conn, b"".join(parts), offsets, sig)
        feed.weight = sum(weights.values())     # this connection's share of the exchange's frames
        return feed

    # ---- rate ---------------------------------------------------------------------------------
    def set_rate(self, rate: float) -> None:
        self.rate = rate
        total = sum(f.weight for f in self.feeds.values()) or 1.0
        for f in self.feeds.values():
            f.rate = rate * f.weight / total
            f.credit = 0.0

    def tick(self, dt: float) -> None:
        for f in self.feeds.values():
            t = f.conn.transport
            if t is None or t.is_closing():
                continue
            room = BUFFER_LIMIT - t.get_write_buffer_size()
            if math.isinf(f.rate):
                if room > BUFFER_LIMIT // 4:
                    f.write(max(1, int(room / f.avg)))
                continue
            owed = f.credit + f.rate * dt
            if room <= 0:                  # the reader is behind: keep a little credit only
                f.credit = min(owed, f.rate * BURST_S)
                continue
            n = int(owed)
            if n:
                f.write(n)
            f.credit = owed - n

    def stats(self) -> dict:
        return {"sent": self.sent_closed + sum(f.sent for f in self.feeds.values()),
                "bytes": self.bytes_closed + sum(f.bytes for f in self.feeds.values()),
                "feeds": len(self.feeds), "topics": sum(len(c) for c in self.ex.index.values()),
                "rate": self.rate}


class Firehose:
    def __init__(self, exchanges, symbols: int, seed: int = 1):
        # limits the real exchanges have but a benchmark must not trip over
        self.sim = Simulator(exchanges=exchanges, symbols=symbols, rate=0.0, seed=seed,
                             okx_max_conn_per_sec=0, okx_idle_timeout=600.0,
                             binance_max_msgs_per_sec=50, okx_max_sub_per_hour=100_000)
        self.exchanges = tuple(exchanges)
        self.seed = seed
        self.pumps: dict[str, ExchangePump] = {}
        self._task = None

    def start(self) -> dict:
        self.sim.start()
        lt = self.sim._lt

        def _setup():
            for name in self.exchanges:
                self.pumps[name] = ExchangePump(name, self.sim._ex[name], self.seed)
            self._task = asyncio.ensure_future(self._pump())
        lt.call(_setup)
        return self.sim.urls

    async def _pump(self) -> None:
        last = time.monotonic()
        next_refresh = 0.0
        while True:
            # idle (rate 0, e.g. another exchange's phase): tick slowly, the CPU belongs to the
            # processes being measured on the same cores
            busy = any(f.rate for p in self.pumps.values() for f in p.feeds.values())
            await asyncio.sleep(TICK_S if busy else IDLE_TICK_S)
            now = time.monotonic()
            dt, last = min(now - last, 0.1), now
            try:
                if now >= next_refresh:
                    next_refresh = now + 0.25
                    for p in self.pumps.values():
                        p.refresh()
                for p in self.pumps.values():
                    p.tick(dt)
            except Exception as e:  # noqa: BLE001 - a bench pump must not die silently
                print(json.dumps({"event": "firehose_error", "error": repr(e)}), file=sys.stderr)

    def set_rate(self, rate) -> None:
        per = math.inf if rate == "max" else float(rate) / len(self.exchanges)

        def _f():
            for p in self.pumps.values():
                p.set_rate(per)
        self.sim._lt.call(_f)

    def stats(self) -> dict:
        out = self.sim._lt.call(lambda: {n: p.stats() for n, p in self.pumps.items()})
        return {"t": time.monotonic(), "sent": sum(s["sent"] for s in out.values()),
                "bytes": sum(s["bytes"] for s in out.values()), "exchanges": out}

    def stop(self) -> None:
        self.sim._lt.call(lambda: self._task.cancel())
        self.sim.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exchanges", default="binance,bybit,okx")
    p.add_argument("--symbols", type=int, default=200, help="USDT perpetuals per exchange (+ a few USDC)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    fh = Firehose(args.exchanges.split(","), args.symbols, args.seed)
    urls = fh.start()
    out = sys.stdout
    out.write(json.dumps({"event": "firehose_ready", "pid": os.getpid(), "urls": urls}) + "\n")
    out.flush()
    lock = threading.Lock()
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "rate":
                fh.set_rate(cmd["rate"])
                reply = {"ok": True}
            elif op == "sim_rate":       # the simulator's own generator (distinct values)
                fh.sim.set_rate(float(cmd["rate"]))
                reply = {"ok": True}
            elif op == "stats":
                reply = fh.stats()
            elif op == "quit":
                break
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - report to the driver, keep serving
            reply = {"error": repr(e)}
        with lock:
            out.write(json.dumps(reply) + "\n")
            out.flush()
    fh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
