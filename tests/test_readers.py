"""Every dataset the collector writes reads as it is with each reader CONTRACT.md section 2 names:
pandas.read_parquet(dir), pyarrow.parquet.read_table(dir), pyarrow.dataset (hive), DuckDB
read_parquet(glob, hive_partitioning=1) and Polars scan_parquet(glob, hive_partitioning=True).

One short run of bin/collector against the simulator (all three exchanges) is shared by every
reader. Each must return exactly the rows of the files (checked against the files read one by
one, with the date taken from their directory), with `exchange` (the file column, one type, no
Hive key of the same name) and `date` (the Hive key) as columns. The first layout
(exchange=<x>/) is what made pandas and read_table fail; tests/test_sanity.py covers moving it.
"""
from __future__ import annotations

import collections
import glob
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from app import schema
from tests.helpers import CollectorProcess, settle, sim_env, wait_until

EXCHANGES = ("binance", "bybit", "okx")
DATASETS = ("bbo", "trades", "mark_price", "funding", "open_interest", "frames")
# Binance publishes no open interest over WebSocket: no Binance open_interest rows
EXPECTED = {(ex, ds) for ex in EXCHANGES for ds in DATASETS if (ex, ds) != ("binance", "open_interest")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """raw/ of one collector run: several files per (dataset, exchange), every dataset present."""
    from sim import Simulator
    tmp = tmp_path_factory.mktemp("readers")
    with Simulator(exchanges=EXCHANGES, rate=30.0, seed=21, cadence_scale=0.1) as sim:
        env = sim_env(sim, EXCHANGES)
        env.update({"SYMBOLS": "BTCUSDT,ETHUSDT", "FLUSH_INTERVAL": "0.5", "ROTATE_INTERVAL": "1",
                    "RECONNECT_MIN": "0.2", "RECONNECT_MAX": "2"})
        with CollectorProcess(tmp, env) as c:
            def rows_of_every_kind():
                st = sim.stats()
                return all(st[ex]["rows"].get(ds, 0) >= 3 for ex, ds in EXPECTED if ds != "frames")
            wait_until(rows_of_every_kind, 60, what="rows of every dataset sent by every exchange")
            # at least two rotations written for every exchange's bbo: the readers merge files
            wait_until(lambda: all(len(files(c.data_dir, "bbo", ex)) >= 2 for ex in EXCHANGES), 30,
                       what="two bbo files per exchange")
            settle(c, sim, EXCHANGES)
            assert c.stop() == 0
        sent = sim.stats()
    d = c.data_dir
    # what the simulator sent is what is on disk (so the readers below are compared with real data)
    for ex, ds in EXPECTED:
        if ds != "frames":
            assert sum(truth_counts(d, ds, ex).values()) == sent[ex]["rows"][ds], (ex, ds)
    return d


def files(data_dir: str, dataset: str, exchange: str = "*") -> list[str]:
    return sorted(glob.glob(os.path.join(data_dir, "raw", "v1", dataset, exchange, "date=*", "*.parquet")))


def truth_counts(data_dir: str, dataset: str, exchange: str = "*") -> collections.Counter:
    """(exchange, date, recv_seq, ts_recv) of every row, from the files read one by one (no
    partitioning), the date from the file's directory: the multiset every reader must return."""
    out: collections.Counter = collections.Counter()
    for path in files(data_dir, dataset, exchange):
        # the layout: raw/v1/<dataset>/<exchange>/date=<day>/<file>, and the file agrees with it
        ex_dir, date_dir = path.split(os.sep)[-3:-1]
        assert date_dir.startswith("date=") and "=" not in ex_dir, path
        date = date_dir[len("date="):]
        t = pq.ParquetFile(path).read()
        assert t.schema.equals(schema.SCHEMAS[dataset], check_metadata=False), path
        assert set(t.column("exchange").to_pylist()) == {ex_dir}, path
        out.update(zip(t.column("exchange").to_pylist(), [date] * t.num_rows,
                       t.column("recv_seq").to_pylist(), t.column("ts_recv").to_pylist()))
    return out


def rows_of(table: pa.Table) -> collections.Counter:
    """The same multiset from a reader's result (date as YYYY-MM-DD whatever its type)."""
    dates = [str(v)[:10] for v in table.column("date").to_pylist()]
    return collections.Counter(zip(table.column("exchange").to_pylist(), dates,
                                   table.column("recv_seq").to_pylist(), table.column("ts_recv").to_pylist()))


def _pandas(path):
    import pandas as pd
    df = pd.read_parquet(path)
    assert not isinstance(df["exchange"].dtype, pd.CategoricalDtype)     # the file column, not a Hive key
    return pa.table({c: df[c].astype(str) if c in ("exchange", "date") else df[c] for c in df.columns})


def _read_table(path):
    return pq.read_table(path)


def _dataset(path):
    return pads.dataset(path, partitioning="hive").to_table()


def _duckdb(path):
    import duckdb
    con = duckdb.connect()
    try:
        return con.sql(f"select * from read_parquet('{path}/**/*.parquet', hive_partitioning=1)").fetch_arrow_table()
    finally:
        con.close()


def _polars(path):
    import polars as pl
    return pl.scan_parquet(f"{path}/**/*.parquet", hive_partitioning=True).collect().to_arrow()


READERS = {"pandas.read_parquet": _pandas, "pyarrow.parquet.read_table": _read_table,
           "pyarrow.dataset(hive)": _dataset, "duckdb.read_parquet": _duckdb, "polars.scan_parquet": _polars}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_reads_every_dataset(data_dir, reader, dataset):
    path = os.path.join(data_dir, "raw", "v1", dataset)
    truth = truth_counts(data_dir, dataset)
    assert {ex for ex, *_ in truth} == {ex for ex, ds in EXPECTED if ds == dataset}
    table = READERS[reader](path)
    # every column of the file schema, once, plus the date key; no `exchange` Hive key beside it
    assert table.column_names == schema.SCHEMAS[dataset].names + ["date"], table.column_names
    assert table.num_rows == sum(truth.values())
    got = rows_of(table)
    assert got == truth, (reader, dataset, len(got - truth), len(truth - got))
    # `exchange` is a plain string column (the file's type) in the Arrow-native readers
    if reader != "pandas.read_parquet":
        assert pa.types.is_string(table.schema.field("exchange").type) or \
            pa.types.is_large_string(table.schema.field("exchange").type) or \
            pa.types.is_string_view(table.schema.field("exchange").type), table.schema.field("exchange").type
