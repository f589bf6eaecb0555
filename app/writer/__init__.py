"""The writer: queue -> adapters (in chunks) -> Arrow -> spool -> Parquet -> storage.

One room per concern, in the order data goes through them; each module's docstring says why it
is a room of its own:

- batching.py  `Writer`, the writer thread: takes frames from the queue, chunks them, decides
               when to parse, flush and rotate; `Pacer`, its GIL switch interval while behind.
- encoding.py  `Encoder`: a chunk of frames -> one Arrow table per dataset, through the
               adapters and app/schema.py; `Spools`/`Spool`: the tables -> spool files (Arrow
               IPC), fsynced by the `Syncer` thread.
- commit.py    spool -> Parquet under a temporary name, fsync, rename (a visible file is always
               whole); `recover` (a killed run's spool, at start); `write_reference`.
- upload.py    `Finalizer`, the thread that commits closed spools and hands each file to
               storage (`storage.publish`).

Dependencies run one way: batching -> encoding, upload -> commit -> encoding. The rest of the
collector uses what is imported here. Tests that change a constant patch the room that reads
it (e.g. `app.writer.batching.PARSE_INTERVAL_S`): the names below are copies.
"""
from app.writer.batching import BEHIND_S, BEHIND_SWITCH_S, CAUGHT_UP_S, PARSE_INTERVAL_S, Pacer, Writer
from app.writer.commit import (ROW_GROUP_BYTES, commit_spool, parquet_name, recover, spool_to_parquet,
                               write_parquet_atomic, write_reference)
from app.writer.encoding import (BATCH_MIN_FRAMES, SPOOL_SUFFIX, Encoder, Spool, Spools, Syncer,
                                 parse_spool_name, split_by_date)
from app.writer.upload import Finalizer

__all__ = ["BATCH_MIN_FRAMES", "BEHIND_S", "BEHIND_SWITCH_S", "CAUGHT_UP_S", "PARSE_INTERVAL_S",
           "ROW_GROUP_BYTES", "SPOOL_SUFFIX", "Encoder", "Finalizer", "Pacer", "Spool", "Spools",
           "Syncer", "Writer", "commit_spool", "parquet_name", "parse_spool_name", "recover",
           "spool_to_parquet", "split_by_date", "write_parquet_atomic", "write_reference"]
