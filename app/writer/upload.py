"""Upload hand-off: the finalizer thread, which commits each closed spool to Parquet and hands
the file to storage.

Why a thread of its own: Parquet encoding (zstd, a row group at a time) runs mostly outside the
GIL, but it takes as long as the rotation's data needs. On the writer thread it would stall
parsing meanwhile, while the queue grows; here the writer only puts the closed spools' paths on
`jobs`, so a rotation never stalls parsing.

Why storage is called here and nowhere else during a run: `storage.publish(path, key)` is the
one hand-off from the writer to storage (app/storage.py: nothing for a local root;
app/storage_s3.py: queued for its uploader threads, never blocking on the store). It is called
once per committed file, after the file is whole under its final name. A failure is reported
(`state.writer_error`, the state turns ERROR) and the thread goes on with the next spool; a
spool not yet committed stays on disk for the next start's `recover`.
"""
from __future__ import annotations

import os
import queue
import threading

from app import logs
from app.writer.commit import commit_spool

log = logs.get()


class Finalizer(threading.Thread):
    """Turns closed spool files (paths put on `jobs`) into Parquet and hands them to storage."""

    def __init__(self, data_dir: str, storage, state):
        super().__init__(name="finalizer", daemon=True)
        self.data_dir = data_dir
        self.storage = storage
        self.state = state
        self.jobs: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            path = self.jobs.get()
            if path is None:
                return
            try:
                self.finalize(path)
            except Exception as e:  # noqa: BLE001 - keep the spool; report, carry on
                self.state.writer_error = f"finalize {os.path.basename(path)}: {e!r}"
                log.error("finalize_failed", extra={"spool": path, "error": repr(e)})

    def finalize(self, path: str) -> str | None:
        """One spool -> Parquet -> storage. -> the Parquet file's path, None if none was written."""
        committed = commit_spool(path, self.data_dir, self.state)
        if committed is None:
            return None
        final, rel = committed
        self.storage.publish(final, rel)
        return final

    def stop(self) -> None:
        """Finish the jobs put so far, then end."""
        self.jobs.put(None)
        self.join()
