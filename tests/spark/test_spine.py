"""The spine on real Spark: raw shards -> ingest -> match -> count -> balance -> publish, and verify."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.demo import generate_demo_corpus
from curation.manifest import release_sha256, verify_manifest, without_volatile
from curation.ops import balance as balance_ops
from curation.ops.ingest import IngestError
from curation.ops.metadata import build_metadata, write_metadata
from curation.ops.uid import uniform
from curation.pipeline import run_pipeline
from curation.run_folder import read_stage_record
from curation.schema import Reason
from curation.stages import parse_run_config

pytestmark = pytest.mark.spark

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 4,000-row demo corpus (every kind of bad row planted) and a wordfreq-only metadata list."""
    root = tmp_path_factory.mktemp("corpus")
    entries, _ = build_metadata(wordfreq_top_n=20_000, wordnet_dir=None)
    metadata = root / "metadata.json"
    write_metadata(metadata, entries)
    summary = generate_demo_corpus(root / "raw", entries, rows=4_000, shards=3, seed=11)
    return {"raw": root / "raw", "metadata": metadata, "summary": summary, "entries": entries}


def _config(corpus, partitions: int, t: float = 40, **publish) -> dict:
    return {
        "name": "test",
        "input": str(corpus["raw"]),
        "metadata": str(corpus["metadata"]),
        "seed": 1,
        "spark": {"partitions": partitions},
        "stages": [
            "ingest", "dedup_exact", {"dedup_text": {"policy": "cap:3"}}, "match", "count", {"balance": {"t": t}},
            {"publish": {"shard_rows": 700, **publish}},
        ],
    }


@pytest.fixture(scope="module")
def runs(spark, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for partitions in (1, 4):
        run_dir = root / f"p{partitions}"
        results[partitions] = (run_dir, run_pipeline(spark, parse_run_config(_config(corpus, partitions)), run_dir))
    return results


def _release_files(run_dir: Path) -> dict[str, bytes]:
    release = run_dir / "publish"
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("*.parquet"))}


def test_output_is_identical_for_one_and_four_partitions(runs):
    one, four = runs[1][0], runs[4][0]
    assert _release_files(one) == _release_files(four)
    manifests = [json.loads((d / "publish" / "manifest.json").read_text()) for d in (one, four)]
    assert without_volatile(manifests[0]) == without_volatile(manifests[1])
    assert len(manifests[0]["shards"]) > 1


def test_every_bad_row_reason_is_in_the_ledger(runs, corpus):
    run_dir = runs[4][0]
    manifest = json.loads((run_dir / "publish" / "manifest.json").read_text())
    planted = corpus["summary"]["planted"]
    drops = manifest["totals"]["drops_by_reason"]
    assert drops[Reason.MISSING_CAPTION] == planted["null_text"]
    assert drops[Reason.EMPTY_CAPTION] == planted["empty_text"] + planted["whitespace_text"]
    assert drops[Reason.MISSING_URL] == planted["null_url"]
    assert drops[Reason.EMPTY_URL] == planted["empty_url"]
    assert drops[Reason.NOT_HTTP_URL] == planted["non_http_url"]
    assert drops[Reason.CAPTION_TOO_LONG] == planted["text_too_long"]
    assert drops[Reason.INVALID_UTF8] == planted["invalid_utf8"]
    assert drops[Reason.DUPLICATE_PAIR] == planted["duplicate_pair"]
    assert drops[Reason.NO_METADATA_MATCH] == planted["no_match"]
    assert drops[Reason.DUPLICATE_URL] == planted["url_duplicate"]
    planted_near_duplicate_drops = sum(max(0, size - 3) for size in corpus["summary"]["near_duplicate_family_sizes"])
    assert drops[Reason.NEAR_DUPLICATE_CAPTION] >= planted_near_duplicate_drops > 0
    assert drops[Reason.BALANCE_NOT_DRAWN] > 0
    ledger = pa.concat_tables(pq.read_table(run_dir / "publish" / f["path"]) for f in manifest["ledger"]["files"])
    assert ledger.num_rows == sum(drops.values())
    assert set(ledger["stage"].to_pylist()) == {"ingest", "dedup_exact", "dedup_text", "match", "balance"}


def test_ledger_invariant_and_verify(runs):
    run_dir = runs[4][0]
    manifest = json.loads((run_dir / "publish" / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["rows_in"] == 4_000 == totals["rows_published"] + totals["rows_in_ledger"]
    assert verify_manifest(run_dir) == []
    digest = release_sha256(manifest)
    assert read_stage_record(run_dir / "publish")["release_sha256"] == digest
    assert cli_main(["verify", str(run_dir), "--expect-sha256", digest]) == 0


def test_a_flipped_byte_in_a_shard_fails_verify(runs, tmp_path):
    import shutil

    release = tmp_path / "release"
    shutil.copytree(runs[4][0] / "publish", release)
    shard = release / "shards" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_manifest(release)
    assert any("shard-00000.parquet" in p and "sha256" in p for p in problems)
    assert cli_main(["verify", str(release)]) == 1


def test_spark_keep_decisions_are_the_pure_formula(runs):
    run_dir = runs[1][0]
    stages = run_dir / "stages"
    matched = pq.read_table(stages / "04_match", columns=["uid", "entry_ids"])
    counts = pq.read_table(stages / "05_count" / "_artifacts" / "entry_counts.parquet")["count"].to_numpy()
    offsets, values = balance_ops.list_parts(matched["entry_ids"])
    probability = balance_ops.keep_probabilities(offsets, values, counts, 40)
    expected_kept = set(np.asarray(matched["uid"].to_pylist())[uniform(1, matched["uid"], "balance") < probability])
    published = pq.read_table(run_dir / "publish" / "shards")["uid"].to_pylist()
    assert set(published) == expected_kept and len(published) == len(expected_kept)
    # Balancing on a Zipf-skewed corpus keeps fewer rows than matched, within 4 sigma of sum P.
    deviation = np.sqrt((probability * (1 - probability)).sum())
    assert abs(len(published) - probability.sum()) <= 4 * deviation
    assert len(published) < matched.num_rows


def test_rerun_skips_finished_stages_and_redoes_changed_ones(spark, runs, corpus):
    run_dir = runs[4][0]
    before = (run_dir / "publish" / "manifest.json").read_bytes()
    results = run_pipeline(spark, parse_run_config(_config(corpus, 4)), run_dir)
    assert [skipped for _, _, skipped in results] == [True] * 7
    assert (run_dir / "publish" / "manifest.json").read_bytes() == before
    results = run_pipeline(spark, parse_run_config(_config(corpus, 4, t=80)), run_dir)
    assert [skipped for _, _, skipped in results] == [True] * 5 + [False, False]
    assert verify_manifest(run_dir) == []


def test_cli_chain_from_raw_shards_with_target_size(spark, corpus, tmp_path):
    matched, balanced, release = tmp_path / "matched", tmp_path / "balanced", tmp_path / "release"
    assert cli_main(["match", "--metadata", str(corpus["metadata"]), "--input", str(corpus["raw"]),
                     "--output", str(matched)]) == 0
    assert (matched / "_ingest" / "_SUCCESS").is_file()
    assert cli_main(["balance", "--input", str(matched), "--output", str(balanced), "--target-size", "1500"]) == 0
    record = json.loads((balanced / "_stage.json").read_text())
    assert record["balancing"]["t_from"] == "target_size"
    table = pq.read_table(matched, columns=["entry_ids"])
    counts = pq.read_table(balanced / "_artifacts" / "entry_counts.parquet")["count"].to_numpy()
    offsets, values = balance_ops.list_parts(table["entry_ids"])
    probability = balance_ops.keep_probabilities(offsets, values, counts, record["balancing"]["t"])
    assert probability.sum() == pytest.approx(1500, abs=0.5)
    assert abs(record["rows_out"] - 1500) <= 4 * np.sqrt((probability * (1 - probability)).sum())
    assert cli_main(["publish", "--input", str(balanced), "--output", str(release), "--shard-rows", "500"]) == 0
    assert verify_manifest(release) == []
    manifest = json.loads((release / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["ingest", "match", "balance"]
    assert manifest["totals"]["rows_in"] == 4_000


def test_an_unreadable_shard_is_a_clear_error_or_recorded_when_skipped(spark, corpus, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(corpus["raw"], raw)
    (raw / "part-broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match="part-broken.parquet"):
        run_pipeline(spark, parse_run_config({**_config(corpus, 2), "input": str(raw)}), tmp_path / "run1")
    config = _config(corpus, 2)
    config.update(input=str(raw), stages=[{"ingest": {"skip_bad_files": True}}, "match", "publish"])
    run_pipeline(spark, parse_run_config(config), tmp_path / "run2")
    manifest = json.loads((tmp_path / "run2" / "publish" / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in manifest["skipped_inputs"]] == ["part-broken.parquet"]
    assert verify_manifest(tmp_path / "run2") == []


def test_spark_submit_runs_a_job(corpus, tmp_path):
    spark_submit = Path(sys.executable).parent / "spark-submit"
    if not spark_submit.exists():
        pytest.skip("spark-submit is not installed beside this interpreter")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "SPARK_LOCAL_IP": "127.0.0.1"}
    output = tmp_path / "ingested"
    completed = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         str(REPO_ROOT / "jobs" / "stage.py"), "ingest", "--input", str(corpus["raw"]), "--output", str(output)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((output / "_stage.json").read_text())
    assert record["rows_in"] == 4_000 and (output / "_SUCCESS").is_file()
