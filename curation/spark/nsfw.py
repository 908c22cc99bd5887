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

import numpy as np
import pyarrow as pa

from curation.schema import UID, Reason
from curation.spark.download import row_images
from curation.spark.executor import StageContext
from curation.spark.rowfilter import DropRule, FilterPlan

logger = logging.getLogger(__name__)

SCORE_COLUMN = "nsfw_score"
IMAGE_COLUMN = "jpg"
HISTOGRAM_BINS = 10
QUANTILES = (0.5, 0.9, 0.99, 0.999)
# The model's own decision threshold (opennsfw's default); counted in the record even when nothing is dropped.
MODEL_THRESHOLD = 0.5
_DECODE_FAILURE = "_decode_failure"  # the ledger detail of an image that did not decode
_OVER_MAX_SCORE = "_over_max_score"  # the ledger detail of a score above max_score
_SCORE_SCHEMA = f"{UID} string, {SCORE_COLUMN} float, {_DECODE_FAILURE} string, _provider string"

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
                names=[UID, SCORE_COLUMN, _DECODE_FAILURE, "_provider"],
            )

    return run


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


def nsfw_plan(context: StageContext, df) -> FilterPlan:
    """Add `nsfw_score` (float32 in [0, 1]) to every row, replacing an existing one; with `max_score` drop the rows
    above it (`nsfw`); drop rows whose image does not decode (`undecodable_image`)."""
    from pyspark.sql import functions as F

    from curation.gpu.nsfw import model_identity, model_path

    options = context.typed
    max_score = None if options.max_score is None else float(options.max_score)
    model_path()  # fail here, not in every task, when the model file is missing or not the pinned one
    tasks = scoring_tasks(context.rows_in, context.spark.sparkContext.defaultParallelism, context.partitions)
    images, source = row_images(df, context.input_dir, IMAGE_COLUMN, tasks)

    started = time.perf_counter()
    scores = images.mapInArrow(
        _score_worker(options.device, options.threads, options.jpeg_reencode, options.batch_size), _SCORE_SCHEMA)
    scores = scores.localCheckpoint()  # the model runs once; the record's summary reads the scores again
    seconds = time.perf_counter() - started

    # The threshold test and its detail are Spark's (a double comparison, Spark's JSON of the numbers), as the
    # ledger has always had them.
    over = F.lit(None).cast("string")
    if max_score is not None:
        over = F.when(F.col(SCORE_COLUMN) > max_score, F.to_json(F.struct(
            F.col(SCORE_COLUMN).cast("double").alias("nsfw_score"), F.lit(max_score).alias("max_score"))))
    rows = df.drop(SCORE_COLUMN).join(scores, UID).withColumn(_OVER_MAX_SCORE, over)

    summary = _summary(scores, seconds)
    return FilterPlan(
        rows=rows,
        drops=(DropRule(_DECODE_FAILURE, Reason.UNDECODABLE_IMAGE), DropRule(_OVER_MAX_SCORE, Reason.NSFW)),
        added=[pa.field(SCORE_COLUMN, pa.float32())],
        record={"nsfw": {
            **model_identity(), "providers": summary.pop("providers"), "threads": options.threads,
            "batch_size": options.batch_size, "jpeg_reencode": options.jpeg_reencode, "max_score": max_score,
            "image_source": source, **summary,
        }},
    )


def _summary(scores, seconds: float) -> dict:
    """Rows scored and undecodable, throughput, the score histogram over [0, 1] in tenths, quantiles."""
    from pyspark.sql import functions as F

    score = F.col(SCORE_COLUMN)
    bin_of = F.least(F.floor(score * HISTOGRAM_BINS).cast("int"), F.lit(HISTOGRAM_BINS - 1))
    totals = scores.agg(
        F.count(score).alias("scored"), F.count(F.col(_DECODE_FAILURE)).alias("undecodable"),
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
