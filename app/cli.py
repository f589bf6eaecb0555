"""Command-line entry points; bin/ scripts only call these."""
from __future__ import annotations

import argparse
import ctypes
import sys

from app import logs, settings as settings_mod


def tune_malloc() -> None:
    """A fixed glibc mmap threshold (call before threads start; no-op elsewhere than glibc).

    Arrow's buffers (system allocator: app/__init__.py) are often megabytes and short-lived, the
    finalizer's row groups ~16 MB. After each such free glibc raises its mmap threshold (up to
    32 MB), so later big buffers come from heap arenas whose freed pages stay resident: RSS then
    creeps after every Parquet rotation. A fixed threshold keeps big buffers mmapped (returned to
    the system on free) and two arenas bound the rest."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, 256 * 1024)
    libc.mallopt(m_arena_max, 2)


def collector_main(argv: list[str]) -> int:
    tune_malloc()
    p = argparse.ArgumentParser(prog="collector", description="Record exchange WebSocket data as RAW Parquet.")
    p.add_argument("--symbols", help="comma separated; ALL = every USDT/USDC linear perpetual")
    p.add_argument("--exchanges", help="comma separated: binance,bybit,okx")
    p.add_argument("--datasets", help="comma separated: bbo,trades,mark_price,funding,open_interest")
    p.add_argument("--config", help="settings file (default: settings.ini in the working directory)")
    p.add_argument("--data-dir", dest="data_dir", help="local root / spool directory")
    p.add_argument("--status-port", dest="status_port", help="status API port")
    p.add_argument("--instance-id", dest="instance_id", help="names this instance's files")
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    logs.setup()
    try:
        settings = settings_mod.load(args.config, flags)
    except settings_mod.SettingsError as e:
        print(f"collector: {e}", file=sys.stderr)
        logs.get().error("settings_invalid", extra={"setting": e.key, "error": str(e)})
        return 2
    from app.collector import StartupError, run
    try:
        return run(settings)
    except StartupError as e:
        print(f"collector: {e}", file=sys.stderr)
        logs.get().error("startup_failed", extra={"setting": e.key, "error": str(e)})
        return 2


def sanity_main(argv: list[str]) -> int:
    """bin/check_raw_sanity: verify stored RAW data (see app/sanity.py)."""
    from app.sanity import main
    return main(argv)
