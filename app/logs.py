"""JSON logs on stdout, one object per line with `ts`, `level`, `event` (python-json-logger).

`log.info("ws_connect", extra={...})`: the message is the event name; details are fields.
RateLimited keeps a noisy event (drops, bad frames, upload failures) to one line per interval
per key, carrying how many were suppressed, so a storm never floods stdout.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

from pythonjsonlogger.json import JsonFormatter

LOGGER_NAME = "collector"


class _Formatter(JsonFormatter):
    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging API
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def setup(level: str = "INFO", stream=None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(message)s",
                                    rename_fields={"asctime": "ts", "levelname": "level",
                                                   "message": "event"}))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class RateLimited:
    """At most one log line per `interval` seconds per key; suppressed lines are counted."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}
        self._lock = threading.Lock()

    def __call__(self, level: int, event: str, key: object = None, **fields) -> bool:
        key = (event, key)
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        get().log(level, event, extra=dict(fields, suppressed=suppressed))
        return True
