"""Spark adapter of decontaminate: drop every corpus image that is a near duplicate of an evaluation image, so that
zero-shot evaluations on that set stay honest (reason `eval_contamination`).

1. The evaluation set is read, decoded and pHashed on the driver (`curation.ops.decontaminate.hash_eval_set`; an
   undecodable evaluation image or an empty set is an error), and its hashes are broadcast.
2. Perceptual test, every row: the corpus image's 64-bit pHash is the rows' `image_phash` when an upstream
   dedup_image wrote it (the signed int64 view of the unsigned hash), else it is computed from the rows' image
   bytes (`image_column`) or from the download stage's tars. A row is dropped when its hash is within
   `max_distance` of an evaluation hash (`curation.ops.imagehash.PhashIndex`: exact, pigeonhole-indexed). A corpus
   image that does not decode cannot be compared: it is kept and counted (`unhashed_rows`); dedup_image drops those
   earlier anyway.
3. Embedding test, with an embed stage upstream (`use_embeddings` auto) or required (`always`): the evaluation
   images are embedded on the driver with the embed stage's own model and preprocessing
   (`curation.gpu.decontaminate`), and every row's stored image embedding is compared with all of them through the
   FAISS seam (exact inner product of unit vectors); a row whose nearest evaluation image has cosine >= `min_cosine`
   (compared in float32) is dropped too. This catches copies that pHash misses (crops, flips, overlays) when the
   model is a real CLIP model. With random weights (tiny-clip, `pretrained: random`) the cosines are meaningless
   and all high: on the demo's generated images the other images' nearest-evaluation cosine reaches 0.9986 and
   every copy is above 0.9997, so the default 0.95 would drop everything; measure a threshold, or use `never`.
   The stage warns when the cosine test alone drops more than COSINE_DROP_WARNING of the rows.

Ledger detail (JSON): `test` (phash or cosine), the evaluation image as `eval_file` (relative to `eval_images`) and
`eval_row` (its row in a parquet file, else null), `eval_index` (its position in the set), and `distance` or
`cosine`. A row both tests catch is recorded by pHash. The record holds the evaluation set's size and content
fingerprint, where the corpus hashes came from, the drops by test and, with embeddings, the model used and the
largest cosine among kept rows (how close the survivors came, for choosing `min_cosine`).
"""

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.ops import embeddings as embedding_ops
from curation.ops.decontaminate import (
    TEST_COSINE,
    TEST_PHASH,
    DecontaminateOptions,
    hash_eval_set,
    iter_eval_images,
    match_detail,
)
from curation.ops.imagehash import PhashIndex, perceptual_hashes
from curation.run_folder import find_upstream, read_stage_record
from curation.schema import UID, Reason
from curation.spark.executor import StageContext
from curation.spark.rowfilter import DropRule, FilterPlan

logger = logging.getLogger(__name__)

PHASH_COLUMN = "image_phash"
# Where the nearest-neighbour search runs in the executors (faiss GPU when the build has one).
SEARCH_DEVICE = "auto"
# Share of the input the cosine test may drop before the stage warns that min_cosine looks too low for the model.
COSINE_DROP_WARNING = 0.05
# The ledger details of the two tests (null where a test found no evaluation image).
_PHASH_DETAIL = "_phash_detail"
_COSINE_DETAIL = "_cosine_detail"
_PHASH_SCHEMA = f"{UID} string, {_PHASH_DETAIL} string, _unhashed boolean"
_COSINE_SCHEMA = f"{UID} string, _cosine float, {_COSINE_DETAIL} string"


def _phash_worker(eval_broadcast, max_distance: int, from_bytes: bool):
    """(uid, ledger detail when within max_distance of an evaluation hash, whether the image had no hash) per row of
    (uid, image bytes) or (uid, image_phash)."""

    def run(batches):
        hashes, files, rows = eval_broadcast.value
        index = PhashIndex(hashes, max_distance)
        for batch in batches:
            if from_bytes:
                values, failures = perceptual_hashes(batch.column(1).to_pylist())
                unhashed = np.fromiter((f is not None for f in failures), dtype=bool, count=len(failures))
            else:
                column = batch.column(1)
                unhashed = column.is_null().to_numpy(zero_copy_only=False)
                # The stored int64 is the unsigned hash's bit pattern.
                values = column.fill_null(0).to_numpy().astype(np.int64).view(np.uint64)
            nearest, distance = index.nearest(values)
            nearest[unhashed] = -1
            details = [None if i < 0 else match_detail(files, rows, i, TEST_PHASH, d)
                       for i, d in zip(nearest.tolist(), distance.tolist(), strict=True)]
            yield pa.RecordBatch.from_arrays([batch.column(0), pa.array(details, pa.string()), pa.array(unhashed)],
                                             names=[UID, _PHASH_DETAIL, "_unhashed"])

    return run


def _cosine_worker(eval_broadcast, min_cosine: float):
    """(uid, cosine to the nearest evaluation image, ledger detail when >= min_cosine) per row of (uid, packed
    embedding)."""
    threshold = np.float32(min_cosine)

    def run(batches):
        from curation.gpu.decontaminate import EvalEmbeddingIndex

        vectors16, files, rows = eval_broadcast.value
        index = None
        for batch in batches:
            vectors = embedding_ops.unpack(batch.column(1), vectors16.shape[1])
            if index is None and len(vectors):
                index = EvalEmbeddingIndex(vectors16.astype(np.float32), SEARCH_DEVICE)
            if len(vectors):
                nearest, cosine = index.nearest(vectors)
            else:
                nearest, cosine = np.empty(0, np.int64), np.empty(0, np.float32)
            details = [match_detail(files, rows, i, TEST_COSINE, c) if c >= threshold else None
                       for i, c in zip(nearest.tolist(), cosine.tolist(), strict=True)]
            yield pa.RecordBatch.from_arrays([batch.column(0), pa.array(cosine, pa.float32()),
                                              pa.array(details, pa.string())],
                                             names=[UID, "_cosine", _COSINE_DETAIL])

    return run


def _corpus_images(df, input_dir: Path, image_column: str, partitions: int | None):
    """(rows of (uid, image_phash) or (uid, image bytes), whether they are bytes, where they came from)."""
    from curation.spark.download import row_images

    if PHASH_COLUMN in df.columns:
        return df.select(UID, PHASH_COLUMN), False, "column image_phash"
    images, source = row_images(df, input_dir, image_column, partitions, f", nor {PHASH_COLUMN!r},")
    return images, True, source


def _eval_embeddings(embed_dir: Path, options: DecontaminateOptions, images: int) -> tuple[np.ndarray, dict]:
    """The evaluation images embedded like the embed stage at `embed_dir` embedded the corpus; (float16 (m, d), the
    model record)."""
    from curation.gpu.clip_model import MODEL_IDENTITY_FIELDS
    from curation.gpu.decontaminate import embed_eval_images, model_like_embed_stage

    embed = read_stage_record(embed_dir)["embed"]
    model = model_like_embed_stage(embed["options"])
    if embed.get("model"):
        differs = {f: (embed["model"].get(f), model.record.get(f)) for f in MODEL_IDENTITY_FIELDS
                   if embed["model"].get(f) != model.record.get(f)}
        if differs:
            raise ValueError(f"the model rebuilt from {embed_dir} is not the one that embedded the corpus "
                             f"(field: (embed stage, now)): {differs}; was its checkpoint replaced?")
    vectors = embed_eval_images(model, iter_eval_images(options.eval_images, options.eval_image_column))
    if len(vectors) != images:
        raise ValueError(f"{options.eval_images} changed while it was read: {images} images hashed, "
                         f"{len(vectors)} embedded")
    return vectors, model.record


def decontaminate_plan(context: StageContext, df) -> FilterPlan:
    """Drop rows whose image is a near duplicate of an evaluation image (module docstring). Rows pass through
    otherwise, columns unchanged."""
    from pyspark.sql import functions as F

    from curation.spark.semantic import with_embeddings

    input_dir = context.input_dir
    opts = DecontaminateOptions.from_options(context.options)
    embed_dir = find_upstream(input_dir, "embed")
    if opts.use_embeddings == "always" and embed_dir is None:
        raise ValueError(f"use_embeddings is 'always' but {input_dir} has no embed stage upstream")
    use_embeddings = embed_dir is not None and opts.use_embeddings != "never"

    eval_set = hash_eval_set(opts.eval_images, opts.eval_image_column)
    logger.info("decontaminate: %d evaluation images from %s; pHash within %d%s", len(eval_set), opts.eval_images,
                opts.max_distance, f", cosine >= {opts.min_cosine}" if use_embeddings else "")
    eval_hashes = context.broadcast((eval_set.hashes, eval_set.files, eval_set.rows))
    images, from_bytes, hash_source = _corpus_images(df, input_dir, opts.image_column, context.partitions)
    matches = images.mapInArrow(_phash_worker(eval_hashes, opts.max_distance, from_bytes), _PHASH_SCHEMA)

    model_record = None
    if use_embeddings:
        vectors, model_record = _eval_embeddings(embed_dir, opts, len(eval_set))
        eval_vectors = context.broadcast((vectors, eval_set.files, eval_set.rows))
        cosines = with_embeddings(context.spark, df.select(UID), input_dir).mapInArrow(
            _cosine_worker(eval_vectors, opts.min_cosine), _COSINE_SCHEMA)
        matches = matches.join(cosines, UID, "left")
    else:
        matches = (matches.withColumn("_cosine", F.lit(None).cast("float"))
                   .withColumn(_COSINE_DETAIL, F.lit(None).cast("string")))
    matches = matches.localCheckpoint()

    stats = matches.agg(
        F.count(F.col(_PHASH_DETAIL)).alias("phash"),
        F.count(F.when(F.col(_PHASH_DETAIL).isNull(), F.col(_COSINE_DETAIL))).alias("cosine"),
        F.sum(F.col("_unhashed").cast("long")).alias("unhashed"),
        F.max(F.when(F.col(_PHASH_DETAIL).isNull() & F.col(_COSINE_DETAIL).isNull(), F.col("_cosine")))
        .alias("max_cosine_kept"),
    ).first()

    rows_in = context.rows_in
    if use_embeddings and stats["cosine"] > COSINE_DROP_WARNING * max(rows_in, 1):
        logger.warning("decontaminate: the cosine test alone dropped %d of %d rows; min_cosine %s is probably too low "
                       "for this model (random or weak weights put all images close together): see max_cosine_kept",
                       stats["cosine"], rows_in, opts.min_cosine)

    embeddings = None
    if use_embeddings:
        max_kept = stats["max_cosine_kept"]
        embeddings = {"embed_stage": context.link_to(embed_dir), "model": model_record, "min_cosine": opts.min_cosine,
                      "max_cosine_kept": None if max_kept is None else round(float(max_kept), 6)}
    # The pHash match's detail when both tests matched.
    drops = (DropRule(_PHASH_DETAIL, Reason.EVAL_CONTAMINATION), DropRule(_COSINE_DETAIL, Reason.EVAL_CONTAMINATION))
    return FilterPlan(rows=df.join(matches, UID, "left"), drops=drops, record={"decontaminate": {
        "eval_set": eval_set.summary(), "eval_image_column": opts.eval_image_column,
        "max_distance": opts.max_distance, "hash_source": hash_source,
        "unhashed_rows": int(stats["unhashed"] or 0),
        "drops_by_test": {TEST_PHASH: int(stats["phash"]), TEST_COSINE: int(stats["cosine"])},
        "embeddings": embeddings,
    }})
