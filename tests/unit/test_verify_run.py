"""`curation verify RUN_DIR` over the folders of a run: each kind of inconsistency is found and located."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import StageWriter
from curation.verify import verify_run


def _stage(run_dir: Path, name: str, upstream: str | None, rows_in: int, kept: int, **extra) -> Path:
    folder = run_dir / "stages" / name
    with StageWriter(folder) as writer:
        writer.temp_dir.mkdir(parents=True)
        pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(kept)]}), writer.temp_dir / "part-0.parquet")
        dropped = rows_in - kept
        if dropped:
            writer.ledger_dir.mkdir(parents=True)
            pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(kept, rows_in)]}),
                           writer.ledger_dir / "part-0.parquet")
        writer.commit({"stage": name.split("_", 1)[1], "rows_in": rows_in, "rows_out": kept,
                       "drops": {"some_reason": dropped} if dropped else {},
                       "input": {"stage": f"../{upstream}" if upstream else None}, **extra})
    return folder


@pytest.fixture
def run_dir(tmp_path):
    _stage(tmp_path, "01_ingest", None, 10, 8)
    _stage(tmp_path, "02_match", "01_ingest", 8, 6)
    return tmp_path


def test_a_consistent_run_has_no_problems(run_dir):
    assert verify_run(run_dir) == []


def test_an_incomplete_stage_is_reported(run_dir):
    (run_dir / "stages" / "02_match" / "_SUCCESS").unlink()
    assert verify_run(run_dir) == ["02_match: incomplete stage folder (no _SUCCESS or _stage.json): rerun the run"]


def test_a_ledger_that_lost_rows_is_reported(run_dir):
    shutil.rmtree(run_dir / "stages" / "02_match" / "_ledger")
    assert verify_run(run_dir) == ["02_match: _ledger/ holds 0 rows, the record says 2 dropped"]


def test_data_that_does_not_match_the_record_is_reported(run_dir):
    pq.write_table(pa.table({"uid": ["f" * 32]}), run_dir / "stages" / "02_match" / "part-1.parquet")
    assert verify_run(run_dir) == ["02_match: data holds 7 rows, the record says 6 out"]


def test_a_broken_chain_is_reported(run_dir):
    record_path = run_dir / "stages" / "02_match" / "_stage.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "rows_in": 9, "rows_out": 7}))
    problems = verify_run(run_dir)
    assert "02_match: 9 rows in, but 01_ingest put out 8" in problems


def test_world_writable_files_are_reported(run_dir):
    path = run_dir / "stages" / "01_ingest" / "part-0.parquet"
    path.chmod(0o666)
    assert verify_run(run_dir) == [f"{path}: world-writable"]


def test_a_folder_without_stages_is_not_a_run(tmp_path):
    assert verify_run(tmp_path) == [f"{tmp_path}: not a run folder (no stages/)"]
