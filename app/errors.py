"""The exceptions every room shares.

One kind stops the start: a setting that cannot work as given (a bad value, a credentials
format, an unwritable data_dir, a port in use). It names the setting so the one line a user
reads says what to fix; bin/collector exits 2 on it. Everything else the collector meets at
run time (an exchange or a store that does not answer) is reported and retried, never fatal.
"""
from __future__ import annotations


class SettingsError(ValueError):
    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid setting {key}: {reason}")
        self.key = key
