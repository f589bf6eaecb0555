"""`bin/collector --probe`: connect to the configured endpoints, subscribe every kind for a few
liquid symbols, write nothing, and say per exchange and kind what came back.

Why: the simulator speaks the protocol as our references describe it; only the real exchange
says whether it still does. A user runs this after deploying, or after an exchange announces a
change, and reads one table: subscribed/live/rejected streams, frames, rows parsed, parse
errors, fields the parser does not map, first/last timestamps. Exit 0 only if every kind that
the exchange publishes parsed rows without an error.

It reuses the collector's own pieces (discovery, adapters, feed.Manager with its subscription
bookkeeping) with a consumer that parses frame by frame in place of the writer; nothing reaches
a file (discovery's reference snapshot included).
"""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import ujson

from app import discovery, logs
from app.exchanges import RowSink, create as create_adapter, resolve_symbols
from app.feed import Manager
from app.handoff import FrameQueue
from app.schema import DATASETS
from app.state import State

PROBE_SYMBOLS = ["BTCUSDT", "ETHUSDT"]
KINDS = tuple(d for d in DATASETS if d != "frames")


class Tally:
    """What one exchange delivered, per kind (dataset)."""

    def __init__(self):
        self.frames = defaultdict(int)          # kind -> data frames that gave it rows
        self.rows = defaultdict(int)
        self.first = {}                         # kind -> first ts_recv (ns)
        self.last = {}
        self.unmapped = defaultdict(set)        # kind -> field names the parser does not map
        self.errors = 0
        self.error_samples: list[str] = []
        self.controls = defaultdict(int)


class Consumer(threading.Thread):
    """The writer's place: every frame through the adapter's per-frame parser, counted."""

    def __init__(self, q: FrameQueue, adapters: dict, streams: dict):
        super().__init__(name="probe-consumer", daemon=True)
        self.q, self.adapters = q, adapters
        self.on_control = None                   # Manager.on_control, as the writer calls it
        self.tallies = {ex: Tally() for ex in adapters}
        self.seen: dict[str, dict[str, int]] = {ex: {} for ex in adapters}   # as writer.last_seen
        self.channel_of = {ex: {st.key: st.channel for st in lst} for ex, lst in streams.items()}
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            batches = self.q.take_all()
            for batch in batches or ():
                for seq, ts, payload in zip(batch.recv_seq, batch.ts_recv, batch.payloads):
                    self.frame(batch.exchange, batch.conn_id, seq, ts, payload)
            if not batches:
                if self._done.is_set():
                    return
                time.sleep(0.05)

    def frame(self, exchange: str, conn_id: int, seq: int, ts: int, payload) -> None:
        adapter, tally = self.adapters[exchange], self.tallies[exchange]
        sink = RowSink()
        try:
            ctrl = adapter.parse((exchange, conn_id, seq, ts, payload), sink)
        except Exception as e:  # noqa: BLE001 - as the writer: a bad frame is counted, never fatal
            tally.errors += 1
            if len(tally.error_samples) < 5:
                tally.error_samples.append(f"{e!r}: {bytes(payload)[:160]!r}")
            return
        if ctrl is not None:
            tally.controls[ctrl.kind] += 1
            self.on_control(exchange, conn_id, ctrl)
            return
        keys = list(sink.last_seen)
        self.seen[exchange].update(sink.last_seen)
        fields = _item_fields(payload)
        mapped = adapter.MAPPED_FIELDS
        for kind, rows in sink.take().items():
            if not rows:
                continue
            tally.frames[kind] += 1
            tally.rows[kind] += len(rows)
            tally.first.setdefault(kind, ts)
            tally.last[kind] = ts
            for key in keys:
                known = mapped.get(self.channel_of[exchange].get(key, ""))
                if known is not None:
                    tally.unmapped[kind] |= fields - known

    def finish(self) -> None:
        """Parse what is still queued, then end."""
        self._done.set()
        self.join(5)


def _item_fields(payload) -> set[str]:
    """Keys of the data items of a frame (`data` as an object or a list of objects)."""
    try:
        msg = ujson.loads(payload)
    except ValueError:
        return set()
    data = msg.get("data") if type(msg) is dict else None
    items = data if type(data) is list else [data]
    return {k for item in items if type(item) is dict for k in item}


def run(settings, seconds: float, out=None) -> int:
    """Probe every configured exchange for `seconds`; print the table; 0 if every kind parsed."""
    import sys
    out = out or sys.stdout
    logs.setup("WARNING", stream=sys.stderr)
    adapters = {name: create_adapter(name) for name in settings.exchanges}
    q = FrameQueue(maxsize=settings.queue_maxsize)
    state = State(exchanges=settings.exchanges, queue=q)
    streams, plans, problems = {}, [], {}
    for name, adapter in adapters.items():
        try:
            found = discovery.discover(adapter, settings.rest_url(name), attempts=2)
        except discovery.DiscoveryError as e:
            problems[name] = f"discovery failed: {e}"
            continue
        instruments, missing = resolve_symbols(settings.symbols, found.instruments)
        if missing:
            problems[name] = f"not listed: {', '.join(missing)}"
        streams[name] = [st for inst in instruments for st in adapter.streams_for(inst, KINDS)]
        plans += adapter.plan_connections(streams[name], settings.max_streams_per_connection)
    consumer = Consumer(q, adapters, streams)
    manager = Manager(settings, adapters, q, state, consumer.seen)
    consumer.on_control = manager.on_control
    consumer.start()
    manager.start(plans)
    try:
        time.sleep(seconds)
        subs = {ex: _per_kind(c, streams.get(ex, [])) for ex, c in _books(manager).items()}
    finally:
        manager.stop()
        consumer.finish()
    report = build_report(adapters, streams, subs, consumer.tallies, problems)
    print_report(report, out)
    return 0 if report["ok"] else 1


def _books(manager: Manager) -> dict[str, dict[str, tuple[str, str]]]:
    out: dict[str, dict] = defaultdict(dict)
    for c in list(manager.connections):
        for key, value in c.subscriptions().items():
            old = out[c.exchange].get(key)
            if old is None or value[0] == "live":
                out[c.exchange][key] = value
    return out


def _per_kind(book: dict, streams: list) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for st in streams:
        status, reason = book.get(st.key, ("pending", ""))
        for kind in st.datasets:
            slot = out.setdefault(kind, {"subscribed": 0, "live": 0, "rejected": 0, "reasons": {}})
            slot["subscribed"] += 1
            if status in ("live", "rejected"):
                slot[status] += 1
            if status == "rejected":
                slot["reasons"][st.key] = reason
    return out


def build_report(adapters, streams, subs, tallies, problems) -> dict:
    exchanges, ok = {}, True
    for ex, adapter in adapters.items():
        unsupported = adapter.UNSUPPORTED_DATASETS
        tally = tallies[ex]
        kinds = {}
        for kind in KINDS:
            if kind in unsupported:
                kinds[kind] = {"unsupported": unsupported[kind]}
                continue
            sub = subs.get(ex, {}).get(kind, {"subscribed": 0, "live": 0, "rejected": 0, "reasons": {}})
            row = dict(sub, frames=tally.frames.get(kind, 0), rows=tally.rows.get(kind, 0),
                       unmapped=sorted(tally.unmapped.get(kind, ())),
                       first=_iso(tally.first.get(kind)), last=_iso(tally.last.get(kind)))
            row["ok"] = row["rows"] > 0 and not row["rejected"]
            ok = ok and row["ok"]
            kinds[kind] = row
        errors_ok = tally.errors == 0 and ex not in problems
        ok = ok and errors_ok
        exchanges[ex] = {"kinds": kinds, "parse_errors": tally.errors, "error_samples": tally.error_samples,
                         "controls": dict(tally.controls), "problem": problems.get(ex)}
    return {"ok": ok, "exchanges": exchanges}


def _iso(ns) -> str:
    if not ns:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ns / 1e9)) + f".{int(ns / 1e6) % 1000:03d}Z"


def print_report(report: dict, out) -> None:
    head = f"{'kind':<14}{'subscribed':>11}{'live':>6}{'rejected':>9}{'frames':>8}{'rows':>8}  {'first':<14}{'last':<14}unmapped fields"
    for ex, r in report["exchanges"].items():
        print(f"\n{ex}  parse errors: {r['parse_errors']}" + (f"  ({r['problem']})" if r["problem"] else ""), file=out)
        print(head, file=out)
        for kind, row in r["kinds"].items():
            if "unsupported" in row:
                print(f"{kind:<14}  not published: {row['unsupported']}", file=out)
                continue
            print(f"{kind:<14}{row['subscribed']:>11}{row['live']:>6}{row['rejected']:>9}{row['frames']:>8}"
                  f"{row['rows']:>8}  {row['first']:<14}{row['last']:<14}{','.join(row['unmapped']) or '-'}",
                  file=out)
            for key, reason in row["reasons"].items():
                print(f"{'':<14}rejected {key}: {reason}", file=out)
        for sample in r["error_samples"]:
            print(f"  parse error: {sample}", file=out)
    print("\nprobe: " + ("OK: every kind parsed rows without errors" if report["ok"]
                         else "FAILED: see the rows above"), file=out)
    print(json.dumps(report, default=str), file=out)
