"""Spark adapters of the CPU stages: ingest, match, count, balance.

Each adapter plans on the driver, runs one `mapInArrow` pass whose worker function calls the pure function in
`curation.ops`, and hands its tagged rows and artifacts to the executor (`curation.spark.executor`).
"""

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.inputs import plan_inputs, read_row_group
from curation.io import fingerprint_files
from curation.ops import balance as balance_ops
from curation.ops.ingest import IngestOptions, normalise_rows
from curation.ops.metadata import load_metadata, metadata_sha256, write_metadata
from curation.ops.uid import uniform
from curation.run_folder import (
    Artifact,
    artifact_path,
    find_upstream,
    read_stage_record,
    resolve_data_dir,
    stage_chain,
)
from curation.schema import CAPTION, ENTRY_IDS, KEEP_PROBABILITY, TAG_REASON, UID, URL, Reason
from curation.spark.common import (
    arrow_schema_of,
    spark_schema,
    tag_dropped,
    tag_kept,
    with_tags,
)
from curation.spark.executor import StageContext, StageOutput

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------- ingest


def _ingest_schema(keep_types: list[pa.Field]) -> pa.Schema:
    data = pa.schema(
        [pa.field(UID, pa.string()), pa.field(URL, pa.string()), pa.field(CAPTION, pa.string())]
        + keep_types
        + [pa.field("_file_index", pa.int32()), pa.field("_source_file", pa.string()),
           pa.field("_source_row", pa.int64())]
    )
    return with_tags(data)


def _ingest_worker(options: IngestOptions, schema: pa.Schema):
    def run(batches):
        for batch in batches:
            for unit in batch.to_pylist():
                columns = [unit["url_column"], unit["text_column"], *options.keep_columns]
                table = read_row_group(unit["path"], unit["row_group"], columns, unit["rows"])
                unit_options = replace(options, url_column=unit["url_column"], text_column=unit["text_column"])
                kept, rejected = normalise_rows(table, unit_options, unit["path"], unit["first_row"])
                kept = kept.append_column("_file_index", pa.array([unit["file_index"]] * len(kept), pa.int32()))
                kept = kept.append_column("_source_file", pa.array([unit["path"]] * len(kept), pa.string()))
                yield tag_kept(kept, schema)
                yield tag_dropped(rejected[UID], "ingest", rejected["reason"], schema, details=rejected["detail"])

    return run


def run_ingest(context: StageContext) -> StageOutput:
    """Raw shards -> stage folder of (uid, url, caption, keep columns); bad rows and repeated uids to the ledger."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark, partitions = context.spark, context.partitions
    options = IngestOptions.from_options(context.options)
    plan = plan_inputs(context.input_location, options, context.options["skip_bad_files"])
    schema = _ingest_schema(plan.keep_fields)
    by_index = {f.index: f for f in plan.files}
    units = [
        (file_index, path, group, first_row, rows, by_index[file_index].url_column, by_index[file_index].text_column)
        for file_index, path, group, first_row, rows in plan.units()
    ]
    units_df = spark.createDataFrame(
        units,
        "file_index int, path string, row_group int, first_row long, rows long, url_column string, text_column string",
    )
    units_df = units_df.repartition(partitions or max(1, min(len(units), spark.sparkContext.defaultParallelism)))
    tagged = units_df.mapInArrow(_ingest_worker(options, schema), spark_schema(schema))

    # The first occurrence (by file order, then row) of a repeated uid is kept; later ones are duplicate_pair.
    order = Window.partitionBy(UID).orderBy("_file_index", "_source_row")
    kept = tagged.filter(F.col(TAG_REASON).isNull())
    ranked = (
        kept.withColumn("_rank", F.row_number().over(order))
        .withColumn("_first_file", F.first("_source_file").over(order))
        .withColumn("_first_row", F.first("_source_row").over(order))
    )
    duplicate = F.col("_rank") > 1
    detail = F.to_json(
        F.struct(
            F.col("_source_file").alias("file"), F.col("_source_row").alias("row"),
            F.col("_first_file").alias("first_file"), F.col("_first_row").alias("first_row"),
        )
    )
    ranked = (
        ranked.withColumn("_ledger_stage", F.when(duplicate, F.lit("ingest")))
        .withColumn(TAG_REASON, F.when(duplicate, F.lit(Reason.DUPLICATE_PAIR)))
        .withColumn("_ledger_related_uid", F.when(duplicate, F.col(UID)))
        .withColumn("_ledger_detail", F.when(duplicate, detail))
        .drop("_rank", "_first_file", "_first_row")
    )
    combined = ranked.unionByName(tagged.filter(F.col(TAG_REASON).isNotNull()))

    input_info = {
        "files": [{"path": f.path, "rows": f.rows, "bytes": f.size} for f in plan.files],
        "skipped_files": plan.skipped,
        "fingerprint": fingerprint_files([Path(f.path) for f in plan.files if "://" not in f.path]),
    }
    return StageOutput(rows=combined, columns=[UID, URL, CAPTION, *options.keep_columns], rows_in=plan.rows,
                       input=input_info)


# ---------------------------------------------------------------------------------------------------- match

_MATCHER_CACHE: dict = {}


def _matcher_for(metadata_sha: str, entries_broadcast):
    """One Matcher per executor process: built from the broadcast entries on first use, then reused."""
    from curation.ops.metaclip import Matcher

    if metadata_sha not in _MATCHER_CACHE:
        _MATCHER_CACHE.clear()
        _MATCHER_CACHE[metadata_sha] = Matcher.from_entries(entries_broadcast.value)
    return _MATCHER_CACHE[metadata_sha]


def _match_worker(metadata_sha: str, entries_broadcast, keep_unmatched: bool, schema: pa.Schema):
    def run(batches):
        matcher = _matcher_for(metadata_sha, entries_broadcast)
        for batch in batches:
            table = pa.Table.from_batches([batch])
            entry_ids = matcher.match(table.column(CAPTION))
            table = table.append_column(ENTRY_IDS, entry_ids)
            matched = pc.greater(pc.list_value_length(entry_ids), 0)
            if keep_unmatched:
                yield tag_kept(table, schema)
                continue
            yield tag_kept(table.filter(matched), schema)
            unmatched = table.filter(pc.invert(matched))
            yield tag_dropped(unmatched[UID].combine_chunks(), "match", Reason.NO_METADATA_MATCH, schema)

    return run


def run_match(context: StageContext) -> StageOutput:
    """Rows gain an `entry_ids` column (sorted unique MetaCLIP entry ids); unmatched rows go to the ledger."""
    metadata_path = Path(context.options["metadata"])
    entries = load_metadata(metadata_path)
    metadata_sha = metadata_sha256(entries)
    entries_broadcast = context.broadcast(entries)
    df = context.read_rows()
    data_schema = arrow_schema_of(df)
    data_schema = data_schema.append(pa.field(ENTRY_IDS, pa.list_(pa.int32())))
    schema = with_tags(data_schema)
    tagged = df.mapInArrow(
        _match_worker(metadata_sha, entries_broadcast, context.options["keep_unmatched"], schema), spark_schema(schema)
    )
    write_metadata(context.artifact(Artifact.METADATA), entries)
    metadata_info = {"path": str(metadata_path), "entries": len(entries), "sha256": metadata_sha,
                     **_never_matching(entries)}
    return StageOutput(rows=tagged, columns=data_schema.names, record={"metadata": metadata_info})


def _never_matching(entries: list[str]) -> dict:
    """Entries that MetaCLIP's spacing makes impossible to match (reported, never silently dropped)."""
    from curation.ops.metaclip import Matcher

    never = Matcher.from_entries(entries).unmatchable_entry_ids()
    if never:
        logger.warning("%d metadata entries can never match (e.g. %s)", len(never), [entries[i] for i in never[:5]])
    return {"never_match_entries": len(never), "never_match_sample": [entries[i] for i in never[:20]]}


# ---------------------------------------------------------------------------------------------------- count


def metadata_of(stage_dir: Path) -> list[str]:
    """The metadata entries the chain ending at `stage_dir` was matched with (copied by the match stage)."""
    match_dir = find_upstream(stage_dir, "match")
    if match_dir is None:
        raise ValueError(f"{stage_dir} has no match stage upstream: balancing needs matched rows")
    return load_metadata(artifact_path(match_dir, Artifact.METADATA))


def compute_entry_counts(df, entry_count: int) -> np.ndarray:
    """c_e for every entry id: the number of rows whose entry_ids contain e (a global reduce)."""
    from pyspark.sql import functions as F

    counts = np.zeros(entry_count, dtype=np.int64)
    rows = df.select(F.explode(ENTRY_IDS).alias("entry_id")).groupBy("entry_id").count().collect()
    for entry_id, count in rows:
        counts[entry_id] = count
    return counts


def _write_counts(path: Path, entries: list[str], **counts: np.ndarray) -> None:
    """An entry table artifact: entry_id, entry, then one int64 column per keyword (count, count_before, ...)."""
    columns = {"entry_id": pa.array(np.arange(len(entries), dtype=np.int32)), "entry": pa.array(entries, pa.string())}
    columns.update({name: pa.array(values, pa.int64()) for name, values in counts.items()})
    pq.write_table(pa.table(columns), path)


def read_counts(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["count"]).column("count").to_numpy()


def run_count(context: StageContext) -> StageOutput:
    """Entry counts artifact; the rows pass through untouched (the record points at the input's data)."""
    entries = metadata_of(context.input_dir)
    data_dir = resolve_data_dir(context.input_dir)
    counts = compute_entry_counts(context.spark.read.parquet(str(data_dir)), len(entries))
    _write_counts(context.artifact(Artifact.ENTRY_COUNTS), entries, count=counts)
    summary = {
        "entries_matched": int((counts > 0).sum()),
        "matches": int(counts.sum()),
        "top_entries": balance_ops.top_entries(counts, entries, 50),
    }
    return StageOutput(data_from=data_dir, record={"counts": summary})


# ---------------------------------------------------------------------------------------------------- balance

_GRID_POINTS = 64


def _expected_kept_worker(counts_broadcast, thresholds: list[float]):
    def run(batches):
        grid = np.asarray(thresholds)
        for batch in batches:
            offsets, values = balance_ops.list_parts(batch.column(ENTRY_IDS))
            expected = balance_ops.expected_kept_for_thresholds(offsets, values, counts_broadcast.value, grid)
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.arange(len(grid), dtype=np.int32)), pa.array(expected)], names=["point", "expected"]
            )

    return run


def solve_threshold_for_target(spark, df, counts: np.ndarray, target_size: int) -> float:
    """t such that the expected number of kept rows, sum of P(keep), equals `target_size` (grid refinement)."""
    from pyspark.sql import functions as F

    if target_size <= 0:
        raise ValueError(f"target size must be positive, got {target_size}")
    entry_ids = df.select(ENTRY_IDS).cache()
    counts_broadcast = spark.sparkContext.broadcast(counts)
    try:
        thresholds = balance_ops.initial_threshold_grid(counts, _GRID_POINTS)
        for _ in range(12):
            worker = _expected_kept_worker(counts_broadcast, thresholds.tolist())
            sums = (
                entry_ids.mapInArrow(worker, "point int, expected double")
                .groupBy("point").agg(F.sum("expected").alias("expected")).collect()
            )
            expected = np.zeros(len(thresholds))
            for point, value in sums:
                expected[point] = value
            thresholds, answer = balance_ops.refine_threshold_bracket(thresholds, expected, target_size, _GRID_POINTS)
            if answer is not None:
                return answer
        return float(thresholds[len(thresholds) // 2])
    finally:
        counts_broadcast.unpersist()
        entry_ids.unpersist()


def _balance_worker(counts_broadcast, t: float, seed: int, purpose: str, schema: pa.Schema):
    def run(batches):
        counts = counts_broadcast.value
        for batch in batches:
            table = pa.Table.from_batches([batch])
            offsets, values = balance_ops.list_parts(table.column(ENTRY_IDS))
            probability = balance_ops.keep_probabilities(offsets, values, counts, t)
            draws = uniform(seed, table.column(UID), purpose)
            keep = draws < probability
            kept = table.filter(pa.array(keep)).append_column(KEEP_PROBABILITY, pa.array(probability[keep]))
            yield tag_kept(kept, schema)
            dropped_index = np.flatnonzero(~keep)
            details = pa.array([json.dumps({"p_keep": float(probability[i])}) for i in dropped_index], pa.string())
            dropped_uids = table.column(UID).take(pa.array(dropped_index, pa.int64())).combine_chunks()
            yield tag_dropped(dropped_uids, "balance", Reason.BALANCE_NOT_DRAWN, schema, details=details)

    return run


def choose_threshold(spark, df, counts: np.ndarray, t, target_size, tail_share) -> tuple[float, str]:
    """t from the one of t, target_size, tail_share given (the loader checks that at most one is); MetaCLIP's
    20,000 when none is."""
    if target_size:
        return solve_threshold_for_target(spark, df, counts, int(target_size)), "target_size"
    if tail_share:
        return float(balance_ops.threshold_for_tail_share(counts, float(tail_share))), "tail_share"
    return float(t if t is not None else balance_ops.METACLIP_T), "t"


def run_balance(context: StageContext) -> StageOutput:
    """Keep each row with P = 1 - prod(1 - min(1, t / c_e)); not drawn rows to the ledger with their P."""
    input_dir, options = context.input_dir, context.options
    seed = int(options["seed"])
    entries = metadata_of(input_dir)
    df = context.read_rows()
    # A balance stage may run again after the image stages (MetaCLIP's advice): its keep_probability replaces the
    # earlier one, and the counts must be of the rows it balances now.
    df = df.drop(KEEP_PROBABILITY)
    count_dir = input_dir if read_stage_record(input_dir)["stage"] == "count" else None
    if count_dir is not None:
        counts = read_counts(artifact_path(count_dir, Artifact.ENTRY_COUNTS))
    else:
        logger.info("balance: the input is not a count stage, so c_e is counted over the input's rows first")
        counts = compute_entry_counts(df, len(entries))
    threshold, threshold_source = choose_threshold(context.spark, df, counts, options["t"], options["target_size"],
                                                   options["tail_share"])
    purpose = balance_ops.balance_purpose(sum(record["stage"] == "balance" for _, record in stage_chain(input_dir)))
    logger.info("balancing with t = %.6g (from %s)", threshold, threshold_source)

    data_schema = arrow_schema_of(df)
    data_schema = data_schema.append(pa.field(KEEP_PROBABILITY, pa.float64()))
    schema = with_tags(data_schema)
    counts_broadcast = context.broadcast(counts)
    tagged = df.mapInArrow(_balance_worker(counts_broadcast, threshold, seed, purpose, schema), spark_schema(schema))
    if count_dir is None:
        _write_counts(context.artifact(Artifact.ENTRY_COUNTS), entries, count=counts)

    def balancing_summary(written_dir: Path, rows_out: int, drops: dict[str, int]) -> dict:
        counts_after = compute_entry_counts(context.spark.read.parquet(str(written_dir)), len(entries))
        _write_counts(context.artifact(Artifact.BALANCED_COUNTS), entries, count_before=counts,
                      count_after=counts_after)
        return {"balancing": {
            "t": threshold,
            "t_from": threshold_source,
            "seed": seed,
            "draw_purpose": purpose,
            "tail_share_before": balance_ops.tail_share(counts, threshold),
            "tail_share_after": balance_ops.tail_share(counts_after, threshold),
            "top_entries_before": balance_ops.top_entries(counts, entries, 50),
            "top_entries_after": balance_ops.top_entries(counts_after, entries, 50),
        }}

    return StageOutput(rows=tagged, columns=data_schema.names, after_write=balancing_summary)
