"""Spark adapter of the filter stage: the attribute rules of `curation.ops.filters`, one ledger reason per rule.

The two rules that need the stage's whole input are computed over all of it before the per-partition pass, so
the outcome does not depend on the partitioning:

- clip_score_top_fraction: a distributed sort of (clip_score descending, uid ascending) over the rows with a
  score; each row then carries its partition index and its index inside the partition (monotonically_increasing_id
  after the sort), the driver adds up the partition sizes and fetches the one row at rank keep_count - 1: the
  TopCutoff every partition compares against. No step gathers more than the per-partition counts on one machine.
- max_caption_repeats: a groupBy count of the exact captions; the captions above the limit (at most
  N / (max_caption_repeats + 1) of them) are joined back to the rows as their count, and the pure rule drops
  those rows.
"""

import logging
from pathlib import Path

import pyarrow as pa

from curation.ops.filters import (
    CLIP_SCORE,
    RULES,
    FilterOptions,
    TopCutoff,
    apply_filter,
    rule_columns,
    top_keep_count,
)
from curation.schema import CAPTION, UID, Reason
from curation.spark.executor import StageContext
from curation.spark.rowfilter import FilterPlan

logger = logging.getLogger(__name__)

# The per-row count of a boilerplate caption over the whole input (null: not above max_caption_repeats).
CAPTION_REPEATS = "_filter_caption_repeats"
# How many of the most repeated boilerplate captions the stage record names.
BOILERPLATE_SAMPLE = 10
_SAMPLE_CHARS = 200
_ROW_BITS = 33  # monotonically_increasing_id = partition index << 33 | row index inside the partition


def top_cutoff_of(df, fraction: float, rows: int) -> TopCutoff:
    """The TopCutoff of the clip_score ranking over every row of `df` (`rows` of them): the same one
    `curation.ops.filters.top_cutoff` computes in memory, whatever the partitioning."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    keep = top_keep_count(fraction, rows)
    score = F.col(CLIP_SCORE).cast("double")
    # NaN sorts above every number in Spark; like null it is a missing score, never in the top.
    scored = df.select(UID, score.alias("_score")).filter(F.col("_score").isNotNull() & ~F.isnan("_score"))
    ranked = (
        scored.orderBy(F.col("_score").desc(), F.col(UID).asc())
        .withColumn("_id", F.monotonically_increasing_id())
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        sizes = dict(
            ranked.groupBy(F.shiftright("_id", _ROW_BITS).alias("_partition")).count().collect()
        )
        if sum(sizes.values()) <= keep:
            return TopCutoff(fraction, rows, keep)
        before = 0
        for partition in sorted(sizes):
            if before + sizes[partition] >= keep:
                target = (partition << _ROW_BITS) + (keep - 1 - before)
                break
            before += sizes[partition]
        last = ranked.filter(F.col("_id") == F.lit(target)).select("_score", UID).collect()
        if len(last) != 1:
            raise RuntimeError(f"clip_score ranking: expected one row at rank {keep - 1}, found {len(last)}")
        return TopCutoff(fraction, rows, keep, float(last[0][0]), last[0][1])
    finally:
        ranked.unpersist()


def boilerplate_captions(df, max_repeats: int):
    """The captions shared by more than `max_repeats` rows of `df`, as (caption, CAPTION_REPEATS): a groupBy count
    over the whole input, so a caption's rows count together whichever partitions they are in."""
    from pyspark.sql import functions as F

    return (
        df.groupBy(CAPTION).agg(F.count(F.lit(1)).alias(CAPTION_REPEATS))
        .filter(F.col(CAPTION).isNotNull() & (F.col(CAPTION_REPEATS) > max_repeats))
    )


def _boilerplate_summary(repeated) -> dict:
    from pyspark.sql import functions as F

    totals = repeated.agg(F.count(F.lit(1)), F.sum(CAPTION_REPEATS)).collect()[0]
    top = repeated.orderBy(F.col(CAPTION_REPEATS).desc(), F.col(CAPTION)).limit(BOILERPLATE_SAMPLE).collect()
    return {
        "boilerplate_captions": int(totals[0]),
        "rows_with_boilerplate_caption": int(totals[1] or 0),
        "most_repeated": [{"caption": caption[:_SAMPLE_CHARS], "rows": int(count)} for caption, count in top],
    }


def filter_plan(context: StageContext, df) -> FilterPlan:
    """Drop the rows failing an attribute rule (`curation.ops.filters`), each with the first failing rule's reason
    and a detail of the measured value and the threshold; the record's `filter` summary gives each active rule's
    threshold and drops."""
    rules = FilterOptions.from_options(context.options)
    columns = rule_columns(rules, df.columns)
    rows_in = context.rows_in
    summary: dict[str, dict] = {}
    cutoff = None
    if rules.clip_score_top_fraction is not None:
        cutoff = top_cutoff_of(df, rules.clip_score_top_fraction, rows_in)
        summary[Reason.CLIP_SCORE_NOT_TOP] = cutoff.summary()
        logger.info("filter: the top %d of %d rows by clip_score end at score %s (uid %s)", cutoff.keep_count,
                    rows_in, cutoff.score, cutoff.uid)
    rows = df
    if rules.max_caption_repeats is not None:
        # Few rows (each stands for more than max_caption_repeats input rows): kept for the summary and the join.
        repeated = context.persist(boilerplate_captions(df, rules.max_caption_repeats))
        summary[Reason.BOILERPLATE_CAPTION] = _boilerplate_summary(repeated)
        rows = df.join(repeated, CAPTION, "left")

    def keep(table: pa.Table) -> tuple[pa.Table, pa.Table]:
        repeats = table.column(CAPTION_REPEATS) if CAPTION_REPEATS in table.column_names else None
        return apply_filter(table, rules, top_cutoff=cutoff, caption_repeats=repeats)

    def filter_summary(written_dir: Path, rows_out: int, drops: dict[str, int]) -> dict:
        return {"filter": {
            "rules": {
                reason: {option: getattr(rules, option), "columns": list(columns[reason]),
                         **summary.get(reason, {}), "dropped": drops.get(reason, 0)}
                for reason, option in RULES if reason in columns
            },
            "order": [reason for reason, _ in RULES if reason in columns],
            "off": [reason for reason, _ in RULES if reason not in columns],
        }}

    return FilterPlan(rows=rows, keep=keep, after_write=filter_summary)
