import os
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


def test_bin_collector_exits_2_naming_the_setting(tmp_path):
    env = dict(os.environ, FLUSH_INTERVAL="zero")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "flush_interval" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "collector"), "--exchanges", "ftx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "exchanges" in p.stderr
