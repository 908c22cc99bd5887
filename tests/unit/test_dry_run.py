"""`curation run --dry-run`: stages, inputs and sample-based estimates, with no Spark session."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.demo import generate_demo_corpus
from curation.dry_run import dry_run
from curation.io import StageWriter
from curation.ops import balance as balance_ops
from curation.ops.ingest import IngestError, IngestOptions, normalise_rows
from curation.ops.metaclip import Matcher
from curation.ops.metadata import build_metadata, write_metadata
from curation.pipeline import current_input_fingerprint
from curation.stages import hashed_config, parse_run_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = 6_000
SHARDS = 3
BALANCE_T = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry_run")
    entries, _ = build_metadata(wordfreq_top_n=2000, wordnet_dir=None)
    write_metadata(root / "metadata.json", entries)
    generate_demo_corpus(root / "corpus", entries, rows=ROWS, shards=SHARDS, seed=11)
    return root, entries


def demo_config(root: Path, stages=None, **ingest):
    stages = stages or [
        {"ingest": {"keep_columns": ["WIDTH", "HEIGHT"], **ingest}}, "dedup_exact", "dedup_text", "match", "count",
        {"balance": {"t": BALANCE_T}}, {"download": {"image_size": 64}}, "embed", "dedup_image", {"cluster": {"k": 8}},
        {"semdedup": {"target_keep_fraction": 0.9}}, {"prune": {"k": 4, "keep_fraction": 0.5}}, "publish",
    ]
    return parse_run_config({"name": "dry", "input": str(root / "corpus"), "metadata": str(root / "metadata.json"),
                             "seed": 3, "spark": {"master": "local[2]"}, "stages": stages})


def estimated(lines: list[str], stage: str) -> tuple[float, float]:
    """(rows in, rows out) of a stage's line in the estimate table."""
    for line in lines:
        found = re.match(rf"^\s+{stage}\s+([\d,]+)\s+([\d,]+)\s", line)
        if found:
            return tuple(float(value.replace(",", "")) for value in found.groups())
    raise AssertionError(f"no estimate line for {stage} in:\n" + "\n".join(lines))


def full_normalise(files: list[Path], options) -> pa.Table:
    kept = [normalise_rows(pq.read_table(path), options, str(path))[0].select(["uid", "caption"]) for path in files]
    return pa.concat_tables(kept)


def test_lists_every_stage_with_its_folder_options_and_status(corpus, tmp_path):
    root, _ = corpus
    config = demo_config(root)
    lines = dry_run(config, tmp_path / "run")
    text = "\n".join(lines)
    assert "no Spark session is started" in lines[0]
    assert f"run folder: {(tmp_path / 'run').resolve()} (does not exist yet)" in text
    for position, stage in enumerate(config.stages, start=1):
        folder = "publish" if stage.name == "publish" else f"stages/{position:02d}_{stage.name}"
        assert re.search(rf"^\s+{position} {stage.name}\s+{folder}\s+will run: no finished stage folder$", text,
                         re.MULTILINE), stage.name
    # Only the options that differ from the defaults are shown.
    assert 'options: keep_columns=["WIDTH", "HEIGHT"]' in text
    assert f"options: t={BALANCE_T}, seed=3" in text
    assert "max_caption_chars=" not in text.split("inputs:")[0]
    assert "a run starts at stage 1 (ingest)" in text


def test_lists_the_inputs_from_the_footers(corpus, tmp_path):
    root, _ = corpus
    lines = dry_run(demo_config(root), tmp_path / "run")
    text = "\n".join(lines)
    files = sorted((root / "corpus").glob("*.parquet"))
    total = sum(path.stat().st_size for path in files)
    assert f"inputs: {SHARDS} shards, {ROWS:,} rows" in text
    assert f"{total / 1000:,.1f} KB (parquet footers)" in text or f"{total / 1e6:,.1f} MB (parquet footers)" in text
    for path in files:
        rows = pq.ParquetFile(path).metadata.num_rows
        assert f"{path}: {rows:,} rows in 1 row group" in text
    assert "keep_columns=['WIDTH', 'HEIGHT']" in text


def test_row_estimates_are_near_the_real_counts(corpus, tmp_path):
    root, entries = corpus
    config = demo_config(root)
    lines = dry_run(config, tmp_path / "run")
    options = IngestOptions.from_options(config.stages[0].options)
    kept = full_normalise(sorted((root / "corpus").glob("*.parquet")), options)

    ingest_in, ingest_out = estimated(lines, "ingest")
    assert ingest_in == ROWS
    assert 0.95 * kept.num_rows <= ingest_out <= 1.05 * kept.num_rows

    # match: the matched share of the sample against that of every row (dedup is an upper bound: it keeps all).
    entry_ids = Matcher.from_entries(entries).match(kept.column("caption"))
    matched = pc.list_value_length(entry_ids).to_numpy() > 0
    match_in, match_out = estimated(lines, "match")
    assert match_in == ingest_out
    assert abs(match_out / match_in - matched.mean()) < 0.05

    # balance: the expected kept share with the real counts over all matched rows, against the estimate.
    offsets, values = balance_ops.list_parts(entry_ids.filter(pa.array(matched)))
    counts = np.bincount(values, minlength=len(entries))
    real_share = balance_ops.keep_probabilities(offsets, values, counts, BALANCE_T).mean()
    balance_in, balance_out = estimated(lines, "balance")
    assert 0.75 * real_share <= balance_out / balance_in <= 1.33 * real_share

    # Stages whose survival is set by an option are exact; the release is what the last stage keeps.
    semdedup_in, semdedup_out = estimated(lines, "semdedup")
    assert semdedup_out == pytest.approx(0.9 * semdedup_in, abs=1)
    prune_in, prune_out = estimated(lines, "prune")
    assert prune_out == pytest.approx(0.5 * prune_in, abs=1)
    assert estimated(lines, "publish")[1] == prune_out
    text = "\n".join(lines)
    assert "ESTIMATES" in text and "assumed" in text
    assert re.search(r"^time \(estimate\): about .* on 2 cores", text, re.MULTILINE)
    assert re.search(r"^  images: about .* of tars", text, re.MULTILINE)


def test_estimates_are_deterministic_and_the_sample_size_is_honoured(corpus, tmp_path):
    root, _ = corpus
    config = demo_config(root)

    def rows_only(lines):
        return [estimated(lines, stage.name) for stage in config.stages]

    first, second = dry_run(config, tmp_path / "run"), dry_run(config, tmp_path / "run")
    assert rows_only(first) == rows_only(second)
    small = dry_run(config, tmp_path / "run", sample_rows=300)
    assert any(line.startswith("sample: 300 rows (asked 300) from the first row groups of 3 shards")
               for line in small)


def test_up_to_date_and_changed_stages(corpus, tmp_path):
    """A finished ingest folder with the same config and input is reported skipped; after a config change it
    runs again, and the changed option is named."""
    root, _ = corpus
    stages = [{"ingest": {"max_caption_chars": 500}}, "dedup_exact"]
    config = demo_config(root, stages=stages)
    ingest = config.stages[0]
    run_dir = tmp_path / "run"
    with StageWriter(run_dir / "stages" / "01_ingest") as writer:
        writer.commit({"stage": "ingest", "config": hashed_config(ingest),
                       "input": {"fingerprint": current_input_fingerprint(ingest, config.inputs)}})
    text = "\n".join(dry_run(config, run_dir))
    assert re.search(r"1 ingest\s+stages/01_ingest\s+up to date \(skipped\)", text)
    assert re.search(r"2 dedup_exact\s+stages/02_dedup_exact\s+will run: no finished stage folder", text)
    assert "a run starts at stage 2 (dedup_exact)" in text

    changed = demo_config(root, stages=[{"ingest": {"max_caption_chars": 400}}, "dedup_exact"])
    text = "\n".join(dry_run(changed, run_dir))
    assert re.search(r"1 ingest\s+stages/01_ingest\s+will run: config changed \(max_caption_chars: 500 -> 400\)",
                     text)


def test_unusable_input_fails_with_the_shard_named(corpus, tmp_path):
    root, _ = corpus
    config = demo_config(root)
    config.inputs = [str(tmp_path / "missing")]
    with pytest.raises(IngestError, match="does not exist"):
        dry_run(config, tmp_path / "run")


def test_missing_metadata_is_reported_not_raised(corpus, tmp_path):
    root, _ = corpus
    config = demo_config(root, stages=["ingest", {"match": {"metadata": str(tmp_path / "none.json")}},
                                       {"balance": {"t": 5}}])
    text = "\n".join(dry_run(config, tmp_path / "run"))
    assert re.search(r"2 match\s+stages/02_match\s+will fail: .*none\.json", text)
    assert "match: the metadata cannot be loaded, so matching is not estimated" in text
    assert "not estimated: no match stage before it" in text


def test_no_spark_is_started(corpus, tmp_path):
    """In a fresh interpreter: the dry run neither starts a SparkContext nor even imports pyspark."""
    root, _ = corpus
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"name: dry\ninput: {root / 'corpus'}\nmetadata: {root / 'metadata.json'}\n"
        "stages: [ingest, dedup_exact, match, count, {balance: {t: 40}}, publish]\n"
    )
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from curation.stages import load_run_config\n"
        "from curation.dry_run import dry_run\n"
        f"lines = dry_run(load_run_config(Path({str(config_path)!r})), Path({str(tmp_path / 'run')!r}))\n"
        "assert any(line.startswith('inputs:') for line in lines)\n"
        "print('pyspark imported:', 'pyspark' in sys.modules)\n"
        "from pyspark import SparkContext\n"
        "print('active context:', SparkContext._active_spark_context)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pyspark imported: False" in result.stdout
    assert "active context: None" in result.stdout
    assert not (tmp_path / "run").exists()


def test_cli_dry_run(corpus, tmp_path, capsys):
    root, _ = corpus
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"name: dry\ninput: {root / 'corpus'}\nmetadata: {root / 'metadata.json'}\n"
                           "stages: [ingest, match, publish]\n")
    assert cli_main(["run", str(config_path), "--output", str(tmp_path / "run"), "--dry-run",
                     "--sample-rows", "500"]) == 0
    out = capsys.readouterr().out
    assert "stages (3):" in out and f"inputs: {SHARDS} shards" in out and "sample: 500 rows" in out
    assert not (tmp_path / "run").exists()


def test_real_captions(shared_data, tmp_path, corpus):
    """LAION-style alt-text (img2dataset's test files): the inputs are listed and the ingest and match estimates
    are near what normalise_rows and the Matcher give on every row."""
    root, entries = corpus
    folder = shared_data / "captions_img2dataset"
    config = parse_run_config({
        "name": "real", "input": str(folder / "*.parquet"), "metadata": str(root / "metadata.json"),
        "stages": ["ingest", "match", {"balance": {"t": 50}}, "publish"],
    })
    lines = dry_run(config, tmp_path / "run")
    text = "\n".join(lines)
    files = sorted(folder.glob("*.parquet"))
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    assert f"inputs: {len(files)} shards, {rows:,} rows" in text
    for path in files:
        assert f"{path}: " in text
    assert re.search(r"^\s+3 balance\s+stages/03_balance\s+will run", text, re.MULTILINE)

    options = IngestOptions.from_options(config.stages[0].options)
    kept = full_normalise(files, options)
    ingest_in, ingest_out = estimated(lines, "ingest")
    assert ingest_in == rows
    assert 0.9 * kept.num_rows <= ingest_out <= 1.1 * kept.num_rows

    matched = (pc.list_value_length(Matcher.from_entries(entries).match(kept.column("caption"))).to_numpy() > 0)
    match_in, match_out = estimated(lines, "match")
    assert abs(match_out / match_in - matched.mean()) < 0.1
    # test_1000 repeats rows of test_10000: the sample sees it, and says the estimate does not include it.
    assert "repeat an earlier (url, caption) pair" in text
