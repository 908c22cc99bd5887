"""`curation ...` (also `python -m curation` and the spark-submit jobs in jobs/): one command per stage, plus
run, verify, metadata and demo. The stage commands and their flags come from the stage registry (curation.stages)."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from curation.config import ConfigError
from curation.pipeline import COMMAND_RUN_DEFAULTS, INGEST
from curation.run_folder import RunFolder
from curation.stage import OptionSpec, Stage
from curation.stages import all_stages, get_stage, hashed_config, load_run_config
from curation.terminal import printable

logger = logging.getLogger("curation")

# `curation <command>` -> its stage, for every declared stage.
STAGE_COMMANDS = {stage.command: stage for stage in all_stages()}

# Kept in step with curation.demo_images (not imported: it would load Pillow and numpy for every command).
DEMO_IMAGE_PORT = 18765


def _option_help(spec: OptionSpec) -> str:
    text = spec.help
    if spec.limits():
        text += f"; {spec.limits()}"
    default = spec.describe_default()
    if spec.from_run:
        run_default = COMMAND_RUN_DEFAULTS.get(spec.name)
        if run_default is None:
            return f"{text} (required)"
        default = str(run_default)
    return text if default in ("none", "[]", "false") else f"{text} (default: {default})"


def _count(text: str) -> int:
    """The argparse type of a count: an integer >= 0."""
    refusal = argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise refusal from None
    if value < 0:
        raise refusal
    return value


def _add_spark_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spark")
    group.add_argument("--master", help="Spark master for a local session (ignored under spark-submit); "
                       "default local[*] or $CURATION_SPARK_MASTER")
    group.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                       help="extra Spark configuration, repeatable")


def _add_option_flags(parser, stage: Stage, skip: frozenset = frozenset()) -> None:
    """One flag per option of `stage`: booleans are switches (`--no-NAME` for those on by default), lists take
    several values. A flag not given is left out, so the stage's own default (or the run-level value) applies."""
    group = parser.add_argument_group(f"{stage.name} options")
    for spec in stage.specs():
        if spec.name in skip:
            continue
        if spec.switches_off:
            group.add_argument(spec.flag, dest=spec.name, action="store_false", default=None,
                               help=f"turn off: {spec.help}")
        elif spec.kind is bool:
            group.add_argument(spec.flag, dest=spec.name, action="store_true", default=None, help=_option_help(spec))
        elif spec.kind is list:
            group.add_argument(spec.flag, dest=spec.name, nargs="*", metavar="VALUE", help=_option_help(spec))
        else:
            group.add_argument(spec.flag, dest=spec.name, type=spec.kind, help=_option_help(spec))


def _add_stage_command(commands, stage: Stage) -> argparse.ArgumentParser:
    """`curation <stage>`: --input, --output and a flag per option; stages that also take raw shards get the ingest
    options too."""
    parser = commands.add_parser(stage.command, help=stage.summary, description=stage.summary)
    if stage.takes_raw_shards:
        help_text = stage.input_help if stage.input_kind == "raw" else (
            "a stage folder, or raw parquet shards (then ingest runs first, inside the output)")
        parser.add_argument("--input", nargs="+", required=True, help=help_text)
    else:
        parser.add_argument("--input", required=True, type=Path, help=stage.input_help)
    parser.add_argument("--output", required=True, type=Path,
                        help="release folder to write" if stage.release else "stage folder to write")
    _add_option_flags(parser, stage)
    if stage.input_kind == "either":
        _add_option_flags(parser, get_stage(INGEST), skip=frozenset(spec.name for spec in stage.specs()))
    _add_spark_options(parser)
    return parser


def _given_options(args, stage: Stage) -> dict:
    return {spec.name: getattr(args, spec.name) for spec in stage.specs() if getattr(args, spec.name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    for stage in all_stages():
        _add_stage_command(commands, stage)

    run = commands.add_parser("run", help="run the stages of a YAML config into RUN_DIR (skips finished stages)")
    run.add_argument("config", type=Path, help="run configuration (see jobs/configs/demo.yaml)")
    run.add_argument("--output", required=True, type=Path, help="run folder")
    run.add_argument("--force", action="store_true", help="redo every stage even if it is up to date")
    run.add_argument("--dry-run", action="store_true", help="print the stages, the inputs (shards, rows, bytes) and "
                     "an estimate of output size and time from a sample; runs nothing and starts no Spark")
    run.add_argument("--sample-rows", type=_count, default=2000,
                     help="rows the dry run's estimate is measured on (default: 2000; 0: no sample, no estimate)")
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
    verify.add_argument("--expect-sha256", metavar="HEX", help="also check that the release digest (printed by "
                        "publish and verify as `release sha256:`) is this one, so a consumer can pin a release")

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

    _add_spark_options(run)
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


def _stage_command(args, stage: Stage) -> dict:
    """Run one stage command with the same options, checks and progress reporting as a stage of `curation run`."""
    from curation.pipeline import check_stage_output, command_stage, run_stage
    from curation.spark.progress import spark_progress

    ingest_given = _given_options(args, get_stage(INGEST)) if stage.input_kind == "either" else None
    # Checked before Spark starts: a bad flag fails in a second, not after the session is up.
    configured, ingest_options = command_stage(stage.name, _given_options(args, stage), ingest_given)
    config = hashed_config(configured)
    check_stage_output(args.output, args.input)
    spark = _spark(args)
    with spark_progress(spark, args.command):
        return run_stage(spark, configured, config, args.input, args.output, ingest_options=ingest_options)


class EscapingFormatter(logging.Formatter):
    """Escapes the whole message of every record, so each record is one line whatever input it echoes; a
    traceback (--verbose) keeps its line breaks but not the control characters within its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info) -> str:
        return "\n".join(printable(line) for line in super().formatException(exc_info).split("\n"))


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _write(line: str) -> None:
    """One line to stdout, escaped as log messages are (it may echo a path or a caption)."""
    sys.stdout.write(printable(line) + "\n")


def _write_json(value, **dumps_options) -> None:
    """`value` as JSON that stays valid once escaped: the only control character json.dumps leaves raw is DEL."""
    for line in json.dumps(value, **dumps_options).replace("\x7f", "\\u007f").splitlines():
        _write(line)


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
    manifest = RunFolder(run_dir).manifest_path
    if manifest.is_file():
        lines.append(f"manifest: {manifest}")
        lines.append(_release_line(manifest))
    return lines


def _release_line(manifest: Path) -> str:
    from curation.manifest import read_manifest, release_sha256

    return f"release sha256: {release_sha256(read_manifest(manifest))}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Nothing a run writes may be world-writable, whatever umask the caller has (Spark's JVM and workers inherit
    # it from this process).
    os.umask(os.umask(0) | 0o002)
    configure_logging(args.verbose)
    try:
        return _dispatch(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except Exception as error:
        # A bad input found inside a Spark task (a corrupt data page, say) reaches the driver wrapped in Spark's
        # PythonException; its last traceback line is the task's own message, which is what the user needs.
        if type(error).__name__ != "PythonException":
            return _failed(error, args.verbose)
        message = [line for line in str(error).strip().splitlines() if line.strip()]
        logger.error("a Spark task failed: %s", message[-1] if message else error)
        return 1


def _failed(error: Exception, verbose: bool) -> int:
    """A failure that is not one of the known, user-fixable kinds: one line, and the traceback with --verbose."""
    if verbose:
        logger.error("%s: %s", type(error).__name__, error, exc_info=error)
    else:
        logger.error("%s: %s (run with --verbose for the traceback)", type(error).__name__, error)
    return 1


def _dispatch(args) -> int:
    stage = STAGE_COMMANDS.get(args.command)
    if stage is not None:
        record = _stage_command(args, stage)
        _write_json({k: record[k] for k in ("stage", "rows_in", "rows_out", "drops")})
        if stage.release:
            _write(_release_line(args.output))
        return 0
    if args.command == "run":
        from curation.pipeline import check_run_output, run_pipeline

        run_config = load_run_config(args.config)
        if args.dry_run:
            from curation.dry_run import dry_run

            for line in dry_run(run_config, args.output, args.sample_rows):
                _write(line)
            return 0
        # The files the options name are hashed now, and the metadata read and checked, so that a missing file or a
        # malformed metadata list fails before Spark starts, not after the stages before it ran.
        configs = [hashed_config(stage) for stage in run_config.stages]
        check_run_output(args.output, run_config.inputs)
        spark = _spark_for_run(args, run_config)
        results = run_pipeline(spark, run_config, args.output, force=args.force, configs=configs)
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
        from curation.inspection import InspectError, inspect_entry, inspect_uid

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
        _write_json(summary, indent=2, sort_keys=True)
        _write(_release_line(args.output))  # the new release, for a consumer to pin
        return 0
    if args.command == "verify":
        from curation.manifest import verify_manifest
        from curation.run_folder import RunFolder, locate_manifest
        from curation.verify import verify_run

        is_run = RunFolder(args.path).is_run()
        problems = (verify_run(args.path, args.expect_sha256) if is_run
                    else verify_manifest(args.path, args.expect_sha256))
        for problem in problems:
            logger.error("verify: %s", problem)
        if problems:
            return 1
        checked = f"every stage of {args.path} and " if is_run else ""
        _write(f"verified {checked}{locate_manifest(args.path)}: checksums, row counts and ledger invariant hold")
        _write(_release_line(locate_manifest(args.path)))
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
        _write_json(summary, indent=2, sort_keys=True)
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
    _write_json({"entries": len(entries), "sha256": metadata_ops.metadata_sha256(entries),
                 "never_match": len(never), "never_match_sample": [entries[i] for i in never[:20]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
