"""Command-line entry points; bin/ scripts only call these."""
from __future__ import annotations

import argparse
import ctypes
import sys

from app import __version__, logs, settings as settings_mod
from app.errors import SettingsError
from app.probe import KINDS as PROBE_KINDS, PROBE_SYMBOLS


def tune_malloc() -> None:
    """Fixed glibc malloc thresholds (call before threads start; no-op elsewhere than glibc).

    Arrow's buffers (system allocator: app/__init__.py) are often megabytes and short-lived, the
    finalizer's row groups ~16 MB. After each such free glibc raises its mmap threshold (up to
    32 MB), so later big buffers come from heap arenas whose freed pages stay resident: RSS
    crept after every Parquet rotation (60k frames/s: 186-263 MB over 10 minutes, budget 190).
    Fixed: buffers of 1 MB and more are mmapped (returned on free), the heap is trimmed above
    8 MB free, two arenas. Measured (bench/rss.py, 60k frames/s, 4 min): 153-166 MB, rotation
    peaks to 200. A 256 KiB threshold held RSS as well but doubled the writer's system time
    (page faults), 4 MB let it creep (185-220 MB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 8 << 20)
    libc.mallopt(m_arena_max, 2)


def build_parser() -> argparse.ArgumentParser:
    """bin/collector's command line (tests/test_kubernetes.py parses the manifests' args with it)."""
    p = argparse.ArgumentParser(prog="collector", description="Record exchange WebSocket data as RAW Parquet.")
    p.add_argument("--symbols", help="comma separated; ALL = every USDT/USDC linear perpetual")
    p.add_argument("--exchanges", help="comma separated: binance,bybit,okx")
    p.add_argument("--datasets", help="comma separated: bbo,trades,mark_price,funding,open_interest")
    p.add_argument("--config", help="settings file (default: settings.ini in the working directory)")
    p.add_argument("--data-dir", dest="data_dir", help="local root / spool directory")
    p.add_argument("--status-port", dest="status_port", help="status API port")
    p.add_argument("--instance-id", dest="instance_id", help="names this instance's files")
    p.add_argument("--shard", help="i/N: record shard i of N of each exchange's symbols (default 0/1: all)")
    p.add_argument("--replica", help="a label (a, b...) when two instances record the same shard")
    p.add_argument("--probe", action="store_true",
                   help="connect to the configured endpoints, subscribe every kind for a few symbols "
                        "(default BTCUSDT,ETHUSDT), write nothing, print what came back; exit 0 if "
                        "every kind parsed rows without errors")
    p.add_argument("--seconds", type=float, default=60.0, help="--probe: how long to listen")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def collector_main(argv: list[str], **parts) -> int:
    """bin/collector. `parts`: replacement parts for the composition root (bench/collector_slow.py
    gives it a slow writer); production passes none."""
    tune_malloc()
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items()
             if k not in ("config", "probe", "seconds") and v is not None}
    if args.probe:
        flags.setdefault("symbols", ",".join(PROBE_SYMBOLS))
        flags["datasets"] = ",".join(PROBE_KINDS)
    logs.setup()
    try:
        settings = settings_mod.load(args.config, flags)
    except SettingsError as e:
        print(f"collector: {e}", file=sys.stderr)
        logs.get().error("settings_invalid", extra={"setting": e.key, "error": str(e)})
        return 2
    if args.probe:
        from app import probe
        return probe.run(settings, args.seconds)
    from app.collector import run
    try:
        return run(settings, **parts)
    except SettingsError as e:
        print(f"collector: {e}", file=sys.stderr)
        logs.get().error("startup_failed", extra={"setting": e.key, "error": str(e)})
        return 2


def sanity_main(argv: list[str]) -> int:
    """bin/check_raw_sanity: verify stored RAW data (see app/sanity.py)."""
    from app.sanity import main
    return main(argv)
