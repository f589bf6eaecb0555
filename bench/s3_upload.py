#!/usr/bin/env python3
"""Upload throughput of S3Storage to moto's S3 server on loopback.

    python bench/s3_upload.py [--small 200] [--small-mb 1] [--large 3] [--large-mb 50]
                              [--concurrency 4] [--verify etag|size]

Publishes the files the way the writer does (publish(local_path, key)) and times each batch
from the first publish until the backlog is empty (upload + HEAD + integrity check + local
delete). Loopback moto is CPU-bound Python (it parses and stores every byte in this same
process), so the figures are a floor for the uploader's overhead, not a network estimate.
Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app import settings as settings_mod  # noqa: E402
from app.state import State  # noqa: E402
from app.storage_s3 import S3Storage  # noqa: E402
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server  # noqa: E402

MB = 1024 * 1024


def batch(storage, state, name: str, count: int, size: int) -> dict:
    paths = []
    block = os.urandom(size)
    for i in range(count):
        rel = f"raw/v1/bbo/binance/date=2024-05-01/i-bench-{name}-{i:06d}.parquet"
        path = os.path.join(storage.data_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(block[:8] + i.to_bytes(8, "little") + block[16:])   # distinct contents
        paths.append((path, rel))
    t0 = time.perf_counter()
    for path, rel in paths:
        storage.publish(path, rel)
    while state.upload_backlog["files"]:
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    total = count * size
    return {"batch": name, "files": count, "file_mb": size / MB, "seconds": round(dt, 3),
            "mb_per_s": round(total / MB / dt, 1), "files_per_s": round(count / dt, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--small-mb", type=float, default=1)
    p.add_argument("--large", type=int, default=3)
    p.add_argument("--large-mb", type=float, default=50)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--verify", default="etag", choices=("etag", "size"))
    a = p.parse_args(argv)
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                      AWS_EC2_METADATA_DISABLED="true")
    srv = S3Server()
    srv.start()
    results = []
    try:
        bucket = srv.new_bucket("bench")
        with tempfile.TemporaryDirectory() as d:
            s = settings_mod.load(None, environ={}, dotenv_path=os.path.join(d, ".env")).replace(
                data_dir=d, storage_backend="s3", s3_endpoint=srv.endpoint, s3_bucket=bucket,
                s3_region=REGION, upload_concurrency=a.concurrency, s3_verify=a.verify)
            state = State(exchanges=["binance"])
            st = S3Storage(s, state)
            st.check()
            st.start()
            results.append(batch(st, state, "small", a.small, int(a.small_mb * MB)))
            results.append(batch(st, state, "large", a.large, int(a.large_mb * MB)))
            st.stop(timeout=60)
            assert len(srv.objects(bucket)) == a.small + a.large
    finally:
        srv.stop()
    for r in results:
        print(f"{r['batch']:>5}: {r['files']} x {r['file_mb']:g} MB in {r['seconds']} s = "
              f"{r['mb_per_s']} MB/s ({r['files_per_s']} files/s)")
    print(json.dumps({"concurrency": a.concurrency, "verify": a.verify, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
