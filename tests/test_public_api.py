"""app/ uses websocket-client through its public API only.

Why: the collector's reader once subclassed `websocket._app.Dispatcher`, replaced
`frame_buffer.recv_strict` and called `app._callback`; any websocket-client release could have
broken that without a sound (requirements.txt allows a range of releases). The reader now
decodes frames itself (app/wsframes.py) and leaves the handshake and sending to the library's
documented API. This test reads every module under app/ (ast, no import) and fails on:

* an import of a private websocket-client module or name (`websocket._core`, `from websocket
  import _abnf`, `from websocket._app import Dispatcher`);
* an attribute starting with `_` reached from the websocket module (`websocket._app`);
* an attribute, or a getattr/setattr/hasattr name, that is one of websocket-client's internals
  (PRIVATE below: the objects' underscore names and their undocumented working attributes such
  as `frame_buffer`, `cont_frame`, `keep_running`). Without type inference the names are
  matched wherever they appear in app/, so none of them may be used for anything else there.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

APP = pathlib.Path(__file__).resolve().parent.parent / "app"

# Internals of websocket-client's WebSocket, WebSocketApp, frame_buffer, continuous_frame and
# dispatchers (1.8-1.9). Public: connect, send, send_text, send_bytes, send_binary, send_frame,
# ping, pong, recv*, send_close, close, abort, shutdown, settimeout/gettimeout, fileno, sock,
# connected, getstatus, getheaders, getsubprotocol, is_ssl, run_forever, on_* callbacks.
PRIVATE = {
    # WebSocket
    "frame_buffer", "cont_frame", "sock_opt", "readlock", "lock", "_recv", "_send", "_closed",
    "dispatcher", "get_mask_key", "close_frame",
    # frame_buffer / continuous_frame / ABNF
    "recv_strict", "recv_header", "recv_length", "recv_mask", "recv_buffer", "has_received_header",
    "has_received_length", "has_received_mask", "clear", "recving_frames", "fire_cont_frame",
    "skip_utf8_validation",
    # WebSocketApp
    "_callback", "_get_close_args", "_parse_close_frame", "_start_ping_thread", "_stop_ping_thread",
    "_send_ping", "create_dispatcher", "keep_running", "has_done_teardown", "has_done_teardown_lock",
    "has_errored", "last_ping_tm", "last_pong_tm", "last_close_frame", "prepared_socket", "ping_timeout",
    "stop_ping",
}
# names above that are also ordinary names elsewhere (a threading.Lock, dict.clear): they count
# only as attributes of something that is not a plain local of ours
AMBIGUOUS = {"lock", "clear"}


def modules() -> list[pathlib.Path]:
    return sorted(p for p in APP.rglob("*.py") if "__pycache__" not in p.parts)


def violations(source: str, filename: str = "<string>") -> list[str]:
    tree = ast.parse(source, filename)
    aliases = set()                            # names bound to the websocket module
    found = []

    def where(node) -> str:
        return f"{filename}:{node.lineno}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "websocket":
                    if any(p.startswith("_") for p in parts[1:]):
                        found.append(f"{where(node)} import {a.name}")
                    if len(parts) == 1:
                        aliases.add(a.asname or "websocket")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "websocket":
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts[1:]):
                found.append(f"{where(node)} from {node.module} import ...")
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{where(node)} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in aliases and node.attr.startswith("_"):
                found.append(f"{where(node)} websocket.{node.attr}")
            elif node.attr in PRIVATE and node.attr not in AMBIGUOUS:
                found.append(f"{where(node)} .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in PRIVATE):
            found.append(f"{where(node)} {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_app_touches_no_private_websocket_client_name():
    files = modules()
    assert APP / "feed.py" in files and APP / "wsframes.py" in files
    found = [v for p in files for v in violations(p.read_text(), str(p.relative_to(APP.parent)))]
    assert found == [], "app/ reaches into websocket-client's internals:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import websocket\nclass D(websocket._app.Dispatcher): pass",
    "import websocket as wsc\nwsc._core.WebSocket",
    "import websocket._abnf",
    "from websocket._core import WebSocket",
    "from websocket import _abnf",
    "def f(ws): ws.frame_buffer.recv_strict = None",
    "def f(ws): return ws.cont_frame.recving_frames",
    "def f(app, e): app._callback(app.on_error, e)",
    "def f(app): app.keep_running = False",
    "def f(ws): return ws._recv(10)",
    "def f(ws): return getattr(ws, 'frame_buffer')",
    "def f(app): app.create_dispatcher(10)",
])
def test_the_check_finds_what_the_old_reader_did(snippet):
    """The patterns app/feed.py used before app/wsframes.py (and their import variants)."""
    assert violations(snippet) != [], snippet


@pytest.mark.parametrize("snippet", [
    "import websocket\nws = websocket.WebSocket(skip_utf8_validation=True)\nws.connect('ws://x')",
    "import websocket\ndef f(ws): ws.send_close(websocket.STATUS_NORMAL, b'x'); ws.sock.recv(10); ws.shutdown()",
    "from websocket import WebSocketException, create_connection",
    "def f(self): self._reader = None; self.lock.acquire()",
])
def test_the_public_api_passes(snippet):
    assert violations(snippet) == [], snippet
