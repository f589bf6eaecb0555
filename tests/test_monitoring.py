"""deploy/prometheus/alerts.yml and deploy/grafana/collector.json against what /metrics exports.

The exported names come from a real scrape: a StatusServer on an ephemeral port, read with
prometheus_client's own parser. Every PromQL expression of both files may name only those
metrics (and `up`, which Prometheus adds per target), with label matchers that exist on them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app import status_api
from app.handoff import FrameQueue
from app.state import State
from tests.test_state import T0, Clock, FakeConn

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "collector.json"
JOB = "quantlab-collector"
TARGET_LABELS = {"job", "instance"}          # added by Prometheus to every scraped series

# PromQL words that look like identifiers but name no metric.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_SELECTOR = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by a
    parenthesis), keywords, label names (in {...} or by/without/on/ignoring lists), durations
    or Grafana variables."""
    e = re.sub(r"\$\{?\w+\}?", "", expr)                 # Grafana variables ($__rate_interval, $instance)
    e = _STRING.sub('""', e)
    e = re.sub(r"\{[^{}]*\}", " ", e)                    # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                    # range and subquery durations
    e = _GROUPING.sub(" ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    return {m.group(1) for m in _IDENT.finditer(e) if not m.group(2) and m.group(1).lower() not in KEYWORDS}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) of every `metric{...}` selector."""
    e = re.sub(r"\$\{?__\w+\}?", "1m", expr)
    return [(m.group(1), _MATCHER.findall(m.group(2))) for m in _SELECTOR.finditer(e)]


def test_the_extractor_itself():
    expr = ('sum by (job, exchange) (rate(collector_frames_dropped_total{job="x", state="a b"}[5m])) > 0 '
            'or on (instance) histogram_quantile(0.9, foo_bucket[$__rate_interval] offset 1h) / bar:ratio '
            '> 1e9 and ignoring(state) up{job="quantlab-collector"} unless absent(baz)')
    assert metric_names(expr) == {"collector_frames_dropped_total", "foo_bucket", "bar:ratio", "up", "baz"}
    assert selectors(expr)[0] == ("collector_frames_dropped_total", [("job", "=", "x"), ("state", "=", "a b")])


# ---- what /metrics really exports -----------------------------------------------------------

def _state(tmp_path, traffic: bool) -> State:
    st = State(version="9.9.9", instance_id="mon-1", run_id="run-1", exchanges=("binance", "okx"),
               queue=FrameQueue(maxsize=1000), clock=Clock(T0))
    if traffic:
        st.data_dir = str(tmp_path)
        st.spool_usage = {"bytes": 1000, "budget": 10_000, "ratio": 0.1, "full": False}
        st.upload_backlog = {"files": 3, "bytes": 3000, "oldest_age_s": 12.0}
        conn = FakeConn("okx", 1)
        conn.received, conn.dropped = 100, 1
        conn.subs = {"bbo:BTC": ("live", ""), "trades:BTC": ("pending", ""), "oi:BTC": ("rejected", "60018")}
        st.register_connection(conn)
        st.count("gaps", "okx", 1, "trades")
        st.count("rows_written", "okx", 99, "trades")
        st.count("files_written", "okx", 1, "trades")
        st.count("bytes_written", "okx", 4096, "trades")
        st.count("upload_failures", "okx", 1, "trades")
        st.count("reconnects", "okx")
    return st


def _scrape(st: State) -> dict[str, dict[str, set[str]]]:
    """{sample name: {label: {values}}} from a real StatusServer's default /metrics."""
    server = status_api.StatusServer(st, "127.0.0.1", 0).start()
    try:
        r = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    finally:
        server.stop()
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = out.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _scrape(_state(tmp_path_factory.mktemp("data"), traffic=True))


@pytest.fixture(scope="module")
def alerts():
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs(dash) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every templating query (label_values' first
    argument: the second is a label name)."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
            out.append((f"variable {var['name']}", m.group(1) if m else q))
    return out


def _check_names(where: str, expr: str, exported: dict) -> list[str]:
    problems = []
    for name in metric_names(expr) - {"up"}:
        if name not in exported:
            problems.append(f"{where}: {name} is not exported ({expr})")
    for name, matchers in selectors(expr):
        labels = {"job": {JOB}, "instance": set()} if name == "up" else exported.get(name)
        if labels is None:
            continue
        for label, op, value in matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels:
                problems.append(f"{where}: {name} has no label {label!r} ({expr})")
            elif op == "=" and value and value not in labels[label]:
                problems.append(f"{where}: {name}{{{label}}} never has the value {value!r} ({expr})")
    if "up" in metric_names(expr):
        for name, matchers in selectors(expr):
            if name == "up":
                assert ("job", "=", JOB) in matchers, f"{where}: up without job={JOB!r}"
    return problems


def test_exported_names_are_prometheus_style(exported):
    assert all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", n) for n in exported)
    ours = {n for n in exported if n.startswith("collector_")}
    assert len(ours) > 30 and not [n for n in exported if not n.startswith(("collector_", "process_", "python_"))]
    assert "collector_queue_utilisation_ratio" in exported and "collector_queue_utilisation" not in exported
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(exported)


def test_alert_rules_are_well_formed(alerts):
    assert len(alerts) >= 8
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names)), names
    for rule in alerts:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
        assert re.fullmatch(r"\d+[smhdwy]", str(rule["for"])), rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule
        assert rule["annotations"]["summary"].strip(), rule
        expr = rule["expr"]
        for a, b in ("()", "{}", "[]"):
            assert expr.count(a) == expr.count(b), f"unbalanced {a}{b} in {rule['alert']}"
        assert metric_names(expr), rule["alert"]


def test_alert_expressions_name_only_exported_metrics(alerts, exported):
    problems = [p for rule in alerts for p in _check_names(f"alert {rule['alert']}", rule["expr"], exported)]
    assert not problems, "\n".join(problems)


def test_alerts_cover_what_the_runbook_needs(alerts):
    by_metric: dict[str, list[dict]] = {}
    for rule in alerts:
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, []).append(rule)
    for needed in ("up", "collector_state", "collector_frames_dropped_total", "collector_writer_lag_seconds",
                   "collector_upload_backlog_oldest_age_seconds", "collector_upload_backlog_files",
                   "collector_streams", "collector_disk_free_bytes", "collector_disk_free_ratio"):
        assert needed in by_metric, f"no alert on {needed}"
    not_ready = [r for r in by_metric["collector_state"] if 'state="READY"' in r["expr"]]
    assert not_ready and not_ready[0]["for"] == "5m"
    assert any('status="rejected"' in r["expr"] for r in by_metric["collector_streams"])


def test_alerts_work_from_the_first_scrape(alerts, tmp_path):
    """On a fresh collector (no traffic yet) every alert's metric already exists, so rate() and
    increase() see the first drop, gap or failure; only the S3 spool and disk gauges need what
    the collector sets at start (spool_usage on S3, data_dir)."""
    fresh = _scrape(_state(tmp_path, traffic=False))
    later = {"collector_spool_bytes", "collector_spool_budget_bytes", "collector_disk_free_bytes",
             "collector_disk_free_ratio", "collector_disk_total_bytes"}
    missing = {n for rule in alerts for n in metric_names(rule["expr"])} - {"up"} - later - set(fresh)
    assert not missing, missing


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    assert len(panels) >= 15
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["title"] and p["type"] in ("timeseries", "stat", "state-timeline", "gauge", "table", "bargauge"), p
        assert p["targets"], f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), (p["title"], t)
            assert metric_names(t["expr"]), (p["title"], t["expr"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "instance" in variables


def test_dashboard_expressions_name_only_exported_metrics(dashboard, exported):
    problems = [p for where, expr in _dashboard_exprs(dashboard) for p in _check_names(where, expr, exported)]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_collector(dashboard):
    used = set().union(*(metric_names(e) for _w, e in _dashboard_exprs(dashboard)))
    for needed in ("collector_state", "collector_frames_received_total", "collector_frames_dropped_total",
                   "collector_gaps_total", "collector_reconnects_total", "collector_writer_lag_seconds",
                   "collector_queue_utilisation_ratio", "collector_uploaded_bytes_total",
                   "collector_upload_backlog_files", "collector_streams", "collector_disk_free_bytes",
                   "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert needed in used, f"no panel on {needed}"
