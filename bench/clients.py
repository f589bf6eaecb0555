#!/usr/bin/env python3
"""Reference readers for `make bench`: what the collector's sockets could do without the collector.

    python bench/clients.py --mode noop|raw --urls '{"binance": {"ws": ..., "rest": ...}}'

Both plan their connections exactly like the collector (discovery over REST, every listed
symbol, every dataset, the adapter's connection plans and subscribe messages), one thread per
connection, in one process:

* `noop`: the collector's own socket code (`app.feed.Reader`: websocket-client's handshake, then
  64 KiB reads of the raw socket decoded by app/wsframes.py, whole data frames to on_message, no
  UTF-8 validation) with an on_message that does nothing: what the collector's reading can take
  in one process. `--reader` picks another: `frames` (websocket-client parses every frame, with
  buffered 64 KiB reads and no UTF-8 validation: the bare WebSocketApp ceiling the issue's
  targets are set against) or `plain` (websocket-client's own WebSocketApp, its own reads).
  `frames` reaches into websocket-client's internals (a Dispatcher subclass, `recv_strict`) as
  app/feed.py did before app/wsframes.py: it measures the library, so it is kept here, out of
  app/, and fails loudly (not silently slower) if a release moves them.
* `raw`: after the handshake and the subscribe messages, recv_into() a buffer and discard it. No
  framing at all: it shows how fast the firehose can send, which must be well above the ceiling
  or the bench would measure the firehose.

Frames are counted where they are sent (bench/firehose.py), so the readers do no counting work.
The process prints `{"event": "clients_ready", "connections": N, "streams": M}` once every
subscribe message is sent, and runs until stdin closes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import websocket  # noqa: E402

from app import discovery  # noqa: E402
from app.exchanges import create as create_adapter, resolve_symbols  # noqa: E402
from app.feed import READ_CHUNK, Reader  # noqa: E402
from app.schema import DATASETS  # noqa: E402

MAX_STREAMS_PER_CONNECTION = 200     # the collector's default (settings: max_streams_per_connection)
# websocket-client's run_forever for the library readers: no UTF-8 validation in Python (as the
# collector), no library pings or reconnects
LIBRARY_OPTIONS = {"skip_utf8_validation": True, "ping_interval": 0, "reconnect": 0}


def plan(exchange: str, urls: dict, symbols=("ALL",), datasets=DATASETS) -> list[tuple[str, list[str], float]]:
    """[(ws url, subscribe texts, pause between them)] for every connection the collector would open."""
    adapter = create_adapter(exchange)
    found = discovery.discover(adapter, urls["rest"])
    instruments, _missing = resolve_symbols(list(symbols), found.instruments)
    streams = [s for inst in instruments for s in adapter.streams_for(inst, datasets)]
    out, first_id = [], 1
    for p in adapter.plan_connections(streams, MAX_STREAMS_PER_CONNECTION):
        msgs = adapter.subscribe_messages(p.streams, first_id)
        first_id += len(p.streams) + 1
        out.append((adapter.ws_url(urls["ws"], p.path), [m[0] for m in msgs],
                    adapter.SUBSCRIBE_INTERVAL_S, len(p.streams)))
    return out


def _send_subscriptions(send, texts: list[str], pause: float) -> None:
    for i, text in enumerate(texts):
        send(text)
        if i + 1 < len(texts):
            time.sleep(pause)


def _nothing(_data) -> None:
    pass


def run_feed(url: str, texts: list[str], pause: float, done: threading.Event) -> None:
    """The collector's reading (app.feed.Reader), a no-op on_message."""
    reader = Reader(_nothing)
    reader.connect(url)
    threading.Thread(target=_send_subscriptions, args=(reader.ws.send, texts, pause), daemon=True,
                     name="sub").start()
    done.set()
    reader.run()


def buffered_frames_app():
    """websocket-client's WebSocketApp parsing every frame itself (ABNF objects, continuation
    logic), its frame_buffer served from READ_CHUNK reads instead of 2-3 recv() calls per frame,
    and no select() before each frame on the blocking socket: the bench's ceiling, exactly as
    app/feed.py's reader ran it with its data-frame path off (before app/wsframes.py)."""
    dispatcher_base = websocket._app.Dispatcher          # AttributeError: the internals moved

    class BufferedRecv:
        def __init__(self, frame_buffer):
            self._recv = frame_buffer.recv               # WebSocket._recv
            self.buf = b""
            self.pos = 0

        def recv_strict(self, n: int) -> bytes:
            pos, end = self.pos, self.pos + n
            if end <= len(self.buf):
                self.pos = end
                return self.buf[pos:end]
            parts = [self.buf[pos:]]
            have = len(parts[0])
            while have < n:
                chunk = self._recv(max(READ_CHUNK, n - have))
                parts.append(chunk)
                have += len(chunk)
            self.buf = b"".join(parts)
            self.pos = n
            return self.buf[:n]

    class BufferedDispatcher(dispatcher_base):
        def read(self, sock, read_callback, check_callback) -> None:
            ws = self.app.sock
            if ws is None or ws.sock is None:
                return
            fb = ws.frame_buffer
            fb.recv_strict = BufferedRecv(fb).recv_strict    # instance attribute shadows the method
            while self.app.keep_running:
                if not read_callback():
                    break
                check_callback()

    class BufferedFramesApp(websocket.WebSocketApp):
        def create_dispatcher(self, ping_timeout, dispatcher=None, *args, **kwargs):
            if dispatcher is not None:
                return super().create_dispatcher(ping_timeout, dispatcher, *args, **kwargs)
            return BufferedDispatcher(self, ping_timeout or 10)
    return BufferedFramesApp


def run_library(url: str, texts: list[str], pause: float, done: threading.Event,
                app_class=websocket.WebSocketApp) -> None:
    def on_open(ws):
        threading.Thread(target=_send_subscriptions, args=(ws.send, texts, pause), daemon=True,
                         name="sub").start()
        done.set()

    def on_message(_ws, _data):
        pass

    app = app_class(url, on_open=on_open, on_message=on_message)
    app.run_forever(**LIBRARY_OPTIONS)


def run_raw(url: str, texts: list[str], pause: float, done: threading.Event) -> None:
    ws = websocket.create_connection(url, skip_utf8_validation=True)
    threading.Thread(target=_send_subscriptions, args=(ws.send, texts, pause), daemon=True).start()
    done.set()
    sock = ws.sock
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while sock.recv_into(view):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("noop", "raw"), required=True)
    p.add_argument("--urls", required=True, help="JSON {exchange: {ws, rest}}")
    p.add_argument("--reader", choices=("feed", "frames", "plain"), default="feed",
                   help="noop: feed.py's reading (default: app.feed.Reader, app/wsframes.py), "
                   "websocket-client parsing every frame from buffered reads (the ceiling), or "
                   "websocket-client's own WebSocketApp")
    args = p.parse_args(argv)
    urls = json.loads(args.urls)
    runner = run_feed if args.mode == "noop" else run_raw
    if args.mode == "noop" and args.reader == "plain":
        runner = run_library
    elif args.mode == "noop" and args.reader == "frames":
        runner = functools.partial(run_library, app_class=buffered_frames_app())
    conns = []
    for exchange, u in urls.items():
        adapter = create_adapter(exchange)
        for url, texts, pause, n in plan(exchange, u):
            done = threading.Event()
            threading.Thread(target=runner, args=(url, texts, pause, done), daemon=True,
                             name=f"{args.mode}-{exchange}").start()
            done.wait(10)
            conns.append(n)
            time.sleep(getattr(adapter, "CONNECT_INTERVAL_S", 0.0))
    print(json.dumps({"event": "clients_ready", "connections": len(conns), "streams": sum(conns)}),
          flush=True)
    for _ in sys.stdin:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
