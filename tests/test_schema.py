"""Golden v1 schemas: an independent copy of CONTRACT §3. A change here is a new schema version."""
import pyarrow as pa
import pytest

from app import schema

GOLDEN = {
    "bbo": "bid_px? float64, bid_sz? float64, ask_px? float64, ask_sz? float64, update_id? int64, seq? int64",
    "trades": "trade_id string, price float64, size float64, side string, first_trade_id? int64, "
              "last_trade_id? int64, trade_count? int64, is_block? bool",
    "mark_price": "mark_px float64, index_px? float64, est_settle_px? float64",
    "funding": "funding_rate? float64, next_funding_time? int64, funding_time? int64, "
               "next_funding_rate? float64, funding_interval_h? int64",
    "open_interest": "open_interest? float64, open_interest_value? float64",
}
COMMON = "exchange string, symbol string, instrument string, ts_event? int64, ts_exchange? int64, " \
         "ts_recv int64, conn_id int64, recv_seq int64"
FRAMES = "exchange string, conn_id int64, recv_seq int64, ts_recv int64, payload string"
TYPES = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}


def golden_schema(spec: str) -> pa.Schema:
    fields = []
    for part in spec.split(", "):
        name, typ = part.split(" ")
        fields.append(pa.field(name.rstrip("?"), TYPES[typ], nullable=name.endswith("?")))
    return pa.schema(fields)


def golden(dataset: str) -> pa.Schema:
    return golden_schema(FRAMES if dataset == "frames" else f"{COMMON}, {GOLDEN[dataset]}")


@pytest.mark.parametrize("dataset", schema.ALL_DATASETS)
def test_schema_matches_golden_copy(dataset):
    assert schema.SCHEMAS[dataset].equals(golden(dataset), check_metadata=False)
    for a, b in zip(schema.SCHEMAS[dataset], golden(dataset)):
        assert (a.name, a.type, a.nullable) == (b.name, b.type, b.nullable)


def test_build_table_converts_strings_and_ms():
    rows = [("BTCUSDT", "BTC-USDT-PERP", 1000, "2000", 5, 1, 7, "1.5", "2", None, "", 9, None)]
    table, rejected = schema.build_table("bbo", "binance", rows)
    assert rejected == 0
    assert table.schema.equals(golden("bbo"), check_metadata=False)
    row = table.to_pylist()[0]
    assert row["exchange"] == "binance"
    assert row["ts_event"] == 1000 * 1_000_000 and row["ts_exchange"] == 2000 * 1_000_000
    assert row["bid_px"] == 1.5 and row["bid_sz"] == 2.0 and row["ask_px"] is None and row["ask_sz"] is None
    assert row["update_id"] == 9 and row["seq"] is None


def test_build_table_rejects_only_bad_rows():
    good = ("X", "X-USDT-PERP", 1, 1, 5, 1, 1, "abc1", "1.0", "0.5", "buy", None, None, None, None)
    bad_price = ("X", "X-USDT-PERP", 1, 1, 5, 1, 2, "abc2", "not-a-number", "0.5", "buy", None, None, None, None)
    missing_size = ("X", "X-USDT-PERP", 1, 1, 5, 1, 3, "abc3", "1.0", None, "buy", None, None, None, None)
    table, rejected = schema.build_table("trades", "okx", [good, bad_price, missing_size, good])
    assert rejected == 2
    assert table.num_rows == 2
    assert table.column("trade_id").to_pylist() == ["abc1", "abc1"]


def test_int_trade_ids_become_strings():
    row = ("X", "X-USDT-PERP", 1, 1, 5, 1, 1, 123456, "1.0", "0.5", "sell", 10, 12, 3, None)
    table, rejected = schema.build_table("trades", "binance", [row])
    assert rejected == 0 and table.column("trade_id").to_pylist() == ["123456"]


def test_frames_table_keeps_non_utf8_frames_escaped():
    items = [("bybit", 1, 1, 10, b'{"a":1}'), ("bybit", 1, 2, 11, b"\xff\xfebad")]
    table, bad = schema.frames_table("bybit", items)
    assert bad == 1
    assert table.column("payload").to_pylist() == ['{"a":1}', "\\xff\\xfebad"]
    assert table.column("recv_seq").to_pylist() == [1, 2]
    assert table.schema.equals(golden("frames"), check_metadata=False)


def test_metadata_keys():
    """The contract's keys, and since scale-out the shard and replica that wrote the file."""
    meta = schema.file_metadata("bbo", "okx", collector_version="1", instance_id="i", run_id="r",
                                shard="2/3", replica="b")
    assert {k.decode() for k in meta} == set(schema.REQUIRED_METADATA) | set(schema.SCALE_METADATA)
    assert meta[b"schema_version"] == b"1" and (meta[b"shard"], meta[b"replica"]) == (b"2/3", b"b")
    plain = schema.file_metadata("bbo", "okx", collector_version="1", instance_id="i", run_id="r")
    assert (plain[b"shard"], plain[b"replica"]) == (b"0/1", b"")


def test_parquet_options_per_dataset_and_exchange(tmp_path):
    """Book sizes are dictionary-encoded only for OKX (contract counts); `frames` is written at
    zstd level 1 without payload statistics; the options are accepted by pyarrow as they are."""
    import pyarrow.parquet as pq
    okx, binance = schema.parquet_options("bbo", "okx"), schema.parquet_options("bbo", "binance")
    assert {"bid_sz", "ask_sz"} <= set(okx["use_dictionary"])
    assert not {"bid_sz", "ask_sz"} & set(binance["use_dictionary"])
    assert schema.parquet_options("bbo") == binance
    frames = schema.parquet_options("frames")
    assert frames["compression_level"] == 1 and binance["compression_level"] == 3
    assert "payload" not in frames["write_statistics"] and "ts_recv" in frames["write_statistics"]
    table, _ = schema.frames_table("okx", [("okx", 1, 1, 1_700_000_000 * 10**9, b'{"a":1}')])
    pq.write_table(table, tmp_path / "f.parquet", **frames)
    md = pq.read_metadata(tmp_path / "f.parquet").row_group(0)
    stats = {md.column(i).path_in_schema: md.column(i).is_stats_set for i in range(md.num_columns)}
    assert stats["ts_recv"] and not stats["payload"]
