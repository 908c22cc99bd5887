"""Spark adapter of dedup_image, the model-free part: exact duplicates by sha256 of the image bytes, then near
duplicates by a 64-bit perceptual hash within Hamming distance d, found exactly at any scale: distinct hash values
are keyed into the block-subset tables of `curation.ops.phash_neighbors` in a Spark shuffle, each bucket's pairs
are verified, and groups come from distributed connected components over hash values. The survivor of a group is
the largest image (width x height), ties by the smallest uid.
"""

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.ops.imagehash import DecodeFailure, decode_image, image_sha256, perceptual_hash
from curation.ops.phash_neighbors import NeighbourPlan, bucket_links, plan_tables, table_keys
from curation.schema import TAG_REASON, UID, Reason
from curation.spark.common import drop_where, untagged
from curation.spark.components import connected_components
from curation.spark.dedup import keep_first_per_key
from curation.spark.download import row_images
from curation.spark.executor import StageContext, StageOutput

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ["image_sha256", "image_phash", "image_width", "image_height", "image_dup_group"]


def _fingerprint_worker(batches):
    for batch in batches:
        digests, hashes, widths, heights, failures = [], [], [], [], []
        for data in batch.column(1).to_pylist():
            decoded = decode_image(data)
            if isinstance(decoded, DecodeFailure):
                digests.append(None)
                hashes.append(None)
                widths.append(None)
                heights.append(None)
                failures.append(json.dumps({"reason": decoded.reason, "detail": decoded.detail}))
                continue
            digests.append(image_sha256(data))
            # The 64-bit hash travels as a signed long (Spark has no unsigned type); the bits are unchanged.
            hashes.append(int(np.uint64(perceptual_hash(decoded.image)).view(np.int64)))
            widths.append(decoded.width)
            heights.append(decoded.height)
            failures.append(None)
        yield pa.RecordBatch.from_arrays(
            [batch.column(0), pa.array(digests, pa.string()), pa.array(hashes, pa.int64()),
             pa.array(widths, pa.int32()), pa.array(heights, pa.int32()), pa.array(failures, pa.string())],
            names=[UID, "image_sha256", "image_phash", "image_width", "image_height", "_decode_failure"],
        )


def _table_key_worker(plan: NeighbourPlan):
    def run(batches):
        for batch in batches:
            hashes = batch.column(0).to_numpy()
            tables, keys = table_keys(plan, hashes.view(np.uint64))
            yield pa.RecordBatch.from_arrays(
                [pa.array(tables), pa.array(keys), pa.array(np.repeat(hashes, plan.table_count)),
                 pa.array(np.repeat(batch.column(1).to_numpy(), plan.table_count))],
                names=["table", "key", "hash", "rows"],
            )

    return run


def _bucket_link_worker(plan: NeighbourPlan):
    """Buckets (table, members: list of (hash, rows)) -> links (a, b) joining what their verified pairs join
    (see `bucket_links`); the batch's count of row pairs within max_distance rides on its first link."""
    def run(batches):
        for batch in batches:
            members = batch.column(1)
            offsets = members.offsets.to_numpy()
            values = members.flatten()
            linked, root, row_pairs, _ = bucket_links(
                plan, values.field("hash").to_numpy().view(np.uint64), offsets - offsets[0],
                batch.column(0).to_numpy(), weights=values.field("rows").to_numpy(),
            )
            counts = np.zeros(len(linked), dtype=np.int64)
            if len(linked):
                counts[0] = row_pairs
            yield pa.RecordBatch.from_arrays(
                [pa.array(linked.view(np.int64)), pa.array(root.view(np.int64)), pa.array(counts)],
                names=["a", "b", "row_pairs"],
            )

    return run


@dataclass(frozen=True)
class HashGroups:
    """`groups`: DataFrame (uid, group) of the rows whose hash is within max_distance of another row's, directly
    or through others (identical hashes included), group = the smallest uid of the connected component;
    `row_pairs`: how many pairs of rows are within max_distance (dedup_image's record calls them edges)."""

    groups: object
    row_pairs: int


def near_duplicate_hash_groups(rows, max_distance: int) -> HashGroups:
    """Exact near-duplicate groups of a DataFrame (uid, image_phash long). Only distinct hash values are keyed
    (C(m, d) keys each, m from their count: `plan_tables`); buckets of one member stay in the JVM's aggregation;
    components are computed over hash values, then every row takes its hash's component."""
    from pyspark.sql import functions as F

    distinct = rows.groupBy("image_phash").agg(F.count("*").alias("rows")).localCheckpoint()
    # One pass over the distinct hashes gives the plan's count and the pairs of rows with identical hashes.
    summary = distinct.agg(F.count("*").alias("hashes"),
                           F.sum(F.expr("rows * (rows - 1) div 2")).alias("identical_pairs")).first()
    plan = plan_tables(summary["hashes"], max_distance)
    logger.info("dedup_image: %d distinct hashes, %d tables of %d-bit keys, %.3g chance candidates per hash",
                plan.distinct_count, plan.table_count, plan.key_bits, plan.expected_candidates)
    keys = distinct.mapInArrow(_table_key_worker(plan), "table int, key long, hash long, rows long")
    buckets = (
        keys.groupBy("table", "key").agg(F.collect_list(F.struct("hash", "rows")).alias("members"))
        .filter(F.size("members") > 1).select("table", "members")
    )
    links = buckets.mapInArrow(_bucket_link_worker(plan), "a long, b long, row_pairs long").localCheckpoint()
    components = connected_components(links).select(F.col("node").alias("image_phash"), F.col("root"))
    # Only hashes with a link or with several rows are in a group of two or more rows; the rest never meet a join.
    grouped_hashes = (
        distinct.join(components, "image_phash", "left")
        .filter(F.col("root").isNotNull() | (F.col("rows") > 1))
        .select("image_phash", F.coalesce("root", "image_phash").alias("_component"))
    )
    members = rows.select(UID, "image_phash").join(grouped_hashes, "image_phash").localCheckpoint()
    smallest = members.groupBy("_component").agg(F.min(UID).alias("group"))
    groups = members.join(smallest, "_component").select(UID, "group")
    linked_pairs = links.agg(F.sum("row_pairs")).first()[0] or 0
    return HashGroups(groups, int(linked_pairs + (summary["identical_pairs"] or 0)))


def run_dedup_image(context: StageContext) -> StageOutput:
    """Drop exact (`duplicate_image_bytes`) and perceptual (`near_duplicate_image`) image duplicates and images
    that do not decode (`undecodable_image`); keep one per group, the largest. Adds IMAGE_COLUMNS.

    The images are the rows' `image_column` (encoded bytes), or else the download stage's tars the rows point to."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    options = context.typed
    image_column, max_distance = options.image_column, options.max_distance
    df = context.read_rows()
    images, _ = row_images(df, context.input_dir, image_column, context.partitions)
    data_columns = [c for c in df.columns if c not in IMAGE_COLUMNS]
    fingerprints = images.mapInArrow(
        _fingerprint_worker,
        f"{UID} string, image_sha256 string, image_phash long, image_width int, image_height int, "
        "_decode_failure string",
    ).localCheckpoint()
    tagged = untagged(df.select(*data_columns).join(fingerprints, UID))
    tagged = drop_where(tagged, F.col("_decode_failure").isNotNull(), "dedup_image", Reason.UNDECODABLE_IMAGE,
                        F.lit(None).cast("string"), F.col("_decode_failure"))

    largest_first = [(F.col("image_width") * F.col("image_height")).desc(), F.col(UID)]
    tagged = keep_first_per_key(
        tagged, "image_sha256", largest_first, "dedup_image", Reason.DUPLICATE_IMAGE_BYTES,
        F.to_json(F.struct(F.col("image_sha256").alias("sha256"))),
    ).localCheckpoint()

    survivors = tagged.filter(F.col(TAG_REASON).isNull()).select(UID, "image_phash", "image_width", "image_height")
    hash_groups = near_duplicate_hash_groups(survivors.select(UID, "image_phash"), max_distance)
    groups = hash_groups.groups.select(UID, F.col("group").alias("_group"))
    members = survivors.join(groups, UID)
    largest = Window.partitionBy("_group").orderBy(*largest_first)
    members = (
        members.withColumn("_rank", F.row_number().over(largest))
        .withColumn("_survivor", F.first(UID).over(largest))
        .select(UID, F.col("_group").alias("image_dup_group"), "_rank", "_survivor")
    )
    tagged = tagged.join(members, UID, "left")
    detail = F.to_json(F.struct(F.col("image_dup_group").alias("group"), F.col("_rank").alias("rank")))
    tagged = drop_where(tagged, F.col(TAG_REASON).isNull() & (F.col("_rank") > 1), "dedup_image",
                        Reason.NEAR_DUPLICATE_IMAGE, F.col("_survivor"), detail)

    return StageOutput(
        rows=tagged, columns=[*data_columns, *IMAGE_COLUMNS],
        record={"dedup_image": {"max_distance": max_distance, "image_column": image_column,
                                "edges": hash_groups.row_pairs}},
    )
