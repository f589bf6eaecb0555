"""A TCP proxy on loopback that can add latency: `make soak`'s "S3 slow" fault.

Why a proxy and not a moto setting: the collector must see a slow store exactly as it would
in production (slow TCP round trips under boto3, same timeouts and retries), without any change
to the collector or to moto. The collector's S3_ENDPOINT points at the proxy for the whole soak;
`delay = 0` forwards at once, `delay > 0` holds every burst of bytes (a request, a response
head, a body chunk after a pause) that long before forwarding it, in each direction.

When the upstream refuses (moto stopped for the S3-outage fault) the client's connection is
closed at once, as a dead endpoint would be; upstream connections cut by moto's stop() are cut
on the client side too.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 256 * 1024
BURST_GAP_S = 0.05          # bytes arriving within this of the previous ones belong to one burst


class SlowProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.delay = 0.0
        self.connections = 0
        self.refused = 0
        self._lsock = socket.create_server((host, port))
        self.host, self.port = self._lsock.getsockname()[:2]
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="slowproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "SlowProxy":
        self._thread.start()
        return self

    def set_delay(self, seconds: float) -> None:
        self.delay = max(0.0, float(seconds))

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._lsock.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            _close(s)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _addr = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self.refused += 1
            _close(client)
            return
        up.settimeout(None)
        self.connections += 1
        with self._lock:
            self._socks.update((client, up))
        t = threading.Thread(target=self._pump, args=(up, client), daemon=True)
        t.start()
        self._pump(client, up)
        t.join()
        with self._lock:
            self._socks.discard(client)
            self._socks.discard(up)
        _close(client)
        _close(up)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        last = 0.0
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                if self.delay and now - last > BURST_GAP_S:
                    time.sleep(self.delay)
                last = time.monotonic()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # one side ended: end both, so neither the client nor the store waits on a dead peer
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.close()
