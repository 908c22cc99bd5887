"""`curation run`: chain the configured stages in one run folder, skipping stages that are already done.

RUN_DIR/stages/<nn>_<stage>/ holds each stage, RUN_DIR/publish/ the release. A stage is skipped when its folder is
complete (`_SUCCESS`) and its record has the same config hash and input fingerprint as now; otherwise it and every
stage after it are redone.
"""

import logging
from pathlib import Path

from curation.config import RunConfig, StageConfig
from curation.io import (
    fingerprint_files,
    is_complete,
    list_files,
    read_stage_record,
    remove_leftovers,
    resolve_data_dir,
    sha256_of_file,
)
from curation.ops.download import DownloadOptions
from curation.ops.ingest import IngestOptions
from curation.ops.metadata import load_metadata, metadata_sha256
from curation.progress import spark_progress

logger = logging.getLogger(__name__)

DOWNLOAD_OPTION_NAMES = (
    "allow_hosts", "image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
    "skip_reencode", "min_image_size", "max_aspect_ratio", "timeout", "retries", "thread_count", "user_agent_token",
    "disallowed_header_directives",
)
KMEANS_OPTION_NAMES = ("k", "sample_size", "iterations", "threads", "device", "init", "seed")
EMBED_OPTION_NAMES = ("model", "pretrained", "device", "precision", "batch_size", "num_workers", "engine")


def ingest_options(options: dict) -> IngestOptions:
    from curation.ops.blocklists import load_domain_blocklist, load_url_blocklist

    domains, urls = options.get("blocked_domains_file"), options.get("blocked_urls_file")
    return IngestOptions(
        url_column=options["url_column"],
        text_column=options["text_column"],
        max_caption_chars=int(options["max_caption_chars"]),
        keep_columns=tuple(options["keep_columns"]),
        blocked_domains=load_domain_blocklist(Path(domains)) if domains else frozenset(),
        blocked_urls=load_url_blocklist(Path(urls)) if urls else frozenset(),
    )


def download_options(options: dict) -> DownloadOptions:
    fields = {name: options[name] for name in DOWNLOAD_OPTION_NAMES}
    fields["allow_hosts"] = tuple(options["allow_hosts"])
    fields["disallowed_header_directives"] = tuple(options["disallowed_header_directives"])
    if fields["max_aspect_ratio"] is None:
        fields["max_aspect_ratio"] = float("inf")
    return DownloadOptions(**fields)


def embed_options(options: dict):
    from curation.spark.embed import EmbedOptions

    return EmbedOptions(**{name: options[name] for name in EMBED_OPTION_NAMES})


def kmeans_options(options: dict):
    from curation.spark.semantic import KMeansOptions

    return KMeansOptions(**{name: options[name] for name in KMEANS_OPTION_NAMES})


def run_logo_stage(spark, name: str, options: dict, config: dict, input_location, output_dir: Path) -> dict:
    from curation.spark import logos

    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    if name == "logo_bank":
        return logos.run_logo_bank(spark, input_location, output_dir, logos.BankOptions(**fields), config)
    if name == "mine_logos":
        return logos.run_mine_logos(spark, input_location, output_dir, logos.MiningOptions(**fields), config)
    return logos.run_flag_logos(spark, input_location, output_dir, logos.FlagOptions(**fields), config)


def hashed_config(stage: StageConfig) -> dict:
    """What a stage's record stores as its config: the options, plus the content hash of files they name."""
    config = {"stage": stage.name, **stage.options}
    if stage.name == "match":
        config["metadata_sha256"] = metadata_sha256(load_metadata(stage.options["metadata"]))
    if stage.name == "embed" and Path(stage.options["pretrained"]).is_file():
        config["checkpoint_sha256"] = sha256_of_file(Path(stage.options["pretrained"]))
    # Files the options name: editing a blocklist or an evaluation set must redo the stage, not skip it.
    for option in ("blocked_domains_file", "blocked_urls_file", "sha256_file", "phash_file"):
        if stage.options.get(option):
            config[f"{option}_sha256"] = sha256_of_file(Path(stage.options[option]))
    if stage.name == "nsfw":
        from curation.gpu.nsfw import model_identity

        config["model_sha256"] = model_identity()["model_sha256"]
    if stage.name == "decontaminate":
        config["eval_images_fingerprint"] = fingerprint_files(list_files(Path(stage.options["eval_images"])))
    if stage.name == "mine_logos":
        # Files the options name: changing a probe image or a checkpoint must redo the mining, not skip it.
        checkpoints = [Path(spec.partition(":")[2]) for spec in stage.options["models"]]
        config["checkpoint_sha256"] = {str(path): sha256_of_file(path) for path in checkpoints if path.is_file()}
        if stage.options["probe_folder"]:
            config["probe_fingerprint"] = fingerprint_files(list_files(Path(stage.options["probe_folder"])))
    return config


def run_stage(
    spark, stage: StageConfig, config: dict, input_location, output_dir: Path, run_config: RunConfig | None
) -> dict:
    """Run one stage; `config` is its `hashed_config`, stored in the stage record."""
    from curation.spark import dedup, download, embed, image_dedup, publish, semantic, stages

    options = stage.options
    partitions = options.get("partitions") or (run_config.spark_partitions if run_config else None)
    if stage.name == "ingest":
        return stages.run_ingest(
            spark, input_location, output_dir, ingest_options(options), options["skip_bad_files"], partitions, config
        )
    if stage.name == "dedup_exact":
        return dedup.run_dedup_exact(spark, input_location, output_dir, options["by_caption"], partitions, config)
    if stage.name == "dedup_text":
        return dedup.run_dedup_text(
            spark, input_location, output_dir, float(options["threshold"]), options["shingles"], options["policy"],
            int(options["num_perm"]), int(options["seed"]), int(options["max_anchors"]),
            int(options["full_pairs_limit"]), partitions, config,
        )
    if stage.name == "download":
        return download.run_download(
            spark, input_location, output_dir, download_options(options), int(options["shard_rows"]), config,
            options["image_bytes_column"],
        )
    if stage.name == "embed":
        return embed.run_embed(spark, input_location, output_dir, embed_options(options), config)
    if stage.name == "cluster":
        return semantic.run_cluster(spark, input_location, output_dir, kmeans_options(options), config)
    if stage.name == "semdedup":
        eps = None if options["target_keep_fraction"] is not None else float(options["eps"])
        return semantic.run_semdedup(spark, input_location, output_dir, eps, options["target_keep_fraction"],
                                     int(options["block_rows"]), config)
    if stage.name == "prune":
        prune = semantic.PruneOptions(
            keep_fraction=options["keep_fraction"], keep_count=options["keep_count"], tau=float(options["tau"]),
            ratio=float(options["ratio"]), selection=options["selection"],
        )
        return semantic.run_prune(spark, input_location, output_dir, kmeans_options(options), prune, config)
    if stage.name == "filter":
        from curation.spark.filters import run_filter

        return run_filter(spark, input_location, output_dir, options, partitions, config)
    if stage.name == "nsfw":
        from curation.spark.nsfw import run_nsfw

        return run_nsfw(spark, input_location, output_dir, options, partitions, config)
    if stage.name == "block_images":
        from curation.spark.blocklist import run_block_images

        return run_block_images(spark, input_location, output_dir, options, partitions, config)
    if stage.name == "decontaminate":
        from curation.spark.decontaminate import run_decontaminate

        return run_decontaminate(spark, input_location, output_dir, options, partitions, config)
    if stage.name in ("logo_bank", "mine_logos", "flag_logos"):
        return run_logo_stage(spark, stage.name, options, config, input_location, output_dir)
    if stage.name == "dedup_image":
        return image_dedup.run_dedup_image(
            spark, input_location, output_dir, options["image_column"], int(options["max_distance"]),
            int(options["max_anchors"]), int(options["full_pairs_limit"]), partitions, config,
        )
    if stage.name == "match":
        return stages.run_match(
            spark, input_location, output_dir, Path(options["metadata"]), options["keep_unmatched"], partitions,
            config,
        )
    if stage.name == "count":
        return stages.run_count(spark, input_location, output_dir, config)
    if stage.name == "balance":
        return stages.run_balance(
            spark, input_location, output_dir, options["t"], int(options["seed"]), options["target_size"],
            options["tail_share"], partitions, config,
        )
    if stage.name == "publish":
        return publish.run_publish(
            spark, input_location, output_dir, int(options["shard_rows"]), options["name"], config,
            run_config=run_config.raw,
        )
    raise ValueError(f"stage {stage.name} is not implemented")


def current_input_fingerprint(stage: StageConfig, input_location) -> str:
    if stage.name == "ingest":
        from curation.inputs import plan_inputs

        plan = plan_inputs(input_location, ingest_options(stage.options), stage.options["skip_bad_files"])
        return fingerprint_files([Path(f.path) for f in plan.files if "://" not in f.path])
    return fingerprint_files(list_files(resolve_data_dir(input_location)))


def is_up_to_date(stage: StageConfig, config: dict, folder: Path, input_location) -> bool:
    if not is_complete(folder):
        return False
    record = read_stage_record(folder)
    return record.get("config") == config and record["input"].get("fingerprint") == current_input_fingerprint(
        stage, input_location
    )


def stage_folder(run_dir: Path, position: int, stage: StageConfig) -> Path:
    if stage.name == "publish":
        return run_dir / "publish"
    return run_dir / "stages" / f"{position:02d}_{stage.name}"


def run_pipeline(spark, run_config: RunConfig, run_dir: Path, force: bool = False) -> list[tuple[Path, dict, bool]]:
    """Run every configured stage in order; (folder, record, was it skipped) per stage."""
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir, run_dir / "stages"):
        remove_leftovers(folder)
    results = []
    input_location = run_config.inputs
    upstream_redone = force
    for position, stage in enumerate(run_config.stages, start=1):
        folder = stage_folder(run_dir, position, stage)
        config = hashed_config(stage)
        if not upstream_redone and is_up_to_date(stage, config, folder, input_location):
            logger.info("stage %s is up to date in %s: skipped", stage.name, folder)
            results.append((folder, read_stage_record(folder), True))
        else:
            upstream_redone = True
            logger.info("stage %s -> %s", stage.name, folder)
            with spark_progress(spark, f"{position}/{len(run_config.stages)} {stage.name}"):
                record = run_stage(spark, stage, config, input_location, folder, run_config)
            results.append((folder, record, False))
        input_location = folder
    return results
