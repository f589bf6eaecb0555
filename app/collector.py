"""The composition root: builds every part in one readable order, starts the threads, stops them.

Start, in this order, so that an operator can see the collector from its first second:
 1. data_dir must be writable (else a settings error at once: one line, exit 2);
 2. the status API binds and the state monitor runs (OFFLINE, "discovering");
 3. storage is checked: a credentials setup that cannot work stops the start; a store that does
    not answer does not (the spool records, DEGRADED, uploads start when it answers);
 4. a killed run's spool is recovered; the writer, the connection manager (no connections yet)
    and the gap detector start;
 5. discovery runs per exchange in parallel, each retrying with back-off until it succeeds;
    each exchange's connections open as soon as its own instruments are known. A symbol an
    exchange does not list is reported with close matches; if no symbol is listed anywhere the
    collector stops with exit 2.
Stop: close the sockets, let the writer drain the queue and turn every spool into Parquet, let
storage finish its uploads, log `collector_stop`.
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import signal
import threading
import time

from app import __version__, discovery, gaps, logs, storage as storage_mod, writer as writer_mod
from app.errors import SettingsError
from app.exchanges import close_matches, create as create_adapter, resolve_symbols
from app.feed import Manager
from app.handoff import FrameQueue
from app.state import Monitor, State, iso_seconds
from app.status_api import StatusServer

log = logs.get()

DISCOVERY_RETRY_MIN_S = 2.0
DISCOVERY_RETRY_MAX_S = 300.0


def new_run_id(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + secrets.token_hex(2)


def prepare_data_dir(path: str) -> None:
    """data_dir and its spool must be writable: say so now, not after discovery."""
    probe = os.path.join(path, "spool", f".write-test-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise SettingsError("data_dir", f"cannot write to {os.path.abspath(path)}: "
                                        f"{e.strerror or e}") from None


class Collector:
    def __init__(self, settings, *, writer_cls=writer_mod.Writer):
        """writer_cls: the Writer class to build (the bench injects a slow one; nothing else)."""
        self._writer_cls = writer_cls
        s = self.settings = settings
        self.run_id = new_run_id()
        self.adapters = {name: create_adapter(name) for name in s.exchanges}
        self.queue = FrameQueue(maxsize=s.queue_maxsize)
        self.state = State(version=__version__, instance_id=s.instance_id, run_id=self.run_id,
                           exchanges=s.exchanges, queue=self.queue)
        self.state.data_dir = s.data_dir
        self.state.shard, self.state.replica = str(s.shard), s.replica
        self.storage = storage_mod.build(s, self.state)
        self.monitor: Monitor | None = None
        self.status_server: StatusServer | None = None
        self.writer: writer_mod.Writer | None = None
        self.manager: Manager | None = None
        self.gap_detector: gaps.GapDetector | None = None
        self.instruments: dict[str, list] = {}
        self.exit_code = 0
        self._stop = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()

    # ---- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        s, st = self.settings, self.state
        log.info("collector_start", extra={"version": __version__, "run_id": self.run_id,
                                           "pid": os.getpid(), "settings": s.public()})
        prepare_data_dir(s.data_dir)
        for name in self.adapters:
            st.discovery[name] = {"status": "waiting"}
        self.monitor = Monitor(st, s, writer_alive=lambda: self.writer is None or self.writer.is_alive())
        try:
            self.status_server = StatusServer(st, s.status_host, s.status_port).start()
        except OSError as e:
            raise SettingsError("status_port", f"cannot listen on {s.status_host}:{s.status_port}: "
                                               f"{e.strerror or e}") from None
        self.monitor.start()
        self.storage.check()
        self.storage.start()
        recovered = writer_mod.recover(s.data_dir, self.storage, st, s.instance_id)
        if recovered:
            log.info("spool_recovery_done", extra={"files": recovered})
        self.writer = self._writer_cls(s, self.queue, st, self.storage, self.adapters,
                                        on_control=self._on_control, run_id=self.run_id,
                                        version=__version__)
        self.manager = Manager(s, self.adapters, self.queue, st, self.writer.last_seen)
        self.gap_detector = gaps.build(s, st, self.adapters)
        self.writer.observers.append(self.gap_detector.observe)
        self.manager.listeners.append(self.gap_detector.on_connection)
        self.writer.start()
        self.manager.start([])
        self.gap_detector.start()
        for name, adapter in self.adapters.items():
            self._note_unsupported(name, adapter)
            threading.Thread(target=self._discover_until_done, args=(name, adapter),
                             name=f"discovery-{name}", daemon=True).start()

    def _on_control(self, exchange, conn_id, ctrl):
        self.manager.on_control(exchange, conn_id, ctrl)

    def _note_unsupported(self, name: str, adapter) -> None:
        for ds in self.settings.datasets:
            why = adapter.UNSUPPORTED_DATASETS.get(ds)
            if why:
                self.state.unsupported[name][ds] = why
                log.info("dataset_unsupported", extra={"exchange": name, "dataset": ds, "reason": why})

    # ---- discovery: per exchange, in parallel, until it works -------------------------------------
    def _discover(self, name: str, adapter, attempts: int = 5):
        """One listing (with `attempts` tries, Retry-After honoured), its reference snapshot."""
        s = self.settings
        result = discovery.discover(adapter, s.rest_url(name), attempts=attempts)
        fetched = time.time_ns()
        try:
            writer_mod.write_reference(s.data_dir, self.storage, name, result.instruments, fetched,
                                       s.instance_id)
        except OSError as e:
            log.error("reference_write_failed", extra={"exchange": name, "error": repr(e)})
        log.info("discovery", extra={"exchange": name, "instruments": len(result.instruments),
                                     "skipped": result.skipped})
        return result

    def _discover_until_done(self, name: str, adapter) -> None:
        delay, attempt = DISCOVERY_RETRY_MIN_S, 0
        while not self._stop.is_set():
            attempt += 1
            self.state.discovery[name] = {"status": "discovering", "attempt": attempt,
                                          "started_at": iso_seconds(time.time())}
            try:
                found = self._discover(name, adapter, attempts=1)   # this loop retries, and says so
            except discovery.DiscoveryError as e:
                wait = max(delay * random.uniform(0.8, 1.0), e.retry_after or 0.0)
                self.state.count("discovery_failures", name)
                self.state.discovery[name] = {"status": "retrying", "attempt": attempt,
                                              "last_error": str(e)[:300],
                                              "next_retry_at": iso_seconds(time.time() + wait),
                                              "next_retry_in_s": round(wait, 1)}
                log.error("discovery_failed", extra={"exchange": name, "error": str(e)[:300],
                                                     "attempt": attempt, "retry_in_s": round(wait, 1)})
                self._stop.wait(wait)
                delay = min(DISCOVERY_RETRY_MAX_S, delay * 2)
                continue
            self._plan(name, adapter, found.instruments)
            if [x.upper() for x in self.settings.symbols] == ["ALL"]:
                self._rediscover_loop(name, adapter)
            return

    def _plan(self, name: str, adapter, listed: list) -> None:
        s = self.settings
        requested, missing = resolve_symbols(s.symbols, listed)
        instruments = [i for i in requested if s.shard.owns(name, i.symbol)]    # this shard's part
        unknown = {sym: close_matches(sym, listed) for sym in missing}
        if unknown:
            log.warning("symbols_not_listed", extra={"exchange": name, "symbols": missing,
                                                     "close_matches": unknown})
        self.instruments[name] = instruments
        streams = [st for inst in instruments for st in adapter.streams_for(inst, s.datasets)]
        plans = adapter.plan_connections(streams, s.max_streams_per_connection)
        log.info("plan", extra={"exchange": name, "symbols": len(instruments), "streams": len(streams),
                                "connections": len(plans), "shard": str(s.shard),
                                "universe": len(requested)})
        self.gap_detector.add_streams(name, streams)
        for plan in plans:
            self.manager.add_plan(plan)
        self.state.discovery[name] = {"status": "done", "instruments": len(listed),
                                      "universe": len(requested), "symbols": len(instruments),
                                      "streams": len(streams),
                                      "unknown_symbols": unknown, "at": iso_seconds(time.time())}
        self._check_any_symbol_known()

    def _check_any_symbol_known(self) -> None:
        """Exit 2 when every exchange has answered and none lists any requested symbol."""
        with self._lock:             # the last two discovery threads may finish together: one says it
            done = [d for d in self.state.discovery.values() if d.get("status") == "done"]
            if (len(done) < len(self.adapters) or any(d["universe"] for d in done)
                    or self.exit_code == 2):
                return
            self.exit_code = 2
        unknown = {ex: d["unknown_symbols"] for ex, d in self.state.discovery.items()}
        hints = sorted({m for per in unknown.values() for ms in per.values() for m in ms})
        reason = (f"none of {','.join(self.settings.symbols)} is listed on {', '.join(self.adapters)}"
                  + (f" (close matches: {', '.join(hints)})" if hints else ""))
        log.error("startup_failed", extra={"setting": "symbols", "error": f"invalid setting symbols: {reason}",
                                           "unknown_symbols": unknown})
        import sys
        print(f"collector: invalid setting symbols: {reason}", file=sys.stderr)
        self._stop.set()

    def _rediscover_loop(self, name: str, adapter) -> None:
        """With ALL: subscribe new listings, stop delisted ones, log both."""
        while not self._stop.wait(self.settings.discovery_interval):
            try:
                found = self._discover(name, adapter)
            except discovery.DiscoveryError as e:
                log.warning("discovery_failed", extra={"exchange": name, "error": str(e)[:300]})
                continue
            self._apply_listing(name, adapter, found.instruments)

    def _apply_listing(self, name, adapter, instruments) -> None:
        instruments = [i for i in instruments if self.settings.shard.owns(name, i.symbol)]
        old = {i.symbol for i in self.instruments.get(name, [])}
        new = {i.symbol for i in instruments}
        added = [i for i in instruments if i.symbol not in old]
        removed = old - new
        if added:
            log.info("listing_added", extra={"exchange": name, "symbols": [i.symbol for i in added]})
            streams = [st for inst in added for st in adapter.streams_for(inst, self.settings.datasets)]
            self.gap_detector.add_streams(name, streams)
            for plan in adapter.plan_connections(streams, self.settings.max_streams_per_connection):
                self.manager.add_plan(plan)
        if removed:
            log.info("listing_removed", extra={"exchange": name, "symbols": sorted(removed)})
            self.manager.remove_symbols(name, removed)
        self.instruments[name] = list(instruments)

    # ---- stop ----------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.state.stopping = True         # draining: the monitor keeps the state it had
        t0 = time.monotonic()
        for step in (self.manager, self.writer, self.gap_detector):
            if step is not None:
                try:
                    step.stop()
                except Exception as e:  # noqa: BLE001 - the rest must still be stopped
                    log.error("stop_error", extra={"part": type(step).__name__, "error": repr(e)})
        if self.status_server is not None:
            self.status_server.stop()
        if self.monitor is not None:
            self.monitor.stop()
        self.storage.stop(timeout=self.settings.upload_stop_timeout)
        counters = self.state.counters()
        log.info("collector_stop", extra={"run_id": self.run_id, "drain_s": round(time.monotonic() - t0, 3),
                                          "counters": counters})


def run(settings, **parts) -> int:
    collector = Collector(settings, **parts)
    signal.signal(signal.SIGTERM, collector.request_stop)
    signal.signal(signal.SIGINT, collector.request_stop)
    try:
        collector.start()
        collector.wait()
    finally:
        collector.stop()
        logging.shutdown()
    return collector.exit_code
