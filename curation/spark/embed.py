"""Spark adapter of embed: open_clip image and text embeddings of every downloaded sample, and its clip_score.

The embeddings go to `_artifacts/embeddings/<shard>.parquet` (uid, image_embedding, text_embedding as float16
fixed-size lists, clip_score), one file per image tar; the rows gain `clip_score`. Two engines:

- `local`: this machine embeds every shard (one process per CUDA device when there are several);
- `spark`: one Spark task per shard (an identity partitioner puts shard i in partition i), each building one
  model per executor process and pinning the GPU Spark assigned to the task (`TaskContext.resources()["gpu"]`,
  with `spark.task.resource.gpu.amount` set), the way clip-retrieval runs inference on Spark.

Finished shards stay in the stage's work folder until it commits, so a rerun embeds only the missing ones.
torch and open_clip are imported only inside the GPU package, inside the functions that embed.
"""

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from curation.ops.embeddings import EmbedOptions
from curation.run_folder import Artifact, downloaded_images_dir
from curation.schema import UID, Reason
from curation.spark.common import drop_where, untagged
from curation.spark.executor import StageContext, StageOutput

logger = logging.getLogger(__name__)

CLIP_SCORE = "clip_score"


_MODEL_CACHE: dict = {}


def _executor_model(options: EmbedOptions, device: str):
    """One model per executor process and device, built there on first use (never pickled from the driver)."""
    from curation.gpu.clip_model import load_model

    key = (options.model, options.pretrained, options.precision, device)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(options.model, options.weights, device, options.precision)
    return _MODEL_CACHE[key]


def task_device(configured: str) -> str:
    """The device of this Spark task: the GPU Spark assigned to it, if any and CUDA is wanted, else `configured`."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses and configured in ("auto", "cuda"):
        return f"cuda:{gpus.addresses[0]}"
    return configured


def _spark_engine_worker(images_dir: str, output_dir: str, shard_names: list[str], options: EmbedOptions):
    def run(partition_index, rows):
        from curation.gpu.shard_embedding import embed_shards

        keys = [key for _, key in rows]
        if not keys:
            return
        shard = os.path.join(images_dir, shard_names[partition_index])
        model = _executor_model(options, task_device(options.device))
        embed_shards(model, [shard], output_dir, options.batch_size, options.num_workers, {shard: keys})
        yield shard_names[partition_index], len(keys)

    return run


def _embed_with_spark(spark, df, images_dir: Path, output_dir: Path, shard_names: list[str], options: EmbedOptions):
    position = {name: index for index, name in enumerate(shard_names)}
    pairs = (
        df.select("image_shard", "image_key").rdd
        .map(lambda row: (position[row[0]], row[1]))
        .partitionBy(len(shard_names), lambda shard_index: shard_index)
    )
    done = pairs.mapPartitionsWithIndex(
        _spark_engine_worker(str(images_dir), str(output_dir), shard_names, options)
    ).collect()
    logger.info("embed (spark engine): %d shards, %d samples", len(done), sum(count for _, count in done))


def _embed_locally(df, images_dir: Path, output_dir: Path, options: EmbedOptions):
    from curation.gpu.local_engine import embed_shards_locally

    table = df.select("image_shard", "image_key").toArrow()
    keys: dict[str, list[str]] = {}
    for shard, key in zip(table.column("image_shard").to_pylist(), table.column("image_key").to_pylist(),
                          strict=True):
        keys.setdefault(str(images_dir / shard), []).append(key)
    embed_shards_locally(options.model, options.weights, sorted(keys), output_dir, options.device,
                         options.precision, options.batch_size, options.num_workers, keys)


def _failures(spark, output_dir: Path, images_dir: Path):
    """(image_shard, image_key, detail) of every sample an output file lists as not embedded."""
    from curation.gpu.shard_embedding import read_shard_metadata

    rows = []
    for path in sorted(output_dir.glob("*.parquet")):
        metadata = read_shard_metadata(path)
        shard = os.path.relpath(metadata["shard"], images_dir)
        rows.extend((shard, failure["key"], json.dumps(failure)) for failure in metadata["failures"])
    return spark.createDataFrame(rows, "image_shard string, image_key string, _failure string")


def _model_record(outputs: list[Path]) -> dict | None:
    from curation.gpu.shard_embedding import read_shard_metadata

    return read_shard_metadata(outputs[0])["model"] if outputs else None


def run_embed(context: StageContext) -> StageOutput:
    """Embed every row's downloaded image and caption; rows gain clip_score, samples that cannot be embedded go to
    the ledger (embed_failed, with the reason)."""
    from pyspark.sql import functions as F

    spark, input_dir = context.spark, context.input_dir
    options = EmbedOptions.from_options(context.options)
    df = context.read_rows()
    for column in ("image_shard", "image_key"):
        if column not in df.columns:
            raise ValueError(f"{input_dir} rows have no {column}: embed reads the images of a download stage")
    images_dir = downloaded_images_dir(input_dir)
    data_columns = [c for c in df.columns if c != CLIP_SCORE]
    shard_names = sorted(row[0] for row in df.select("image_shard").distinct().collect())

    embeddings_dir = context.work_dir({"config": context.config, "input": context.input_link}) / Artifact.EMBEDDINGS
    embeddings_dir.mkdir(exist_ok=True)
    logger.info("embed: %d rows in %d shards with %s (%s), %s engine", context.rows_in, len(shard_names),
                options.model, options.pretrained, options.engine)
    if shard_names and options.engine == "spark":
        _embed_with_spark(spark, df, images_dir, embeddings_dir, shard_names, options)
    elif shard_names:
        _embed_locally(df, images_dir, embeddings_dir, options)

    outputs = sorted(embeddings_dir.glob("*.parquet"))
    scores = spark.read.schema(f"{UID} string, {CLIP_SCORE} float").parquet(*map(str, outputs)) if outputs \
        else spark.createDataFrame([], f"{UID} string, {CLIP_SCORE} float")
    tagged = (
        df.select(*data_columns).join(scores, UID, "left")
        .join(_failures(spark, embeddings_dir, images_dir), ["image_shard", "image_key"], "left")
    )
    unreported = tagged.filter(F.col(CLIP_SCORE).isNull() & F.col("_failure").isNull()).limit(5).collect()
    if unreported:
        raise RuntimeError(f"embed: no embedding and no failure for uids {[row[UID] for row in unreported]}")
    tagged = drop_where(untagged(tagged), F.col(CLIP_SCORE).isNull(), "embed", Reason.EMBED_FAILED,
                        detail=F.col("_failure"))
    return StageOutput(
        rows=tagged, columns=[*data_columns, CLIP_SCORE],
        finished_work={Artifact.EMBEDDINGS: embeddings_dir},
        record={"embed": {"options": asdict(options), "model": _model_record(outputs), "shards": len(shard_names)}},
    )
