"""Spark adapters of SLANT's stages (DESIGN.md section 4): logo_bank (fit), mine_logos and flag_logos (apply).

- logo_bank scores every embedded image against logo prompts minus contrast prompts (text embeddings of the embed
  stage's own model), takes the top q of the corpus (above an optional floor, capped), collapses near-duplicate
  logos and copies the bank images out of the download tars, so that mining needs no second download.
- mine_logos pastes each bank logo into the corners of probe images and scores how much it pushes zero-shot
  predictions toward each target, for one or more models (`curation.gpu.slant`); it runs on the driver (one GPU or
  the CPU) and resumes per logo block. Rows pass through.
- flag_logos marks rows whose image embedding is within a cosine threshold of a mined spurious logo (`tag`), or
  drops them (`drop`, ledger reason spurious_logo).
"""

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import (
    ARTIFACTS_DIR,
    StageWriter,
    downloaded_images_dir,
    find_upstream,
    read_stage_record,
    resolve_data_dir,
)
from curation.ops import embeddings as embedding_ops
from curation.ops import logos as logo_ops
from curation.ops import tars as tar_ops
from curation.ops.embeddings import EMBEDDING_COLUMN
from curation.ops.uid import uniform
from curation.schema import UID, Reason
from curation.spark.common import StageRun, drop_where, untagged, write_tagged
from curation.spark.semantic import with_embeddings
from curation.spark.stages import read_stage_data, stage_input

logger = logging.getLogger(__name__)

STAGE_VERSIONS = {"logo_bank": 1, "mine_logos": 1, "flag_logos": 1}
BANK_TABLE = "logo_bank.parquet"
BANK_IMAGES = "bank"
MINING_TABLE = "mining.parquet"
CONTACT_SHEET = "contact_sheet.png"
PROBE_PURPOSE = "slant_probe"
# A `models` entry naming SLANT's toy scorer: deterministic, with a planted red-logo feature (tests and demos
# without pretrained weights).
TOY_MODEL = "toy"


def _embed_model(stage_dir: Path, device: str = "auto"):
    """The embed stage's model (same name, weights and preprocessing), loaded in this process."""
    from curation.gpu.embed import load_model
    from curation.spark.embed import EmbedOptions

    embed_dir = find_upstream(stage_dir, "embed")
    if embed_dir is None:
        raise ValueError(f"{stage_dir} has no embed stage upstream")
    options = EmbedOptions(**read_stage_record(embed_dir)["embed"]["options"])
    return load_model(options.model, options.weights, device, options.precision if device != "cpu" else "auto")


def _text_features(scorer, texts) -> np.ndarray:
    return scorer.encode_text(list(texts)).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------- logo_bank


@dataclass(frozen=True)
class BankOptions:
    q: float = 0.01
    floor: float | None = None
    max_bank_size: int = 10_000
    duplicate_similarity: float = 0.95
    logo_prompts: tuple[str, ...] = ("a logo", "a brand logo", "logo of a company")
    contrast_prompts: tuple[str, ...] = ("a photo", "a photo of a person", "a photo of an object")


def _score_worker(logo_broadcast, contrast_broadcast):
    def run(batches):
        for batch in batches:
            vectors = embedding_ops.unpack(batch.column(1))
            scores = logo_ops.logo_scores(vectors, logo_broadcast.value, contrast_broadcast.value) \
                if len(vectors) else np.empty(0, np.float32)
            yield pa.RecordBatch.from_arrays([batch.column(0), pa.array(scores)], names=[UID, "logo_score"])

    return run


def run_logo_bank(spark, input_dir: Path, output_dir: Path, options: BankOptions, config: dict | None = None) -> dict:
    """Rows gain `logo_score`; artifacts logo_bank.parquet (logo_uid, score, frequency, cluster, members,
    embedding) and bank/<logo uid>.<ext> (the bank images)."""
    from pyspark.sql import functions as F

    from curation.gpu.slant import OpenClipScorer

    run = StageRun("logo_bank", STAGE_VERSIONS["logo_bank"], config or {})
    df = read_stage_data(spark, input_dir, None)
    rows_in = read_stage_record(input_dir)["rows_out"]
    scorer = OpenClipScorer(_embed_model(input_dir))
    logo_broadcast = spark.sparkContext.broadcast(_text_features(scorer, options.logo_prompts))
    contrast_broadcast = spark.sparkContext.broadcast(_text_features(scorer, options.contrast_prompts))
    emb_df = with_embeddings(spark, df.select(UID, "image_shard", "image_key"), input_dir)
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
        "embedding": bank.column(EMBEDDING_COLUMN).take(pa.array(entries)) if len(entries) else pa.array([],
                                                                                                         pa.binary()),
    })
    tagged = untagged(df.join(scores, UID))
    with StageWriter(output_dir) as writer:
        pq.write_table(table, writer.artifacts_dir / BANK_TABLE)
        _copy_bank_images(bank, entries, downloaded_images_dir(input_dir), writer.artifacts_dir / BANK_IMAGES)
        rows_out, drops = write_tagged(tagged, [*df.columns, "logo_score"], str(writer.temp_dir),
                                       str(writer.ledger_dir))
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops,
                            logo_bank={"taken": len(bank), "entries": len(entries), "q": options.q,
                                       "floor": options.floor, "max_bank_size": options.max_bank_size,
                                       "model": scorer.name})
        writer.commit(record)
    logo_broadcast.unpersist()
    contrast_broadcast.unpersist()
    return record


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
    return pq.read_table(bank_dir / ARTIFACTS_DIR / BANK_TABLE), bank_dir / ARTIFACTS_DIR / BANK_IMAGES


# ---------------------------------------------------------------------------------------------------- mine_logos


@dataclass(frozen=True)
class MiningOptions:
    targets: tuple[str, ...] = ("greedy", "harmless")
    contrast: tuple[str, ...] = ("a person", "an animal", "an object", "a landscape", "food", "a vehicle")
    models: tuple[str, ...] = field(default_factory=tuple)
    probe_count: int = 64
    probe_folder: str | None = None
    max_logos: int = 256
    scale: float = 0.2
    batch_size: int = 64
    heldout_fraction: float = 0.25
    recheck_top: int = 20
    logo_block: int = 16
    device: str = "auto"
    seed: int = 0


def _scorers(models: tuple[str, ...], input_dir: Path, device: str) -> list:
    """One scorer per `models` entry ("NAME", "NAME:PRETRAINED", or "toy"); none given: the embed stage's model."""
    from curation.gpu.embed import load_model
    from curation.gpu.slant import OpenClipScorer, ToyLogoScorer

    if not models:
        return [OpenClipScorer(_embed_model(input_dir, device))]
    scorers = []
    for spec in models:
        if spec == TOY_MODEL:
            scorers.append(ToyLogoScorer())
            continue
        name, _, pretrained = spec.partition(":")
        weights = None if pretrained in ("", "random") else pretrained
        scorers.append(OpenClipScorer(load_model(name, weights, device)))
    return scorers


def _probe_images(spark, input_dir: Path, options: MiningOptions) -> list:
    """(id, image) probes: the images of a folder, or the `probe_count` corpus images with the smallest
    u(seed, uid)."""
    from PIL import Image

    if options.probe_folder:
        paths = sorted(p for p in Path(options.probe_folder).rglob("*")
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not paths:
            raise ValueError(f"probe_folder {options.probe_folder} holds no jpg/png/webp images")
        return [(str(p.relative_to(options.probe_folder)), Image.open(p).convert("RGB")) for p in paths]
    rows = read_stage_data(spark, input_dir, None).select(UID, "image_shard", "image_key").toArrow()
    draws = uniform(options.seed, rows.column(UID), PROBE_PURPOSE)
    chosen = np.argsort(draws, kind="stable")[: options.probe_count]
    images_dir = downloaded_images_dir(input_dir)
    probes = []
    with tar_ops.TarReader() as reader:
        for index in sorted(chosen.tolist(), key=lambda i: rows.column(UID)[i].as_py()):
            uid, shard, key = (rows.column(name)[index].as_py() for name in (UID, "image_shard", "image_key"))
            _, data = reader.image(images_dir / shard, key)
            probes.append((uid, Image.open(io.BytesIO(data)).convert("RGB")))
    return probes


def _bank_logos(stage_dir: Path, max_logos: int) -> list:
    from PIL import Image

    bank, images = read_bank(stage_dir)
    top = bank.sort_by([("score", "descending"), ("logo_uid", "ascending")]).slice(0, max_logos)
    logos = []
    for uid in top.column("logo_uid").to_pylist():
        [path] = list(images.glob(f"{uid}.*"))
        logos.append((uid, Image.open(path).convert("RGBA")))
    return logos


def run_mine_logos(
    spark, input_dir: Path, output_dir: Path, options: MiningOptions, config: dict | None = None
) -> dict:
    """Rank the bank's logos by spuriousness toward each target; artifacts mining.parquet and contact_sheet.png.
    Rows pass through (the record points at the input's data)."""
    from curation.gpu import slant

    run = StageRun("mine_logos", STAGE_VERSIONS["mine_logos"], config or {})
    rows = read_stage_record(input_dir)["rows_out"]
    data_dir = resolve_data_dir(input_dir)
    logos = _bank_logos(input_dir, options.max_logos)
    probes = _probe_images(spark, input_dir, options)
    scorers = _scorers(options.models, input_dir, options.device)
    with StageWriter(output_dir) as writer:
        input_info = stage_input(input_dir, writer)
        work_dir = writer.open_work_dir({"config": run.config, "input": input_info})
        result = slant.mine_logos(
            scorers, logos, probes, list(options.targets), list(options.contrast), scale=options.scale,
            batch_size=options.batch_size, heldout_fraction=options.heldout_fraction,
            recheck_top=options.recheck_top, seed=options.seed, logo_block=options.logo_block,
            work_dir=work_dir / "blocks",
        )
        pq.write_table(result.table, writer.artifacts_dir / MINING_TABLE)
        by_logo = dict(logos)
        top = result.table.slice(0, 32).to_pylist()
        slant.contact_sheet([(row["logo_id"], by_logo[row["logo_id"]]) for row in top],
                            [row["spuriousness"] for row in top], writer.artifacts_dir / CONTACT_SHEET)
        record = run.record(input_info, rows, rows, {}, data_from=writer.link_to(data_dir),
                            mining={**json.loads(json.dumps(result.summary, default=str)),
                                    "ten_crop": _ten_crop_check(scorers[0], logos, probes, result, options)})
        writer.commit(record)
    return record


def _ten_crop_check(scorer, logos, probes, result, options: MiningOptions) -> dict | None:
    """Target-prediction rates of plain vs 10-crop zero-shot on probes carrying the top-ranked logo (SLANT's
    mitigation), for the first model."""
    import torch

    from curation.gpu import slant, zeroshot

    if not len(result.table) or not probes:
        return None
    best = result.table.slice(0, 1).to_pylist()[0]
    labels = list(options.targets) + list(options.contrast)
    label_features = scorer.encode_text(labels)
    clean = torch.stack([scorer.to_pixels(image) for _, image in probes]).to(scorer.device)
    logo = slant.logo_tensor(dict(logos)[best["logo_id"]]).to(scorer.device)
    pasted = slant.paste(clean, logo, slant.CORNERS[0], options.scale)
    comparison = zeroshot.compare_plain_and_ten_crop(scorer, clean, pasted, label_features,
                                                     labels.index(best["target"]))
    return {"logo_id": best["logo_id"], "target": best["target"], "corner": slant.CORNERS[0], **comparison}


# ---------------------------------------------------------------------------------------------------- flag_logos


@dataclass(frozen=True)
class FlagOptions:
    threshold: float = 0.9
    top: int = 10
    min_spuriousness: float = 0.05
    policy: str = "tag"

    def __post_init__(self):
        if self.policy not in ("tag", "drop"):
            raise ValueError(f"policy must be tag or drop, not {self.policy!r}")


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
                names=[UID, "spurious_logo", "spurious_logo_similarity"],
            )

    return run


def mined_spurious_logos(stage_dir: Path, options: FlagOptions) -> list[str]:
    """Logo uids ranked in the top `options.top` with spuriousness >= `options.min_spuriousness`."""
    mine_dir = find_upstream(stage_dir, "mine_logos")
    if mine_dir is None:
        raise ValueError(f"{stage_dir} has no mine_logos stage upstream")
    table = pq.read_table(mine_dir / ARTIFACTS_DIR / MINING_TABLE).to_pylist()
    chosen = []
    for row in table:
        if row["rank"] <= options.top and row["spuriousness"] >= options.min_spuriousness \
                and row["logo_id"] not in chosen:
            chosen.append(row["logo_id"])
    return chosen


def run_flag_logos(
    spark, input_dir: Path, output_dir: Path, options: FlagOptions, config: dict | None = None
) -> dict:
    """Rows gain `spurious_logo` (the mined logo uid within cosine `threshold`, or null) and its similarity; with
    policy drop, flagged rows go to the ledger (spurious_logo)."""
    from pyspark.sql import functions as F

    run = StageRun("flag_logos", STAGE_VERSIONS["flag_logos"], config or {})
    df = read_stage_data(spark, input_dir, None)
    rows_in = read_stage_record(input_dir)["rows_out"]
    logo_uids = mined_spurious_logos(input_dir, options)
    bank, _ = read_bank(input_dir)
    by_uid = dict(zip(bank.column("logo_uid").to_pylist(), range(len(bank)), strict=True))
    vectors = embedding_ops.unpack(bank.column("embedding").take(pa.array([by_uid[u] for u in logo_uids],
                                                                          pa.int64())))
    logos_broadcast = spark.sparkContext.broadcast(vectors)
    flags = with_embeddings(spark, df.select(UID), input_dir).mapInArrow(
        _flag_worker(logo_uids, logos_broadcast, options.threshold),
        f"{UID} string, spurious_logo string, spurious_logo_similarity float",
    )
    data_columns = [c for c in df.columns if c not in ("spurious_logo", "spurious_logo_similarity")]
    tagged = untagged(df.select(*data_columns).join(flags, UID))
    if options.policy == "drop":
        detail = F.to_json(F.struct(F.col("spurious_logo").alias("logo"),
                                    F.col("spurious_logo_similarity").alias("similarity")))
        tagged = drop_where(tagged, F.col("spurious_logo").isNotNull(), "flag_logos", Reason.SPURIOUS_LOGO,
                            F.col("spurious_logo"), detail)
    with StageWriter(output_dir) as writer:
        rows_out, drops = write_tagged(tagged, [*data_columns, "spurious_logo", "spurious_logo_similarity"],
                                       str(writer.temp_dir), str(writer.ledger_dir))
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops,
                            flag_logos={"logos": logo_uids, "threshold": options.threshold,
                                        "policy": options.policy})
        writer.commit(record)
    logos_broadcast.unpersist()
    return record
