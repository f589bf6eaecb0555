"""The read-only status API: a bottle app served by waitress in its own thread.

    GET /status   state, reasons, uptime, version, ids, connections, the last 15 minutes
    GET /metrics  every counter: JSON, or Prometheus text / OpenMetrics by the Accept header
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
import threading

import bottle
from waitress import wasyncore
from waitress.server import create_server

from app import logs

log = logs.get()

READ_METHODS = ("GET", "HEAD")
PROM_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

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


def _metric_name(name: str) -> str:
    return "collector_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _label_value(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    parts = [f'{k}="{_label_value(v)}"' for k, v in labels.items() if v not in (None, "")]
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def gauges(state, now: float | None = None) -> list[tuple[str, str, list[tuple[dict, float]]]]:
    """(name, help, [(labels, value)]) of every gauge; counters come from state.counter_items()."""
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
    return out


def prometheus_text(state, openmetrics: bool = False, now: float | None = None) -> str:
    """Prometheus text exposition 0.0.4, or OpenMetrics 1.0 (counter families without the
    `_total` suffix, an info family, `# EOF`)."""
    lines: list[str] = []
    families: dict[str, list] = {}
    for counter, exchange, dataset, value in state.counter_items():
        families.setdefault(counter, []).append(({"exchange": exchange, "dataset": dataset}, value))
    for counter, samples in families.items():
        base = _metric_name(counter)
        family = base if openmetrics else base + "_total"
        lines.append(f"# HELP {family} {HELP.get(counter, counter.replace('_', ' '))}")
        lines.append(f"# TYPE {family} counter")
        merged: dict[str, int] = {}
        for labels, value in samples:
            key = _labels(**labels)
            merged[key] = merged.get(key, 0) + value
        for key, value in merged.items():
            lines.append(f"{base}_total{key} {_num(value)}")
    for name, help_text, samples in gauges(state, now):
        family = _metric_name(name)
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} gauge")
        for labels, value in samples:
            lines.append(f"{family}{_labels(**labels)} {_num(value)}")
    info = _labels(version=state.version, instance_id=state.instance_id, run_id=state.run_id)
    if openmetrics:
        lines += ["# HELP collector_build collector version and identity", "# TYPE collector_build info",
                  f"collector_build_info{info} 1", "# EOF"]
    else:
        lines += ["# HELP collector_build_info collector version and identity",
                  "# TYPE collector_build_info gauge", f"collector_build_info{info} 1"]
    return "\n".join(lines) + "\n"


def metrics_json(state, now: float | None = None) -> dict:
    now = state.clock() if now is None else now
    return {"state": state.state, "instance_id": state.instance_id, "run_id": state.run_id,
            "ts": round(now, 3), "counters": state.counters(),
            "gauges": {name: (samples[0][1] if len(samples) == 1 and not samples[0][0]
                              else [dict(labels, value=v) for labels, v in samples])
                       for name, _h, samples in gauges(state, now)}}


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

    @app.get("/metrics")
    def metrics():
        accept = (bottle.request.headers.get("Accept") or "").lower()
        if "application/openmetrics-text" in accept:
            return bottle.HTTPResponse(prometheus_text(state, openmetrics=True), 200,
                                       headers={"Content-Type": OPENMETRICS})
        if "text/plain" in accept:
            return bottle.HTTPResponse(prometheus_text(state), 200, headers={"Content-Type": PROM_TEXT})
        return _json(metrics_json(state))

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


def _start_server(collector) -> None:
    s = collector.settings
    try:
        server = StatusServer(collector.state, s.status_host, s.status_port)
    except OSError as e:
        from app.collector import StartupError
        raise StartupError("status_port", f"cannot listen on {s.status_host}:{s.status_port}: "
                                          f"{e.strerror or e}") from None
    collector.status_server = server.start()


def _stop_server(collector) -> None:
    server = getattr(collector, "status_server", None)
    if server is not None:
        server.stop()


# Collector.extra_threads entry: (start(collector), stop(collector)).
STATUS_THREAD = (_start_server, _stop_server)
