"""The shard split: stable across processes, complete and disjoint, even, and growth-local."""
from __future__ import annotations

import subprocess
import sys

import pytest

from app import sharding
from tests.helpers import ROOT

SYMBOLS = [f"{b}USDT" for b in ("BTC", "ETH", "SOL", "XRP", "DOGE", "ADA", "AVAX", "LINK", "DOT", "TRX")] + \
          [f"C{i:03d}USDT" for i in range(490)]


def test_every_symbol_has_exactly_one_shard_and_the_split_is_even():
    for n in (1, 2, 3, 7):
        owners = {ex: {s: [i for i in range(n) if sharding.Shard(i, n).owns(ex, s)] for s in SYMBOLS}
                  for ex in ("binance", "bybit", "okx")}
        for ex, per in owners.items():
            assert all(len(v) == 1 for v in per.values())
            sizes = [sum(1 for v in per.values() if v == [i]) for i in range(n)]
            assert max(sizes) - min(sizes) <= 0.25 * len(SYMBOLS) / n + 5, (ex, n, sizes)


def test_the_split_is_the_same_in_another_process():
    here = [sharding.shard_of("okx", s, 3) for s in SYMBOLS[:50]]
    code = ("from app import sharding; print([sharding.shard_of('okx', s, 3) for s in %r])" % SYMBOLS[:50])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True).stdout
    assert out.strip() == str(here)


@pytest.mark.parametrize("exchange,symbol,owners", [
    ("binance", "BTCUSDT", [0, 2, 1]), ("binance", "ETHUSDT", [1, 0, 3]), ("bybit", "SOLUSDT", [1, 1, 5]),
    ("bybit", "XRPUSDC", [1, 1, 2]), ("okx", "BTC-USDT-SWAP", [1, 2, 3]), ("okx", "DOGE-USDT-SWAP", [0, 1, 0])])
def test_the_split_is_pinned_across_releases(exchange, symbol, owners):
    """A fleet mixes versions during a rolling update, and a day's files are judged against
    today's hash: a change of the hash would move streams between shards (recorded twice or
    not at all). The owner depends on (exchange, symbol, N) only, so a new listing moves
    nothing else; these values must never change."""
    assert [sharding.shard_of(exchange, symbol, n) for n in (2, 3, 7)] == owners


@pytest.mark.parametrize("text,why", [("1", "i/N"), ("3/3", "0..2"), ("-1/2", "i/N"), ("0/0", "N >= 1"),
                                      ("a/b", "i/N")])
def test_bad_shard_text_says_what_is_expected(text, why):
    with pytest.raises(ValueError) as e:
        sharding.parse(text)
    assert why in str(e.value)


def test_parse():
    assert sharding.parse(" 2/5 ") == sharding.Shard(2, 5) and str(sharding.parse("0/1")) == "0/1"


def test_a_shard_subscribes_only_its_own_symbols_and_says_so(tmp_path):
    """bin/collector --shard 1/2 --replica b against the simulator: it plans exactly the symbols
    the hash gives shard 1, /status and the heartbeat name the shard, the files' metadata too."""
    import glob

    import pyarrow.parquet as pq

    from sim import Simulator
    from tests.helpers import CollectorProcess, sim_env, wait_until
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT"]
    mine = [s for s in symbols if sharding.shard_of("binance", s, 2) == 1]
    assert 0 < len(mine) < len(symbols)
    with Simulator(exchanges=("binance",), symbols=[s[:-4] for s in symbols], rate=10.0) as sim:
        env = dict(sim_env(sim, ("binance",)), EXCHANGES="binance", SYMBOLS=",".join(symbols),
                   FLUSH_INTERVAL="0.5", ROTATE_INTERVAL="2", HEARTBEAT_INTERVAL="1")
        with CollectorProcess(tmp_path, env, ["--shard", "1/2", "--replica", "b"]) as c:
            plan = c.wait_for("plan", timeout=30)[0]
            assert (plan["shard"], plan["symbols"], plan["universe"]) == ("1/2", len(mine), len(symbols))
            st = c.get()
            assert (st["shard"], st["replica"]) == ("1/2", "b")
            beat = c.wait_for("heartbeat", timeout=10)[0]
            assert (beat["shard"], beat["replica"]) == ("1/2", "b")
            wait_until(lambda: glob.glob(f"{c.data_dir}/raw/v1/bbo/binance/date=*/*.parquet"), 20,
                       what="a bbo file")
            assert c.stop() == 0
    files = glob.glob(f"{c.data_dir}/raw/v1/bbo/binance/date=*/*.parquet")
    seen = set()
    for f in files:
        meta = pq.read_schema(f).metadata
        assert (meta[b"shard"], meta[b"replica"]) == (b"1/2", b"b")
        seen |= set(pq.read_table(f, columns=["symbol"]).column("symbol").to_pylist())
    assert seen == set(mine)
