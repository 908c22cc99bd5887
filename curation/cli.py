"""`curation ...` (also `python -m curation` and the spark-submit jobs in jobs/): one command per stage, plus
run, verify, metadata and demo. Stage options are documented in curation.config.STAGE_OPTIONS."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from curation.config import STAGE_OPTIONS, ConfigError, load_run_config

logger = logging.getLogger("curation")

STAGE_COMMANDS = (
    "ingest", "dedup-exact", "dedup-text", "download", "embed", "dedup-image", "cluster", "semdedup", "prune",
    "logo-bank", "mine-logos", "flag-logos", "match", "count", "balance", "publish", "filter", "nsfw",
    "block-images", "decontaminate",
)
# Kept in step with curation.demo_images (not imported: it would load Pillow and numpy for every command).
DEMO_IMAGE_PORT = 18765


def _help(stage: str, option: str) -> str:
    default, text = STAGE_OPTIONS[stage][option]
    return f"{text} (default: {default})" if default not in (None, [], False) else text


def _add_spark_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spark")
    group.add_argument("--master", help="Spark master for a local session (ignored under spark-submit); "
                       "default local[*] or $CURATION_SPARK_MASTER")
    group.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                       help="extra Spark configuration, repeatable")


def _add_partitions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partitions", type=int, help="Spark partitions of this stage (default: Spark's parallelism)")


def _add_ingest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url-column", help=_help("ingest", "url_column"))
    parser.add_argument("--text-column", help=_help("ingest", "text_column"))
    parser.add_argument("--max-caption-chars", type=int, default=STAGE_OPTIONS["ingest"]["max_caption_chars"][0],
                        help=_help("ingest", "max_caption_chars"))
    parser.add_argument("--keep-columns", nargs="*", default=[], help=_help("ingest", "keep_columns"))
    parser.add_argument("--skip-bad-files", action="store_true", help=_help("ingest", "skip_bad_files"))
    parser.add_argument("--blocked-domains-file", help=_help("ingest", "blocked_domains_file"))
    parser.add_argument("--blocked-urls-file", help=_help("ingest", "blocked_urls_file"))


def _add_options_of(parser: argparse.ArgumentParser, stage: str, types: dict | None = None) -> None:
    """One flag per STAGE_OPTIONS entry of `stage`: booleans are switches, lists take several values, and the type
    is the default's unless `types` names it."""
    for option, (default, _) in STAGE_OPTIONS[stage].items():
        flag = f"--{option.replace('_', '-')}"
        if default is True:
            parser.add_argument(f"--no-{option.replace('_', '-')}", dest=option, action="store_false",
                                help=f"turn off: {STAGE_OPTIONS[stage][option][1]}")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_help(stage, option))
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="*", default=list(default), help=_help(stage, option))
        else:
            kind = (types or {}).get(option, type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=default, help=_help(stage, option))


def _stage_folder_command(commands, stage: str, help_text: str, input_help: str, types: dict | None = None):
    """A command that reads one stage folder and writes one, with a flag per STAGE_OPTIONS entry of `stage`."""
    parser = commands.add_parser(stage.replace("_", "-"), help=help_text)
    parser.add_argument("--input", required=True, type=Path, help=input_help)
    parser.add_argument("--output", required=True, type=Path, help="stage folder to write")
    _add_options_of(parser, stage, types)
    return parser


def _stage_options_from(args, stage: str) -> dict:
    return {option: getattr(args, option) for option in STAGE_OPTIONS[stage]}


def _add_raw_or_stage_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help="a stage folder, or raw parquet shards (then ingest runs first, inside the output)")
    parser.add_argument("--output", required=True, type=Path, help="stage folder to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="raw parquet shards -> uid, url, caption; bad rows to the ledger")
    ingest.add_argument("--input", nargs="+", required=True, help="parquet files, folders or globs (any pyarrow URI)")
    ingest.add_argument("--output", required=True, type=Path, help="stage folder to write")
    _add_ingest_options(ingest)
    _add_partitions(ingest)

    match = commands.add_parser("match", help="MetaCLIP substring matching; unmatched rows to the ledger")
    match.add_argument("--metadata", required=True, type=Path, help="metadata.json: a JSON list of entries")
    _add_raw_or_stage_input(match)
    match.add_argument("--keep-unmatched", action="store_true", help=_help("match", "keep_unmatched"))
    _add_ingest_options(match)
    _add_partitions(match)

    dedup_exact = commands.add_parser("dedup-exact", help="one row per normalised url (optionally per caption)")
    _add_raw_or_stage_input(dedup_exact)
    dedup_exact.add_argument("--by-caption", action="store_true", help=_help("dedup_exact", "by_caption"))
    _add_ingest_options(dedup_exact)
    _add_partitions(dedup_exact)

    dedup_text = commands.add_parser("dedup-text", help="MinHash-LSH near-duplicate captions, exact-Jaccard verified")
    _add_raw_or_stage_input(dedup_text)
    for option, kind in (("threshold", float), ("shingles", str), ("policy", str), ("num_perm", int),
                         ("max_anchors", int), ("full_pairs_limit", int)):
        dedup_text.add_argument(f"--{option.replace('_', '-')}", type=kind,
                                default=STAGE_OPTIONS["dedup_text"][option][0], help=_help("dedup_text", option))
    dedup_text.add_argument("--seed", type=int, default=0, help="seed of the permutations and keep draw (default: 0)")
    _add_ingest_options(dedup_text)
    _add_partitions(dedup_text)

    dedup_image = commands.add_parser("dedup-image", help="exact (sha256) and perceptual-hash image duplicates")
    dedup_image.add_argument("--input", required=True, type=Path, help="stage folder whose rows carry image bytes")
    dedup_image.add_argument("--output", required=True, type=Path, help="stage folder to write")
    for option, kind in (("image_column", str), ("max_distance", int), ("max_anchors", int),
                         ("full_pairs_limit", int)):
        dedup_image.add_argument(f"--{option.replace('_', '-')}", type=kind,
                                 default=STAGE_OPTIONS["dedup_image"][option][0], help=_help("dedup_image", option))
    _add_partitions(dedup_image)

    download = _stage_folder_command(commands, "download", "img2dataset download into webdataset tars; failures "
                                     "ledgered", "stage folder of the rows to download", {"max_aspect_ratio": float})
    embed = _stage_folder_command(commands, "embed", "open_clip image and text embeddings and clip_score per sample",
                                  "stage folder of downloaded rows")
    cluster = _stage_folder_command(commands, "cluster", "spherical k-means on the image embeddings; rows gain "
                                    "cluster", "stage folder downstream of embed", {"seed": int})
    semdedup = _stage_folder_command(commands, "semdedup", "SemDeDup inside the clusters of a cluster stage",
                                     "stage folder of a cluster stage (or after it)", {"target_keep_fraction": float})
    prune = _stage_folder_command(commands, "prune", "density-based pruning over concept clusters",
                                  "stage folder downstream of embed", {"seed": int, "keep_fraction": float,
                                                                        "keep_count": int})

    logo_types = {"seed": int, "floor": float, "probe_folder": str}
    logo_bank = _stage_folder_command(commands, "logo_bank", "SLANT logo bank: the top q of the corpus by logo score",
                                      "stage folder downstream of embed", logo_types)
    mine_logos = _stage_folder_command(commands, "mine_logos", "SLANT mining: rank bank logos by spuriousness per "
                                       "target", "stage folder downstream of embed", logo_types)
    flag_logos = _stage_folder_command(commands, "flag_logos", "tag or drop images carrying a mined spurious logo",
                                       "stage folder downstream of embed", logo_types)

    filter_types = {name: float for name in ("min_clip_score", "clip_score_top_fraction", "max_aspect_ratio")}
    filter_types.update({name: int for name in ("min_image_side", "min_caption_words", "max_caption_words",
                                                "partitions")})
    filter_stage = _stage_folder_command(commands, "filter", "attribute filters (CLIP score, image size, aspect "
                                         "ratio, caption words, boilerplate captions); each rule its own reason",
                                         "stage folder to filter", filter_types)
    nsfw = _stage_folder_command(commands, "nsfw", "open_nsfw image score (nsfw_score) and an optional drop",
                                 "stage folder downstream of download", {"max_score": float, "threads": int,
                                                                         "partitions": int})
    block_images = _stage_folder_command(commands, "block_images", "drop images on a sha256 or perceptual-hash "
                                         "blocklist", "stage folder downstream of download", {"partitions": int})
    decontaminate = _stage_folder_command(commands, "decontaminate", "drop near duplicates of evaluation images",
                                          "stage folder downstream of download", {"min_cosine": float,
                                                                                  "partitions": int})

    count = commands.add_parser("count", help="entry counts c_e over matched rows (artifact; rows pass through)")
    count.add_argument("--input", required=True, type=Path, help="matched stage folder")
    count.add_argument("--output", required=True, type=Path, help="stage folder to write")

    balance = commands.add_parser("balance", help="MetaCLIP balancing: keep with 1 - prod(1 - min(1, t/c_e))")
    balance.add_argument("--input", required=True, type=Path, help="matched (or counted) stage folder")
    balance.add_argument("--output", required=True, type=Path, help="stage folder to write")
    choice = balance.add_mutually_exclusive_group()
    choice.add_argument("--t", type=float, help=_help("balance", "t"))
    choice.add_argument("--target-size", type=int, help=_help("balance", "target_size"))
    choice.add_argument("--tail-share", type=float, help=_help("balance", "tail_share"))
    balance.add_argument("--seed", type=int, default=0, help="seed of the keep draw u(seed, uid) (default: 0)")
    _add_partitions(balance)

    publish = commands.add_parser("publish", help="uid-range parquet shards, the run's ledger and manifest.json")
    publish.add_argument("--input", required=True, type=Path, help="last stage folder of the chain")
    publish.add_argument("--output", required=True, type=Path, help="release folder to write")
    publish.add_argument("--shard-rows", type=int, default=STAGE_OPTIONS["publish"]["shard_rows"][0],
                         help=_help("publish", "shard_rows"))
    publish.add_argument("--name", default="curation-release", help="dataset name in the manifest")

    run = commands.add_parser("run", help="run the stages of a YAML config into RUN_DIR (skips finished stages)")
    run.add_argument("config", type=Path, help="run configuration (see jobs/configs/demo.yaml)")
    run.add_argument("--output", required=True, type=Path, help="run folder")
    run.add_argument("--force", action="store_true", help="redo every stage even if it is up to date")
    run.add_argument("--dry-run", action="store_true", help="print the stages, the inputs (shards, rows, bytes) and "
                     "an estimate of output size and time from a sample; runs nothing and starts no Spark")
    run.add_argument("--sample-rows", type=int, default=2000, help="rows the dry run's estimate is measured on "
                     "(default: 2000)")
    run.add_argument("--no-report", dest="report", action="store_false",
                     help="do not write RUN_DIR/report.html at the end")

    report = commands.add_parser("report", help="write a self-contained report.html of a run folder")
    report.add_argument("run_dir", type=Path, help="run folder (curation run --output)")
    report.add_argument("--output", type=Path, help="HTML file to write (default: RUN_DIR/report.html)")

    inspect = commands.add_parser("inspect", help="the story of one sample (--uid) or one metadata entry (--entry)")
    inspect.add_argument("run_dir", type=Path, help="run folder")
    what = inspect.add_mutually_exclusive_group(required=True)
    what.add_argument("--uid", help="a sample's uid: every stage it passed, its scores, groups, or why it was dropped")
    what.add_argument("--entry", help="a metadata entry: its counts at each count/balance stage and examples")
    inspect.add_argument("--examples", type=int, default=5, help="example rows shown for --entry (default: 5)")

    takedown = commands.add_parser("takedown", help="write a new release without the samples named in the request "
                                   "files (unchanged shards reused byte for byte)")
    takedown.add_argument("release", type=Path, help="published release folder (with manifest.json)")
    takedown.add_argument("--output", required=True, type=Path, help="new release folder to write")
    takedown.add_argument("--uids", type=Path, help="file of uids, one a line")
    takedown.add_argument("--urls", type=Path, help="file of urls, one a line (compared after url normalisation)")
    takedown.add_argument("--image-hashes", type=Path, help="file of image sha256 digests (64 hex; of the published "
                          "image or of the original as served) or perceptual hashes (16 hex, exact), one a line")
    takedown.add_argument("--reason", default="takedown request", help="reason recorded in the ledger "
                          "(default: takedown request)")

    verify = commands.add_parser("verify", help="re-check a run (every stage) or a release: checksums, row counts, "
                                 "ledger invariant")
    verify.add_argument("path", type=Path, help="a run folder (every stage and the release), manifest.json, or a "
                        "release folder")

    metadata = commands.add_parser("metadata", help="build or check MetaCLIP metadata")
    metadata_commands = metadata.add_subparsers(dest="metadata_command", required=True)
    build = metadata_commands.add_parser("build", help="build metadata from WordNet synsets and wordfreq unigrams")
    build.add_argument("--output", required=True, type=Path, help="metadata.json to write")
    build.add_argument("--wordnet-dir", type=Path, help="WordNet dict folder (default: NLTK_DATA, then Debian's)")
    build.add_argument("--wordfreq-top-n", type=int, help="number of wordfreq unigrams (default: 300000)")
    build.add_argument("--min-zipf", type=float, help="keep only wordfreq words with at least this Zipf frequency")
    check = metadata_commands.add_parser("check", help="entry count and entries that can never match")
    check.add_argument("path", type=Path, help="metadata.json")

    demo_data = commands.add_parser("demo-data", help="generate the seeded demo corpus (LAION-like parquet)")
    demo_data.add_argument("--metadata", required=True, type=Path, help="metadata.json the captions draw from")
    demo_data.add_argument("--output", required=True, type=Path, help="folder for the parquet shards")
    demo_data.add_argument("--rows", type=int, default=60_000, help="rows to generate (default: 60000)")
    demo_data.add_argument("--shards", type=int, default=4, help="parquet files (default: 4)")
    demo_data.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    demo_data.add_argument("--image-port", type=int, default=DEMO_IMAGE_PORT,
                           help=f"port of the demo image server the URLs point to (default: {DEMO_IMAGE_PORT})")
    demo_data.add_argument("--requests", type=Path, help="also write the demo's blocklists and evaluation set "
                           "(blocked_urls.txt, blocked_image_phashes.txt, eval_images/) into this folder")
    demo_data.add_argument("--image-seed", type=int, default=0, help="seed of the demo image server the requests "
                           "describe (curation demo-images --seed; default: 0)")

    demo_images = commands.add_parser("demo-images", help="serve the demo corpus's generated images on 127.0.0.1")
    demo_images.add_argument("--port", type=int, default=DEMO_IMAGE_PORT, help=f"default: {DEMO_IMAGE_PORT}")
    demo_images.add_argument("--seed", type=int, default=0, help="image generator seed (default: 0)")

    for sub in (ingest, dedup_exact, dedup_text, dedup_image, download, embed, cluster, semdedup, prune, logo_bank,
                mine_logos, flag_logos, filter_stage, nsfw, block_images, decontaminate, match, count, balance,
                publish, run):
        _add_spark_options(sub)
    return parser


def _spark(args):
    from curation.spark.session import get_spark

    conf = {}
    for item in args.spark_conf:
        key, separator, value = item.partition("=")
        if not separator:
            raise ConfigError(f"--spark-conf expects KEY=VALUE, got {item!r}")
        conf[key] = value
    return get_spark(master=args.master, conf=conf)


def _ingest_config(args) -> dict:
    return {
        "url_column": args.url_column, "text_column": args.text_column,
        "max_caption_chars": args.max_caption_chars, "keep_columns": list(args.keep_columns),
        "skip_bad_files": args.skip_bad_files, "blocked_domains_file": args.blocked_domains_file,
        "blocked_urls_file": args.blocked_urls_file,
    }


def _stage_command(args) -> dict:
    """Run one stage command with the same progress reporting as a stage of `curation run`."""
    from curation.progress import spark_progress

    spark = _spark(args)
    with spark_progress(spark, args.command):
        return _run_stage_command(spark, args)


def _run_stage_command(spark, args) -> dict:
    from curation.io import is_stage_folder
    from curation.pipeline import ingest_options
    from curation.spark import dedup, image_dedup, publish, stages

    input_dir, raw_ingest = None, None
    if args.command in ("match", "dedup-exact", "dedup-text"):
        if len(args.input) == 1 and is_stage_folder(Path(args.input[0])):
            input_dir = Path(args.input[0])
        else:
            ingest_config = {"stage": "ingest", **_ingest_config(args)}
            raw_ingest = (args.input, ingest_options(ingest_config), args.skip_bad_files, ingest_config)
    if args.command == "ingest":
        config = {"stage": "ingest", **_ingest_config(args)}
        return stages.run_ingest(spark, args.input, args.output, ingest_options(config), args.skip_bad_files,
                                 args.partitions, config)
    if args.command == "match":
        config = {"stage": "match", "metadata": str(args.metadata), "keep_unmatched": args.keep_unmatched}
        return stages.run_match(spark, input_dir, args.output, args.metadata, args.keep_unmatched, args.partitions,
                                config, raw_ingest=raw_ingest)
    if args.command == "dedup-exact":
        config = {"stage": "dedup_exact", "by_caption": args.by_caption}
        return dedup.run_dedup_exact(spark, input_dir, args.output, args.by_caption, args.partitions, config,
                                     raw_ingest=raw_ingest)
    if args.command == "download":
        from curation.pipeline import download_options
        from curation.spark.download import run_download

        options = _stage_options_from(args, "download")
        return run_download(spark, args.input, args.output, download_options(options), args.shard_rows,
                            {"stage": "download", **options}, args.image_bytes_column)
    if args.command == "embed":
        from curation.pipeline import embed_options
        from curation.spark.embed import run_embed

        options = _stage_options_from(args, "embed")
        return run_embed(spark, args.input, args.output, embed_options(options), {"stage": "embed", **options})
    if args.command in ("cluster", "semdedup", "prune", "logo-bank", "mine-logos", "flag-logos", "filter", "nsfw",
                        "block-images", "decontaminate"):
        return _embedding_stage_command(spark, args)
    if args.command == "dedup-image":
        options = {k: getattr(args, k) for k in ("image_column", "max_distance", "max_anchors", "full_pairs_limit")}
        return image_dedup.run_dedup_image(spark, args.input, args.output, partitions=args.partitions,
                                           config={"stage": "dedup_image", **options}, **options)
    if args.command == "dedup-text":
        options = {k: getattr(args, k) for k in ("threshold", "shingles", "policy", "num_perm", "seed", "max_anchors",
                                                 "full_pairs_limit")}
        return dedup.run_dedup_text(spark, input_dir, args.output, partitions=args.partitions,
                                    config={"stage": "dedup_text", **options}, raw_ingest=raw_ingest, **options)
    if args.command == "count":
        return stages.run_count(spark, args.input, args.output, {"stage": "count"})
    if args.command == "balance":
        config = {"stage": "balance", "t": args.t, "target_size": args.target_size, "tail_share": args.tail_share,
                  "seed": args.seed}
        return stages.run_balance(spark, args.input, args.output, args.t, args.seed, args.target_size,
                                  args.tail_share, args.partitions, config)
    config = {"stage": "publish", "shard_rows": args.shard_rows, "name": args.name}
    return publish.run_publish(spark, args.input, args.output, args.shard_rows, args.name, config)


def _embedding_stage_command(spark, args) -> dict:
    from curation.config import StageConfig, stage_options
    from curation.pipeline import run_stage

    stage = args.command.replace("-", "_")
    given = _stage_options_from(args, stage)
    options = stage_options(stage, given, {"seed": 0})
    return run_stage(spark, StageConfig(stage, options), {"stage": stage, **options}, args.input, args.output, None)


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


def run_summary(results, run_dir: Path) -> list[str]:
    """The short summary `curation run` prints: rows per stage, drops by reason, tail share, manifest path."""
    lines = [f"{'stage':<10} {'rows in':>10} {'rows out':>10}  drops"]
    for _, record, skipped in results:
        drops = ", ".join(f"{reason} {count}" for reason, count in record["drops"].items()) or "-"
        note = " (up to date, skipped)" if skipped else ""
        lines.append(f"{record['stage']:<10} {record['rows_in']:>10} {record['rows_out']:>10}  {drops}{note}")
        balancing = record.get("balancing")
        if balancing:
            lines.append(
                f"{'':<10} t = {balancing['t']:.6g} ({balancing['t_from']}); tail share "
                f"{balancing['tail_share_before']:.3f} before -> {balancing['tail_share_after']:.3f} after"
            )
    manifest = run_dir / "publish" / "manifest.json"
    if manifest.is_file():
        lines.append(f"manifest: {manifest}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Nothing a run writes may be world-writable, whatever umask the caller has (Spark's JVM and workers inherit
    # it from this process).
    os.umask(os.umask(0) | 0o002)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    except Exception as error:
        # A bad input found inside a Spark task (a corrupt data page, say) reaches the driver wrapped in Spark's
        # PythonException; its last traceback line is the task's own message, which is what the user needs.
        if type(error).__name__ != "PythonException":
            raise
        message = [line for line in str(error).strip().splitlines() if line.strip()]
        logger.error("a Spark task failed: %s", message[-1] if message else error)
        return 1


def _dispatch(args) -> int:
    if args.command in STAGE_COMMANDS:
        record = _stage_command(args)
        _write(json.dumps({k: record[k] for k in ("stage", "rows_in", "rows_out", "drops")}))
        return 0
    if args.command == "run":
        from curation.pipeline import run_pipeline

        run_config = load_run_config(args.config)
        if args.dry_run:
            from curation.dry_run import dry_run

            for line in dry_run(run_config, args.output, args.sample_rows):
                _write(line)
            return 0
        spark = _spark_for_run(args, run_config)
        results = run_pipeline(spark, run_config, args.output, force=args.force)
        for line in run_summary(results, args.output.resolve()):
            _write(line)
        if args.report:
            from curation.report import write_report

            _write(f"report: {write_report(args.output)}")
        return 0
    if args.command == "report":
        from curation.report import write_report

        _write(f"report: {write_report(args.run_dir, args.output)}")
        return 0
    if args.command == "inspect":
        from curation.inspect import InspectError, inspect_entry, inspect_uid

        try:
            lines = (inspect_uid(args.run_dir, args.uid) if args.uid is not None
                     else inspect_entry(args.run_dir, args.entry, args.examples))
        except InspectError as error:
            logger.error("%s", error)
            return 1
        for line in lines:
            _write(line)
        return 0
    if args.command == "takedown":
        from curation.takedown import takedown_release

        if not (args.uids or args.urls or args.image_hashes):
            raise ConfigError("takedown needs at least one of --uids, --urls, --image-hashes")
        summary = takedown_release(args.release, args.output, args.uids, args.urls, args.image_hashes, args.reason)
        _write(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    if args.command == "verify":
        from curation.manifest import locate_manifest, verify_manifest
        from curation.verify import verify_run

        is_run = (args.path / "stages").is_dir()
        problems = verify_run(args.path) if is_run else verify_manifest(args.path)
        for problem in problems:
            logger.error("verify: %s", problem)
        if problems:
            return 1
        checked = f"every stage of {args.path} and " if is_run else ""
        _write(f"verified {checked}{locate_manifest(args.path)}: checksums, row counts and ledger invariant hold")
        return 0
    if args.command == "metadata":
        return _metadata_command(args)
    if args.command == "demo-data":
        from curation.demo import generate_demo_corpus
        from curation.ops.metadata import load_metadata

        summary = generate_demo_corpus(args.output, load_metadata(args.metadata), args.rows, args.shards, args.seed,
                                       args.image_port)
        if args.requests is not None:
            from curation.demo import write_demo_requests

            summary["requests"] = write_demo_requests(args.requests, args.rows, args.image_seed, args.image_port)
        _write(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    if args.command == "demo-images":
        from curation.demo_images import serve_demo_images

        serve_demo_images(args.port, args.seed)
        return 0
    raise AssertionError(args.command)


def _spark_for_run(args, run_config):
    if args.master is None:
        args.master = run_config.spark_master
    args.spark_conf = [f"{k}={v}" for k, v in run_config.spark_conf.items()] + list(args.spark_conf)
    return _spark(args)


def _metadata_command(args) -> int:
    from curation.ops import metadata as metadata_ops

    if args.metadata_command == "build":
        options = {}
        if args.wordfreq_top_n is not None:
            options["wordfreq_top_n"] = args.wordfreq_top_n
        if args.min_zipf is not None:
            options["min_zipf"] = args.min_zipf
        entries, record = metadata_ops.build_metadata(wordnet_dir=args.wordnet_dir, **options)
        metadata_ops.write_metadata(args.output, entries)
        record_path = args.output.with_suffix(".record.json")
        from curation.io import atomic_write_json

        atomic_write_json(record_path, record)
        _write(f"wrote {len(entries)} entries to {args.output} (sources recorded in {record_path})")
        return 0
    from curation.ops.metaclip import Matcher

    entries = metadata_ops.load_metadata(args.path)
    never = Matcher.from_entries(entries).unmatchable_entry_ids()
    _write(json.dumps({"entries": len(entries), "sha256": metadata_ops.metadata_sha256(entries),
                       "never_match": len(never), "never_match_sample": [entries[i] for i in never[:20]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
