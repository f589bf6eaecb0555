"""The read-only status API, served for real by waitress on a loopback port."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from app import settings as settings_mod, status_api
from app.state import DEGRADED, ERROR, OFFLINE, READY, Monitor, State
from app.handoff import FrameQueue
from tests.test_state import T0, Clock, FakeConn, make_settings


@pytest.fixture
def live(tmp_path, monkeypatch):
    """A State with traffic on two exchanges, a ticked Monitor, and the API on an ephemeral port."""
    monkeypatch.chdir(tmp_path)
    clock = Clock(T0)
    q = FrameQueue(maxsize=1000)
    st = State(version="1.2.3", instance_id="box-1", run_id="20270115T000000Zabcd",
               exchanges=("binance", "okx"), queue=q, clock=clock)
    conns = [FakeConn("binance", 1), FakeConn("okx", 2)]
    for c in conns:
        st.register_connection(c)
    st.unsupported["binance"]["open_interest"] = "no WebSocket stream"
    mon = Monitor(st, make_settings(tmp_path), clock=clock)
    for _ in range(130):                        # a bit over two minutes of traffic
        clock.t += 1
        conns[0].received += 10
        conns[1].received += 5
        st.count("rows_written", "binance", 8, "bbo")
        st.count("rows_written", "okx", 4, "trades")
        mon.tick()
    conns[0].dropped = 2
    st.count("gaps", "okx", 1, "trades")
    st.count("files_written", "binance", 1, "bbo")
    st.count("bytes_written", "binance", 4096, "bbo")
    clock.t += 1
    mon.tick()
    server = status_api.StatusServer(st, "127.0.0.1", 0).start()
    yield st, f"http://127.0.0.1:{server.port}", server
    server.stop()


def test_status_shape(live):
    st, url, _srv = live
    r = requests.get(url + "/status", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert doc["state"] == DEGRADED and doc["reasons"] == ["drops"]
    assert (doc["version"], doc["instance_id"], doc["run_id"]) == ("1.2.3", "box-1", "20270115T000000Zabcd")
    assert doc["uptime_s"] == 131.0
    b = doc["exchanges"]["binance"]
    assert b["connected"] == 1 and b["connections"][0]["name"] == "binance-1"
    assert b["frames_received"] == 1300 and b["frames_dropped"] == 2
    assert b["unsupported"] == {"open_interest": "no WebSocket stream"}
    assert doc["exchanges"]["okx"]["gaps"] == 1 and doc["exchanges"]["okx"]["unsupported"] == {}
    assert set(doc["queue"]) >= {"size", "capacity", "utilisation", "writer_lag_s"}
    minutes = doc["last_15m"]
    assert [m["start"] for m in minutes] == [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 60 * i))
                                             for i in range(3)]
    assert sum(m["msgs"] for m in minutes) == 1300 + 650
    assert sum(m["drops"] for m in minutes) == 2 and sum(m["gaps"] for m in minutes) == 1
    assert minutes[-1]["by_exchange"]["binance"]["drops"] == 2
    assert set(minutes[0]) >= {"start", "msgs", "drops", "gaps", "reconnects", "queue_peak"}


def test_status_is_readable_with_json_tool(live):
    _st, url, _srv = live
    body = requests.get(url + "/status", timeout=5).content
    out = subprocess.run([sys.executable, "-m", "json.tool"], input=body, capture_output=True, check=True)
    assert b'"state": "DEGRADED"' in out.stdout and out.stdout.count(b"\n") > 30


@pytest.mark.parametrize("query,headers", [("?format=json", {}), ("", {"Accept": "application/json"}),
                                           ("?format=json", {"Accept": "text/plain"})])
def test_metrics_json_has_every_counter(live, query, headers):
    st, url, _srv = live
    r = requests.get(url + "/metrics" + query, headers=headers, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert doc["counters"] == json.loads(json.dumps(st.counters()))
    assert doc["counters"]["binance"]["rows_written"] == {"bbo": 1040}
    assert doc["counters"]["binance"]["frames_dropped"] == 2
    g = doc["gauges"]
    assert g["queue_capacity"] == 1000 and g["uptime_seconds"] == 131.0
    assert g["queue_utilisation"] == 0.0 and "queue_utilisation_ratio" not in g     # JSON keeps its names
    assert {d["state"]: d["value"] for d in g["state"]}[DEGRADED] == 1


def _families(text, parser):
    return {f.name: f for f in parser(text)}


def _by(family, *labels, nonzero=False):
    out = {}
    for s in family.samples:
        if nonzero and not s.value:
            continue
        key = tuple(s.labels.get(k, "") for k in labels)
        out[key if len(key) > 1 else key[0]] = out.get(key if len(key) > 1 else key[0], 0.0) + s.value
    return out


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "text/plain;version=0.0.4;q=0.9,*/*;q=0.1",
                                    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                                    "application/json;q=0.5, text/plain", "text/*"])
def test_metrics_prometheus_text(live, accept):
    """The default (curl, a browser, Prometheus' text/plain): the Prometheus text format."""
    _st, url, _srv = live
    headers = {} if accept is None else {"Accept": accept}
    if accept is None:                                      # no Accept header at all
        with requests.Session() as s:
            s.headers.pop("Accept", None)
            r = s.get(url + "/metrics", timeout=5)
    else:
        r = requests.get(url + "/metrics", headers=headers, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# HELP collector_frames_received_total " in text
    assert "# TYPE collector_frames_received_total counter" in text
    fams = _families(text, parse_prometheus)
    assert _by(fams["collector_frames_received"], "exchange") == {"binance": 1300.0, "okx": 650.0}
    assert _by(fams["collector_rows_written"], "exchange", "dataset", nonzero=True) == \
        {("binance", "bbo"): 1040.0, ("okx", "trades"): 520.0}
    assert fams["collector_rows_written"].type == "counter"
    assert _by(fams["collector_written_bytes"], "exchange", "dataset", nonzero=True) == {("binance", "bbo"): 4096.0}
    assert _by(fams["collector_frames_dropped"], "exchange") == {"binance": 2.0, "okx": 0.0}
    state = {s.labels["state"]: s.value for s in fams["collector_state"].samples}
    assert state == {READY: 0.0, DEGRADED: 1.0, OFFLINE: 0.0, ERROR: 0.0}
    assert fams["collector_queue_capacity"].samples[0].value == 1000.0
    assert fams["collector_queue_utilisation_ratio"].type == "gauge" and "collector_queue_utilisation" not in fams
    assert fams["collector_uptime_seconds"].samples[0].value == 131.0
    assert fams["collector_build_info"].samples[0].labels["instance_id"] == "box-1"
    for name in ("collector_streams", "collector_streams_requested", "collector_writer_lag_seconds",
                 "collector_upload_backlog_oldest_age_seconds", "collector_connections_connected"):
        assert fams[name].type == "gauge", name


@pytest.mark.parametrize("accept", ["application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                                    "application/openmetrics-text"])
def test_metrics_openmetrics(live, accept):
    _st, url, _srv = live
    r = requests.get(url + "/metrics", headers={"Accept": accept}, timeout=5)
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    fams = _families(r.text, parse_openmetrics)        # strict: raises on any format error
    assert _by(fams["collector_gaps"], "exchange") == {"binance": 0.0, "okx": 1.0}
    assert _by(fams["collector_gaps"], "exchange", "dataset", nonzero=True) == {("okx", "trades"): 1.0}
    assert fams["collector_build"].type == "info"
    assert fams["process_cpu_seconds"].type == "counter"


@pytest.mark.parametrize("query,accept,expect", [
    ("?format=prometheus", "application/json", "text/plain; version=0.0.4"),
    ("?format=text", None, "text/plain; version=0.0.4"),
    ("?format=openmetrics", None, "application/openmetrics-text; version=1.0.0"),
    ("?format=JSON", None, "application/json"),
    ("", "application/json, text/plain;q=0.5", "application/json"),
    ("", "application/json, text/plain, */*", "text/plain; version=0.0.4"),   # a tie: the scraper's type
    ("", "application/json;q=0, */*", "text/plain; version=0.0.4"),
])
def test_metrics_format_negotiation(live, query, accept, expect):
    _st, url, _srv = live
    r = requests.get(url + "/metrics" + query, headers={"Accept": accept} if accept else {}, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(expect)
    assert r.headers["Cache-Control"] == "no-store"


def test_metrics_unknown_format_is_a_json_400(live):
    _st, url, _srv = live
    r = requests.get(url + "/metrics?format=xml", timeout=5)
    assert r.status_code == 400 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {"error": "unknown format", "formats": ["prometheus", "openmetrics", "json"]}


REQUIRED_AT_ZERO = ("collector_frames_dropped_total", "collector_frames_unparsed_total", "collector_reconnects_total",
                    "collector_gaps_total", "collector_subscriptions_rejected_total",
                    "collector_subscription_errors_total", "collector_upload_failures_total",
                    "collector_files_written_total", "collector_written_bytes_total",
                    "collector_frames_received_total", "collector_rows_written_total")


def _scrape(state, accept="text/plain"):
    srv = status_api.StatusServer(state, "127.0.0.1", 0).start()
    try:
        return requests.get(f"http://127.0.0.1:{srv.port}/metrics", headers={"Accept": accept}, timeout=5).text
    finally:
        srv.stop()


def test_counters_exist_at_zero_on_a_fresh_state():
    """Before any event, so rate()/increase() and the alerts see the first drop, gap or failure."""
    text = _scrape(State(exchanges=("binance", "bybit", "okx")))
    samples = {}
    for fam in parse_prometheus(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    for name in REQUIRED_AT_ZERO:
        got = {s.labels["exchange"]: s.value for s in samples[name]}
        assert got == {"binance": 0.0, "bybit": 0.0, "okx": 0.0}, name
    assert {s.labels["status"] for s in samples["collector_streams"]} == {"live", "pending", "rejected"}
    parse_openmetrics(_scrape(State(exchanges=("okx",)), "application/openmetrics-text"))     # strict


def test_process_metrics_are_exported(live):
    _st, url, _srv = live
    fams = _families(requests.get(url + "/metrics", timeout=5).text, parse_prometheus)
    rss = fams["process_resident_memory_bytes"].samples[0].value
    assert 1e6 < rss == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert fams["process_cpu_seconds"].type == "counter" and fams["process_cpu_seconds"].samples[0].value > 0
    assert abs(fams["process_start_time_seconds"].samples[0].value - psutil.Process().create_time()) < 2
    assert fams["process_open_fds"].samples[0].value > 0
    assert fams["python_info"].samples[0].labels["implementation"]


def test_disk_free_of_data_dir(live, tmp_path):
    st, url, _srv = live
    fams = _families(requests.get(url + "/metrics", timeout=5).text, parse_prometheus)
    assert "collector_disk_free_bytes" not in fams         # data_dir unknown: no gauge, not a full disk
    st.data_dir = str(tmp_path)
    fams = _families(requests.get(url + "/metrics", timeout=5).text, parse_prometheus)
    du = shutil.disk_usage(tmp_path)
    free = fams["collector_disk_free_bytes"].samples[0].value
    assert free == pytest.approx(du.free, rel=0.05) and fams["collector_disk_total_bytes"].samples[0].value == du.total
    assert 0 < fams["collector_disk_free_ratio"].samples[0].value <= 1
    assert requests.get(url + "/metrics?format=json", timeout=5).json()["gauges"]["disk_total_bytes"] == du.total
    st.data_dir = str(tmp_path / "gone")                   # unreadable: the gauges go, /metrics stays 200
    r = requests.get(url + "/metrics", timeout=5)
    assert r.status_code == 200 and "collector_disk_free_bytes" not in r.text


def test_each_app_has_its_own_registry(live):
    """Several apps in one process (tests): each reports its own State, none the global registry's."""
    _st, url, _srv = live
    other = State(version="0.0.1", instance_id="box-2", exchanges=("bybit",))
    fams = _families(_scrape(other), parse_prometheus)
    assert fams["collector_build_info"].samples[0].labels["instance_id"] == "box-2"
    assert set(_by(fams["collector_frames_received"], "exchange")) == {"bybit"}
    fams = _families(requests.get(url + "/metrics", timeout=5).text, parse_prometheus)
    assert fams["collector_build_info"].samples[0].labels["instance_id"] == "box-1"
    assert set(_by(fams["collector_frames_received"], "exchange")) == {"binance", "okx"}


def test_head_metrics_is_a_read(live):
    _st, url, _srv = live
    r = requests.head(url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("state,code", [(READY, 200), (DEGRADED, 200), (OFFLINE, 503), (ERROR, 503)])
def test_healthz(live, state, code):
    st, url, _srv = live
    st.state, st.reasons = state, ["x"]
    r = requests.get(url + "/healthz", timeout=5)
    assert r.status_code == code and r.json() == {"state": state, "reasons": ["x"]}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("path", ["/status", "/metrics", "/healthz", "/", "/nope"])
def test_only_reads_are_allowed(live, method, path):
    st, url, _srv = live
    before = st.counters()
    r = requests.request(method, url + path, data=b'{"state": "READY"}', timeout=5)
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD" and r.json()["error"] == "method not allowed"
    assert st.counters() == before and st.state == DEGRADED


def test_head_is_a_read(live):
    _st, url, _srv = live
    r = requests.head(url + "/status", timeout=5)
    assert r.status_code == 200 and r.content == b""


@pytest.mark.parametrize("path", ["/nope", "/status/extra", "/", "/metrics.txt"])
def test_unknown_path_is_json_404(live, path):
    _st, url, _srv = live
    r = requests.get(url + path, timeout=5)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    assert r.json()["error"] == "not found"


def test_handler_failure_is_json_500_and_server_survives(live):
    st, url, _srv = live

    class Broken:
        def status(self):
            raise RuntimeError("bug")
    good, st.monitor = st.monitor, Broken()
    r = requests.get(url + "/status", timeout=5)
    assert r.status_code == 500 and r.json() == {"error": "internal error"} and "bug" not in r.text
    st.monitor = good
    assert requests.get(url + "/status", timeout=5).status_code == 200


def test_default_binds_loopback_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings_mod.load(environ={}, dotenv_path=str(tmp_path / "none.env"))
    assert (s.status_host, s.status_port) == ("127.0.0.1", 8000)
    srv = status_api.StatusServer(State(), s.status_host, 0).start()
    try:
        assert srv.server.socket.getsockname()[0] == "127.0.0.1"
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for addr in others:                    # every non-loopback address of this host refuses
            with pytest.raises(OSError):
                socket.create_connection((addr, srv.port), timeout=2).close()
    finally:
        srv.stop()


def test_port_in_use_is_an_oserror_at_construction():
    """The collector turns it into a settings error naming status_port (app/collector.py)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            status_api.StatusServer(State(), "127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_stop_is_clean_even_with_an_open_connection():
    srv = status_api.StatusServer(State(exchanges=("okx",)), "127.0.0.1", 0).start()
    idle = socket.create_connection(("127.0.0.1", srv.port))       # a keep-alive client
    try:
        with requests.Session() as s:
            assert s.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5).status_code == 503
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 3
        assert not srv._thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        assert idle.recv(1) == b""             # the idle client was closed, not left hanging
    finally:
        idle.close()


# ---- against the running collector ----------------------------------------------------------

import sim as sim_mod  # noqa: E402
from tests.helpers import CollectorProcess, sim_env  # noqa: E402

SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-Value-XYZ", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123",
           "AWS_SESSION_TOKEN": "tok-very-secret-42"}


@pytest.mark.timeout(90)
def test_collector_api_no_secrets_and_clean_stop(tmp_path):
    sim = sim_mod.Simulator(exchanges=("binance", "okx"), symbols=1, rate=10.0).start()
    try:
        env = dict(sim_env(sim, ("binance", "okx")), EXCHANGES="binance,okx", SYMBOLS="BTCUSDT",
                   **SECRETS)
        env.pop("STATUS_HOST", None)
        with CollectorProcess(tmp_path, env) as cp:
            listen = cp.wait_for("status_listen")[0]
            assert listen["host"] == "127.0.0.1" and listen["port"] > 0
            url = f"http://127.0.0.1:{listen['port']}"
            cp.wait_for("state_change", lambda l: l["new"] == READY, timeout=30)
            bodies = [requests.get(url + p, headers=h, timeout=5)
                      for p, h in (("/status", {}), ("/metrics", {}), ("/healthz", {}), ("/nope", {}),
                                   ("/metrics", {"Accept": "text/plain"}),
                                   ("/metrics", {"Accept": "application/openmetrics-text"}),
                                   ("/metrics?format=json", {}))]
            bodies.append(requests.post(url + "/status", timeout=5))
            doc = bodies[0].json()
            assert doc["state"] == READY and doc["exchanges"]["okx"]["connected"] >= 1
            assert "open_interest" in doc["exchanges"]["binance"]["unsupported"]
            for r in bodies:
                for secret in SECRETS.values():
                    assert secret not in r.text
                    assert secret not in str(r.headers)
            parse_prometheus(bodies[4].text)
            fams = _families(bodies[1].text, parse_prometheus)        # the default: Prometheus text
            assert fams["collector_state"].samples and fams["process_resident_memory_bytes"].samples
            parse_openmetrics(bodies[5].text)
            assert bodies[6].json()["state"] == READY and "disk_free_bytes" in bodies[6].json()["gauges"]
            assert cp.stop() == 0
            stopped = cp.wait_for("status_stopped")[0]
            assert stopped["clean"] is True
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", listen["port"]), timeout=2).close()
        assert not any(secret in line for line in cp.raw for secret in SECRETS.values())
    finally:
        sim.stop()
