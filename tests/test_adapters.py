"""Every adapter has exactly the shape of app.exchanges.Adapter: the same names (no fewer, no more),
the same method signatures, constants of the declared kinds. Callers rely on it instead of probing
(no getattr/hasattr on an adapter anywhere in app/)."""
from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from app import schema
from app.exchanges import EXCHANGES, Adapter, Keepalive, SequenceRule, create
from app.exchanges.channels import Table

PROTOCOL_NAMES = {n for n in dir(Adapter) if not n.startswith("_")} | set(Adapter.__annotations__)
METHODS = {n for n in PROTOCOL_NAMES if callable(getattr(Adapter, n, None))}
CONSTANTS = PROTOCOL_NAMES - METHODS


def test_the_protocol_is_what_the_callers_use():
    assert CONSTANTS == {"NAME", "KEEPALIVE", "MAX_CONNECTION_AGE_S", "CONNECT_INTERVAL_S", "SUBSCRIBE_INTERVAL_S",
                         "SUBSCRIBE_IN_URL", "MAX_STREAMS_PER_CONNECTION", "URGENT_SCREEN",
                         "GAP_RULES", "UNSUPPORTED_DATASETS", "MAPPED_FIELDS"}
    assert METHODS == {"ws_url", "discovery_request", "parse_discovery", "unified", "streams_for", "plan_connections",
                       "subscribe_messages", "unsubscribe_messages", "parse", "parse_batch", "urgent_control",
                       "alignment_request", "parse_recent_trades", "time_request",
                       "parse_server_time", "rest_throttle"}


@pytest.mark.parametrize("name", EXCHANGES)
def test_adapter_has_exactly_the_protocol_shape(name):
    adapter = create(name)
    assert isinstance(adapter, Adapter)                 # names only (runtime_checkable)
    public = {n for n in dir(adapter) if not n.startswith("_")}
    assert public == PROTOCOL_NAMES, f"extra: {public - PROTOCOL_NAMES}, missing: {PROTOCOL_NAMES - public}"
    for method in METHODS:
        want = inspect.signature(getattr(Adapter, method))
        got = inspect.signature(getattr(type(adapter), method))
        assert got == want, f"{name}.{method}{got} != Adapter.{method}{want}"
        assert not isinstance(inspect.getattr_static(type(adapter), method), (staticmethod, classmethod)), method
    assert adapter.NAME == name


@pytest.mark.parametrize("name", EXCHANGES)
def test_constants_are_of_the_declared_kinds(name):
    a = create(name)
    assert isinstance(a.KEEPALIVE, Keepalive)
    assert a.MAX_CONNECTION_AGE_S is None or a.MAX_CONNECTION_AGE_S > 0
    assert isinstance(a.CONNECT_INTERVAL_S, float) and isinstance(a.SUBSCRIBE_INTERVAL_S, float)
    assert isinstance(a.SUBSCRIBE_IN_URL, bool)
    assert isinstance(a.MAX_STREAMS_PER_CONNECTION, int) and a.MAX_STREAMS_PER_CONNECTION > 0
    assert a.URGENT_SCREEN is None or isinstance(a.URGENT_SCREEN, bytes)
    assert all(ds in schema.DATASETS and isinstance(r, SequenceRule) for ds, r in a.GAP_RULES.items())
    assert all(ds in schema.DATASETS and isinstance(why, str) for ds, why in a.UNSUPPORTED_DATASETS.items())
    assert a.MAPPED_FIELDS and all(isinstance(v, frozenset) for v in a.MAPPED_FIELDS.values())


@pytest.mark.parametrize("name", EXCHANGES)
def test_state_lives_in_the_instance(name):
    """Two adapters share no memo: the unified-name cache and the batch instrument arrays are the
    instance's, and each module holds only frozen data (no module-level dict or list that grows)."""
    a, b = create(name), create(name)
    a.unified("XYZUSDT")
    assert a._names and not b._names and a._batch is not b._batch
    module = __import__(f"app.exchanges.{name}", fromlist=["x"])
    mutable = {k for k, v in vars(module).items() if isinstance(v, (dict, list, set)) and not k.startswith("__")}
    assert mutable == set(), mutable


def test_every_dataset_column_comes_from_the_table():
    """MAPPED_FIELDS and the subscribed channels are the table's, not separate lists."""
    for name in EXCHANGES:
        a = create(name)
        table: Table = type(a)._CHANNELS
        assert a.MAPPED_FIELDS == table.mapped_fields
        for ds, ch in table.subscribed.items():
            assert ch.name in a.MAPPED_FIELDS and ds in ch.rows


def test_no_caller_probes_an_adapter():
    """The shape is known, so app/ reads names directly (getattr/hasattr on an adapter is how a
    difference in shape used to be papered over)."""
    root = pathlib.Path(__file__).resolve().parent.parent / "app"
    probe = re.compile(r"\b(getattr|hasattr)\(\s*(self\.)?(adapter|adapters\[|a\b|c\.adapter)")
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name not in NOT_YET
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []


NOT_YET: set[str] = set()
