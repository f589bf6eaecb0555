#!/usr/bin/env python3
"""The WebSocket frame decoder alone, in-process: frames/s on a buffer of typical frames.

    python bench/decoder.py [--frames 100000] [--repeat 7] [--reference OLD_FEED_PY]

The buffer holds --frames server frames mixed like bench/firehose.py's corpus (75 % BBO of
~110-180 bytes, 18 % trades of ~230, 7 % larger periodic frames of ~400-900: 7- and 16-bit
lengths), cut into 64 KiB reads as the socket thread sees them. Modes, each the best of
--repeat runs:

* `callback`: `Decoder.deliver(on_message)` with a no-op Python callback (what app/feed.py runs).
* `list`: `Decoder.deliver(out.append)`: the messages in a list, not iterated.
* `list+iterate`: the same, then the no-op callback called on each message of the list.
* `reference` (with --reference): `_BufferedReader.data_frames` of an older app/feed.py (the
  reader before app/wsframes.py existed), with the same no-op callback:
  `git show 97ee365:app/feed.py > /tmp/old_feed.py; python bench/decoder.py --reference /tmp/old_feed.py`
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app.wsframes import Decoder  # noqa: E402

READ = 64 * 1024


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 65536:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload


def corpus(n: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.random()
        if r < 0.75:
            p = (b'{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":%d,"s":"BTCUSDT",'
                 b'"b":"%d.10","B":"%d.5"}}' % (i, 60000 + rnd.randrange(99), rnd.randrange(1, 10 ** rnd.randrange(1, 6))))
        elif r < 0.93:
            p = (b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1700000000%03d,"s":"BTCUSDT",'
                 b'"a":%d,"p":"%d.10","q":"0.%03d","f":%d,"l":%d,"T":1700000000%03d,"m":true}}'
                 % (i % 1000, i, 60000 + rnd.randrange(99), rnd.randrange(1000), i, i, i % 1000))
        else:
            p = b'{"stream":"btcusdt@markPrice","data":{"e":"markPriceUpdate","x":"' + \
                b"x" * rnd.randrange(300, 800) + b'"}}'
        out.append(frame(p))
    return b"".join(out)


def reads(stream: bytes) -> list[bytes]:
    return [stream[i:i + READ] for i in range(0, len(stream), READ)]


def run_decoder(chunks: list[bytes], mode: str) -> float:
    def on_message(_data):
        pass
    dec = Decoder()
    t0 = time.perf_counter()
    if mode == "callback":
        for c in chunks:
            dec.feed(c)
            dec.deliver(on_message)
    elif mode == "list":
        for c in chunks:
            out: list = []
            dec.feed(c)
            dec.deliver(out.append)
    else:
        for c in chunks:
            out = []
            dec.feed(c)
            dec.deliver(out.append)
            for m in out:
                on_message(m)
    return time.perf_counter() - t0


def run_reference(chunks: list[bytes], path: str) -> float:
    spec = importlib.util.spec_from_file_location("old_feed", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    it = iter(chunks)

    class FB:
        def recv(self, _n):
            return next(it)

    class App:
        @staticmethod
        def on_message(_app, _data):
            pass
        on_error = None

        def _callback(self, *a):
            raise AssertionError(a)
    app = App()
    reader = old._BufferedReader(FB(), object(), lambda: None)
    t0 = time.perf_counter()
    for _ in range(len(chunks)):
        reader.fill(1)
        reader.data_frames(app)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--reference", help="an older app/feed.py with _BufferedReader")
    args = p.parse_args(argv)
    stream = corpus(args.frames)
    chunks = reads(stream)
    modes = ["callback", "list", "list+iterate"] + (["reference"] if args.reference else [])
    best = {m: float("inf") for m in modes}
    for _ in range(args.repeat):          # interleaved, so load from other processes hits all alike
        for m in modes:
            t = run_reference(chunks, args.reference) if m == "reference" else run_decoder(chunks, m)
            best[m] = min(best[m], t)
    result = {"frames": args.frames, "bytes_per_frame": round(len(stream) / args.frames, 1)}
    for m in modes:
        result[m] = {"frames_per_s": round(args.frames / best[m]), "ns_per_frame": round(best[m] / args.frames * 1e9)}
        print(f"{m:>13}: {args.frames / best[m]:>12,.0f} frames/s  {best[m] / args.frames * 1e9:6.0f} ns/frame")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
