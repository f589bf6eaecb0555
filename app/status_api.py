"""The read-only status API: a bottle app served by waitress in its own thread.

    GET /status   state, reasons, uptime, version, ids, connections, the last 15 minutes
    GET /metrics  every counter and gauge in the Prometheus text format (OpenMetrics when the
                  Accept header asks for it); JSON with ?format=json or Accept: application/json
    GET /healthz  200 unless ERROR or OFFLINE (503): for a load balancer or a cron probe

Everything else is refused: any method but GET/HEAD gets 405 (nothing here changes anything),
any other path a JSON 404. Responses are built from the State/Monitor read models, which hold
no settings, URLs or credentials, so nothing secret can leak. The waitress loop runs in our
thread one poll at a time, so stopping is a flag checked twice a second, not a cross-thread
close of a socket the loop is polling.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import threading

import bottle
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from waitress import wasyncore
from waitress.server import create_server

from app import logs

log = logs.get()

READ_METHODS = ("GET", "HEAD")

HELP = {
    "frames_received": "WebSocket text frames read from the sockets",
    "frames_dropped": "frames dropped because the ingestion queue was full",
    "frames_unparsed": "frames the exchange adapter could not parse (kept in frames)",
    "frames_written": "frames written to the frames dataset",
    "writer_parse_seconds": "wall time the writer spent parsing and spooling this exchange's frames",
    "writer_parse_cpu_seconds": "the writer thread's CPU time within writer_parse_seconds (the rest: "
                                "waiting, mostly for the GIL held by socket threads)",
    "frames_non_utf8": "frames that were not valid UTF-8",
    "rows_written": "rows written to a dataset",
    "rows_rejected": "rows rejected by the schema (null in a non-nullable column)",
    "reconnects": "WebSocket reconnects",
    "gaps": "gaps detected in exchange sequence ids or times",
    "subscription_errors": "subscription errors returned by the exchange",
    "subscriptions_rejected": "streams reported rejected (refused by the exchange, or never acknowledged)",
    "discovery_failures": "instrument discovery failures",
    "files_written": "Parquet files written",
    "bytes_written": "Parquet bytes written",
    "files_uploaded": "Parquet files uploaded to object storage",
    "bytes_uploaded": "Parquet bytes uploaded to object storage",
    "upload_failures": "failed upload attempts",
    "frames_dropped_spool_full": "frames dropped because the local spool reached spool_max_bytes",
    "alignments": "post-reconnect alignments measured over REST (RAM only)",
    "alignments_skipped": "alignments skipped to stay within the REST budget",
    "alignments_failed": "alignments whose REST calls failed",
    "rest_throttled": "REST answers that asked us to back off (429/418/403, Retry-After)",
}


def _json(data, status: int = 200) -> bottle.HTTPResponse:
    body = json.dumps(data, default=str, sort_keys=False) + "\n"
    return bottle.HTTPResponse(body=body, status=status,
                               headers={"Content-Type": "application/json", "Cache-Control": "no-store"})


# The Prometheus name of every counter we know (JSON keeps the left-hand names); units last
# (`_bytes`, `_seconds`), then `_total`. A counter not listed here is exported as
# collector_<name>_total, so nothing counted is ever missing from /metrics.
COUNTER_NAMES = {
    "frames_received": "collector_frames_received_total",
    "frames_dropped": "collector_frames_dropped_total",
    "frames_unparsed": "collector_frames_unparsed_total",
    "frames_written": "collector_frames_written_total",
    "frames_non_utf8": "collector_frames_non_utf8_total",
    "frames_dropped_spool_full": "collector_frames_dropped_spool_full_total",
    "rows_written": "collector_rows_written_total",
    "rows_rejected": "collector_rows_rejected_total",
    "reconnects": "collector_reconnects_total",
    "gaps": "collector_gaps_total",
    "subscription_errors": "collector_subscription_errors_total",
    "subscriptions_rejected": "collector_subscriptions_rejected_total",
    "discovery_failures": "collector_discovery_failures_total",
    "files_written": "collector_files_written_total",
    "bytes_written": "collector_written_bytes_total",
    "files_uploaded": "collector_files_uploaded_total",
    "bytes_uploaded": "collector_uploaded_bytes_total",
    "upload_failures": "collector_upload_failures_total",
    "writer_parse_seconds": "collector_writer_parse_seconds_total",
    "writer_parse_cpu_seconds": "collector_writer_parse_cpu_seconds_total",
    "alignments": "collector_alignments_total",
    "alignments_skipped": "collector_alignments_skipped_total",
    "alignments_failed": "collector_alignments_failed_total",
    "rest_throttled": "collector_rest_throttled_total",
}
# Counted per dataset (the `dataset` label); the others are per exchange only.
DATASET_COUNTERS = frozenset(("rows_written", "rows_rejected", "gaps", "files_written", "bytes_written",
                              "files_uploaded", "bytes_uploaded", "upload_failures"))
# Exported at 0 from the first scrape for every exchange of state.exchanges (with dataset="" for the
# per-dataset ones), and per dataset for every dataset an exchange has counted anything for: so
# rate()/increase() and alerts see the first event rather than a series that appears with it.
ZERO_COUNTERS = tuple(COUNTER_NAMES)
# Gauges whose Prometheus name is not simply collector_<json name>.
GAUGE_NAMES = {"queue_utilisation": "collector_queue_utilisation_ratio"}


def _metric_name(name: str) -> str:
    return "collector_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def counter_name(counter: str) -> str:
    """The Prometheus sample name (with `_total`) of a state counter."""
    return COUNTER_NAMES.get(counter) or _metric_name(counter) + "_total"


def gauge_name(name: str) -> str:
    return GAUGE_NAMES.get(name) or _metric_name(name)


def disk_figures(state) -> dict | None:
    """Free/total bytes of the filesystem holding `state.data_dir` (an optional attribute set by
    whoever builds the State; None or unset: unknown). None when unknown or unreadable: no gauge
    rather than a 0 that would look like a full disk."""
    path = getattr(state, "data_dir", None)
    if not path:
        return None
    try:
        du = shutil.disk_usage(path)
    except (OSError, TypeError, ValueError):
        return None
    return {"free": du.free, "total": du.total, "ratio": round(du.free / du.total, 6) if du.total else 0.0}


def gauges(state, now: float | None = None) -> list[tuple[str, str, list[tuple[dict, float]]]]:
    """(name, help, [(labels, value)]) of every gauge; counters come from state.counter_items().
    Names are the JSON ones; Prometheus names come from gauge_name()."""
    from app.state import STATES
    now = state.clock() if now is None else now
    q = state.queue_figures(int(now * 1e9))
    conns = state.connection_status()
    subs = state.subscriptions()
    out = [
        ("state", "1 for the current state (READY, DEGRADED, OFFLINE, ERROR)",
         [({"state": s}, 1 if state.state == s else 0) for s in STATES]),
        ("uptime_seconds", "seconds since start", [({}, round(now - state.started_at, 3))]),
        ("queue_size", "frames in the ingestion queue", [({}, q["size"])]),
        ("queue_capacity", "capacity of the ingestion queue, in frames", [({}, q["capacity"])]),
        ("queue_utilisation", "queue size / capacity", [({}, q["utilisation"])]),
        ("writer_lag_seconds", "age of the oldest frame not yet written to a spool file",
         [({}, q["writer_lag_s"])]),
        ("connections", "live WebSocket connections (connected or reconnecting)",
         [({"exchange": ex}, len(cs)) for ex, cs in conns.items()]),
        ("connections_connected", "connected WebSocket connections",
         [({"exchange": ex}, sum(1 for c in cs if c.get("connected"))) for ex, cs in conns.items()]),
        ("silent_streams", "live periodic streams silent past their threshold",
         [({"exchange": ex}, len(state.silent_streams.get(ex, ()))) for ex in state.exchanges]),
        ("streams_requested", "streams the collector asked the exchange for",
         [({"exchange": ex}, v["requested"]) for ex, v in subs.items()]),
        ("streams", "requested streams by subscription status (live, pending, rejected)",
         [({"exchange": ex, "status": st}, v[st]) for ex, v in subs.items()
          for st in ("live", "pending", "rejected")]),
        ("upload_backlog_files", "files waiting for upload", [({}, (state.upload_backlog or {}).get("files", 0))]),
        ("upload_backlog_bytes", "bytes waiting for upload", [({}, (state.upload_backlog or {}).get("bytes", 0))]),
        ("upload_backlog_oldest_age_seconds", "age of the oldest file waiting for upload",
         [({}, (state.upload_backlog or {}).get("oldest_age_s", 0.0) or 0.0)]),
    ]
    usage = getattr(state, "spool_usage", None) or {}
    if usage:
        out.append(("spool_bytes", "S3 spool usage: files waiting for upload + open spool files",
                    [({}, usage.get("bytes") or 0)]))
        out.append(("spool_budget_bytes", "spool_max_bytes", [({}, usage.get("budget") or 0)]))
    disk = disk_figures(state)
    if disk is not None:
        out.append(("disk_free_bytes", "bytes free (for the collector's user) on the data_dir filesystem",
                    [({}, disk["free"])]))
        out.append(("disk_total_bytes", "size of the data_dir filesystem", [({}, disk["total"])]))
        out.append(("disk_free_ratio", "disk_free_bytes / disk_total_bytes", [({}, disk["ratio"])]))
    return out


class StateCollector:
    """A prometheus_client collector over the State, read at scrape time (nothing is copied
    between scrapes): every counter per exchange (and dataset), every gauge of gauges(), and
    collector_build_info."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        st = self.state
        rows: dict[str, dict[tuple[str, str], float]] = {}
        datasets: dict[str, set[str]] = {}
        for counter in ZERO_COUNTERS:
            fam = rows.setdefault(counter, {})
            for ex in st.exchanges:
                fam[(ex, "")] = 0
        for counter, exchange, dataset, value in st.counter_items():
            fam = rows.setdefault(counter, {})
            fam[(exchange, dataset)] = fam.get((exchange, dataset), 0) + value
            if dataset:
                datasets.setdefault(exchange, set()).add(dataset)
        for counter, fam in rows.items():
            per_dataset = counter in DATASET_COUNTERS or any(d for _e, d in fam)
            if per_dataset:
                # every dataset the exchange has reported anything for, at 0 until counted
                for ex, dss in datasets.items():
                    for ds in dss:
                        fam.setdefault((ex, ds), 0)
            name = counter_name(counter)
            metric = CounterMetricFamily(name, HELP.get(counter, counter.replace("_", " ")),
                                         labels=("exchange", "dataset") if per_dataset else ("exchange",))
            for (ex, ds), value in sorted(fam.items()):
                metric.add_metric((ex, ds) if per_dataset else (ex,), value)
            yield metric
        for name, help_text, samples in gauges(st):
            labels = list(samples[0][0]) if samples else []
            metric = GaugeMetricFamily(gauge_name(name), help_text, labels=labels)
            for lab, value in samples:
                metric.add_metric([str(lab.get(k, "")) for k in labels], float(value))
            yield metric
        yield InfoMetricFamily("collector_build", "collector version and identity",
                               value={"version": str(st.version or ""), "instance_id": str(st.instance_id or ""),
                                      "run_id": str(st.run_id or "")})


def registry_for(state) -> CollectorRegistry:
    """A registry of our own per app (not the global one: tests build several apps): the State's
    metrics, the process_* metrics (CPU, RSS, fds, start time) and python_info."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def metrics_json(state, now: float | None = None) -> dict:
    now = state.clock() if now is None else now
    return {"state": state.state, "instance_id": state.instance_id, "run_id": state.run_id,
            "ts": round(now, 3), "counters": state.counters(),
            "gauges": {name: (samples[0][1] if len(samples) == 1 and not samples[0][0]
                              else [dict(labels, value=v) for labels, v in samples])
                       for name, _h, samples in gauges(state, now)}}


FORMATS = ("prometheus", "openmetrics", "json")
_OFFERED = (("openmetrics", "application/openmetrics-text"), ("prometheus", "text/plain"),
            ("json", "application/json"))


def metrics_format(query: str | None, accept: str | None) -> str | None:
    """What /metrics answers: `?format=` first (prometheus or text, openmetrics, json; None if
    unknown), else the Accept header: of the types it names, the one with the highest q
    (OpenMetrics, then text/plain, then JSON on a tie: what a Prometheus server asks for wins);
    else (no header, `*/*`, a browser) the Prometheus text format."""
    if query is not None and query.strip():
        q = query.strip().lower()
        q = {"text": "prometheus"}.get(q, q)
        return q if q in FORMATS else None
    ranges = []
    for part in (accept or "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        weight = 1.0
        for param in params:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(val)
                except ValueError:
                    weight = 0.0
        ranges.append((media.lower(), weight))
    best, best_q = "prometheus", 0.0
    for fmt, media in _OFFERED:
        named = [w for m, w in ranges if m == media or (fmt == "prometheus" and m == "text/*")]
        if named and max(named) > best_q:
            best, best_q = fmt, max(named)
    return best


def _ranges(accept: str, media: str) -> str:
    """The parts of an Accept header naming `media` (with their version/escaping parameters)."""
    return ",".join(p for p in (accept or "").split(",") if p.split(";")[0].strip().lower() == media)


def build_app(state) -> bottle.Bottle:
    """The WSGI app; `state.monitor` (if running) provides the 15-minute history."""
    app = bottle.Bottle(catchall=True, autojson=False)

    def status_doc():
        monitor = state.monitor
        if monitor is not None:
            return monitor.status()
        # no monitor running (early start, tests): the same fields, without history
        return {"state": state.state, "reasons": list(state.reasons), "uptime_s": round(state.uptime(), 1),
                "version": state.version, "instance_id": state.instance_id, "run_id": state.run_id,
                "exchanges": {ex: {"connections": cs, "unsupported": dict(state.unsupported.get(ex, {}))}
                              for ex, cs in state.connection_status().items()},
                "queue": state.queue_figures(), "last_15m": []}

    @app.get("/status")
    def status():
        return _json(status_doc())

    @app.get("/healthz")
    def healthz():
        ok = state.state not in ("ERROR", "OFFLINE")
        return _json({"state": state.state, "reasons": list(state.reasons)}, 200 if ok else 503)

    registry = registry_for(state)

    @app.get("/metrics")
    def metrics():
        accept = bottle.request.headers.get("Accept") or ""
        fmt = metrics_format(bottle.request.query.get("format"), accept)
        if fmt is None:
            return _json({"error": "unknown format", "formats": list(FORMATS)}, 400)
        if fmt == "json":
            return _json(metrics_json(state))
        if fmt == "openmetrics":
            # the client's own OpenMetrics range (version, escaping), or plain 1.0.0 for ?format=
            accept = _ranges(accept, "application/openmetrics-text") or "application/openmetrics-text"
        else:
            accept = _ranges(accept, "text/plain")  # choose_encoder prefers OpenMetrics whenever named
        encoder, content_type = choose_encoder(accept)
        return bottle.HTTPResponse(encoder(registry), 200,
                                   headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    @app.route("/", method="ANY")
    @app.route("/<path:path>", method="ANY")
    def fallback(path=""):
        return _json({"error": "not found", "path": "/" + path,
                      "endpoints": ["/status", "/metrics", "/healthz"]}, 404)

    @app.error(404)
    def not_found(err):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "not found"}) + "\n"

    @app.error(405)
    def not_allowed(err):
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Allow", ", ".join(READ_METHODS))
        return json.dumps({"error": "method not allowed"}) + "\n"

    @app.error(500)
    def failed(err):
        log.error("status_api_error", extra={"error": repr(getattr(err, "exception", err))[:300]})
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "internal error"}) + "\n"

    def read_only(environ, start_response):
        """Refuse writes before routing, so no method other than GET/HEAD reaches a handler."""
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in READ_METHODS:
            body = (json.dumps({"error": "method not allowed", "method": method,
                                "allowed": list(READ_METHODS)}) + "\n").encode()
            start_response("405 Method Not Allowed", [("Content-Type", "application/json"),
                                                      ("Allow", ", ".join(READ_METHODS)),
                                                      ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    read_only.bottle = app
    return read_only


class StatusServer:
    """waitress on host:port (0 = an ephemeral port), polled in its own thread."""

    def __init__(self, state, host: str, port: int, threads: int = 2):
        self.state = state
        self.app = build_app(state)
        # waitress's own warnings (e.g. task queue depth) go out as JSON lines like ours
        wlog = logging.getLogger("waitress")
        wlog.handlers = list(log.handlers)
        wlog.propagate = False
        wlog.setLevel(logging.WARNING)
        self.server = create_server(self.app, host=host, port=port, threads=threads,
                                    ident="quantlab-collector", expose_tracebacks=False,
                                    clear_untrusted_proxy_headers=True)
        self.host = self.server.effective_host
        self.port = int(self.server.effective_port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="status-api", daemon=True)

    def start(self) -> "StatusServer":
        self._thread.start()
        log.info("status_listen", extra={"host": self.host, "port": self.port,
                                         "url": f"http://{self.host}:{self.port}/status"})
        return self

    def _serve(self) -> None:
        srv = self.server
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=0.5, map=srv._map, use_poll=True, count=1)
        except Exception as e:  # noqa: BLE001 - the API must never take the collector down
            log.error("status_api_stopped", extra={"error": repr(e)})
        finally:
            for channel in list(srv._map.values()):
                try:
                    channel.close()
                except Exception:  # noqa: BLE001
                    pass
            srv.task_dispatcher.shutdown(timeout=5)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self.server.pull_trigger()          # wake the poll now rather than at its timeout
        except OSError:
            pass
        self._thread.join(timeout)
        log.info("status_stopped", extra={"port": self.port, "clean": not self._thread.is_alive()})
