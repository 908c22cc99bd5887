"""Spark adapter of the `nsfw` stage: every row gains `nsfw_score`, open_nsfw's probability that its image is NSFW
(`curation.gpu.nsfw`), and with `max_score` set the rows scoring above it go to the ledger (reason `nsfw`, detail
the score and the threshold). Rows whose image does not decode go to the ledger as `undecodable_image` whatever
`max_score` is: a row of an image-text corpus needs an image, and a kept row always has a score.

Images are the rows' `jpg` bytes column when they carry one, else the download stage's tars. Each executor
process builds one onnxruntime session and reuses it across tasks. A score depends on its image only (see
`curation.gpu.nsfw`), so the column is the same for any number of partitions.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.io import StageWriter, read_stage_record
from curation.schema import UID, Reason
from curation.spark.common import StageRun, drop_where, untagged, write_tagged
from curation.spark.download import row_images
from curation.spark.stages import read_stage_data, stage_input

logger = logging.getLogger(__name__)

STAGE = "nsfw"
STAGE_VERSION = 1
SCORE_COLUMN = "nsfw_score"
DEFAULT_IMAGE_COLUMN = "jpg"
HISTOGRAM_BINS = 10
QUANTILES = (0.5, 0.9, 0.99, 0.999)
# The model's own decision threshold (opennsfw's default); counted in the record even when nothing is dropped.
MODEL_THRESHOLD = 0.5
_SCORE_SCHEMA = f"{UID} string, {SCORE_COLUMN} float, _decode_failure string, _provider string"

_MODEL_CACHE: dict = {}


def _model_for(device: str, threads: int | None, jpeg_reencode: bool, batch_size: int):
    """One open_nsfw session per executor process: built on first use, then reused by every task it runs."""
    from curation.gpu.nsfw import load_nsfw_model

    key = (device, threads, jpeg_reencode, batch_size)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_nsfw_model(device, threads, jpeg_reencode, batch_size)
    return _MODEL_CACHE[key]


def _score_worker(device: str, threads: int | None, jpeg_reencode: bool, batch_size: int):
    def run(batches):
        model = _model_for(device, threads, jpeg_reencode, batch_size)
        for batch in batches:
            result = model.score(batch.column(1).to_pylist())
            failures = [None if failure is None else json.dumps({"reason": failure.reason, "detail": failure.detail})
                        for failure in result.failures]
            yield pa.RecordBatch.from_arrays(
                [batch.column(0), pa.array(result.scores, pa.float32(), mask=np.isnan(result.scores)),
                 pa.array(failures, pa.string()), pa.array([model.provider] * len(batch), pa.string())],
                names=[UID, SCORE_COLUMN, "_decode_failure", "_provider"],
            )

    return run


def _options(options: dict) -> tuple[float | None, int, str, int | None, bool, str]:
    from curation.gpu.nsfw import DEVICES

    max_score = None if options.get("max_score") is None else float(options["max_score"])
    batch_size = int(options.get("batch_size", 64))
    device = str(options.get("device", "auto"))
    threads = None if options.get("threads") is None else int(options["threads"])
    if max_score is not None and not 0.0 <= max_score <= 1.0:
        raise ValueError(f"nsfw max_score must be in [0, 1] (a probability), got {max_score}")
    if batch_size < 1:
        raise ValueError(f"nsfw batch_size must be at least 1, got {batch_size}")
    if device not in DEVICES:
        raise ValueError(f"nsfw device must be one of {', '.join(DEVICES)}, not {device!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"nsfw threads must be at least 1, got {threads}")
    return (max_score, batch_size, device, threads, bool(options.get("jpeg_reencode", True)),
            str(options.get("image_column") or DEFAULT_IMAGE_COLUMN))


ROWS_PER_SCORING_TASK = 1000
# At most this many scoring tasks per core. Each range partition costs the driver ~100 sampled rows for the bounds
# (rangeExchange.sampleSizePerPartition) plus its tracking and one shuffle block per map task, and a task opens again
# the tars it shares with its neighbours; 16 waves already balance the cores and show progress, so beyond that
# more tasks only add those costs.
MAX_SCORING_TASKS_PER_CORE = 16


def scoring_tasks(rows: int, parallelism: int, partitions: int | None) -> int:
    """Tasks scoring images read from the download tars: `partitions` when given, else about
    ROWS_PER_SCORING_TASK images a task (the model costs ~10 ms an image on a CPU core, so a task, and the progress,
    which counts finished tasks, moves in seconds, not minutes), at least one per core and at most
    MAX_SCORING_TASKS_PER_CORE per core (400M rows would otherwise be 400,000 range partitions)."""
    if partitions:
        return partitions
    return max(parallelism, min(-(-rows // ROWS_PER_SCORING_TASK), parallelism * MAX_SCORING_TASKS_PER_CORE))


def run_nsfw(spark, input_dir: Path, output_dir: Path, options: dict, partitions: int | None, config: dict) -> dict:
    """Add `nsfw_score` (float32 in [0, 1]) to every row, replacing an existing one; with `options["max_score"]`
    drop the rows above it (`nsfw`); drop rows whose image does not decode (`undecodable_image`)."""
    from pyspark.sql import functions as F

    from curation.gpu.nsfw import model_identity, model_path

    max_score, batch_size, device, threads, jpeg_reencode, image_column = _options(options)
    run = StageRun(STAGE, STAGE_VERSION, config or {})
    model_path()  # fail here, not in every task, when the model file is missing or not the pinned one
    df = read_stage_data(spark, input_dir, partitions)
    tasks = scoring_tasks(read_stage_record(input_dir)["rows_out"], spark.sparkContext.defaultParallelism,
                          partitions)
    images, source = row_images(df, input_dir, image_column, tasks)
    data_columns = [c for c in df.columns if c != SCORE_COLUMN]

    started = time.perf_counter()
    scores = images.mapInArrow(_score_worker(device, threads, jpeg_reencode, batch_size), _SCORE_SCHEMA)
    scores = scores.localCheckpoint()  # the model runs once; the record's summary reads the scores again
    seconds = time.perf_counter() - started

    tagged = untagged(df.select(*data_columns).join(scores, UID))
    tagged = drop_where(tagged, F.col("_decode_failure").isNotNull(), STAGE, Reason.UNDECODABLE_IMAGE,
                        detail=F.col("_decode_failure"))
    if max_score is not None:
        detail = F.to_json(F.struct(F.col(SCORE_COLUMN).cast("double").alias("nsfw_score"),
                                    F.lit(max_score).alias("max_score")))
        tagged = drop_where(tagged, F.col(SCORE_COLUMN) > max_score, STAGE, Reason.NSFW, detail=detail)

    summary = _summary(scores, seconds)
    with StageWriter(output_dir) as writer:
        rows_out, drops = write_tagged(tagged, [*data_columns, SCORE_COLUMN], str(writer.temp_dir),
                                       str(writer.ledger_dir))
        rows_in = read_stage_record(input_dir)["rows_out"]
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops, nsfw={
            **model_identity(), "providers": summary.pop("providers"), "threads": threads, "batch_size": batch_size,
            "jpeg_reencode": jpeg_reencode, "max_score": max_score, "image_source": source, **summary,
        })
        writer.commit(record)
    return record


def _summary(scores, seconds: float) -> dict:
    """Rows scored and undecodable, throughput, the score histogram over [0, 1] in tenths, quantiles."""
    from pyspark.sql import functions as F

    score = F.col(SCORE_COLUMN)
    bin_of = F.least(F.floor(score * HISTOGRAM_BINS).cast("int"), F.lit(HISTOGRAM_BINS - 1))
    totals = scores.agg(
        F.count(score).alias("scored"), F.count(F.col("_decode_failure")).alias("undecodable"),
        F.min(score).alias("min"), F.max(score).alias("max"), F.mean(score).alias("mean"),
        F.count(F.when(score >= MODEL_THRESHOLD, True)).alias("at_least_model_threshold"),
        F.percentile_approx(score, list(QUANTILES), 100_000).alias("quantiles"),
        F.sort_array(F.collect_set("_provider")).alias("providers"),
    ).first()
    counts = [0] * HISTOGRAM_BINS
    for row in scores.filter(score.isNotNull()).groupBy(bin_of.alias("bin")).count().collect():
        counts[row["bin"]] = row["count"]
    scored = totals["scored"]
    return {
        "providers": list(totals["providers"] or []),
        "rows_scored": scored,
        "rows_undecodable": totals["undecodable"],
        "seconds": round(seconds, 3),
        "images_per_second": round((scored + totals["undecodable"]) / seconds, 1) if seconds > 0 else None,
        "score_min": totals["min"],
        "score_max": totals["max"],
        "score_mean": totals["mean"],
        "quantiles": dict(zip((str(q) for q in QUANTILES), totals["quantiles"] or [None] * len(QUANTILES),
                              strict=True)),
        f"rows_at_least_{MODEL_THRESHOLD}": totals["at_least_model_threshold"],
        "histogram": {"edges": [round(i / HISTOGRAM_BINS, 2) for i in range(HISTOGRAM_BINS + 1)], "counts": counts},
    }
