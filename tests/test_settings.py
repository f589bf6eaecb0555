import json
import os
import socket
import subprocess
import sys

import pytest

from app import settings
from tests.helpers import ROOT


def test_defaults_match_contract(tmp_path):
    s = settings.load(None, environ={}, dotenv_path=str(tmp_path / ".env"))
    assert s.symbols == ["BTCUSDT", "ETHUSDT"]
    assert s.exchanges == ["binance", "bybit", "okx"]
    assert s.storage_backend == "local" and s.data_dir == "./data"
    assert (s.flush_interval, s.rotate_interval) == (2.0, 60.0)
    assert (s.status_host, s.status_port, s.heartbeat_interval) == ("127.0.0.1", 8000, 30.0)
    assert s.ws_url("binance") == "wss://fstream.binance.com"
    assert s.ws_url("okx") == "wss://ws.okx.com"        # port 443, not the old 8443


def test_layers_override_in_order(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[storage]\nflush_interval = 3\nrotate_interval = 30\n[status]\nstatus_port = 9000\n")
    (tmp_path / ".env").write_text("ROTATE_INTERVAL=40\nSTATUS_PORT=9100\n")
    s = settings.load(str(ini), flags={"status_port": "9200"}, environ={"FLUSH_INTERVAL": "4"},
                      dotenv_path=str(tmp_path / ".env"))
    assert s.flush_interval == 4.0        # environment beats file
    assert s.rotate_interval == 40.0      # .env beats file
    assert s.status_port == 9200          # flag beats everything


@pytest.mark.parametrize("env,key", [
    ({"FLUSH_INTERVAL": "-1"}, "flush_interval"),
    ({"EXCHANGES": "binance,kraken"}, "exchanges"),
    ({"DATASETS": "bbo,orderbook"}, "datasets"),
    ({"STATUS_PORT": "99999"}, "status_port"),
    ({"STORAGE_BACKEND": "ftp"}, "storage_backend"),
    ({"STORAGE_BACKEND": "s3"}, "s3_bucket"),
    ({"BINANCE_WS_URL": "http://x"}, "binance_ws_url"),
    ({"QUEUE_MAXSIZE": "many"}, "queue_maxsize"),
    ({"INSTANCE_ID": "a b"}, "instance_id"),
])
def test_bad_values_name_the_setting(tmp_path, env, key):
    with pytest.raises(settings.SettingsError) as e:
        settings.load(None, environ=env, dotenv_path=str(tmp_path / ".env"))
    assert e.value.key == key and key in str(e.value)


def test_unknown_key_in_file(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[storage]\nflush_intervall = 3\n")
    with pytest.raises(settings.SettingsError) as e:
        settings.load(str(ini), environ={})
    assert e.value.key == "flush_intervall"
    assert "did you mean flush_interval?" in str(e.value)


def test_unknown_keys_in_dotenv_and_ql_environment_name_the_closest(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("DATA_DIRR=/x\n")
    with pytest.raises(settings.SettingsError) as e:
        settings.load(None, environ={}, dotenv_path=str(dotenv))
    assert e.value.key == "DATA_DIRR" and "did you mean data_dir?" in str(e.value)
    dotenv.write_text("data_dir=/x\n")
    with pytest.raises(settings.SettingsError) as e:
        settings.load(None, environ={}, dotenv_path=str(dotenv))
    assert "upper case: DATA_DIR" in str(e.value)
    dotenv.write_text("AWS_ACCESS_KEY_ID=AKIA\nQL_FLUSH_INTERVAL=5\n")      # AWS names and QL_ are ours
    assert settings.load(None, environ={}, dotenv_path=str(dotenv)).flush_interval == 5.0
    with pytest.raises(settings.SettingsError) as e:
        settings.load(None, environ={"QL_ROTATE_INTERVALL": "9"}, dotenv_path=str(tmp_path / "none"))
    assert e.value.key == "QL_ROTATE_INTERVALL" and "did you mean rotate_interval?" in str(e.value)
    # other programs' variables in the shared environment are not ours to judge
    s = settings.load(None, environ={"HOME": "/root", "ROTATE": "x", "QL_DATA_DIR": "/d", "DATA_DIR": "/e"},
                      dotenv_path=str(tmp_path / "none"))
    assert s.data_dir == "/d"                                           # QL_ wins over the bare name


def test_exchange_and_dataset_names_ignore_case(tmp_path):
    s = settings.load(None, flags={"exchanges": "OKX,Bybit", "datasets": "BBO"}, environ={},
                      dotenv_path=str(tmp_path / ".env"))
    assert s.exchanges == ["okx", "bybit"] and s.datasets == ["bbo"]


def test_version_flag():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--version"],
                       capture_output=True, text=True, timeout=60)
    from app import __version__
    assert p.returncode == 0 and p.stdout.strip() == f"collector {__version__}"


def test_unwritable_data_dir_is_one_line_and_exit_2_at_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--data-dir",
                        str(blocker / "data"), "--status-port", "0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, BINANCE_REST_URL="http://127.0.0.1:9"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"collector: invalid setting data_dir: cannot write to {blocker / 'data'}: Not a directory"]
    assert "Traceback" not in p.stdout + p.stderr
    # before anything else: no discovery or connection was attempted
    events = [json.loads(l)["event"] for l in p.stdout.splitlines() if l.startswith("{")]
    assert not [e for e in events if e.startswith(("discovery", "ws_"))], events


def test_status_port_in_use_is_one_line_naming_status_port(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--data-dir",
                            str(tmp_path / "data"), "--status-port", str(port)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, STATUS_HOST="127.0.0.1", BINANCE_REST_URL="http://127.0.0.1:9"))
    finally:
        taken.close()
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"collector: invalid setting status_port: cannot listen on 127.0.0.1:{port}: "), lines
    assert "Traceback" not in p.stdout + p.stderr


def test_bin_collector_exits_2_naming_the_setting(tmp_path):
    env = dict(os.environ, FLUSH_INTERVAL="zero")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "flush_interval" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--exchanges", "ftx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "exchanges" in p.stderr


def test_a_comment_after_a_value_is_a_comment(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[storage]\nspool_max_bytes = 53687091200 ; 50 GiB\nflush_interval = 3  # seconds\n")
    s = settings.load(str(ini), environ={}, dotenv_path=str(tmp_path / ".env"))
    assert s.spool_max_bytes == 53687091200 and s.flush_interval == 3.0
