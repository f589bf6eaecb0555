"""A real S3-protocol server on loopback for tests and benches: moto's ThreadedMotoServer.

Why a subclass: tests need (1) an ephemeral port that stays the same across stop()/start(),
so an outage can be simulated and the client's endpoint stays valid; (2) stop() to be a real
outage: moto's own stop() only ends the accept loop, the listening socket stays open (clients
hang instead of being refused) and keep-alive connections go on being served, so here the
socket is closed and every open connection is cut; (3) a server-side log of requests, so a
test can count PUTs (a retried upload shows as a second PUT of the same key).
Objects survive stop()/start(): moto keeps them in this process.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections import Counter

import boto3
from botocore.config import Config
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                           create_backend_app)
from werkzeug.serving import make_server

ACCESS_KEY = "AKIDTESTQUANTLAB0001"
SECRET_KEY = "test-secret-not-a-real-one"
REGION = "us-east-1"


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args, **kwargs):  # noqa: D401 - keep test output readable
        pass


class S3Server(ThreadedMotoServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port, verbose=False)
        self._app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.requests: list[tuple[str, str, str]] = []     # (method, path, query)

    # ---- server --------------------------------------------------------------------------
    def _wsgi(self, environ, start_response):
        with self._lock:
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                  environ.get("QUERY_STRING", "")))
        return self._app(environ, start_response)

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self._wsgi, True,
                                   request_handler=_QuietHandler)
        self._port = self._server.port          # pin the ephemeral port for restarts
        get_request = self._server.get_request

        def tracked():
            sock, addr = get_request()
            with self._lock:
                self._conns.add(sock)
            return sock, addr
        self._server.get_request = tracked
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        """An outage: refuse new connections and cut the open ones."""
        if self._server is None:
            return
        self._server_ready_event.clear()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join()
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://{self._ip_address}:{self._port}"

    # ---- helpers ---------------------------------------------------------------------------
    def client(self, **kw):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=kw.pop("key", ACCESS_KEY),
                            aws_secret_access_key=kw.pop("secret", SECRET_KEY),
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}), **kw)

    def new_bucket(self, prefix: str = "ql") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size of every object (all pages)."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def request_counts(self, bucket: str, requests: list | None = None) -> Counter:
        """Per object key: how many single PUTs and completed multipart uploads it received
        (among `requests`, a slice of self.requests; default all)."""
        c: Counter = Counter()
        start = f"/{bucket}/"
        if requests is None:
            with self._lock:
                requests = list(self.requests)
        for method, path, query in requests:
            if not path.startswith(start):
                continue
            key = path[len(start):]
            if method == "PUT" and "uploadId=" not in query and "partNumber=" not in query:
                c[("put", key)] += 1
            elif method == "POST" and "uploadId=" in query:
                c[("complete", key)] += 1
            elif method == "POST" and query.startswith("uploads"):
                c[("create", key)] += 1
            elif method == "PUT" and "partNumber=" in query:
                c[("part", key)] += 1
        return c

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Environment for bin/collector pointing at this server."""
        return {"STORAGE_BACKEND": "s3", "S3_ENDPOINT": self.endpoint, "S3_BUCKET": bucket,
                "S3_PREFIX": prefix, "S3_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def running_s3():
    """`with running_s3() as s3:` a started server, stopped on exit."""
    srv = S3Server()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
