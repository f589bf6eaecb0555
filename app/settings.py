"""The one Settings object: settings.ini (or --config) -> environment (+ .env) -> flags.

Every key has one definition below (section, type, default, check), so that loading,
validation, the environment name (the key in upper case) and the log of what was used all come
from the same table. A bad value raises SettingsError naming the key; bin/collector exits 2.
"""
from __future__ import annotations

import configparser
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

from app import sharding
from app.errors import SettingsError
from app.exchanges import EXCHANGES
from app.schema import DATASETS

__all__ = ["KEYS", "Key", "Settings", "SettingsError", "load"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _names(value: str) -> list[str]:
    """A list of exchange or dataset names: case does not matter (`OKX` is `okx`)."""
    return [v.lower() for v in _csv(value)]


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _positive(v):
    if v <= 0:
        raise ValueError("must be > 0")


def _min(lo):
    def check(v):
        if v < lo:
            raise ValueError(f"must be >= {lo}")
    return check


def _port(v):
    if not 0 <= v <= 65535:
        raise ValueError("must be a port number 0-65535")


def _nonempty(values):
    if not values:
        raise ValueError("must not be empty")


def _subset(allowed):
    def check(values):
        _nonempty(values)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {', '.join(bad)} (allowed: {', '.join(allowed)})")
    return check


def _one_of(*allowed):
    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
    return check


def _label(v):
    if v and not re.match(r"^[A-Za-z0-9_.-]{1,32}$", v):
        raise ValueError("letters, digits, '_', '.', '-' only, at most 32")


def _url(*schemes):
    def check(v):
        if not re.match(rf"^({'|'.join(schemes)})://[^/\s]+", v):
            raise ValueError(f"must be a {' or '.join(schemes)} URL")
    return check


@dataclass(frozen=True)
class Key:
    name: str
    section: str
    kind: Callable[[str], Any]
    default: Any
    check: Callable[[Any], None] | None = None
    secret: bool = False
    help: str = ""


KEYS = [
    Key("symbols", "collector", _csv, ["BTCUSDT", "ETHUSDT"], _nonempty,
        help="symbols to record; ALL = every USDT/USDC linear perpetual"),
    Key("exchanges", "collector", _names, list(EXCHANGES), _subset(EXCHANGES),
        help="binance, bybit, okx (any case)"),
    Key("datasets", "collector", _names, list(DATASETS), _subset(DATASETS),
        help="bbo, trades, mark_price, funding, open_interest (frames are always written)"),
    Key("instance_id", "collector", str, None,
        help="names this instance's files (default: the host name); letters, digits, _ . -"),
    Key("shard", "collector", sharding.parse, sharding.ALL,
        help="i/N: record only the symbols whose stable hash of (exchange, symbol) mod N is i; "
             "N instances with 0..N-1 record the universe once"),
    Key("replica", "collector", str, "", _label,
        help="a label (a, b...) for instances that record the same shard twice; in every file's metadata"),
    Key("discovery_interval", "collector", float, 3600.0, _positive,
        help="seconds between instrument listings with symbols = ALL (new listings join, delisted leave)"),
    Key("storage_backend", "storage", str, "local", _one_of("local", "s3"),
        help="local: files stay under data_dir; s3: uploaded, data_dir is the spool"),
    Key("data_dir", "storage", str, "./data",
        help="root of the local layout, or the spool for s3; must be writable"),
    Key("s3_endpoint", "storage", str, "",
        help="http(s) URL of an S3-compatible store (MinIO, Ceph...); empty = AWS"),
    Key("s3_bucket", "storage", str, "", help="required with storage_backend = s3"),
    Key("s3_prefix", "storage", str, "", help="key prefix inside the bucket (raw/ and reference/ go under it)"),
    Key("s3_region", "storage", str, "us-east-1", help="the bucket's region"),
    Key("flush_interval", "storage", float, 2.0, _positive,
        help="seconds: at most this much received data is only in memory (spool fsync)"),
    Key("rotate_interval", "storage", float, 60.0, _positive,
        help="seconds one Parquet file covers"),
    Key("spool_max_bytes", "storage", int, 50 * 1024**3, _positive,
        help="s3: disk budget of the spool during a store outage; beyond it new data is dropped and counted"),
    Key("upload_concurrency", "storage", int, 4, _positive, help="s3: parallel uploads"),
    Key("s3_addressing_style", "storage", str, "auto", _one_of("auto", "path", "virtual"),
        help="auto = path-style when s3_endpoint is set (MinIO, Ceph), the SDK's choice on AWS"),
    Key("s3_verify", "storage", str, "etag", _one_of("etag", "size"),
        help="check after upload: etag = size + MD5 ETag (default), size = size only (SSE-KMS)"),
    Key("s3_multipart_threshold", "storage", int, 16 * 1024**2, _positive,
        help="bytes: files this large or larger go as a multipart upload"),
    Key("s3_multipart_chunksize", "storage", int, 16 * 1024**2, _min(5 * 1024**2),
        help="bytes per multipart part (S3 minimum 5 MiB)"),
    Key("upload_retry_min", "storage", float, 1.0, _positive,
        help="seconds: first back-off after a failed upload (doubles up to upload_retry_max)"),
    Key("upload_retry_max", "storage", float, 30.0, _positive,
        help="seconds: the longest back-off between upload attempts"),
    Key("upload_stop_timeout", "storage", float, 120.0, _positive,
        help="seconds at shutdown to finish pending uploads; what is left stays for the next start"),
    Key("queue_maxsize", "queue", int, 1_000_000, _positive,
        help="frames the ingestion queue holds (~10 s of peak load); a full queue drops and counts"),
    Key("writer_batch", "queue", int, 100_000, _positive,
        help="most frames the writer parses as one chunk (it parses every 0.5 s, or once this "
             "many wait; a writer behind takes bigger chunks, which cost fewer GIL hand-backs "
             "per frame and more memory)"),
    Key("status_host", "status", str, "127.0.0.1",
        help="address of the status API (0.0.0.0 to let Prometheus or a probe in from outside)"),
    Key("status_port", "status", int, 8000, _port, help="port of the status API; 0 = any free port"),
    Key("heartbeat_interval", "status", float, 30.0, _positive, help="seconds between heartbeat log lines"),
    Key("degraded_queue_ratio", "status", float, 0.8, _positive,
        help="DEGRADED when the queue is fuller than this share"),
    Key("degraded_gap_rate", "status", float, 10.0, _positive,
        help="gaps per minute (over the last window) above which the state is DEGRADED"),
    Key("degraded_window", "status", float, 60.0, _positive,
        help="seconds: drops and the gap rate are judged over this trailing window"),
    Key("degraded_spool_ratio", "status", float, 0.9, _positive,
        help="DEGRADED when the S3 spool (backlog + open spool files) reaches this share of spool_max_bytes"),
    Key("degraded_upload_age", "status", float, 600.0, _positive,
        help="seconds: DEGRADED when the oldest file waiting for upload is older than this"),
    Key("reconnect_min", "feed", float, 0.5, _positive,
        help="seconds: first reconnect back-off (doubles, jittered, up to reconnect_max)"),
    Key("reconnect_max", "feed", float, 30.0, _positive, help="seconds: the longest reconnect back-off"),
    Key("reconnect_stable_after", "feed", float, 60.0, _positive,
        help="seconds a connection must last for the back-off to start again from reconnect_min"),
    Key("stale_timeout", "feed", float, 60.0, _positive,
        help="a connection with no frame (data, pong, ping) for this long is dead"),
    Key("silence_factor", "feed", float, 10.0, _positive,
        help="a periodic stream (mark price, funding, Bybit tickers) silent for this many of its "
             "periods is reported; event-driven streams (trades, BBO, OKX open interest) are not "
             "judged per stream: a quiet market is not a fault"),
    Key("silence_floor", "feed", float, 30.0, _positive,
        help="seconds: the shortest silence of a periodic stream that is reported"),
    Key("subscribe_timeout", "feed", float, 10.0, _positive,
        help="seconds to wait for a subscription's acknowledgement (or data) before sending it again"),
    Key("subscribe_retries", "feed", int, 2, _min(0),
        help="times an unacknowledged subscription is sent again before it is reported as rejected"),
    Key("max_streams_per_connection", "feed", int, 200, _positive,
        help="streams per WebSocket connection (the exchanges' own limits apply below it)"),
    Key("connection_max_age", "feed", float, 0.0,
        help="seconds before a connection is rotated; 0 = the exchange's own rule"),
    Key("keepalive_interval", "feed", float, 0.0,
        help="seconds between client keepalive pings; 0 = the exchange's own rule"),
    Key("gap_time_factor", "gaps", float, 10.0, _positive,
        help="a periodic stream's rows further apart than this many periods are a time gap"),
    Key("gap_time_floor", "gaps", float, 60.0, _positive,
        help="seconds: the shortest time gap reported"),
    Key("rest_budget_per_min", "gaps", float, 600.0, _positive,
        help="REST alignment budget per exchange, in the exchange's units (Binance weight, else requests)"),
    Key("alignment_max_wait", "gaps", float, 10.0, _positive,
        help="seconds an alignment may wait for REST budget or a back-off before it is skipped"),
    Key("alignment_timeout", "gaps", float, 30.0, _positive,
        help="seconds after a reconnect a trade stream's disconnect gap waits for its first trade"),
    Key("clock_check_interval", "gaps", float, 300.0, _positive,
        help="seconds between server-time measurements per exchange (also after each reconnect)"),
]
for _ex, _ws, _rest in (("binance", "wss://fstream.binance.com", "https://fapi.binance.com"),
                        ("bybit", "wss://stream.bybit.com", "https://api.bybit.com"),
                        ("okx", "wss://ws.okx.com", "https://www.okx.com")):
    KEYS.append(Key(f"{_ex}_ws_url", _ex, str, _ws, _url("ws", "wss"),
                    help=f"{_ex} WebSocket base URL (paths are added by the exchange module)"))
    KEYS.append(Key(f"{_ex}_rest_url", _ex, str, _rest, _url("http", "https"),
                    help=f"{_ex} REST base URL (discovery and post-reconnect alignment)"))
KEYS_BY_NAME = {k.name: k for k in KEYS}
ENV_PREFIX = "QL_"          # QL_DATA_DIR works like DATA_DIR; an unknown QL_ name is an error


def _did_you_mean(name: str) -> str:
    import difflib
    found = difflib.get_close_matches(name.lower(), list(KEYS_BY_NAME), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


class Settings:
    """Typed, validated settings; attribute per key (settings.data_dir, settings.symbols...)."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]):
        self._values = values
        self._sources = sources

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes) -> "Settings":
        values = dict(self._values)
        for k, v in changes.items():
            if k not in KEYS_BY_NAME:
                raise KeyError(k)
            values[k] = v
        return Settings(values, dict(self._sources, **{k: "override" for k in changes}))

    def public(self) -> dict[str, Any]:
        """All settings for logs and the status API, secrets masked."""
        out = {k.name: ("***" if k.secret and self._values[k.name] else self._values[k.name]) for k in KEYS}
        out["shard"] = str(out["shard"])
        return out

    def ws_url(self, exchange: str) -> str:
        return self._values[f"{exchange}_ws_url"]

    def rest_url(self, exchange: str) -> str:
        return self._values[f"{exchange}_rest_url"]


def _setting_of(env_name: str) -> str | None:
    """The setting an environment name sets (DATA_DIR or QL_DATA_DIR -> data_dir), or None."""
    name = env_name.removeprefix(ENV_PREFIX).lower()
    return name if name in KEYS_BY_NAME and env_name.isupper() else None


def _read_dotenv(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    from dotenv import dotenv_values
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED")


def _export_aws(dotenv: dict[str, str]) -> None:
    """AWS credentials are not settings: boto3 reads them from the process environment, so the
    standard AWS variables found in .env are exported (a real environment variable still wins)."""
    for name in _AWS_ENV:
        if name in dotenv and name not in os.environ:
            os.environ[name] = dotenv[name]


def load(config_file: str | None = None, flags: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None, dotenv_path: str = ".env") -> Settings:
    """Merge the layers and validate; raises SettingsError naming the first bad key."""
    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    path = config_file or "settings.ini"
    if config_file and not os.path.exists(config_file):
        raise SettingsError("config", f"file not found: {config_file}")
    if os.path.exists(path):
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
        try:
            parser.read(path)
        except configparser.Error as e:
            raise SettingsError("config", f"{path}: {e}") from None
        for section in parser.sections():
            for name, value in parser.items(section):
                if name not in KEYS_BY_NAME:
                    raise SettingsError(name, f"unknown key in [{section}] of {path}{_did_you_mean(name)}")
                if KEYS_BY_NAME[name].section != section:
                    raise SettingsError(name, f"belongs in [{KEYS_BY_NAME[name].section}], found in [{section}]")
                raw[name] = value
                sources[name] = path
    dotenv = _read_dotenv(dotenv_path)
    for name in dotenv:           # a file of ours: every line must mean something
        if name not in _AWS_ENV and _setting_of(name) is None:
            bare = name.removeprefix(ENV_PREFIX)
            hint = (f" (environment names are upper case: {name.upper()})" if bare.lower() in KEYS_BY_NAME
                    else _did_you_mean(bare))
            raise SettingsError(name, f"unknown key in {dotenv_path}{hint}")
    if environ is None:
        _export_aws(dotenv)
    env = dict(dotenv)
    env.update(os.environ if environ is None else environ)
    for name in env:              # the shared environment: only our own prefix is checked
        if name.startswith(ENV_PREFIX) and _setting_of(name) is None:
            raise SettingsError(name, f"unknown setting in the environment"
                                      f"{_did_you_mean(name[len(ENV_PREFIX):])}")
    for k in KEYS:
        for name in (k.name.upper(), ENV_PREFIX + k.name.upper()):    # QL_ wins over the bare name
            if name in env:
                raw[k.name] = env[name]
                sources[k.name] = "environment"
    for name, value in (flags or {}).items():
        if value is not None:
            raw[name] = value
            sources[name] = "flag"
    values: dict[str, Any] = {}
    for k in KEYS:
        if k.name in raw:
            value = raw[k.name]
            try:
                value = k.kind(value) if isinstance(value, str) else value
                if k.check:
                    k.check(value)
            except (ValueError, TypeError) as e:
                raise SettingsError(k.name, f"{raw[k.name]!r}: {e}") from None
        else:
            value = list(k.default) if isinstance(k.default, list) else k.default
        values[k.name] = value
    if not values["instance_id"]:
        values["instance_id"] = socket.gethostname()
    if not re.match(r"^[A-Za-z0-9_.-]+$", values["instance_id"]):
        raise SettingsError("instance_id", "only letters, digits, '_', '.', '-' are allowed")
    if values["storage_backend"] == "s3" and not values["s3_bucket"]:
        raise SettingsError("s3_bucket", "required when storage_backend = s3")
    if values["s3_endpoint"]:
        try:
            _url("http", "https")(values["s3_endpoint"])
        except ValueError as e:
            raise SettingsError("s3_endpoint", str(e)) from None
    if values["upload_retry_max"] < values["upload_retry_min"]:
        raise SettingsError("upload_retry_max", "must be >= upload_retry_min")
    if values["reconnect_max"] < values["reconnect_min"]:
        raise SettingsError("reconnect_max", "must be >= reconnect_min")
    if values["rotate_interval"] < values["flush_interval"]:
        raise SettingsError("rotate_interval", "must be >= flush_interval")
    return Settings(values, sources)


def _shown_default(k: Key) -> str:
    if k.name == "instance_id":
        return "host name"
    if isinstance(k.default, list):
        return ",".join(k.default)
    if isinstance(k.default, sharding.Shard):
        return str(k.default)
    if isinstance(k.default, float) and k.default.is_integer():
        return str(int(k.default))
    return str(k.default) if k.default != "" else "-"


def markdown_table() -> str:
    """The README's settings table, from KEYS (tests/test_readme.py keeps the README equal to it)."""
    lines = ["| key | section | default | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        lines.append(f"| `{k.name}` | {k.section} | `{_shown_default(k)}` | {k.help.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":       # python -m app.settings: print the README's settings table
    print(markdown_table(), end="")
