"""app/wsframes.py on its own: bytes in, events out, no sockets.

Why: the decoder is every socket thread's hot path and the only frame parser between the
exchanges and the Parquet files. It must give exactly the messages the server sent whatever
way TCP cuts the stream (inside the 2-, 4- and 10-byte headers too), reassemble fragments
around interleaved control frames, and refuse what RFC 6455 forbids with the close code to send.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app import wsframes
from app.wsframes import Close, Decoder, Message, Ping, Pong, ProtocolError

from tests.wsserver import BINARY, CLOSE, CONT, PING, PONG, TEXT, frame


def header_len(n: int, length: str = "minimal") -> int:
    if length == "64" or (length == "minimal" and n >= 65536):
        return 10
    if length == "16" or (length == "minimal" and n >= 126):
        return 4
    return 2


def decode(pieces, max_size: int = wsframes.DEFAULT_MAX_SIZE) -> list:
    """Feed the pieces one by one; every event, as events() gives them."""
    dec = Decoder(max_size)
    out = []
    for p in pieces:
        dec.feed(p)
        out += dec.events()
    return out


def payload(i: int, n: int) -> bytes:
    return (b"%d:" % i + bytes(range(256)) * (n // 256 + 1))[:n]


SIZES = [0, 1, 2, 124, 125, 126, 127, 128, 300, 65535, 65536, 65537, 70000]


# ---- messages: every length encoding, every cut -----------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_every_length_encoding_text_and_binary(n):
    data = payload(n, n)
    assert decode([frame(data)]) == [Message(data, False)]
    assert decode([frame(data, BINARY)]) == [Message(data, True)]
    # a message split into two reads at each header byte and around the payload's start and end
    f = frame(data)
    for cut in sorted({1, 2, 3, 4, 5, 9, 10, 11, len(f) - 1} & set(range(1, len(f)))):
        assert decode([f[:cut], f[cut:]]) == [Message(data, False)], cut


@pytest.mark.parametrize("length", ["minimal", "16", "64"])
def test_non_minimal_lengths_are_accepted(length):
    """RFC 6455 asks senders for the minimal length encoding; a receiver gains nothing by refusing
    a longer one (and the 10-byte header can be tested cheaply at every cut this way)."""
    assert decode([frame(b"hello", length=length)]) == [Message(b"hello")]


def mixed_stream() -> tuple[bytes, list]:
    """Frames with 2-, 4- and 10-byte headers, control frames, a fragmented message."""
    parts, expected = [], []
    for i, (n, length) in enumerate([(0, "minimal"), (5, "minimal"), (125, "minimal"), (126, "minimal"),
                                     (3, "16"), (7, "64"), (300, "minimal"), (1, "64")]):
        data = payload(i, n)
        parts.append(frame(data, BINARY if i % 3 == 2 else TEXT, length=length))
        expected.append(Message(data, i % 3 == 2))
    parts += [frame(b"p1", PING), frame(b"", PONG), frame(b"ab", TEXT, fin=False),
              frame(b"", PING), frame(b"cd", CONT, fin=False, length="64"),
              frame(b"ef", CONT, length="16"), frame(b"\x00\x01", BINARY)]
    expected += [Ping(b"p1"), Pong(b""), Ping(b""), Message(b"abcdef"), Message(b"\x00\x01", True)]
    parts.append(frame(struct.pack("!H", 1001) + b"going", CLOSE))
    expected.append(Close(1001, b"going"))
    return b"".join(parts), expected


def test_cut_at_every_byte_position():
    stream, expected = mixed_stream()
    assert decode([stream]) == expected
    for cut in range(len(stream) + 1):
        assert decode([stream[:cut], stream[cut:]]) == expected, cut


def test_fed_one_byte_at_a_time():
    stream, expected = mixed_stream()
    assert decode([stream[i:i + 1] for i in range(len(stream))]) == expected


def test_large_messages_one_byte_and_odd_reads_at_a_time():
    big = [payload(1, 70000), payload(2, 65536), payload(3, 200)]
    stream = b"".join(frame(p) for p in big)
    for step in (1, 7, 4093, 65536):
        assert decode([stream[i:i + step] for i in range(0, len(stream), step)]) == \
            [Message(p) for p in big], step


def test_a_large_message_in_small_reads_is_joined_once():
    """While a frame is incomplete the reads are only queued: the buffer being decoded is not
    rebuilt for every read (16 MiB in 4 KiB reads would copy ~32 GB)."""
    data = payload(0, 1 << 20)
    f = frame(data)
    dec = Decoder()
    got = []
    for i in range(0, len(f) - 4096, 4096):
        dec.feed(f[i:i + 4096])
        assert dec.deliver(got.append) is None
        assert len(dec._buf) <= 4096                  # not the growing message
    dec.feed(f[i + 4096:])
    assert dec.deliver(got.append) is None and got == [data]
    assert dec.buffered == 0


# ---- fragmentation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_fragments_with_control_frames_between_them(opcode):
    stream = b"".join([
        frame(b"one ", opcode, fin=False), frame(b"ping!", PING),
        frame(b"two ", CONT, fin=False), frame(b"", PONG), frame(b"x", PING),
        frame(b"", CONT, fin=False),                  # an empty fragment is allowed
        frame(b"three", CONT), frame(b"after", TEXT)])
    expected = [Ping(b"ping!"), Pong(b""), Ping(b"x"), Message(b"one two three", opcode == BINARY),
                Message(b"after")]
    for cut in range(len(stream) + 1):
        assert decode([stream[:cut], stream[cut:]]) == expected, cut


def test_deliver_stops_at_each_control_frame_in_stream_order():
    stream = frame(b"a") + frame(b"b") + frame(b"1", PING) + frame(b"c") + frame(b"2", PONG) + frame(b"d")
    dec = Decoder()
    dec.feed(stream)
    got = []
    assert dec.deliver(got.append) == Ping(b"1") and got == [b"a", b"b"]
    assert dec.deliver(got.append) == Pong(b"2") and got == [b"a", b"b", b"c"]
    assert dec.deliver(got.append) is None and got == [b"a", b"b", b"c", b"d"]


def test_text_and_binary_callbacks():
    dec = Decoder()
    dec.feed(frame(b"t") + frame(b"b", BINARY) + frame(b"f", BINARY, fin=False) + frame(b"g", CONT))
    text, binary = [], []
    assert dec.deliver(text.append, binary.append) is None
    assert text == [b"t"] and binary == [b"b", b"fg"]
    dec.feed(frame(b"x", BINARY))
    assert dec.deliver(text.append) is None and text == [b"t", b"x"]     # on_binary defaults to on_text


# ---- close frames -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,event", [
    (b"", Close(1005, b"")),
    (struct.pack("!H", 1000), Close(1000, b"")),
    (struct.pack("!H", 1001) + b"bye", Close(1001, b"bye")),
    (struct.pack("!H", 4000) + "tschüss".encode(), Close(4000, "tschüss".encode())),
    (struct.pack("!H", 3000) + b"x" * 123, Close(3000, b"x" * 123)),
    (struct.pack("!H", 1011) + b"\xff", Close(1011, b"\xff")),     # reason bytes are not validated
])
def test_close_frames(body, event):
    dec = Decoder()
    dec.feed(frame(b"before") + frame(body, CLOSE) + frame(b"after"))
    got = []
    assert dec.deliver(got.append) == event
    assert got == [b"before"] and dec.closed
    # nothing after a close frame counts
    dec.feed(frame(b"later"))
    assert dec.deliver(got.append) is None and got == [b"before"] and dec.buffered == 0


# ---- protocol errors --------------------------------------------------------------------------------

ERRORS = {
    "rsv1": (frame(b"x", rsv=4), 1002),
    "rsv2": (frame(b"x", rsv=2), 1002),
    "rsv3": (frame(b"x", BINARY, rsv=1), 1002),
    "rsv on a control frame": (frame(b"", PING, rsv=4), 1002),
    "rsv on a continuation": (frame(b"a", fin=False) + frame(b"b", CONT, rsv=4), 1002),
    "masked": (frame(b'{"a":1}', mask=b"\x01\x02\x03\x04"), 1002),
    "masked control": (frame(b"", PING, mask=b"abcd"), 1002),
    "fragmented ping": (frame(b"x", PING, fin=False), 1002),
    "fragmented close": (frame(b"", CLOSE, fin=False), 1002),
    "ping over 125 bytes": (frame(b"x" * 126, PING), 1002),
    "pong over 125 bytes": (frame(b"x" * 200, PONG), 1002),
    "close over 125 bytes": (frame(struct.pack("!H", 1000) + b"x" * 124, CLOSE), 1002),
    "ping with an extended length": (frame(b"x", PING, length="16"), 1002),
    "continuation without a start": (frame(b"x", CONT), 1002),
    "final continuation without a start": (frame(b"x", CONT, fin=True), 1002),
    "text inside a fragmented message": (frame(b"a", fin=False) + frame(b"b"), 1002),
    "binary inside a fragmented message": (frame(b"a", BINARY, fin=False) + frame(b"b", BINARY, fin=False), 1002),
    "reserved data opcode 3": (frame(b"x", 3), 1002),
    "reserved data opcode 7": (frame(b"x", 7), 1002),
    "reserved control opcode 0xB": (frame(b"x", 0xB), 1002),
    "reserved control opcode 0xF": (frame(b"", 0xF), 1002),
    "64-bit length with the high bit": (bytes([0x81, 127]) + struct.pack("!Q", 1 << 63), 1002),
    "close with a 1-byte body": (frame(b"\x03", CLOSE), 1002),
    "close code 999": (frame(struct.pack("!H", 999), CLOSE), 1002),
    "close code 1004": (frame(struct.pack("!H", 1004), CLOSE), 1002),
    "close code 1005": (frame(struct.pack("!H", 1005), CLOSE), 1002),
    "close code 1006": (frame(struct.pack("!H", 1006), CLOSE), 1002),
    "close code 1015": (frame(struct.pack("!H", 1015), CLOSE), 1002),
    "close code 2999": (frame(struct.pack("!H", 2999), CLOSE), 1002),
    "close code 5000": (frame(struct.pack("!H", 5000), CLOSE), 1002),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_protocol_errors_carry_the_close_code(name):
    bad, code = ERRORS[name]
    good = frame(b"first") + frame(b"second", BINARY)
    for pieces in ([good + bad + frame(b"never")], [good, bad[:1], bad[1:]],
                   [good + bad[:2], bad[2:]], [(good + bad)[i:i + 1] for i in range(len(good + bad))]):
        dec = Decoder()
        got = []
        with pytest.raises(ProtocolError) as err:
            for p in pieces:
                dec.feed(p)
                while dec.deliver(got.append) is not None:
                    pass
        assert err.value.code == code, name
        assert err.value.reason and str(code) in str(err.value)
        assert got[:2] == [b"first", b"second"] and b"never" not in got   # what came before: delivered
        # the decoder does not go on after an error
        dec.feed(frame(b"more"))
        with pytest.raises(ProtocolError):
            dec.deliver(got.append)
        assert b"more" not in got


def test_events_returns_what_came_before_an_error_then_raises():
    dec = Decoder()
    dec.feed(frame(b"a") + frame(b"", PING) + frame(b"b", rsv=4))
    assert dec.events() == [Message(b"a"), Ping(b"")]
    with pytest.raises(ProtocolError) as err:
        dec.events()
    assert err.value.code == 1002


def test_an_error_is_raised_from_the_header_without_waiting_for_the_payload():
    for bad in (frame(b"x" * 200, PING)[:2], bytes([0xC1, 5]), bytes([0x81, 0x85])):
        dec = Decoder()
        dec.feed(bad)
        with pytest.raises(ProtocolError):
            dec.deliver(lambda _m: None)


# ---- message size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,length", [(126, "minimal"), (1000, "minimal"), (70000, "minimal"),
                                      (200, "64"), (5000, "64")])
def test_a_frame_over_max_size_is_1009_as_soon_as_its_length_is_known(n, length):
    limit = n - 1
    dec = Decoder(max_size=limit)
    f = frame(payload(0, n), length=length)
    dec.feed(frame(b"ok") + f[:header_len(n, length)])    # the header only: no payload yet
    got = []
    with pytest.raises(ProtocolError) as err:
        dec.deliver(got.append)
    assert err.value.code == 1009 and got == [b"ok"]
    # one byte less fits
    assert decode([frame(payload(0, limit), length=length)], max_size=limit) == [Message(payload(0, limit))]


def test_a_fragmented_message_over_max_size_is_1009():
    limit = 1000
    ok = frame(b"x" * 400, fin=False) + frame(b"", PING) + frame(b"y" * 600, CONT)
    assert decode([ok], max_size=limit) == [Ping(b""), Message(b"x" * 400 + b"y" * 600)]
    too_big = frame(b"x" * 400, fin=False) + frame(b"y" * 400, CONT, fin=False) + frame(b"z" * 201, CONT)
    dec = Decoder(max_size=limit)
    dec.feed(too_big[:-201])                              # the last header, no payload
    with pytest.raises(ProtocolError) as err:
        dec.deliver(lambda _m: None)
    assert err.value.code == 1009


def test_control_frames_do_not_count_towards_max_size():
    assert decode([frame(b"p" * 125, PING) + frame(b"m" * 10)], max_size=10) == \
        [Ping(b"p" * 125), Message(b"m" * 10)]


@pytest.mark.parametrize("n", [11, 125])
def test_a_small_max_size_is_enforced_for_7_bit_lengths(n):
    with pytest.raises(ProtocolError) as err:
        decode([frame(b"x" * n)], max_size=10)
    assert err.value.code == 1009


# ---- callbacks and the hot path ---------------------------------------------------------------------

def test_a_raising_callback_leaves_the_decoder_consistent():
    dec = Decoder()
    dec.feed(b"".join(frame(b"%d" % i) for i in range(6)) + frame(b"f", fin=False) + frame(b"g", CONT))
    got = []

    def on_message(m):
        if m in (b"2", b"fg"):
            raise ValueError(m)
        got.append(m)
    with pytest.raises(ValueError):
        dec.deliver(on_message)
    assert got == [b"0", b"1"]
    with pytest.raises(ValueError):                       # the fragmented message, on the general path
        dec.deliver(on_message)
    assert dec.deliver(on_message) is None
    assert got == [b"0", b"1", b"3", b"4", b"5"] and dec.buffered == 0


def test_whole_data_frames_take_the_fast_path(monkeypatch):
    """The common frame (0x81/0x82, unmasked, whole) must not go through the general per-frame
    path: a read of many frames costs one call of it (to find where the buffer ends)."""
    calls = [0]
    real = Decoder._step

    def counting(self, *a):
        calls[0] += 1
        return real(self, *a)
    monkeypatch.setattr(Decoder, "_step", counting)
    frames = [payload(i, 20 + i % 400) for i in range(1000)]
    stream = b"".join(frame(p, BINARY if i % 5 == 0 else TEXT, length="64" if i % 7 == 0 else "minimal")
                      for i, p in enumerate(frames))
    dec = Decoder()
    got = []
    for i in range(0, len(stream), 65536):
        dec.feed(stream[i:i + 65536])
        assert dec.deliver(got.append) is None
    assert got == frames
    assert calls[0] <= len(range(0, len(stream), 65536)), calls


def test_max_size_must_be_positive():
    with pytest.raises(ValueError):
        Decoder(0)


# ---- random streams, random cuts --------------------------------------------------------------------

@st.composite
def streams(draw):
    """(bytes, expected events): messages (some fragmented, control frames between fragments),
    pings and pongs, in every length encoding, maybe a close at the end."""
    parts, expected = [], []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
        if kind in ("ping", "pong"):
            data = draw(st.binary(max_size=125))
            parts.append(frame(data, PING if kind == "ping" else PONG))    # 7-bit length: <= 125
            expected.append(Ping(data) if kind == "ping" else Pong(data))
            continue
        data = draw(st.one_of(st.binary(max_size=300), st.integers(65530, 65540).map(lambda n: b"z" * n)))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        opcode = TEXT if kind == "text" else BINARY
        for i, piece in enumerate(pieces):
            parts.append(frame(piece, opcode if i == 0 else CONT, fin=i == len(pieces) - 1,
                               length=draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
                               if len(piece) < 65536 else "minimal"))
            if i < len(pieces) - 1 and draw(st.booleans()):
                ping = draw(st.binary(max_size=10))
                parts.append(frame(ping, PING))
                expected.append(Ping(ping))
        expected.append(Message(data, kind == "binary"))
    if draw(st.booleans()):
        parts.append(frame(struct.pack("!H", 1000) + b"end", CLOSE) + frame(b"ignored"))
        expected.append(Close(1000, b"end"))
    return b"".join(parts), expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_random_streams_cut_anywhere(stream_expected, data):
    stream, expected = stream_expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert decode(pieces) == expected
