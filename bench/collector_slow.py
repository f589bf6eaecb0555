#!/usr/bin/env python3
"""bin/collector with a slow writer: the soak's and the tests' fault injection, kept out of
production code (the collector itself has no setting for it).

    python bench/collector_slow.py [--writer-stall SECONDS] [--writer-stall-file PATH]
                                   [any bin/collector option]

The collector is built exactly as bin/collector builds it (app.cli.collector_main: same options,
same settings, same start-up), except that its writer takes frames through a `StallingQueue`:
after every take that found frames, the writer stalls for --writer-stall seconds, or for the
seconds written in --writer-stall-file, re-read every 0.2 s while stalling (lowering the figure or
removing the file ends the stall; while the file is absent or unreadable, --writer-stall applies).
Meanwhile the socket threads keep offering frames to the real queue, which fills and drops
(counted per frame, recv_seq holes) exactly as behind a slow disk. The writer's stop ends a stall
at once, so its final drain is not held up.

Users: bench/soak.py (scenario writer_stall: writes the file to stall a running collector,
removes it to let it recover without a restart), tests/test_state.py and
tests/test_e2e_binance.py (a fixed stall: pressure relief).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app.writer import Writer  # noqa: E402
from app import logs  # noqa: E402

STEP_S = 0.2       # a stall re-reads the file (and looks at the writer's stop) this often


class Stall:
    """How long the writer stalls after a take: `seconds`, or what the file says."""

    def __init__(self, seconds: float = 0.0, path: str = ""):
        self.default = seconds
        self.path = path

    def seconds(self) -> float:
        if not self.path:
            return self.default
        try:
            with open(self.path) as f:
                return max(0.0, float(f.read().strip() or 0))
        except (OSError, ValueError):
            return self.default

    def wait(self, stopping) -> None:
        """Sleep for `seconds()`, ending early once that drops (re-read every STEP_S) or
        `stopping()` is true."""
        end = time.monotonic() + self.seconds()
        while not stopping() and time.monotonic() < end:
            time.sleep(min(STEP_S, max(0.0, end - time.monotonic())))
            end = min(end, time.monotonic() + self.seconds())


class StallingQueue:
    """The writer's view of the collector's FrameQueue (the Writer calls only these two
    methods): each take that found frames is followed by a stall. Everyone else (socket threads,
    state, status) uses the real queue."""

    def __init__(self, q, stall: Stall, stopping):
        self.q = q
        self.stall = stall
        self.stopping = stopping

    def take_all(self):
        batches = self.q.take_all()
        if batches:
            self.stall.wait(self.stopping)
        return batches

    def oldest_ts_recv(self):
        return self.q.oldest_ts_recv()


class SlowWriter(Writer):
    """The collector's Writer, taking frames through a StallingQueue (`stall`: set by main)."""

    stall = Stall()

    def __init__(self, settings, q, *args, **kwargs):
        super().__init__(settings, StallingQueue(q, self.stall, lambda: self.stopping), *args, **kwargs)
        logs.get().info("writer_stall_injected", extra={"seconds": self.stall.default,
                                                        "file": self.stall.path})


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--writer-stall", type=float, default=0.0)
    p.add_argument("--writer-stall-file", default="")
    args, rest = p.parse_known_args(argv)
    SlowWriter.stall = Stall(args.writer_stall, args.writer_stall_file)
    from app.cli import collector_main
    return collector_main(rest, writer_cls=SlowWriter)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
