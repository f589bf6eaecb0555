"""Shared helpers for tests that read the recorded exchange frames in `<shared>/samples/`.

The shared directory is `$QL_SHARED_DIR` when set, else `../shared` next to the repository root
(the repository root is the parent of this `tests/` directory). Files are read at test time and
never copied into the repository. Line numbers are 1-based, as in samples/SOURCES.md.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent

TS_FALLBACK_NS = 1_700_000_000_000_000_000   # ts_recv for lines the recorder gave no receive time
CONN_ID = 7


def shared_dir() -> Path:
    env = os.environ.get("QL_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def samples_dir() -> Path:
    return shared_dir() / "samples"


def require_samples() -> Path:
    """The samples directory. Missing samples are an error, never a silent skip: the parsers'
    tests are only worth something on the real frames."""
    d = samples_dir()
    if not d.is_dir():
        raise RuntimeError(f"sample frames not found at {d}: put shared/ beside the repository "
                           "or set QL_SHARED_DIR")
    return d


def path(name: str) -> Path:
    return samples_dir() / name


@functools.cache
def raw_lines(name: str) -> tuple[bytes, ...]:
    """Each line of a sample file as bytes, without its line terminator (the frame's exact text)."""
    return tuple(path(name).read_bytes().splitlines())


def json_lines(name: str) -> list:
    """Each line decoded with the standard library (independent of the adapters' ujson)."""
    return [json.loads(line) for line in raw_lines(name)]


@functools.cache
def recv_times(name: str) -> tuple[int | None, ...]:
    """ts_recv_ns per line from the matching `.ts.jsonl`, or Nones when there is none."""
    ts_file = path(name[:-len(".jsonl")] + ".ts.jsonl")
    n = len(raw_lines(name))
    if not ts_file.exists():
        return (None,) * n
    times = tuple(json.loads(line)["ts_recv_ns"] for line in ts_file.read_bytes().splitlines())
    assert len(times) == n, f"{ts_file.name} has {len(times)} lines for {n} frames"
    return times


def items(exchange: str, name: str, *, as_str: bool = False, conn_id: int = CONN_ID) -> list[tuple]:
    """Queue items (exchange, conn_id, recv_seq, ts_recv_ns, payload) for every line of a file.

    recv_seq is the 1-based line number; ts_recv the recorded receive time, or a fixed fallback
    plus the line number when the recorder wrote none.
    """
    out = []
    for n, (line, ts) in enumerate(zip(raw_lines(name), recv_times(name)), start=1):
        payload = line.decode("utf-8") if as_str else line
        out.append((exchange, conn_id, n, ts if ts is not None else TS_FALLBACK_NS + n, payload))
    return out


class Parsed:
    """What parsing a whole sample file produced: the sink, Controls and per-line row counts."""

    def __init__(self, sink, controls, rows_per_line):
        self.sink = sink
        self.controls = controls            # [(line number, Control)]
        self.rows_per_line = rows_per_line  # {line number: {dataset: rows}}

    def rows(self, dataset: str) -> list[tuple]:
        return getattr(self.sink, dataset)


def parse_file(adapter, name: str, *, as_str: bool = False) -> Parsed:
    """Run adapter.parse over every line; any exception fails the test with the line number."""
    from app.exchanges import RowSink
    from app.schema import DATASETS

    sink = RowSink()
    controls, per_line = [], {}
    for item in items(adapter.NAME, name, as_str=as_str):
        before = {ds: len(getattr(sink, ds)) for ds in DATASETS}
        try:
            control = adapter.parse(item, sink)
        except Exception as exc:  # pragma: no cover - reported as a failure
            raise AssertionError(f"{name} line {item[2]}: {exc!r}") from exc
        if control is not None:
            controls.append((item[2], control))
        per_line[item[2]] = {ds: len(getattr(sink, ds)) - before[ds] for ds in DATASETS}
    return Parsed(sink, controls, per_line)


def column(dataset: str, name: str) -> int:
    """Index of a column in an adapter row tuple."""
    from app.schema import ROW_INDEX
    return ROW_INDEX[dataset][name]


def as_dicts(dataset: str, rows: list[tuple]) -> list[dict]:
    from app.schema import ROW_INDEX
    names = sorted((n for n, i in ROW_INDEX[dataset].items() if i >= 0), key=ROW_INDEX[dataset].get)
    return [dict(zip(names, row)) for row in rows]


GARBAGE = [
    b'{"topic":',                 # truncated JSON
    b"\xff\xfe",                  # not UTF-8 / not JSON
    b"[1,2,3]",                   # JSON, but an array
    b'"text"',                    # JSON string
    b"42",                        # JSON number
    b"null",
    b"",
]


def ts_recv(name: str, line: int) -> int:
    """The recorded receive time of a sample line (1-based), or the fallback the items use."""
    ts = recv_times(name)[line - 1]
    return ts if ts is not None else TS_FALLBACK_NS + line
