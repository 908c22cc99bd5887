"""Spark adapters of the caption-side dedup stages: dedup_exact (same normalised url, optionally same caption)
and dedup_text (MinHash-LSH near-duplicate captions, verified by exact Jaccard, grouped by connected components).
"""

import logging

import numpy as np
import pyarrow as pa

from curation.ops.jaccard import exact_jaccard_pairs
from curation.ops.lsh import anchor_edges, band_hashes, choose_bands
from curation.ops.minhash import EMPTY_HASH_VALUE, MinHasher
from curation.ops.shingles import normalise_texts, parse_shingle_spec
from curation.ops.survivors import parse_policy
from curation.ops.uid import uniform
from curation.ops.urls import normalise_urls
from curation.schema import CAPTION, TAG_REASON, UID, URL, Reason
from curation.spark.common import drop_where, untagged
from curation.spark.components import connected_components
from curation.spark.executor import StageOutput

logger = logging.getLogger(__name__)

TEXT_DEDUP_PURPOSE = "dedup_text"
GROUP_COLUMN = "text_dup_group"
GROUP_SIZE_COLUMN = "text_dup_group_size"


def keep_first_per_key(tagged, key, order: list, stage: str, reason: str, detail):
    """Among the rows not dropped yet, keep the first of each `key` group in `order` and drop the others with
    `reason`, the kept row's uid as related uid and `detail`; rows dropped earlier pass through unchanged."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    window = Window.partitionBy(key).orderBy(*order)
    ranked = (
        tagged.filter(F.col(TAG_REASON).isNull())
        .withColumn("_rank", F.row_number().over(window))
        .withColumn("_winner", F.first(UID).over(window))
    )
    ranked = drop_where(ranked, F.col("_rank") > 1, stage, reason, F.col("_winner"), detail)
    return ranked.drop("_rank", "_winner").unionByName(tagged.filter(F.col(TAG_REASON).isNotNull()))


# ---------------------------------------------------------------------------------------------------- exact


def _url_key_worker(batches):
    for batch in batches:
        table = pa.Table.from_batches([batch])
        yield pa.RecordBatch.from_arrays(
            [table.column(UID).combine_chunks(), normalise_urls(table.column(URL).combine_chunks())],
            names=[UID, "_url_key"],
        )


def run_dedup_exact(context) -> StageOutput:
    """One row per normalised url (and, with `by_caption`, per exact caption); the survivor is the smallest uid.

    Losers go to the ledger as `duplicate_url` / `duplicate_caption` with the uid they lost to.
    """
    from pyspark.sql import functions as F

    df = context.read_rows()
    data_columns = df.columns
    keys = df.select(UID, URL).mapInArrow(_url_key_worker, f"{UID} string, _url_key string")
    tagged = keep_first_per_key(
        untagged(df.join(keys, UID)), "_url_key", [UID], "dedup_exact", Reason.DUPLICATE_URL,
        F.to_json(F.struct(F.col("_url_key").alias("normalised_url"))),
    )
    if context.options["by_caption"]:
        tagged = keep_first_per_key(
            tagged, CAPTION, [UID], "dedup_exact", Reason.DUPLICATE_CAPTION, F.lit(None).cast("string")
        )
    return StageOutput(rows=tagged, columns=data_columns)


# ---------------------------------------------------------------------------------------------------- near


def _band_worker(num_perm: int, seed: int, kind: str, size: int, bands: int, rows: int):
    def run(batches):
        hasher = MinHasher(num_perm, seed, kind=kind, size=size)
        for batch in batches:
            signatures = hasher.signatures(batch.column(1))
            # A text without shingles has the empty signature; it would share every bucket and match nothing.
            has_shingles = ~np.all(signatures == EMPTY_HASH_VALUE, axis=1)
            uids = batch.column(0).filter(pa.array(has_shingles))
            keys = band_hashes(signatures[has_shingles], bands, rows).view(np.int64)
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(np.repeat(np.asarray(uids.to_pylist(), dtype=object), bands), pa.string()),
                    pa.array(np.tile(np.arange(bands, dtype=np.int32), len(uids))),
                    pa.array(keys.reshape(-1)),
                ],
                names=[UID, "band", "key"],
            )

    return run


def pair_worker(max_anchors: int, full_pairs_limit: int):
    def run(batches):
        for batch in batches:
            left, right = [], []
            for members in batch.column(0).to_pylist():
                anchors = len(members) - 1 if len(members) <= full_pairs_limit else max_anchors
                a, b = anchor_edges(np.asarray(members, dtype=object), anchors)
                left.extend(a.tolist())
                right.extend(b.tolist())
            yield pa.RecordBatch.from_arrays([pa.array(left, pa.string()), pa.array(right, pa.string())], ["a", "b"])

    return run


def _verify_worker(kind: str, size: int, threshold: float):
    def run(batches):
        for batch in batches:
            table = pa.Table.from_batches([batch])
            similarity = exact_jaccard_pairs(table.column("text_a"), table.column("text_b"), kind, size)
            keep = similarity >= threshold
            yield pa.RecordBatch.from_arrays(
                [
                    table.column("a").combine_chunks().filter(pa.array(keep)),
                    table.column("b").combine_chunks().filter(pa.array(keep)),
                    pa.array(similarity[keep]),
                ],
                names=["a", "b", "similarity"],
            )

    return run


def _uniform_worker(seed: int):
    def run(batches):
        for batch in batches:
            draws = uniform(seed, batch.column(0), TEXT_DEDUP_PURPOSE)
            yield pa.RecordBatch.from_arrays([batch.column(0), batch.column(1), pa.array(draws)], [UID, "root", "u"])

    return run


def _normalised_worker(batches):
    for batch in batches:
        yield pa.RecordBatch.from_arrays(
            [batch.column(0), pa.array(normalise_texts(batch.column(1)), pa.string())], [UID, "_normal"]
        )


def caption_similarity_edges(spark, texts, threshold: float, shingles: str, num_perm: int, bands: int, rows: int,
                             seed: int, max_anchors: int, full_pairs_limit: int):
    """Edges (a, b, similarity) of every near-duplicate caption pair, for connected components.

    Captions that are equal after normalisation (lowercase, whitespace collapsed) have identical shingle sets:
    they are linked to their smallest uid with similarity 1 directly, and only one of them per text enters
    MinHash-LSH. Web and template corpora repeat texts thousands of times; this keeps LSH buckets and candidate
    pairs proportional to the distinct texts.
    """
    from pyspark.sql import functions as F

    normal = texts.mapInArrow(_normalised_worker, f"{UID} string, _normal string")
    representatives = normal.groupBy("_normal").agg(F.min(UID).alias("_representative"))
    same_text = (
        normal.join(representatives, "_normal")
        .filter(F.col(UID) != F.col("_representative"))
        .select(F.col("_representative").alias("a"), F.col(UID).alias("b"), F.lit(1.0).alias("similarity"))
    )
    distinct_texts = texts.join(representatives.select(F.col("_representative").alias(UID)), UID)
    near = near_duplicate_edges(spark, distinct_texts, threshold, shingles, num_perm, bands, rows, seed, max_anchors,
                                full_pairs_limit)
    return near.unionByName(same_text)


def near_duplicate_edges(spark, texts, threshold: float, shingles: str, num_perm: int, bands: int, rows: int,
                         seed: int, max_anchors: int, full_pairs_limit: int):
    """DataFrame (a, b, similarity) of caption pairs whose exact shingle Jaccard is >= threshold (a < b)."""
    from pyspark.sql import functions as F

    kind, size = parse_shingle_spec(shingles)
    logger.info("MinHash-LSH: %d permutations, %d bands x %d rows, shingles %s", num_perm, bands, rows, shingles)
    keys = texts.mapInArrow(
        _band_worker(num_perm, seed, kind, size, bands, rows), f"{UID} string, band int, key long"
    )
    buckets = (
        keys.groupBy("band", "key").agg(F.sort_array(F.collect_list(UID)).alias("members"))
        .filter(F.size("members") > 1).select("members")
    )
    pairs = buckets.mapInArrow(pair_worker(max_anchors, full_pairs_limit), "a string, b string").distinct()
    text_a = texts.select(F.col(UID).alias("a"), F.col(CAPTION).alias("text_a"))
    text_b = texts.select(F.col(UID).alias("b"), F.col(CAPTION).alias("text_b"))
    candidates = pairs.join(text_a, "a").join(text_b, "b").select("a", "b", "text_a", "text_b")
    return candidates.mapInArrow(_verify_worker(kind, size, threshold), "a string, b string, similarity double")


def run_dedup_text(context) -> StageOutput:
    """Near-duplicate caption groups; per group the policy keeps `cap` members (smallest u(seed, uid)).

    Every row in a group gets `text_dup_group` (the group's smallest uid) and `text_dup_group_size`; dropped rows go
    to the ledger as `near_duplicate_caption` with the group's first survivor as related uid.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    options = context.options
    threshold, shingles = float(options["threshold"]), options["shingles"]
    num_perm, seed = int(options["num_perm"]), int(options["seed"])
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    keep_policy = parse_policy(options["policy"])
    df = context.read_rows()
    data_columns = [c for c in df.columns if c not in (GROUP_COLUMN, GROUP_SIZE_COLUMN)]
    df = df.select(*data_columns)
    bands, rows = choose_bands(num_perm, threshold)
    edges = caption_similarity_edges(
        context.spark, df.select(UID, CAPTION), threshold, shingles, num_perm, bands, rows, seed,
        int(options["max_anchors"]), int(options["full_pairs_limit"]),
    ).localCheckpoint()
    components = connected_components(edges)
    sizes = components.groupBy("root").agg(F.count("*").alias(GROUP_SIZE_COLUMN))
    members = components.select(F.col("node").alias(UID), "root").mapInArrow(
        _uniform_worker(seed), f"{UID} string, root string, u double"
    )
    order = Window.partitionBy("root").orderBy("u", UID)
    members = (
        members.join(sizes, "root")
        .withColumn("_rank", F.row_number().over(order))
        .withColumn("_survivor", F.first(UID).over(order))
        .select(UID, F.col("root").alias(GROUP_COLUMN), GROUP_SIZE_COLUMN, "_rank", "_survivor")
    )
    tagged = untagged(df.join(members, UID, "left"))
    if keep_policy.cap is not None:
        dropped = F.col("_rank") > keep_policy.cap
        detail = F.to_json(F.struct(
            F.col(GROUP_COLUMN).alias("group"), F.col(GROUP_SIZE_COLUMN).alias("group_size"),
            F.col("_rank").alias("rank"), F.lit(str(keep_policy)).alias("policy"),
        ))
        tagged = drop_where(tagged, dropped, "dedup_text", Reason.NEAR_DUPLICATE_CAPTION, F.col("_survivor"),
                            detail)
    tagged = tagged.drop("_rank", "_survivor")
    summary = edges.agg(F.count("*").alias("edges")).first()
    group_stats = sizes.agg(F.count("*").alias("groups"), F.sum(GROUP_SIZE_COLUMN).alias("rows_in_groups"),
                            F.max(GROUP_SIZE_COLUMN).alias("largest_group")).first()
    dedup_info = {
        "threshold": threshold, "shingles": shingles, "policy": str(keep_policy), "num_perm": num_perm,
        "bands": bands, "rows_per_band": rows, "verified_edges": summary["edges"],
        "groups": group_stats["groups"], "rows_in_groups": group_stats["rows_in_groups"] or 0,
        "largest_group": group_stats["largest_group"] or 0,
    }
    return StageOutput(rows=tagged, columns=[*data_columns, GROUP_COLUMN, GROUP_SIZE_COLUMN],
                       record={"dedup": dedup_info})
