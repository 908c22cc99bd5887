"""The sample stage: its op (a seeded, partition-independent draw) and the stage through the executor and the CLI."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.config import ConfigError
from curation.io import LEDGER_DIR
from curation.ops.sample import SAMPLED_OUT, sample_rows
from curation.ops.uid import compute_uids
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.stages import parse_run_config

ROWS = 4_000


def _table(rows: int) -> pa.Table:
    urls = pa.array([f"https://example.com/{i}.jpg" for i in range(rows)])
    captions = pa.array([f"caption number {i}" for i in range(rows)])
    return pa.table({"uid": compute_uids(urls, captions), "url": urls, "caption": captions})


def test_the_draw_depends_on_seed_and_uid_only():
    table = _table(1_000)
    kept, dropped = sample_rows(table, 0.3, seed=5)
    assert len(kept) + len(dropped) == 1_000
    assert set(dropped.column_names) == {"uid", "reason", "detail"}
    assert set(dropped["reason"].to_pylist()) == {SAMPLED_OUT}
    assert all(json.loads(d)["u"] >= 0.3 for d in dropped["detail"].to_pylist())
    # any split of the rows gives the same kept rows
    halves = [sample_rows(table.slice(0, 400), 0.3, seed=5)[0], sample_rows(table.slice(400), 0.3, seed=5)[0]]
    assert pa.concat_tables(halves)["uid"].to_pylist() == kept["uid"].to_pylist()
    # a larger fraction keeps a superset; another seed another sample; fraction 1 keeps all
    assert set(kept["uid"].to_pylist()) < set(sample_rows(table, 0.6, seed=5)[0]["uid"].to_pylist())
    assert kept["uid"].to_pylist() != sample_rows(table, 0.3, seed=6)[0]["uid"].to_pylist()
    assert len(sample_rows(table, 1.0, seed=5)[0]) == 1_000
    with pytest.raises(ValueError, match="fraction must be in"):
        sample_rows(table, 0.0, seed=5)


@pytest.fixture(scope="module")
def ingested(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    table = _table(ROWS)
    pq.write_table(table.drop(["uid"]), root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest")
    return root


def _kept(folder) -> list[str]:
    return sorted(pq.read_table(folder, columns=["uid"])["uid"].to_pylist())


def test_the_stage_is_the_same_for_any_partitioning(spark, ingested):
    one = run_one_stage(spark, "sample", ingested / "ingest", ingested / "one", {"fraction": 0.25, "partitions": 1})
    three = run_one_stage(spark, "sample", ingested / "ingest", ingested / "three", {"fraction": 0.25,
                                                                                      "partitions": 3})
    assert _kept(ingested / "one") == _kept(ingested / "three")
    expected = ROWS * 0.25
    sigma = (ROWS * 0.25 * 0.75) ** 0.5
    assert abs(one["rows_out"] - expected) < 4 * sigma
    for record in (one, three):
        assert record["rows_in"] == ROWS == record["rows_out"] + record["drops"][SAMPLED_OUT]
        assert record["sample"] == {"fraction": 0.25, "seed": 0}
    ledger = pq.read_table(ingested / "one" / LEDGER_DIR)
    assert set(ledger["stage"].to_pylist()) == {"sample"} and len(ledger) == one["drops"][SAMPLED_OUT]
    assert not set(ledger["uid"].to_pylist()) & set(_kept(ingested / "one"))
    assert read_stage_record(ingested / "one")["config"]["fraction"] == 0.25


def test_the_command_checks_its_options_before_spark(spark, ingested, caplog):
    assert cli_main(["sample", "--input", str(ingested / "ingest"), "--output", str(ingested / "cli"),
                     "--fraction", "0.5", "--seed", "3"]) == 0
    assert read_stage_record(ingested / "cli")["sample"] == {"fraction": 0.5, "seed": 3}
    assert cli_main(["sample", "--input", str(ingested / "ingest"), "--output", str(ingested / "bad"),
                     "--fraction", "1.5"]) == 2
    assert "stage sample: option fraction is 1.5" in caplog.text
    assert not (ingested / "bad").exists()


def test_a_run_configuration_with_a_bad_fraction_fails_at_load():
    with pytest.raises(ConfigError, match="stage sample: option fraction is 'half'; allowed: a number"):
        parse_run_config({"input": "x", "stages": ["ingest", {"sample": {"fraction": "half"}}]})
