"""The filter stage on Spark over real captions (captions_mixed: CC3M, COCO, web alt-text, edge cases) with real
photo sizes: its outcome is the pure rules applied to the whole input, and is the same with 1 and 4 partitions
although the boilerplate captions and the clip_score top span partitions, where counting per partition would
decide differently.

clip_score is synthetic (no CLIP weights offline): u(seed, uid) rounded to two decimals, so the top's cut falls
inside a tie that the uid must break; a few rows have none (null) or NaN. The image sizes are those of the real
photos, decoded.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.io import LEDGER_DIR, StageWriter
from curation.ops.filters import RULES, FilterOptions, apply_filter, caption_repeat_counts, top_cutoff
from curation.ops.uid import compute_uids, uniform
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.schema import Reason
from curation.spark.common import StageRun
from tests.imagekit import photos

pytestmark = pytest.mark.spark

# ALIGN's 3:1 would meet only the 123x456 photos, which are too small first; 208x495 is 2.38:1.
OPTIONS = {"min_clip_score": 0.15, "clip_score_top_fraction": 0.7, "min_image_side": 200, "max_aspect_ratio": 2.2,
           "min_caption_words": 3, "max_caption_words": 20, "max_caption_repeats": 20}
BOILERPLATE = "digital art selected for the #"  # 40 rows of real alt-text


@pytest.fixture(scope="module")
def scored_stage(shared_data, tmp_path_factory) -> Path:
    """A stage folder of ingested-form rows (uid, url, caption) of real captions, with the clip_score of embed and
    the size columns of download: image_original_* of real photos, image_* their 256-pixel keep_ratio copies."""
    root = tmp_path_factory.mktemp("filter_input")
    mixed = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet", columns=["url", "caption"])
    counts = pc.value_counts(mixed["caption"]).to_pylist()
    common = pa.array([c["values"] for c in counts if c["counts"] > 8])
    rows = pa.concat_tables([mixed.take(pa.array(np.linspace(0, len(mixed) - 1, 1500).astype(np.int64))),
                             mixed.filter(pc.is_in(mixed["caption"], common))])
    rows = rows.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(rows["caption"])), 0))
    uids = compute_uids(rows["url"].combine_chunks(), rows["caption"].combine_chunks())
    first = np.sort(np.unique(uids.to_numpy(zero_copy_only=False), return_index=True)[1])  # one row per uid
    rows, uids = rows.take(pa.array(first)), uids.take(pa.array(first))
    n = len(rows)
    score = np.round(0.1 + 0.3 * uniform(2, uids, "test_clip_score"), 2)
    score[np.arange(n) % 89 == 3] = np.nan  # NaN sorts above every number in Spark: it must not enter the top
    real_sizes = np.array([image.size for image in photos(40)])
    original = real_sizes[(uniform(2, uids, "test_size") * len(real_sizes)).astype(np.int64)]
    resized = np.round(original * (256 / original.max(axis=1, keepdims=True))).astype(np.int32)  # keep_ratio
    scored = pa.table({
        "uid": uids, "url": rows["url"], "caption": rows["caption"],
        "clip_score": pa.array(score, pa.float32(), mask=np.arange(n) % 97 == 5),
        "image_width": pa.array(resized[:, 0], pa.int32()), "image_height": pa.array(resized[:, 1], pa.int32()),
        "image_original_width": pa.array(original[:, 0], pa.int32()),
        "image_original_height": pa.array(original[:, 1], pa.int32()),
    })
    # three files, the rows shuffled so that every repeated caption spans them
    _write_stage(root / "embed", "embed", scored.take(pa.array(np.random.default_rng(7).permutation(n))), files=3)
    return root / "embed"


def _write_stage(folder: Path, stage: str, rows: pa.Table, files: int = 1) -> None:
    with StageWriter(folder) as writer:
        writer.temp_dir.mkdir()
        for part, chunk in enumerate(np.array_split(np.arange(len(rows)), files)):
            pq.write_table(rows.take(pa.array(chunk)), writer.temp_dir / f"part-{part:05d}.parquet")
        writer.commit(StageRun(stage, 1, {"stage": stage}).record({"files": ["captions_mixed.parquet"]}, len(rows),
                                                                  len(rows), {}))


@pytest.fixture(scope="module")
def runs(spark, scored_stage, tmp_path_factory) -> tuple[Path, Path]:
    """The stage with 1 partition (the adapter), and with 4 partitions and 7 shuffle partitions (the CLI)."""
    root = tmp_path_factory.mktemp("filter_runs")
    run_one_stage(spark, "filter", scored_stage, root / "one", {**OPTIONS, "partitions": 1})
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    try:
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in OPTIONS.items()]
        assert cli_main(["filter", "--input", str(scored_stage), "--output", str(root / "four"), *flags,
                         "--partitions", "4"]) == 0
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    return root / "one", root / "four"


def _kept(stage_dir: Path) -> set[str]:
    return set(pq.read_table(stage_dir, columns=["uid"])["uid"].to_pylist())


def _ledger(stage_dir: Path) -> dict[str, tuple[str, str, dict]]:
    rows = pq.read_table(stage_dir / LEDGER_DIR).to_pylist()
    found = {row["uid"]: (row["stage"], row["reason"], json.loads(row["detail"])) for row in rows}
    assert len(found) == len(rows), "a uid is in the ledger twice"
    return found


def test_the_outcome_is_the_pure_rules_over_the_whole_input_with_1_and_4_partitions(scored_stage, runs):
    rows = pq.read_table(scored_stage)
    options = FilterOptions.from_options(OPTIONS)
    cutoff = top_cutoff(rows["clip_score"], rows["uid"], options.clip_score_top_fraction)
    repeats = caption_repeat_counts(rows["caption"])
    kept, dropped = apply_filter(rows, options, top_cutoff=cutoff, caption_repeats=repeats)
    expected = {row["uid"]: ("filter", row["reason"], json.loads(row["detail"])) for row in dropped.to_pylist()}
    for stage_dir in runs:
        assert _kept(stage_dir) == set(kept["uid"].to_pylist())
        assert _ledger(stage_dir) == expected
    one, four = (pq.read_table(d / LEDGER_DIR).sort_by("uid") for d in runs)
    assert one.equals(four), "the ledgers differ byte for byte between 1 and 4 partitions"


def test_every_rule_drops_with_its_reason_and_ledger_plus_kept_is_the_input(scored_stage, runs):
    input_uids = set(pq.read_table(scored_stage, columns=["uid"])["uid"].to_pylist())
    for stage_dir in runs:
        record, kept, ledger = read_stage_record(stage_dir), _kept(stage_dir), _ledger(stage_dir)
        assert kept | set(ledger) == input_uids and not kept & set(ledger)
        assert record["rows_in"] == len(input_uids) == record["rows_out"] + sum(record["drops"].values())
        assert record["stage"] == "filter" and record["rows_out"] == len(kept)
        assert set(record["drops"]) == {reason for reason, _ in RULES}
        by_reason = {}
        for _, reason, _ in ledger.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        assert by_reason == record["drops"]
        rules = record["filter"]["rules"]
        assert record["filter"]["order"] == [reason for reason, _ in RULES] and record["filter"]["off"] == []
        for reason, option in RULES:
            assert rules[reason][option] == OPTIONS[option]
            assert rules[reason]["dropped"] == record["drops"][reason]
        assert rules[Reason.IMAGE_TOO_SMALL]["columns"] == ["image_original_width", "image_original_height"]
        top = rules[Reason.CLIP_SCORE_NOT_TOP]
        assert top["keep_count"] == -(-7 * len(input_uids) // 10) and top["ranked_rows"] == len(input_uids)
        boilerplate = rules[Reason.BOILERPLATE_CAPTION]
        assert boilerplate["most_repeated"][0] == {"caption": BOILERPLATE, "rows": 40}
    # the details name the original size, not the 256-pixel copy
    small = [d for _, r, d in _ledger(runs[0]).values() if r == Reason.IMAGE_TOO_SMALL]
    assert small and all(min(d["width"], d["height"]) == d["shorter_side"] < 200 for d in small)
    assert {d["shorter_side"] for d in small} == {123}


def test_counting_per_partition_would_decide_differently(spark, scored_stage, runs):
    """The 4-partition layout the stage read: a boilerplate caption stays under the limit in every partition, and
    each partition's own top differs from the whole input's; the stage dropped by the whole input all the same."""
    from pyspark.sql import functions as F

    layout = (spark.read.parquet(str(scored_stage)).repartition(4).withColumn("_p", F.spark_partition_id())
              .select("uid", "caption", "clip_score", "_p").toArrow())
    ledger = _ledger(runs[1])
    per_partition = pc.value_counts(pc.binary_join_element_wise(
        # toArrow gives large_string (the session sets useLargeVarTypes); the join's kernels want one string type.
        layout["caption"].cast(pa.string()), layout["_p"].cast(pa.string()), "\x00")).to_pylist()
    most_in_one_partition = max(c["counts"] for c in per_partition if c["values"].startswith(BOILERPLATE + "\x00"))
    assert most_in_one_partition <= OPTIONS["max_caption_repeats"] < 40
    boilerplate_uids = {u for u, c in zip(layout["uid"].to_pylist(), layout["caption"].to_pylist(), strict=True)
                        if c == BOILERPLATE}
    assert any(ledger.get(u, (None, None))[1] == Reason.BOILERPLATE_CAPTION for u in boilerplate_uids)

    fraction = OPTIONS["clip_score_top_fraction"]
    whole = top_cutoff(layout["clip_score"], layout["uid"], fraction)
    local_top = set()
    for p in range(4):
        part = layout.filter(pc.equal(layout["_p"], p))
        kept, _ = apply_filter(part, FilterOptions(clip_score_top_fraction=fraction, max_caption_repeats=None),
                               top_cutoff=top_cutoff(part["clip_score"], part["uid"], fraction))
        local_top |= set(kept["uid"].to_pylist())
    global_top, _ = apply_filter(layout, FilterOptions(clip_score_top_fraction=fraction, max_caption_repeats=None),
                                 top_cutoff=whole)
    assert local_top != set(global_top["uid"].to_pylist())
    # the cut falls inside a tie, which the uid breaks
    tied = layout.filter(pc.equal(layout["clip_score"], pa.scalar(whole.score, pa.float32())))["uid"].to_pylist()
    in_top = set(global_top["uid"].to_pylist())
    assert any(u in in_top for u in tied) and any(u not in in_top for u in tied)
    assert all((u in in_top) == (u <= whole.uid) for u in tied)


def test_a_missing_column_is_a_clear_error(spark, scored_stage, tmp_path, caplog):
    ingest_dir = tmp_path / "ingest"
    _write_stage(ingest_dir, "ingest", pq.read_table(scored_stage, columns=["uid", "url", "caption"]))
    with pytest.raises(ValueError, match=r"low_clip_score needs the column clip_score .*\['caption', 'uid', 'url'\]"):
        run_one_stage(spark, "filter", ingest_dir, tmp_path / "out", {"min_clip_score": 0.2})
    assert cli_main(["filter", "--input", str(ingest_dir), "--output", str(tmp_path / "cli"), "--min-image-side",
                     "200"]) == 2
    assert "image_too_small needs the image size columns" in caplog.text
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_an_empty_input_passes_through(spark, scored_stage, tmp_path):
    _write_stage(tmp_path / "empty", "embed", pq.read_table(scored_stage).slice(0, 0))
    record = run_one_stage(spark, "filter", tmp_path / "empty", tmp_path / "out", OPTIONS)
    assert (record["rows_in"], record["rows_out"], record["drops"]) == (0, 0, {})
    assert record["filter"]["rules"][Reason.CLIP_SCORE_NOT_TOP]["keep_count"] == 0
    assert pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).names == pq.read_schema(
        next(scored_stage.glob("*.parquet"))).names
