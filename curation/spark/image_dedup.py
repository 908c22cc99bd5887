"""Spark adapter of dedup_image, the model-free part: exact duplicates by sha256 of the image bytes, then near
duplicates by a 64-bit perceptual hash within Hamming distance d (candidates by pigeonhole on d + 1 hash chunks in
a Spark shuffle, groups by distributed connected components). The survivor of a group is the largest image
(width x height), ties by the smallest uid.
"""

import json
import logging

import numpy as np
import pyarrow as pa

from curation.ops.imagehash import (
    DecodeFailure,
    chunk_keys,
    decode_image,
    hamming_distances,
    image_sha256,
    perceptual_hash,
)
from curation.schema import TAG_REASON, UID, Reason
from curation.spark.common import drop_where, untagged
from curation.spark.components import connected_components
from curation.spark.dedup import keep_first_per_key, pair_worker
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


def _chunk_key_worker(max_distance: int):
    def run(batches):
        for batch in batches:
            hashes = batch.column(1).to_numpy().view(np.uint64)
            keys = chunk_keys(hashes, max_distance)
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.repeat(np.asarray(batch.column(0).to_pylist(), dtype=object), keys.shape[1]),
                          pa.string()), pa.array(keys.reshape(-1))],
                names=[UID, "key"],
            )

    return run


def _hamming_worker(max_distance: int):
    def run(batches):
        for batch in batches:
            distances = hamming_distances(
                batch.column(2).to_numpy().view(np.uint64), batch.column(3).to_numpy().view(np.uint64)
            ).astype(np.int32)
            keep = pa.array(distances <= max_distance)
            yield pa.RecordBatch.from_arrays(
                [batch.column(0).filter(keep), batch.column(1).filter(keep), pa.array(distances).filter(keep)],
                names=["a", "b", "distance"],
            )

    return run


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
    keys = survivors.select(UID, "image_phash").mapInArrow(_chunk_key_worker(max_distance), f"{UID} string, key long")
    buckets = (
        keys.groupBy("key").agg(F.sort_array(F.collect_list(UID)).alias("members"))
        .filter(F.size("members") > 1).select("members")
    )
    pairs = buckets.mapInArrow(pair_worker(options.max_anchors, options.full_pairs_limit),
                               "a string, b string").distinct()
    hash_a = survivors.select(F.col(UID).alias("a"), F.col("image_phash").alias("hash_a"))
    hash_b = survivors.select(F.col(UID).alias("b"), F.col("image_phash").alias("hash_b"))
    edges = (
        pairs.join(hash_a, "a").join(hash_b, "b").select("a", "b", "hash_a", "hash_b")
        .mapInArrow(_hamming_worker(max_distance), "a string, b string, distance int").localCheckpoint()
    )
    groups = connected_components(edges).select(F.col("node").alias(UID), F.col("root").alias("_group"))
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
        record={"dedup_image": {"max_distance": max_distance, "image_column": image_column, "edges": edges.count()}},
    )
