"""Orchestration: build the parts, start the threads, stop cleanly on SIGTERM/SIGINT.

Start: settings are already valid; recover spool from a killed run; discover instruments per
exchange (REST, reference data only); map the requested symbols (an unlisted symbol is reported
and skipped, never silently); plan connections; start writer, connections, watchdog, status.
Stop: close the sockets, let the writer drain the queue and turn every spool into Parquet,
let storage finish its uploads, log `collector_stop`, exit 0.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time

from app import __version__, discovery, logs, storage as storage_mod, writer as writer_mod
from app.exchanges import load as load_adapter, resolve_symbols
from app.feed import Manager
from app.gaps import GAP_THREAD
from app.handoff import FrameQueue
from app.state import MONITOR_THREAD, State
from app.status_api import STATUS_THREAD

log = logs.get()


class StartupError(RuntimeError):
    """A start-up check failed because of a setting (bad bucket, endpoint, credentials...)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid setting {key}: {reason}")
        self.key = key


def new_run_id(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + secrets.token_hex(2)


class Collector:
    def __init__(self, settings):
        self.settings = settings
        self.run_id = new_run_id()
        self.adapters = {name: load_adapter(name) for name in settings.exchanges}
        self.queue = FrameQueue(maxsize=settings.queue_maxsize)
        self.state = State(version=__version__, instance_id=settings.instance_id, run_id=self.run_id,
                           exchanges=settings.exchanges, queue=self.queue)
        self.storage = storage_mod.build(settings, self.state)
        self.writer: writer_mod.Writer | None = None
        self.manager: Manager | None = None
        self.instruments: dict[str, list] = {}
        self.streams: dict[str, list] = {}
        self.extra_threads: list = []      # status API, heartbeat, gap/alignment: (start, stop)
        self.extra_threads += [MONITOR_THREAD, STATUS_THREAD]   # state machine + heartbeat; API
        self.extra_threads.append(GAP_THREAD)     # gap detector + REST alignment (app/gaps.py)
        self._stop = threading.Event()
        self._stopped = False
        self._undiscovered: list = []      # exchanges whose discovery failed at start

    # ---- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        log.info("collector_start", extra={"version": __version__, "run_id": self.run_id,
                                           "pid": os.getpid(), "settings": s.public()})
        os.makedirs(s.data_dir, exist_ok=True)
        self.storage.check()
        self.storage.start()
        recovered = writer_mod.recover(s.data_dir, self.storage, self.state, s.instance_id)
        if recovered:
            log.info("spool_recovery_done", extra={"files": recovered})
        plans = []
        for name, adapter in self.adapters.items():
            plans.extend(self._plan_exchange(name, adapter))
        self.writer = writer_mod.Writer(s, self.queue, self.state, self.storage, self.adapters,
                                        on_control=self._on_control, run_id=self.run_id,
                                        version=__version__)
        self.manager = Manager(s, self.adapters, self.queue, self.state, self.writer.last_seen)
        self.writer.start()
        self.manager.start(plans)
        for start, _stop in self.extra_threads:
            start(self)
        for name, adapter in self._undiscovered:
            threading.Thread(target=self._retry_discovery, args=(name, adapter),
                             name=f"discovery-retry-{name}", daemon=True).start()
        if [x.upper() for x in s.symbols] == ["ALL"]:
            threading.Thread(target=self._rediscover_loop, name="discovery", daemon=True).start()

    def _on_control(self, exchange, conn_id, ctrl):
        self.manager.on_control(exchange, conn_id, ctrl)

    def _discover(self, name: str, adapter):
        s = self.settings
        result = discovery.discover(adapter, s.rest_url(name))
        fetched = time.time_ns()
        try:
            writer_mod.write_reference(s.data_dir, self.storage, name, result.instruments, fetched,
                                       s.instance_id)
        except OSError as e:
            log.error("reference_write_failed", extra={"exchange": name, "error": repr(e)})
        log.info("discovery", extra={"exchange": name, "instruments": len(result.instruments),
                                     "skipped": result.skipped})
        return result

    def _streams_for(self, adapter, instruments) -> list:
        out = []
        for inst in instruments:
            out.extend(adapter.streams_for(inst, self.settings.datasets))
        return out

    def _plan_exchange(self, name: str, adapter) -> list:
        s = self.settings
        for ds in s.datasets:
            why = getattr(adapter, "UNSUPPORTED_DATASETS", {}).get(ds)
            if why:
                self.state.unsupported[name][ds] = why
                log.info("dataset_unsupported", extra={"exchange": name, "dataset": ds, "reason": why})
        try:
            found = self._discover(name, adapter)
        except discovery.DiscoveryError as e:
            log.error("discovery_failed", extra={"exchange": name, "error": str(e), "retry": True})
            self.state.count("discovery_failures", name)
            self._undiscovered.append((name, adapter))
            return []
        instruments, missing = resolve_symbols(s.symbols, found.instruments)
        if missing:
            log.warning("symbols_not_listed", extra={"exchange": name, "symbols": missing})
        self.instruments[name] = instruments
        streams = self._streams_for(adapter, instruments)
        self.streams[name] = streams
        plans = adapter.plan_connections(streams, s.max_streams_per_connection)
        log.info("plan", extra={"exchange": name, "symbols": len(instruments), "streams": len(streams),
                                "connections": len(plans)})
        return plans

    def _retry_discovery(self, name: str, adapter) -> None:
        """An exchange whose REST was down at start joins as soon as discovery works."""
        delay = 30.0
        while not self._stop.wait(delay):
            before = len(self._undiscovered)
            plans = self._plan_exchange(name, adapter)
            if len(self._undiscovered) == before:     # succeeded
                for plan in plans:
                    self.manager.add_plan(plan)
                return
            delay = min(600.0, delay * 2)

    def _rediscover_loop(self) -> None:
        """With ALL: subscribe new listings, stop delisted ones, log both."""
        while not self._stop.wait(self.settings.discovery_interval):
            for name, adapter in self.adapters.items():
                try:
                    found = self._discover(name, adapter)
                except discovery.DiscoveryError as e:
                    log.warning("discovery_failed", extra={"exchange": name, "error": str(e)})
                    continue
                self._apply_listing(name, adapter, found.instruments)

    def _apply_listing(self, name, adapter, instruments) -> None:
        old = {i.symbol for i in self.instruments.get(name, [])}
        new = {i.symbol for i in instruments}
        added = [i for i in instruments if i.symbol not in old]
        removed = old - new
        if added:
            log.info("listing_added", extra={"exchange": name, "symbols": [i.symbol for i in added]})
            streams = self._streams_for(adapter, added)
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
        if self.manager:
            self.manager.stop()
        if self.writer:
            self.writer.stop()
        for _start, stop in reversed(self.extra_threads):
            try:
                stop(self)
            except Exception as e:  # noqa: BLE001
                log.error("stop_error", extra={"error": repr(e)})
        self.storage.stop(timeout=self.settings.upload_stop_timeout)
        counters = self.state.counters()
        log.info("collector_stop", extra={"run_id": self.run_id, "drain_s": round(time.monotonic() - t0, 3),
                                          "counters": counters})


def run(settings) -> int:
    collector = Collector(settings)
    signal.signal(signal.SIGTERM, collector.request_stop)
    signal.signal(signal.SIGINT, collector.request_stop)
    try:
        collector.start()
        collector.wait()
    finally:
        collector.stop()
        logging.shutdown()
    return 0
