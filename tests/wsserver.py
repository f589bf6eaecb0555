"""A small WebSocket server on loopback for tests that need a server to misbehave in ways the
simulator does not offer (stop answering pings while the socket stays open, refuse every
handshake, send a burst of frames exactly as given). Real sockets, a thread per connection, the
RFC 6455 handshake and framing written out here so a test controls every byte.

    srv = WsServer(handler).start()     # handler(conn: ServerConn) runs per accepted socket
    srv.url                             # ws://127.0.0.1:<port>
    srv.stop()

    WsServer(handler, tls=self_signed_context(tmp_path))   # wss://127.0.0.1:<port>
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True, rsv: int = 0,
          mask: bytes | None = None, length: str = "minimal") -> bytes:
    """One frame as a server (or, with mask, a client) sends it. length: minimal, 16 or 64
    (the 2-byte or 8-byte extended length even where a shorter one would do)."""
    n = len(payload)
    out = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    m = 0x80 if mask else 0
    if length == "64" or (length == "minimal" and n >= 65536):
        out += bytes([m | 127]) + struct.pack("!Q", n)
    elif length == "16" or (length == "minimal" and n >= 126):
        out += bytes([m | 126]) + struct.pack("!H", n)
    else:
        out += bytes([m | n])
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        out += mask
    return out + payload


class ServerConn:
    """One accepted socket."""

    def __init__(self, server: "WsServer", sock: socket.socket, index: int):
        self.server = server
        self.sock = sock
        self.index = index                  # 0 for the first connection the server accepted
        self.accepted_at = time.monotonic()
        self.path = ""
        self._buf = b""
        self.done = threading.Event()        # set when the server's handler has ended

    def read_request(self) -> bytes:
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("client closed during the handshake")
            req += chunk
        self.path = req.split(b" ", 2)[1].decode()
        return req

    def handshake(self) -> str:
        """Read the upgrade request, answer 101; -> the request path."""
        req = self.read_request()
        key = [line.split(b":", 1)[1].strip() for line in req.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        return self.path

    def refuse(self, status: bytes = b"503 Service Unavailable") -> None:
        """Read the upgrade request, answer an HTTP error, close."""
        self.read_request()
        self.sock.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.close()

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        self.sock.sendall(frame(payload, opcode))

    def _need(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The client's next frame (opcode, unmasked payload); None at end of stream."""
        try:
            if not self._need(2):
                return None
            b0, b1 = self._buf[0], self._buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if not self._need(4):
                    return None
                n, pos = struct.unpack("!H", self._buf[2:4])[0], 4
            elif n == 127:
                if not self._need(10):
                    return None
                n, pos = struct.unpack("!Q", self._buf[2:10])[0], 10
            mask = b""
            if b1 & 0x80:
                if not self._need(pos + 4):
                    return None
                mask, pos = self._buf[pos:pos + 4], pos + 4
            if not self._need(pos + n):
                return None
            data = self._buf[pos:pos + n]
            self._buf = self._buf[pos + n:]
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            return b0 & 0x0F, data
        except OSError:
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def self_signed_context(directory) -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate for 127.0.0.1 (clients
    connect with sslopt={"cert_reqs": ssl.CERT_NONE})."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(str(directory), "server.crt"), os.path.join(str(directory), "server.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


class WsServer:
    def __init__(self, handler, tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self.url = f"{'wss' if tls else 'ws'}://127.0.0.1:{self.port}"
        self.conns: list[ServerConn] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="ws-test-server", daemon=True)

    def start(self) -> "WsServer":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                conn = ServerConn(self, sock, len(self.conns))
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: ServerConn) -> None:
        try:
            if self.tls is not None:            # the TLS handshake in the connection's thread
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
            self.handler(conn)
        except (OSError, ConnectionError):      # ssl.SSLError is an OSError
            pass                                   # the client went away: its business
        except BaseException as e:  # noqa: BLE001 - a handler's bug must show in the test
            self.errors.append(e)
        finally:
            conn.close()
            conn.done.set()

    def accepted(self) -> list[ServerConn]:
        with self._lock:
            return list(self.conns)

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for c in self.accepted():
            c.close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def binance_manager(tmp_path, url: str):
    """A feed.Manager with one real Binance connection (btcusdt@bookTicker on /public) to `url`,
    started; no writer: the test reads the queue itself. -> (manager, queue)."""
    from app import feed, settings as settings_mod
    from app.exchanges import ConnectionPlan, Stream, create
    from app.handoff import FrameQueue
    from app.state import State
    s = settings_mod.load(None, environ={}, dotenv_path=str(tmp_path / ".env")).replace(
        exchanges=["binance"], binance_ws_url=url, data_dir=str(tmp_path))
    q = FrameQueue()
    m = feed.Manager(s, {"binance": create("binance")}, q, State(exchanges=["binance"], queue=q), {})
    m.start([ConnectionPlan("binance", "/public", [
        Stream("btcusdt@bookTicker", "BTCUSDT", "bookTicker", ("bbo",), "/public")])])
    return m, q
