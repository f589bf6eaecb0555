"""deploy/supervisord.conf, for real: supervisord starts the collector, `supervisorctl stop` makes
it drain and exit 0, and nothing received is lost.

The tests run the shipped file with only its locations rewritten (repo, python, socket and log
directories into tmp), fixed status ports replaced by 0 (parallel test runs), startsecs shortened
and autostart off (each test starts what it exercises with supervisorctl).
"""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import sim as sim_mod
from tests.helpers import ROOT, count_rows, sim_env, wait_until

CONF = os.path.join(ROOT, "deploy", "supervisord.conf")
GROUP = ("collector-binance", "collector-bybit", "collector-okx")


def shipped() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(CONF)
    return cp


def test_shipped_conf_shape():
    cp = shipped()
    programs = {s.split(":", 1)[1]: cp[s] for s in cp.sections() if s.startswith("program:")}
    assert set(programs) == {"collector", *GROUP}
    assert cp["group:collectors"]["programs"].split(",") == list(GROUP)
    ports, ids = set(), set()
    for name, p in programs.items():
        assert p["stopsignal"] == "TERM"
        assert int(p["stopwaitsecs"]) >= 180          # writer drain + storage's 120 s upload drain
        assert p["autorestart"] == "true" and p["redirect_stderr"] == "true"
        assert p["stdout_logfile"].endswith("%(program_name)s.log")
        assert int(p["stdout_logfile_backups"]) > 0 and p["stdout_logfile_maxbytes"].endswith("MB")
        assert "PYTHONUNBUFFERED" in p["environment"]
        assert p["command"].split()[1].endswith("bin/collector")
        if name != "collector":
            ex = name.split("-", 1)[1]
            assert f"--exchanges {ex}" in p["command"]
            ports.add(re.search(r"--status-port (\d+)", p["command"]).group(1))
            ids.add(re.search(r"--instance-id (\S+)", p["command"]).group(1))
    assert len(ports) == 3 and "8000" not in ports and len(ids) == 3
    assert programs["collector"]["autostart"] == "true"        # the default: one process
    assert all(programs[g]["autostart"] == "false" for g in GROUP)


class Supervisor:
    """supervisord -n with the shipped conf, relocated into tmp; supervisorctl against it."""

    def __init__(self, tmp_path, env: dict[str, str]):
        self.dir = tmp_path
        self.logs = tmp_path / "log"
        run = tmp_path / "run"
        work = tmp_path / "work"
        for d in (self.logs, run, work):
            d.mkdir()
        text = open(CONF).read()
        text = text.replace("/opt/quantlab/.venv/bin/python", sys.executable)
        text = text.replace("directory=/opt/quantlab", f"directory={work}")   # no repo settings.ini
        text = text.replace("/opt/quantlab", ROOT)
        text = text.replace("/run/quantlab", str(run)).replace("/var/log/quantlab", str(self.logs))
        text = re.sub(r"--status-port \d+", "--status-port 0", text)
        text = text.replace("startsecs=10", "startsecs=1").replace("autostart=true", "autostart=false")
        self.conf = tmp_path / "supervisord.conf"
        self.conf.write_text(text)
        base = {k: v for k, v in os.environ.items() if not k.endswith(("_WS_URL", "_REST_URL"))}
        self.env = dict(base, **env)
        self.proc = None

    def start(self) -> "Supervisor":
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)],
                                     env=self.env, cwd=str(self.dir), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.ctl("status").returncode in (0, 3), timeout=20, what="supervisord up")
        return self

    def ctl(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def log_lines(self, program: str) -> list[dict]:
        path = self.logs / f"{program}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def events(self, program: str, event: str) -> list[dict]:
        return [l for l in self.log_lines(program) if l.get("event") == event]

    def supervisord_log(self) -> str:
        path = self.logs / "supervisord.log"
        return path.read_text() if path.exists() else ""

    def shutdown(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.ctl("shutdown", timeout=60)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def simulator():
    sim = sim_mod.Simulator(exchanges=("binance", "bybit", "okx"), symbols=1, rate=10.0).start()
    yield sim
    sim.stop()


def _env(sim, tmp_path) -> dict[str, str]:
    return dict(sim_env(sim), DATA_DIR=str(tmp_path / "data"), SYMBOLS="BTCUSDT", FLUSH_INTERVAL="0.5",
                ROTATE_INTERVAL="2", HEARTBEAT_INTERVAL="2", STATUS_PORT="0", INSTANCE_ID="sup")


def _reconcile(data_dir: str, exchange: str, stops: list[dict]) -> None:
    """Every frame received is in `frames` or counted as dropped (CONTRACT §1.4)."""
    received = sum(s["counters"][exchange]["frames_received"] for s in stops)
    dropped = sum(s["counters"][exchange]["frames_dropped"] for s in stops)
    assert received > 0
    assert count_rows(data_dir, "frames", exchange) + dropped == received, (exchange, received, dropped)


def _all_files_readable(data_dir: str) -> int:
    n = 0
    for root, _dirs, files in os.walk(os.path.join(data_dir, "raw")):
        for f in files:
            assert f.endswith(".parquet") and not f.startswith("."), f
            pq.read_table(os.path.join(root, f))
            n += 1
    assert not [f for f in os.listdir(os.path.join(data_dir, "spool")) if not f.startswith(".")]
    return n


@pytest.mark.timeout(150)
def test_single_program_start_stop_drains(tmp_path, simulator):
    sup = Supervisor(tmp_path, _env(simulator, tmp_path)).start()
    try:
        r = sup.ctl("start", "collector")
        assert "collector: started" in r.stdout, r.stdout + r.stderr
        wait_until(lambda: sup.events("collector", "file_written"), timeout=30, what="data flows")
        wait_until(lambda: any(l.get("new") == "READY" for l in sup.events("collector", "state_change")),
                   timeout=20, what="READY")
        assert sup.events("collector", "status_listen")[0]["port"] > 0
        r = sup.ctl("stop", "collector")
        assert "collector: stopped" in r.stdout, r.stdout + r.stderr
        assert "stopped: collector (exit status 0)" in sup.supervisord_log()
        assert "SIGKILL" not in sup.supervisord_log()
        (stop,) = sup.events("collector", "collector_stop")
        data = str(tmp_path / "data")
        assert _all_files_readable(data) > 0
        for ex in ("binance", "bybit", "okx"):
            _reconcile(data, ex, [stop])
        assert not sup.events("collector", "finalize_failed")
    finally:
        sup.shutdown()


@pytest.mark.timeout(180)
def test_group_one_program_per_exchange_shares_data_dir(tmp_path, simulator):
    """Three programs, one per exchange, one data_dir. Restarting one mid-run must leave the
    others' open spool files alone (each recovers only its own instance's spool)."""
    sup = Supervisor(tmp_path, _env(simulator, tmp_path)).start()
    data = str(tmp_path / "data")
    try:
        r = sup.ctl("start", "collectors:*")
        assert all(f"collectors:{p}: started" in r.stdout for p in GROUP), r.stdout + r.stderr
        for p in GROUP:
            wait_until(lambda p=p: sup.events(p, "file_written"), timeout=30, what=f"{p} writes")
        ports = {sup.events(p, "status_listen")[0]["port"] for p in GROUP}
        assert len(ports) == 3
        assert {sup.events(p, "collector_start")[0]["settings"]["instance_id"] for p in GROUP} == {
            f"{os.uname().nodename}-{p.split('-', 1)[1]}" for p in GROUP}

        assert "stopped" in sup.ctl("stop", "collectors:collector-okx").stdout
        assert "started" in sup.ctl("start", "collectors:collector-okx").stdout   # spool recovery runs
        wait_until(lambda: len(sup.events("collector-okx", "file_written")) >
                   len([1 for l in sup.events("collector-okx", "file_written")
                        if l["ts"] < sup.events("collector-okx", "collector_stop")[0]["ts"]]),
                   timeout=30, what="okx writes again")
        # binance/bybit keep writing across okx's restart: each wrote a file after okx's new start
        okx_back = sup.events("collector-okx", "collector_start")[-1]["ts"]
        for p in GROUP:
            wait_until(lambda p=p: [l for l in sup.events(p, "file_written") if l["ts"] > okx_back],
                       timeout=30, what=f"{p} writes after okx's restart")

        r = sup.ctl("stop", "collectors:*")
        assert all(f"collectors:{p}: stopped" in r.stdout for p in GROUP), r.stdout + r.stderr
        log = sup.supervisord_log()
        for p in GROUP:
            assert re.search(rf"stopped: (collectors:)?{p} \(exit status 0\)", log), log[-2000:]
        assert _all_files_readable(data) > 0
        for p in GROUP:
            ex = p.split("-", 1)[1]
            stops = sup.events(p, "collector_stop")
            assert len(stops) == (2 if ex == "okx" else 1)
            _reconcile(data, ex, stops)
            assert not sup.events(p, "finalize_failed") and not sup.events(p, "spool_unreadable")
    finally:
        sup.shutdown()


@pytest.mark.timeout(150)
def test_store_down_at_start_keeps_running_under_supervisord(tmp_path, simulator):
    """An unreachable S3 endpoint used to exit 2 at start: supervisord retried, then marked the
    program FATAL and nothing was recorded until a person acted. Now it stays RUNNING, records
    into the local spool and says DEGRADED with the reason."""
    import socket
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env = dict(_env(simulator, tmp_path), STORAGE_BACKEND="s3", S3_ENDPOINT=f"http://127.0.0.1:{dead}",
               S3_BUCKET="ql-bucket", AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY="not-a-secret",
               AWS_EC2_METADATA_DISABLED="true", UPLOAD_STOP_TIMEOUT="2")
    sup = Supervisor(tmp_path, env).start()
    try:
        assert "collector: started" in sup.ctl("start", "collector").stdout
        wait_until(lambda: sup.events("collector", "file_written"), timeout=30, what="recording")
        (problem,) = sup.events("collector", "storage_unavailable")[:1]
        assert problem["setting"] == "s3_endpoint"
        wait_until(lambda: any("storage_unavailable" in l.get("reasons", [])
                               for l in sup.events("collector", "state_change")), 20, what="DEGRADED")
        assert "RUNNING" in sup.ctl("status", "collector").stdout
        assert "FATAL" not in sup.supervisord_log() and "exit status 2" not in sup.supervisord_log()
        r = sup.ctl("stop", "collector")
        assert "collector: stopped" in r.stdout, r.stdout + r.stderr
    finally:
        sup.shutdown()
