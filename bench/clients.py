#!/usr/bin/env python3
"""Reference readers for `make bench`: what the collector's sockets could do without the collector.

    python bench/clients.py --mode noop|raw --urls '{"binance": {"ws": ..., "rest": ...}}'

Both plan their connections exactly like the collector (discovery over REST, every listed
symbol, every dataset, the adapter's connection plans and subscribe messages), one thread per
connection, in one process:

* `noop`: the collector's own socket code (`app.feed.FastWebSocketApp` with `feed.RUN_OPTIONS`:
  buffered reads, whole data frames to on_message without websocket-client's frame objects, no
  UTF-8 validation) with an on_message that does nothing: what the collector's reading can take
  in one process. `--reader` picks another: `frames` (the same configuration, but
  websocket-client parses every frame: the bare WebSocketApp ceiling the issue's targets are
  set against) or `plain` (websocket-client's own WebSocketApp, its own reads).
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
from app.exchanges import load as load_adapter, resolve_symbols  # noqa: E402
from app.feed import RUN_OPTIONS, FastWebSocketApp  # noqa: E402
from app.schema import DATASETS  # noqa: E402

MAX_STREAMS_PER_CONNECTION = 200     # the collector's default (settings: max_streams_per_connection)


def plan(exchange: str, urls: dict, symbols=("ALL",), datasets=DATASETS) -> list[tuple[str, list[str], float]]:
    """[(ws url, subscribe texts, pause between them)] for every connection the collector would open."""
    adapter = load_adapter(exchange)
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


class LibraryFramesApp(FastWebSocketApp):
    data_frames = False


def run_noop(url: str, texts: list[str], pause: float, done: threading.Event,
             app_class=FastWebSocketApp) -> None:
    def on_open(ws):
        threading.Thread(target=_send_subscriptions, args=(ws.send, texts, pause), daemon=True,
                         name="sub").start()
        done.set()

    def on_message(_ws, _data):
        pass

    app = app_class(url, on_open=on_open, on_message=on_message)
    app.run_forever(**RUN_OPTIONS)


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
                   help="noop: feed.py's reading (default), feed.py's buffered reads with "
                   "websocket-client parsing every frame, or websocket-client's own WebSocketApp")
    args = p.parse_args(argv)
    urls = json.loads(args.urls)
    runner = run_noop if args.mode == "noop" else run_raw
    if args.reader == "plain":
        runner = functools.partial(run_noop, app_class=websocket.WebSocketApp)
    elif args.reader == "frames":
        runner = functools.partial(run_noop, app_class=LibraryFramesApp)
    conns = []
    for exchange, u in urls.items():
        adapter = load_adapter(exchange)
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
