"""WebSocket frames from a server, decoded without I/O (RFC 6455, client side).

Why it exists: websocket-client reads every frame through Python objects and two or three
recv() calls (~4 us a frame, a socket thread's whole budget), and doing better inside it meant
reaching into private internals that any release may change. This module owns the decoding
instead: bytes in, messages and control frames out, no sockets, threads or clocks, in the style
of h11 and websockets' sans-I/O layer, so it is tested on its own, byte by byte, and the socket
code (app/feed.py) stays a plain loop.

    dec = Decoder(max_size=16 << 20)
    dec.feed(data)                           # whatever the socket returned
    while (event := dec.deliver(on_text, on_binary)) is not None:
        ...                                  # Ping / Pong / Close, in stream order
    # None: every complete frame is used up; feed more bytes

`deliver` hands each complete text or binary message (fragments reassembled) to a callback as
bytes and stops at each control frame, which it returns. The common frame (a whole unmasked
text or binary message: first byte 0x81 or 0x82) takes a tight loop over one bytes buffer: a
slice and a call per frame. Everything else (fragments, control frames, errors) takes the
general path, one frame at a time. `events()` is the same as a list of event objects, for tests
and tools.

Errors raise `ProtocolError` with the close code to send (1002 protocol error: RSV bits, a
masked frame, a reserved opcode, a control frame fragmented or over 125 bytes (its length must
fit the 7-bit field), a continuation without a start, a new data frame inside a fragmented
message, a bad close frame; 1009: a message over max_size) as soon as the frame's header shows
them, before its payload arrives; messages before the bad frame were delivered; the decoder
then refuses to go on. Lengths need not be minimally encoded (RFC 6455 asks senders only). UTF-8 is not validated (no 1007): payloads stay bytes, and Arrow
validates text per batch in the writer. A callback that raises leaves the decoder consistent
(its frame counts as delivered); `deliver` again to go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Decoder", "Message", "Ping", "Pong", "Close", "ProtocolError",
           "PROTOCOL_ERROR", "MESSAGE_TOO_BIG", "NO_STATUS", "DEFAULT_MAX_SIZE"]

PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009
NO_STATUS = 1005                  # a close frame without a code (never sent on the wire)
DEFAULT_MAX_SIZE = 16 << 20       # bytes in one message, fragments included

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True, slots=True)
class Message:
    data: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int = NO_STATUS         # NO_STATUS: the frame had no body
    reason: bytes = b""


class ProtocolError(Exception):
    """The server broke the protocol; `code` is the close code to send before closing."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4, IANA registry): not 1004-1006, 1015, < 1000."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Decoder:
    """Server-to-client frames -> messages and control events. One per connection."""

    __slots__ = ("max_size", "_buf", "_pos", "_chunks", "_queued", "_need", "_fast",
                 "_frag_kind", "_frags", "_frag_size", "_done", "_error")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE):
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self.max_size = max_size
        self._buf = b""            # bytes being decoded; frames start at _pos
        self._pos = 0
        self._chunks: list[bytes] = []    # fed, not yet joined to _buf (a frame is still short)
        self._queued = 0           # bytes in _chunks
        self._need = 2             # bytes from _pos the next step needs
        # the fast loop skips the size check of 7-bit lengths, so it runs only if they all fit
        self._fast = max_size >= 125
        self._frag_kind = 0        # opcode of the fragmented message being received, 0: none
        self._frags: list[bytes] = []
        self._frag_size = 0
        self._done = False       # a close frame was decoded: nothing after it counts
        self._error: ProtocolError | None = None

    # ---- input -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Append bytes received from the server. While the next frame is still incomplete,
        chunks are only queued, so a large message costs one join, not one per read."""
        if self._done or self._error is not None or not data:
            return
        buf, pos = self._buf, self._pos
        left = len(buf) - pos
        if self._chunks or left + len(data) < self._need:
            self._chunks.append(data)
            self._queued += len(data)
            if left + self._queued < self._need:
                return
            parts, self._chunks, self._queued = self._chunks, [], 0
            if left:
                parts.insert(0, memoryview(buf)[pos:])
            self._buf = b"".join(parts)
        else:
            self._buf = buf[pos:] + data if left else data
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet decoded."""
        return len(self._buf) - self._pos + self._queued

    @property
    def closed(self) -> bool:
        """True once a close frame was decoded."""
        return self._done

    # ---- output ------------------------------------------------------------------------------
    def deliver(self, on_text: Callable[[bytes], object],
                on_binary: Callable[[bytes], object] | None = None) -> Ping | Pong | Close | None:
        """Call on_text(payload) / on_binary(payload) (default on_text) for each complete
        message, in order, up to the next control frame, and return that (Ping, Pong, Close);
        None when the buffered bytes hold no further complete frame. Raises ProtocolError."""
        if self._error is not None:
            raise self._error
        if self._done:
            return None
        if on_binary is None:
            on_binary = on_text
        buf, pos = self._buf, self._pos
        size = len(buf)
        max_size = self.max_size
        try:
            while True:
                if self._fast and not self._frag_kind:
                    # the hot path: whole unmasked text/binary frames, straight from the buffer
                    while size - pos >= 2:
                        head = buf[pos]
                        if head == 0x81:
                            cb = on_text
                        elif head == 0x82:
                            cb = on_binary
                        else:
                            break
                        n = buf[pos + 1]
                        if n < 126:
                            start = pos + 2
                        elif n == 126:
                            start = pos + 4
                            if start > size:
                                break
                            n = buf[pos + 2] << 8 | buf[pos + 3]
                            if n > max_size:
                                break
                        elif n == 127:
                            start = pos + 10
                            if start > size:
                                break
                            n = int.from_bytes(buf[pos + 2:start], "big")
                            if n > max_size:
                                break
                        else:               # the mask bit: the general path refuses it
                            break
                        end = start + n
                        if end > size:
                            break
                        pos = end
                        cb(buf[start:end])
                # the general path: one frame of any kind, or the bytes it still needs
                event = self._step(buf, pos, size, on_text, on_binary)
                if event is None:           # incomplete: self._need is set
                    return None
                pos = self._pos
                if event is not True:       # a control frame
                    return event
        finally:
            if self._pos < pos:             # after the fast loop (also when a callback raised)
                self._pos = pos

    def events(self) -> list:
        """Every complete event now buffered: Message, Ping, Pong, Close, in order. A
        ProtocolError is raised after the events before it are returned, on the next call."""
        out: list = []
        text = lambda data: out.append(Message(data, False))      # noqa: E731
        binary = lambda data: out.append(Message(data, True))     # noqa: E731
        while True:
            try:
                event = self.deliver(text, binary)
            except ProtocolError:
                if out:
                    return out
                raise
            if event is None:
                return out
            out.append(event)

    # ---- the general path --------------------------------------------------------------------
    def _fail(self, code: int, reason: str) -> ProtocolError:
        self._error = ProtocolError(code, reason)
        self._chunks = []
        self._frags = []
        return self._error

    def _step(self, buf: bytes, pos: int, size: int, on_text, on_binary):
        """Decode the frame at pos. -> None (incomplete; _pos = pos, _need set), True (a data
        frame, delivered or kept as a fragment), or the control event; _pos is past the frame."""
        self._pos = pos
        have = size - pos
        if have < 2:
            self._need = 2
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if b0 & 0x70:
            raise self._fail(PROTOCOL_ERROR, "RSV bits set without a negotiated extension")
        if b1 & 0x80:
            raise self._fail(PROTOCOL_ERROR, "masked frame from the server")
        n = b1 & 0x7F
        if opcode >= 0x8:
            if opcode not in (_CLOSE, _PING, _PONG):
                raise self._fail(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if not fin:
                raise self._fail(PROTOCOL_ERROR, "fragmented control frame")
            if n > 125:
                raise self._fail(PROTOCOL_ERROR, "control frame payload over 125 bytes")
        elif opcode not in (_CONT, _TEXT, _BINARY):
            raise self._fail(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        elif opcode == _CONT and not self._frag_kind:
            raise self._fail(PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif opcode != _CONT and self._frag_kind:
            raise self._fail(PROTOCOL_ERROR, "new data frame inside a fragmented message")
        start = pos + 2
        if n == 126:
            start = pos + 4
            if start > size:
                self._need = 4
                return None
            n = buf[pos + 2] << 8 | buf[pos + 3]
        elif n == 127:
            start = pos + 10
            if start > size:
                self._need = 10
                return None
            n = int.from_bytes(buf[pos + 2:start], "big")
            if n >> 63:
                raise self._fail(PROTOCOL_ERROR, "64-bit payload length with the high bit set")
        if opcode < 0x8 and self._frag_size + n > self.max_size:
            raise self._fail(MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")
        end = start + n
        if end > size:
            self._need = end - pos
            return None
        payload = buf[start:end]
        self._pos = end
        self._need = 2
        if opcode == _PING:
            return Ping(payload)
        if opcode == _PONG:
            return Pong(payload)
        if opcode == _CLOSE:
            return self._close(payload)
        if opcode != _CONT:
            if fin:
                (on_text if opcode == _TEXT else on_binary)(payload)
            else:
                self._frag_kind, self._frags, self._frag_size = opcode, [payload], n
            return True
        self._frags.append(payload)
        self._frag_size += n
        if fin:
            kind, data = self._frag_kind, b"".join(self._frags)
            self._frag_kind, self._frags, self._frag_size = 0, [], 0
            (on_text if kind == _TEXT else on_binary)(data)
        return True

    def _close(self, payload: bytes) -> Close:
        if not payload:
            event = Close()
        elif len(payload) == 1:
            raise self._fail(PROTOCOL_ERROR, "close frame with a 1-byte body")
        else:
            code = payload[0] << 8 | payload[1]
            if not _valid_close_code(code):
                raise self._fail(PROTOCOL_ERROR, f"invalid close code {code}")
            event = Close(code, payload[2:])
        self._done = True
        self._buf, self._pos, self._chunks, self._queued = b"", 0, [], 0
        return event
