"""Run configuration: the YAML given to `curation run`, loaded safely and checked key by key.

Every stage option, its default and its meaning live in STAGE_OPTIONS; the CLI flags and the README's table are
the same names (with '_' written '-' on the command line).
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curation.io import sha256_of_json
from curation.ops.ingest import DEFAULT_MAX_CAPTION_CHARS

# What the cluster and prune stages share: both fit spherical k-means on the image embeddings.
KMEANS_OPTIONS: dict[str, tuple[object, str]] = {
    "sample_size": (500_000, "k-means is fit on the driver on a uniform sample (u(seed, uid)) of about this many"),
    "iterations": (20, "k-means iterations (faiss may stop earlier once converged)"),
    "threads": (4, "faiss threads for the fit (fixed, so the centroids do not depend on the machine)"),
    "device": ("auto", "auto (GPU faiss when present), cuda or cpu"),
    "init": ("random", "centroid seeding: random (faiss's, as SemDeDup) or kmeans++"),
    "seed": (None, "seed of the sample draw and of faiss; default: the run's `seed`"),
}

STAGE_OPTIONS: dict[str, dict[str, tuple[object, str]]] = {
    "ingest": {
        "url_column": (None, "url column of the raw shards (default: detected: url, URL, image_url)"),
        "text_column": (None, "caption column (default: detected: caption, TEXT, text, txt, alt_text)"),
        "max_caption_chars": (DEFAULT_MAX_CAPTION_CHARS, "longer captions go to the ledger (caption_too_long)"),
        "keep_columns": ([], "extra raw columns carried through to the release"),
        "skip_bad_files": (False, "record unreadable shards in the manifest and go on, instead of failing"),
        "blocked_domains_file": (None, "text file of domains, one a line: rows whose url host is one of them or a "
                                       "subdomain go to the ledger (blocked_domain)"),
        "blocked_urls_file": (None, "text file of urls, one a line, compared after url normalisation "
                                    "(blocked_url)"),
        "partitions": (None, "Spark partitions for this stage (default: Spark's parallelism)"),
    },
    "dedup_exact": {
        "by_caption": (False, "also keep one row per exact caption (duplicate_caption)"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "dedup_text": {
        "threshold": (0.8, "exact shingle Jaccard at or above which two captions are near duplicates"),
        "shingles": ("char:5", "shingles: char:N (character N-grams) or word:N (word N-grams)"),
        "policy": ("cap:10", "per group: cap:K keeps the K members with the smallest u(seed, uid); keep_one; tag"),
        "num_perm": (128, "MinHash permutations (bands x rows chosen so P(candidate | J = threshold) >= 0.98)"),
        "seed": (None, "seed of the MinHash permutations and of the keep draw; default: the run's `seed`"),
        "max_anchors": (8, "in an LSH bucket larger than full_pairs_limit, members are paired with this many anchors"),
        "full_pairs_limit": (64, "LSH buckets up to this size are verified pair by pair"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "dedup_image": {
        "image_column": ("jpg", "column of encoded image bytes (img2dataset's parquet output calls it jpg)"),
        "max_distance": (4, "perceptual hashes within this Hamming distance are near duplicates"),
        "max_anchors": (8, "in a hash-chunk bucket larger than full_pairs_limit, members pair with this many anchors"),
        "full_pairs_limit": (64, "hash-chunk buckets up to this size are compared pair by pair"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "filter": {
        "min_clip_score": (None, "drop rows with clip_score below this (low_clip_score; LAION used 0.28 with "
                                 "ViT-B/32)"),
        "clip_score_top_fraction": (None, "keep only this top fraction of rows by clip_score, ties by uid "
                                          "(clip_score_not_top; DataComp's CLIP-score filter, e.g. 0.3)"),
        "min_image_side": (None, "drop images whose original shorter side is below this many pixels "
                                 "(image_too_small; ALIGN: 200)"),
        "max_aspect_ratio": (None, "drop images whose original long/short side ratio exceeds this "
                                   "(extreme_aspect_ratio; ALIGN: 3)"),
        "min_caption_words": (None, "drop captions with fewer words (too_few_caption_words; ALIGN: 3)"),
        "max_caption_words": (None, "drop captions with more words (too_many_caption_words; ALIGN: 20)"),
        "max_caption_repeats": (1000, "drop every row whose exact caption is shared by more than this many rows "
                                      "of the stage's whole input (boilerplate_caption; ALIGN's boilerplate "
                                      "rule); null (0 on the command line) turns it off"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "nsfw": {
        "max_score": (None, "drop rows whose nsfw_score exceeds this (reason nsfw); default: only add the score"),
        "batch_size": (64, "images per onnxruntime call on CUDA (the CPU runs one image per call, which is as "
                           "fast there and independent of batch composition); also the preprocessing chunk"),
        "device": ("auto", "auto (CUDA execution provider when onnxruntime has it), cuda or cpu"),
        "threads": (None, "onnxruntime intra-op threads per Spark task (default: onnxruntime's)"),
        "jpeg_reencode": (True, "the open_nsfw reference preprocessing (a JPEG round trip) for reference scores"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "block_images": {
        "sha256_file": (None, "text file of image sha256 digests (hex), one a line: exact matches are blocked"),
        "phash_file": (None, "text file of 64-bit perceptual hashes (16 hex digits), one a line"),
        "max_distance": (4, "images within this Hamming distance of a blocked perceptual hash are blocked"),
        "image_column": ("jpg", "column of encoded image bytes, if the rows carry them (else the download tars)"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "decontaminate": {
        "eval_images": (None, "evaluation images: a folder of image files or a parquet file with an image column "
                              "(required)"),
        "eval_image_column": ("jpg", "the image-bytes column when eval_images is a parquet file"),
        "max_distance": (4, "images within this perceptual-hash Hamming distance of an evaluation image are "
                            "dropped (eval_contamination)"),
        "min_cosine": (0.95, "with embeddings upstream, images whose image-embedding cosine to an evaluation image "
                             "is at least this are dropped too"),
        "use_embeddings": ("auto", "auto (when an embed stage is upstream), always or never"),
        "image_column": ("jpg", "column of encoded image bytes, if the rows carry them (else the download tars)"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "download": {
        "allow_hosts": ([], "host:port pairs that may be reached although they resolve to a loopback, private, "
                            "link-local or multicast address (refused by default)"),
        "shard_rows": (10_000, "about this many rows per image tar (uid-range shards)"),
        "image_bytes_column": (None, "also store each image's bytes in this column of the rows (e.g. jpg)"),
        "image_size": (256, "img2dataset image_size: target side in pixels"),
        "resize_mode": ("border", "img2dataset resize_mode: no, border, keep_ratio, keep_ratio_largest, center_crop"),
        "resize_only_if_bigger": (False, "img2dataset: never upscale"),
        "encode_format": ("jpg", "image format in the tars: jpg, png or webp"),
        "encode_quality": (95, "img2dataset encode_quality"),
        "skip_reencode": (False, "img2dataset: keep the original bytes when no resize is needed"),
        "min_image_size": (0, "img2dataset: smaller images are image_rejected"),
        "max_aspect_ratio": (None, "img2dataset: images with a larger aspect ratio are image_rejected (default none)"),
        "timeout": (10, "seconds per request"),
        "retries": (0, "img2dataset retries per URL"),
        "thread_count": (32, "download threads per Spark task"),
        "user_agent_token": (None, "token added to the User-Agent, also matched in X-Robots-Tag directives"),
        "disallowed_header_directives": (["noai", "noimageai", "noindex", "noimageindex"],
                                         "X-Robots-Tag directives that opt an image out (download_opt_out)"),
    },
    "embed": {
        "model": ("ViT-B-32", "open_clip model name (or a model config added to open_clip, such as tiny-clip)"),
        "pretrained": ("openai", "open_clip pretrained tag, a local checkpoint path, or `random` (random init)"),
        "device": ("auto", "auto (CUDA when present), cuda or cpu"),
        "precision": ("auto", "auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16"),
        "batch_size": (256, "images per forward pass; batches never span two tars"),
        "num_workers": (2, "DataLoader processes decoding images while the model embeds"),
        "engine": ("local", "local (this machine, one process per GPU) or spark (one Spark task per tar)"),
    },
    "cluster": {
        "k": (1000, "number of k-means clusters on the image embeddings (SemDeDup used 50,000 for 440M)"),
        **KMEANS_OPTIONS,
    },
    "semdedup": {
        "eps": (0.07, "drop a member whose cosine similarity to an earlier member of its cluster exceeds 1 - eps"),
        "target_keep_fraction": (None, "choose eps so that this fraction of the rows is kept (instead of eps)"),
        "block_rows": (2048, "rows per similarity block: memory is O(block_rows^2), not O(cluster^2)"),
    },
    "prune": {
        "k": (500, "number of concept clusters (500 in the paper for LAION)"),
        **KMEANS_OPTIONS,
        "keep_fraction": (None, "fraction of the rows to keep (this or keep_count is required)"),
        "keep_count": (None, "number of rows to keep"),
        "tau": (0.1, "softmax temperature over cluster complexity"),
        "ratio": (0.5, "each cluster keeps at least min(floor(ratio * N_keep / k), its size)"),
        "selection": ("hard", "which members a cluster keeps: hard (farthest from the centroid), easy, random"),
    },
    "logo_bank": {
        "q": (0.01, "the bank is the top q of the corpus by logo score (logo prompts minus contrast prompts)"),
        "floor": (None, "only images with a logo score at least this enter the bank"),
        "max_bank_size": (10_000, "at most this many images are taken into the bank"),
        "duplicate_similarity": (0.95, "bank images within this cosine collapse into one logo (frequency kept)"),
        "logo_prompts": (["a logo", "a brand logo", "logo of a company"], "prompts an image is a logo by"),
        "contrast_prompts": (["a photo", "a photo of a person", "a photo of an object"],
                             "prompts an image is not a logo by"),
    },
    "mine_logos": {
        "targets": (["greedy", "harmless"], "labels a logo may spuriously push predictions toward"),
        "contrast": (["a person", "an animal", "an object", "a landscape", "food", "a vehicle"],
                     "the other zero-shot labels"),
        "models": ([], "open_clip models NAME or NAME:PRETRAINED (or `toy`); default: the embed stage's model"),
        "probe_count": (64, "probe images: this many corpus images with the smallest u(seed, uid)"),
        "probe_folder": (None, "probe images from this folder instead of the corpus"),
        "max_logos": (256, "mine the bank's best-scored logos up to this many"),
        "scale": (0.2, "pasted logo size as a share of the probe's shorter side"),
        "batch_size": (64, "pasted images per forward pass"),
        "heldout_fraction": (0.25, "share of probes kept aside to re-check the top logos"),
        "recheck_top": (20, "logos re-checked on the held-out probes"),
        "logo_block": (16, "logos per resumable block"),
        "device": ("auto", "auto, cuda or cpu"),
        "seed": (None, "seed of the probe draw and split; default: the run's `seed`"),
    },
    "flag_logos": {
        "threshold": (0.9, "an image within this cosine of a mined spurious logo carries it"),
        "top": (10, "logos ranked up to this are candidates"),
        "min_spuriousness": (0.05, "and must score at least this"),
        "policy": ("tag", "tag (add spurious_logo) or drop (ledger reason spurious_logo)"),
    },
    "match": {
        "metadata": (None, "MetaCLIP metadata.json (a JSON list of entries); default: the run's `metadata`"),
        "keep_unmatched": (False, "keep rows matching no entry (with empty entry_ids) instead of dropping them"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "count": {},
    "balance": {
        "t": (None, "MetaCLIP threshold t (default 20000 when neither target_size nor tail_share is given)"),
        "target_size": (None, "solve t so that the expected number of kept rows is this"),
        "tail_share": (None, "choose the smallest t whose tail share (matches on entries with c_e < t) >= this"),
        "seed": (None, "seed of the keep draw u(seed, uid); default: the run's `seed`"),
        "partitions": (None, "Spark partitions for this stage"),
    },
    "publish": {
        "shard_rows": (100_000, "about this many rows per parquet shard (uid-range shards)"),
        "name": (None, "dataset name in the manifest; default: the run's `name`"),
    },
}

RUN_KEYS = {"name", "input", "metadata", "seed", "spark", "stages"}
SPARK_KEYS = {"master", "partitions", "conf"}


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key."""


@dataclass
class StageConfig:
    name: str
    options: dict

    @property
    def sha256(self) -> str:
        return sha256_of_json({"stage": self.name, "options": self.options})


@dataclass
class RunConfig:
    name: str
    inputs: list[str]
    seed: int
    stages: list[StageConfig]
    spark_master: str | None = None
    spark_partitions: int | None = None
    spark_conf: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)


# Options that are on by default and turned off by null in YAML or 0 on the command line.
OFF_BY_NULL_OR_ZERO = frozenset({"max_caption_repeats"})


def stage_options(stage: str, given: dict | None, defaults_from_run: dict) -> dict:
    """The full option dict of a stage: defaults, then the run-level values, then what the stage gives (a given
    None means "the default", except for OFF_BY_NULL_OR_ZERO options, where None and 0 turn the option off)."""
    if stage not in STAGE_OPTIONS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {sorted(STAGE_OPTIONS)}")
    given = dict(given or {})
    unknown = sorted(set(given) - set(STAGE_OPTIONS[stage]))
    if unknown:
        raise ConfigError(f"stage {stage}: unknown option(s) {unknown}; options are {sorted(STAGE_OPTIONS[stage])}")
    options = {key: default for key, (default, _) in STAGE_OPTIONS[stage].items()}
    for key, value in defaults_from_run.items():
        if key in options and options[key] is None:
            options[key] = value
    options.update({k: v for k, v in given.items() if v is not None})
    for key in OFF_BY_NULL_OR_ZERO & set(options):
        if (key in given and given[key] is None) or options[key] == 0:
            options[key] = None
    return options


def parse_run_config(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the run configuration must be a mapping")
    unknown = sorted(set(raw) - RUN_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; keys are {sorted(RUN_KEYS)}")
    if "input" not in raw:
        raise ConfigError("`input` is required: a path, folder or glob of parquet shards, or a list of them")
    inputs = raw["input"] if isinstance(raw["input"], list) else [raw["input"]]
    spark = raw.get("spark") or {}
    unknown_spark = sorted(set(spark) - SPARK_KEYS)
    if unknown_spark:
        raise ConfigError(f"unknown spark key(s) {unknown_spark}; keys are {sorted(SPARK_KEYS)}")
    name = str(raw.get("name", "curation-release"))
    seed = int(raw.get("seed", 0))
    run_defaults = {"metadata": raw.get("metadata"), "seed": seed, "name": name}
    stages = []
    for item in raw.get("stages") or []:
        if isinstance(item, str):
            stage_name, given = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            stage_name, given = next(iter(item.items()))
        else:
            raise ConfigError(f"a stage must be a name or a one-key mapping, got {item!r}")
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"options of stage {stage_name} must be a mapping, got {given!r}")
        stages.append(StageConfig(stage_name, stage_options(stage_name, given, run_defaults)))
    if not stages:
        raise ConfigError("`stages` is empty: list the stages to run, e.g. [ingest, match, count, balance, publish]")
    if stages[0].name != "ingest":
        raise ConfigError("the first stage must be ingest")
    for stage in stages:
        if stage.name == "match" and not stage.options["metadata"]:
            raise ConfigError("stage match needs `metadata` (in the stage or at the top level)")
        if stage.name == "decontaminate" and not stage.options["eval_images"]:
            raise ConfigError("stage decontaminate needs `eval_images` (a folder of images or a parquet file)")
        if stage.name == "prune" and (stage.options["keep_fraction"] is None) == (stage.options["keep_count"] is None):
            raise ConfigError("stage prune needs exactly one of keep_fraction and keep_count")
    return RunConfig(
        name=name, inputs=[str(i) for i in inputs], seed=seed, stages=stages, spark_master=spark.get("master"),
        spark_partitions=spark.get("partitions"), spark_conf=dict(spark.get("conf") or {}), raw=raw,
    )


def load_run_config(path: Path) -> RunConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read run configuration {path}: {error}") from error
    try:
        return parse_run_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
