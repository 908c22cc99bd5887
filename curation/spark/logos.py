"""Spark adapters of SLANT's stages (DESIGN.md section 4): logo_bank (fit), mine_logos and flag_logos (apply).

- logo_bank scores every embedded image against logo prompts minus contrast prompts (text embeddings of the embed
  stage's own model), takes the top q of the corpus (above an optional floor, capped), collapses near-duplicate
  logos and copies the bank images out of the download tars, so that mining needs no second download.
- mine_logos pastes each bank logo into the corners of probe images and scores how much it pushes zero-shot
  predictions toward each target, for one or more models (`curation.gpu.slant`); it runs on the driver (one GPU or
  the CPU) and resumes per logo block. Rows pass through.
- flag_logos marks rows whose image embedding is within a cosine threshold of a mined spurious logo (`tag`), or
  drops them (`drop`, ledger reason spurious_logo).

The models, text features and the 10-crop check are torch code: they live in `curation.gpu.logo_features`.
"""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.ops import embeddings as embedding_ops
from curation.ops import logos as logo_ops
from curation.ops import tars as tar_ops
from curation.ops.contact_sheet import contact_sheet
from curation.ops.embeddings import EMBEDDING_COLUMN
from curation.ops.uid import uniform
from curation.run_folder import (
    Artifact,
    artifact_path,
    downloaded_images_dir,
    find_upstream,
    read_stage_record,
    resolve_data_dir,
)
from curation.schema import UID, Reason
from curation.spark.common import arrow_schema_of, spark_schema, untagged
from curation.spark.executor import StageContext, StageOutput
from curation.spark.rowfilter import DropRule, FilterPlan
from curation.spark.semantic import with_embeddings

logger = logging.getLogger(__name__)

PROBE_PURPOSE = "slant_probe"
_PROBE_DRAW = "_probe_draw"  # u(seed, uid, PROBE_PURPOSE) of a candidate probe
SPURIOUS_LOGO = "spurious_logo"
SPURIOUS_LOGO_SIMILARITY = "spurious_logo_similarity"
# The ledger detail of a flagged row, made by Spark's to_json before the row pass (so its float text is Spark's).
_FLAG_DETAIL = "_flag_logos_detail"


def _embed_options(stage_dir: Path) -> dict:
    """The options of the nearest upstream embed stage, as its record stores them."""
    embed_dir = find_upstream(stage_dir, "embed")
    if embed_dir is None:
        raise ValueError(f"{stage_dir} has no embed stage upstream")
    return read_stage_record(embed_dir)["embed"]["options"]


# ---------------------------------------------------------------------------------------------------- logo_bank


def _score_worker(logo_broadcast, contrast_broadcast):
    def run(batches):
        for batch in batches:
            vectors = embedding_ops.unpack(batch.column(1))
            scores = logo_ops.logo_scores(vectors, logo_broadcast.value, contrast_broadcast.value) \
                if len(vectors) else np.empty(0, np.float32)
            yield pa.RecordBatch.from_arrays([batch.column(0), pa.array(scores)], names=[UID, "logo_score"])

    return run


def run_logo_bank(context: StageContext) -> StageOutput:
    """Rows gain `logo_score`; artifacts logo_bank.parquet (logo_uid, score, frequency, cluster, members,
    embedding) and bank/<logo uid>.<ext> (the bank images)."""
    from pyspark.sql import functions as F

    from curation.gpu.logo_features import embed_stage_scorer, text_features

    options = context.typed
    df = context.read_rows()
    rows_in = context.rows_in
    scorer = embed_stage_scorer(_embed_options(context.input_dir))
    logo_broadcast = context.broadcast(text_features(scorer, options.logo_prompts))
    contrast_broadcast = context.broadcast(text_features(scorer, options.contrast_prompts))
    emb_df = with_embeddings(context.spark, df.select(UID, "image_shard", "image_key"), context.input_dir)
    scores = emb_df.select(UID, EMBEDDING_COLUMN).mapInArrow(
        _score_worker(logo_broadcast, contrast_broadcast), f"{UID} string, logo_score float"
    ).localCheckpoint()
    candidates = emb_df.join(scores, UID)
    if options.floor is not None:
        candidates = candidates.filter(F.col("logo_score") >= options.floor)
    taken = logo_ops.bank_size(rows_in, options.q, options.max_bank_size)
    bank = candidates.orderBy(F.col("logo_score").desc(), F.col(UID)).limit(taken).toArrow()
    vectors = embedding_ops.unpack(bank.column(EMBEDDING_COLUMN)) if len(bank) else np.empty((0, 1), np.float32)
    representative = logo_ops.collapse_near_duplicates(vectors, options.duplicate_similarity)
    entries = np.unique(representative)
    uids = bank.column(UID).to_pylist()
    table = pa.table({
        "logo_uid": [uids[i] for i in entries],
        "score": bank.column("logo_score").take(pa.array(entries)) if len(entries) else pa.array([], pa.float32()),
        "frequency": [int((representative == i).sum()) for i in entries],
        "cluster": pa.array(np.arange(len(entries), dtype=np.int32)),
        "members": [[uids[j] for j in np.flatnonzero(representative == i)] for i in entries],
        # binary on disk as before Spark handed vectors over as large_binary (session.py): the same file bytes.
        "embedding": (bank.column(EMBEDDING_COLUMN).take(pa.array(entries)).cast(pa.binary()) if len(entries)
                      else pa.array([], pa.binary())),
    })
    pq.write_table(table, context.artifact(Artifact.LOGO_BANK))
    _copy_bank_images(bank, entries, downloaded_images_dir(context.input_dir),
                      context.artifact(Artifact.LOGO_BANK_IMAGES))
    return StageOutput(
        rows=untagged(df.join(scores, UID)), columns=[*df.columns, "logo_score"],
        record={"logo_bank": {"taken": len(bank), "entries": len(entries), "q": options.q, "floor": options.floor,
                              "max_bank_size": options.max_bank_size, "model": scorer.name}},
    )


def _copy_bank_images(bank: pa.Table, entries: np.ndarray, images_dir: Path, bank_dir: Path) -> None:
    bank_dir.mkdir(parents=True, exist_ok=True)
    with tar_ops.TarReader() as reader:
        for index in entries.tolist():
            shard, key, uid = (bank.column(name)[index].as_py() for name in ("image_shard", "image_key", UID))
            found = reader.image(images_dir / shard, key)
            if found is None:
                raise ValueError(f"bank logo {uid}: no image for key {key} in {shard}")
            extension, data = found
            (bank_dir / f"{uid}.{extension}").write_bytes(data)


def read_bank(stage_dir: Path) -> tuple[pa.Table, Path]:
    """The logo bank table of the nearest upstream logo_bank stage, and the folder of its images."""
    bank_dir = find_upstream(stage_dir, "logo_bank")
    if bank_dir is None:
        raise ValueError(f"{stage_dir} has no logo_bank stage upstream")
    return (pq.read_table(artifact_path(bank_dir, Artifact.LOGO_BANK)),
            artifact_path(bank_dir, Artifact.LOGO_BANK_IMAGES))


# ---------------------------------------------------------------------------------------------------- mine_logos


def _scorers(models: list[str], input_dir: Path, device: str) -> list:
    """One scorer per `models` entry ("NAME", "NAME:PRETRAINED", or "toy"); none given: the embed stage's model."""
    from curation.gpu.logo_features import embed_stage_scorer, mining_scorer

    if not models:
        return [embed_stage_scorer(_embed_options(input_dir), device)]
    return [mining_scorer(spec, device) for spec in models]


def _probe_images(context: StageContext) -> list:
    """(id, image) probes: the images of a folder, or the `probe_count` corpus images with the smallest
    u(seed, uid)."""
    from PIL import Image

    options = context.typed
    if options.probe_folder:
        paths = sorted(p for p in Path(options.probe_folder).rglob("*")
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not paths:
            raise ValueError(f"probe_folder {options.probe_folder} holds no jpg/png/webp images")
        return [(str(p.relative_to(options.probe_folder)), Image.open(p).convert("RGB")) for p in paths]
    # The probe_count smallest draws, found by Spark (a bounded top-k per partition): only they reach the driver.
    rows = context.read_rows().select(UID, "image_shard", "image_key")
    schema = arrow_schema_of(rows).append(pa.field(_PROBE_DRAW, pa.float64()))
    chosen = (rows.mapInArrow(_probe_draw_worker(options.seed), spark_schema(schema))
              .orderBy(_PROBE_DRAW, UID).limit(options.probe_count).toArrow().sort_by(UID))
    images_dir = downloaded_images_dir(context.input_dir)
    probes = []
    with tar_ops.TarReader() as reader:
        for uid, shard, key in zip(*(chosen.column(name).to_pylist() for name in (UID, "image_shard", "image_key")),
                                   strict=True):
            _, data = reader.image(images_dir / shard, key)
            probes.append((uid, Image.open(io.BytesIO(data)).convert("RGB")))
    return probes


def _probe_draw_worker(seed: int):
    def run(batches):
        for batch in batches:
            draws = pa.array(uniform(seed, batch.column(UID), PROBE_PURPOSE))
            yield pa.RecordBatch.from_arrays([*batch.columns, draws], names=[*batch.schema.names, _PROBE_DRAW])

    return run


def _bank_logos(stage_dir: Path, max_logos: int) -> list:
    from PIL import Image

    bank, images = read_bank(stage_dir)
    top = bank.sort_by([("score", "descending"), ("logo_uid", "ascending")]).slice(0, max_logos)
    logos = []
    for uid in top.column("logo_uid").to_pylist():
        [path] = list(images.glob(f"{uid}.*"))
        logos.append((uid, Image.open(path).convert("RGBA")))
    return logos


def run_mine_logos(context: StageContext) -> StageOutput:
    """Rank the bank's logos by spuriousness toward each target; artifacts mining.parquet and contact_sheet.png.
    Rows pass through (the record points at the input's data)."""
    from curation.gpu import slant
    from curation.gpu.logo_features import ten_crop_check

    options = context.typed
    logos = _bank_logos(context.input_dir, options.max_logos)
    probes = _probe_images(context)
    scorers = _scorers(options.models, context.input_dir, options.device)
    work_dir = context.work_dir({"config": context.config, "input": context.input_link})
    result = slant.mine_logos(
        scorers, logos, probes, list(options.targets), list(options.contrast), scale=options.scale,
        batch_size=options.batch_size, heldout_fraction=options.heldout_fraction, recheck_top=options.recheck_top,
        seed=options.seed, logo_block=options.logo_block, work_dir=work_dir / "blocks",
    )
    pq.write_table(result.table, context.artifact(Artifact.MINING))
    by_logo = dict(logos)
    top = result.table.slice(0, 32).to_pylist()
    contact_sheet([(row["logo_id"], by_logo[row["logo_id"]]) for row in top],
                  [row["spuriousness"] for row in top], context.artifact(Artifact.CONTACT_SHEET))
    ten_crop = ten_crop_check(scorers[0], logos, probes, result, list(options.targets), list(options.contrast),
                              options.scale)
    return StageOutput(data_from=resolve_data_dir(context.input_dir),
                       record={"mining": {**json.loads(json.dumps(result.summary, default=str)),
                                          "ten_crop": ten_crop}})


# ---------------------------------------------------------------------------------------------------- flag_logos


def _flag_worker(logo_uids: list[str], logos_broadcast, threshold: float):
    def run(batches):
        for batch in batches:
            vectors = embedding_ops.unpack(batch.column(1))
            if len(vectors):
                best, similarity = logo_ops.match_logos(vectors, logos_broadcast.value, threshold)
            else:
                best, similarity = np.empty(0, np.int64), np.empty(0, np.float32)
            flagged = [logo_uids[i] if i >= 0 else None for i in best.tolist()]
            yield pa.RecordBatch.from_arrays(
                [batch.column(0), pa.array(flagged, pa.string()),
                 pa.array(np.where(best >= 0, similarity, np.nan), from_pandas=True, type=pa.float32())],
                names=[UID, SPURIOUS_LOGO, SPURIOUS_LOGO_SIMILARITY],
            )

    return run


def mined_spurious_logos(stage_dir: Path, top: int, min_spuriousness: float) -> list[str]:
    """Logo uids ranked in the top `top` with spuriousness >= `min_spuriousness`."""
    mine_dir = find_upstream(stage_dir, "mine_logos")
    if mine_dir is None:
        raise ValueError(f"{stage_dir} has no mine_logos stage upstream")
    table = pq.read_table(artifact_path(mine_dir, Artifact.MINING)).to_pylist()
    chosen = []
    for row in table:
        if row["rank"] <= top and row["spuriousness"] >= min_spuriousness and row["logo_id"] not in chosen:
            chosen.append(row["logo_id"])
    return chosen


def flag_logos_plan(context: StageContext, rows) -> FilterPlan:
    """Rows gain `spurious_logo` (the mined logo uid within cosine `threshold`, or null) and its similarity; with
    policy drop, flagged rows go to the ledger (spurious_logo)."""
    from pyspark.sql import functions as F

    options = context.typed
    logo_uids = mined_spurious_logos(context.input_dir, options.top, options.min_spuriousness)
    bank, _ = read_bank(context.input_dir)
    by_uid = dict(zip(bank.column("logo_uid").to_pylist(), range(len(bank)), strict=True))
    vectors = embedding_ops.unpack(bank.column("embedding").take(pa.array([by_uid[u] for u in logo_uids],
                                                                          pa.int64())))
    logos_broadcast = context.broadcast(vectors)
    flags = with_embeddings(context.spark, rows.select(UID), context.input_dir).mapInArrow(
        _flag_worker(logo_uids, logos_broadcast, options.threshold),
        f"{UID} string, {SPURIOUS_LOGO} string, {SPURIOUS_LOGO_SIMILARITY} float",
    )
    data_columns = [c for c in rows.columns if c not in (SPURIOUS_LOGO, SPURIOUS_LOGO_SIMILARITY)]
    flagged = rows.select(*data_columns).join(flags, UID)
    if options.policy == "drop":
        flagged = flagged.withColumn(_FLAG_DETAIL, F.when(F.col(SPURIOUS_LOGO).isNotNull(), F.to_json(F.struct(
            F.col(SPURIOUS_LOGO).alias("logo"), F.col(SPURIOUS_LOGO_SIMILARITY).alias("similarity")))))
    # Policy drop: a flagged row (a logo within the threshold) goes to the ledger with its logo (related_uid) and the
    # detail Spark made.
    drops = (DropRule(_FLAG_DETAIL, Reason.SPURIOUS_LOGO, related=SPURIOUS_LOGO),) if options.policy == "drop" else ()
    return FilterPlan(
        rows=flagged,
        drops=drops,
        added=[pa.field(SPURIOUS_LOGO, pa.string()), pa.field(SPURIOUS_LOGO_SIMILARITY, pa.float32())],
        record={"flag_logos": {"logos": logo_uids, "threshold": options.threshold, "policy": options.policy}},
    )
