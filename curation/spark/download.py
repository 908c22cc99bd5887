"""Spark adapter of download: img2dataset per uid-range shard, one Spark task per shard, every row ledgered.

Rows go to shard k of S by the first 60 bits of their uid (as publish shards them), S = ceil(rows / shard_rows), so
a shard's content depends only on the set of rows. Each shard is one call of img2dataset's `Downloader` in a Spark
task (img2dataset's pyspark distributor does the same: one picklable function per shard); the task installs the
address check first. Finished shards live in the stage's work folder until the stage commits, so a rerun after a
crash downloads only the unfinished ones. The images end in `_artifacts/images/<shard>.tar`; the rows carry
`image_shard` (the tar's file name), `image_key` (the sample key in it), the stored and original sizes and
`image_source_sha256` (of the bytes as served, before resizing).
"""

import logging
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from curation.io import remove_leftovers
from curation.ops import download as download_ops
from curation.ops import tars as tar_ops
from curation.ops.download import DownloadOptions
from curation.progress import Progress, polling
from curation.run_folder import Artifact, downloaded_images_dir
from curation.schema import CAPTION, TAG_REASON, UID, URL
from curation.spark.common import drop_where, untagged
from curation.spark.executor import StageContext, StageOutput
from curation.spark.publish import shard_of_prefix_expression

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = [
    "image_shard", "image_key", "image_width", "image_height", "image_original_width", "image_original_height",
    "image_source_sha256",
]
_STATUS_SCHEMA = (
    "uid string, image_shard string, image_key string, image_width int, image_height int, "
    "image_original_width int, image_original_height int, image_source_sha256 string, _reason string, _detail string"
)


def _image_bytes_worker(images_dir: str, image_column: str):
    def run(batches):
        with tar_ops.TarReader() as reader:
            for batch in batches:
                images = []
                for shard, key in zip(batch.column(1).to_pylist(), batch.column(2).to_pylist(), strict=True):
                    found = reader.image(os.path.join(images_dir, shard), key)
                    images.append(found[1] if found else None)
                yield pa.RecordBatch.from_arrays([batch.column(0), pa.array(images, pa.binary())],
                                                 names=[UID, image_column])

    return run


def row_images(df, input_dir: Path, image_column: str = "jpg", partitions: int | None = None,
               alternatives: str = "") -> tuple[object, str]:
    """((uid, `image_column`) with every row's encoded image, where they came from): the rows' own
    `image_column` if they carry one, else the tars of the download stage upstream of `input_dir` (read by
    `image_bytes` with `partitions`). `alternatives` names what else the caller could have used, for the error."""
    if image_column in df.columns:
        return df.select(UID, image_column), f"column {image_column}"
    if "image_shard" in df.columns:
        return image_bytes(df, downloaded_images_dir(input_dir), image_column, partitions), "download tars"
    raise ValueError(f"{input_dir} rows have neither an image column {image_column!r}{alternatives} nor images "
                     f"downloaded by a download stage; columns are {df.columns}")


def image_bytes(df, images_dir: Path, image_column: str = "jpg", partitions: int | None = None):
    """(uid, `image_column`) with the encoded image of every row of `df`, read from the download stage's tars.

    With `partitions`, the rows are range-partitioned by (tar, key), so that a tar may be split over several tasks
    (finer progress and balance for expensive per-image work) while each task still reads its tars in order."""
    by_shard = df.select(UID, "image_shard", "image_key")
    by_shard = (by_shard.repartitionByRange(partitions, "image_shard", "image_key") if partitions
                else by_shard.repartition("image_shard"))
    return by_shard.sortWithinPartitions("image_shard", "image_key").mapInArrow(
        _image_bytes_worker(str(images_dir), image_column), f"{UID} string, {image_column} binary"
    )


def _download_worker(images_dir: str, options: DownloadOptions, shards_done=None, rows_done=None):
    def run(shard_id: int, pairs):
        members = [member for _, member in pairs]
        if not members:
            if shards_done is not None:
                shards_done.add(1)
            return
        uids, urls, captions = zip(*members, strict=True)
        rows = pa.table({UID: pa.array(uids, pa.string()), URL: pa.array(urls, pa.string()),
                         CAPTION: pa.array(captions, pa.string())})
        statuses = download_ops.download_shard(rows, shard_id, images_dir, options)
        name = download_ops.shard_name(shard_id)
        status_values = statuses.column("status").to_pylist()
        messages = statuses.column("error_message").to_pylist()
        keys = statuses.column("key").to_pylist()
        reasons = [download_ops.ledger_reason(s, m) for s, m in zip(status_values, messages, strict=True)]
        details = [
            None if reason is None else download_ops.ledger_detail(shard_id, key, status, message)
            for reason, key, status, message in zip(reasons, keys, status_values, messages, strict=True)
        ]
        succeeded = pc.equal(statuses.column("status"), "success")
        table = pa.table({
            UID: statuses.column(UID),
            "image_shard": pa.array([f"{name}.tar"] * len(statuses), pa.string()),
            "image_key": pc.if_else(succeeded, statuses.column("key"), None),
            "image_width": statuses.column("width").cast(pa.int32()),
            "image_height": statuses.column("height").cast(pa.int32()),
            "image_original_width": statuses.column("original_width").cast(pa.int32()),
            "image_original_height": statuses.column("original_height").cast(pa.int32()),
            "image_source_sha256": statuses.column("sha256"),
            "_reason": pa.array(reasons, pa.string()),
            "_detail": pa.array(details, pa.string()),
        })
        if shards_done is not None:  # progress: the driver reads these as tasks finish
            shards_done.add(1)
            rows_done.add(len(statuses))
        yield from zip(*(column.to_pylist() for column in table.columns), strict=True)

    return run


def run_download(context: StageContext) -> StageOutput:
    """Download the image of every row; kept rows gain IMAGE_COLUMNS, failures go to the ledger with img2dataset's
    status and message (reasons download_failed, download_refused, download_opt_out, image_rejected). With the
    option `image_bytes_column`, the rows also carry their stored image's bytes in that column (parquet with
    images, as img2dataset's parquet output), besides the tars. A shard that stalls (no progress for
    `stall_seconds`) fails its task with ShardStalled: Spark retries it up to spark.task.maxFailures (1 in local
    mode, where the stage fails at once), and a rerun of the stage downloads only the shards not finished."""
    from pyspark.sql import functions as F

    options = DownloadOptions.from_options(context.options)
    shard_rows, image_bytes_column = context.options["shard_rows"], context.options["image_bytes_column"]
    df = context.read_rows()
    rows_in = context.rows_in
    shard_count = max(1, math.ceil(rows_in / shard_rows))
    if shard_count >= 10**download_ops.SHARD_DIGITS:
        raise ValueError(f"{shard_count} shards do not fit img2dataset's {download_ops.SHARD_DIGITS}-digit names; "
                         "raise shard_rows")
    data_columns = [c for c in df.columns if c not in IMAGE_COLUMNS]

    work_dir = context.work_dir({"config": context.config, "input": context.input_link, "shards": shard_count})
    images_dir = work_dir / Artifact.IMAGES
    images_dir.mkdir(exist_ok=True)
    remove_leftovers(images_dir)  # shards of an attempt killed mid-shard
    done = sum(download_ops.is_shard_done(images_dir, shard) for shard in range(shard_count))
    logger.info("download: %d rows in %d shards (%d already done) into %s", rows_in, shard_count, done, images_dir)
    # Shard i is partition i (an identity partitioner; hashing shard ids would put two or three shards in some
    # tasks, to be downloaded one after the other, and none in others), one Spark task per shard.
    by_shard = (
        df.select(F.expr(shard_of_prefix_expression(shard_count)).alias("_shard"), UID, URL, CAPTION).rdd
        .map(lambda row: (row[0], (row[1], row[2], row[3])))
        .partitionBy(shard_count, lambda shard: shard)
    )
    spark_context = context.spark.sparkContext
    shards_done, rows_done = spark_context.accumulator(0), spark_context.accumulator(0)
    worker = _download_worker(str(images_dir), options, shards_done, rows_done)
    with Progress("download", shard_count, "shards") as progress, \
            polling(lambda: progress.set(shards_done.value, note=f"{rows_done.value:,} rows")):
        statuses = context.spark.createDataFrame(by_shard.mapPartitionsWithIndex(worker),
                                                 _STATUS_SCHEMA).localCheckpoint()
    tagged = df.select(*data_columns).join(statuses, UID, "left")
    unreported = tagged.filter(F.col("_reason").isNull() & F.col("image_key").isNull()).limit(5).collect()
    if unreported:
        raise RuntimeError(f"download: img2dataset reported no status for uids {[r[UID] for r in unreported]}")
    tagged = drop_where(untagged(tagged), F.col("_reason").isNotNull(), "download", F.col("_reason"),
                        detail=F.col("_detail"))
    written_columns = [*data_columns, *IMAGE_COLUMNS]
    if image_bytes_column:
        downloaded = tagged.filter(F.col(TAG_REASON).isNull())
        tagged = tagged.join(image_bytes(downloaded, images_dir, image_bytes_column), UID, "left")
        written_columns.append(image_bytes_column)
    return StageOutput(
        rows=tagged, columns=written_columns, finished_work={Artifact.IMAGES: images_dir},
        record={"download": {"shards": shard_count, "shards_resumed": done,
                             "options": download_ops.options_record(options)}},
    )
