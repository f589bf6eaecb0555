"""Where finished files go. The writer always writes complete Parquet files under data_dir;
`publish(local_path, key)` then makes them durable in the configured backend.

LocalStorage: data_dir is the root, so a published file is already in place.
S3Storage (app/storage_s3.py) has the same interface: check() at start (raises
app.errors.SettingsError naming the setting), start(), publish() (queues an upload, never
blocks), accepting() (disk budget), pending_keys(), stop(timeout) (drain, leave the rest).
"""
from __future__ import annotations


class LocalStorage:
    backend = "local"

    def __init__(self, settings, state):
        self.root = settings.data_dir
        self.state = state

    def check(self) -> None:
        """Fail fast at start (a bad root is a settings error)."""

    def start(self) -> None:
        pass

    def publish(self, local_path: str, key: str) -> None:
        pass

    def accepting(self) -> bool:
        """Asked by the writer at every flush: False = drop (and count) new data, the spool is
        at its disk budget (S3 backend during a long outage). A local root always accepts."""
        return True

    def pending_keys(self) -> list[str]:
        return []

    def stop(self, timeout: float = 0) -> None:
        pass


def build(settings, state):
    if settings.storage_backend == "s3":
        from app.storage_s3 import S3Storage
        return S3Storage(settings, state)
    return LocalStorage(settings, state)
