"""`curation run`: chain the configured stages in one run folder, skipping stages that are already done.

RUN_DIR/stages/<nn>_<stage>/ holds each stage, RUN_DIR/publish/ the release. A stage is skipped when its folder is
complete (`_SUCCESS`) and its record has the same config hash and input fingerprint as now; otherwise it and every
stage after it are redone. Every stage runs through one executor (`curation.spark.executor.execute`), looked up in
the registry (`curation.stages`); nothing here knows a stage by name.
"""

import logging
from pathlib import Path

from curation.config import DEFAULT_RELEASE_NAME, RunConfig, StageConfig
from curation.io import OutputLock, check_apart, check_replaceable, remove_leftovers
from curation.run_folder import RunFolder, is_complete, is_stage_folder, read_stage_record
from curation.spark.progress import spark_progress
from curation.stages import get_stage, hashed_config

logger = logging.getLogger(__name__)

INGEST = "ingest"
# What a stage command uses for the run-level values a `curation run` takes from its YAML.
COMMAND_RUN_DEFAULTS = {"seed": 0, "name": DEFAULT_RELEASE_NAME, "metadata": None}


def ingests_first(stage: StageConfig, input_location) -> bool:
    """Whether `input_location` is raw shards that a stage reading a stage folder must ingest first."""
    if get_stage(stage.name).input_kind != "either":
        return False
    locations = input_location if isinstance(input_location, list | tuple) else [input_location]
    return not (len(locations) == 1 and is_stage_folder(Path(locations[0])))


def current_input_fingerprint(stage: StageConfig, input_location) -> str:
    return get_stage(stage.name).input_fingerprint(stage.options, input_location)


def is_up_to_date(stage: StageConfig, config: dict, folder: Path, input_location) -> bool:
    if not is_complete(folder):
        return False
    record = read_stage_record(folder)
    return record.get("config") == config and record["input"].get("fingerprint") == current_input_fingerprint(
        stage, input_location
    )


def stage_folder(run_dir: Path, position: int, stage: StageConfig) -> Path:
    declaration = get_stage(stage.name)
    return RunFolder(run_dir).stage_dir(position, declaration.name, declaration.release)


def run_stage(spark, stage: StageConfig, config: dict, input_location, output_dir: Path,
              run_config: RunConfig | None = None, ingest_options: dict | None = None) -> dict:
    """Run one configured stage into `output_dir`; its record. `config` is its `hashed_config`; `ingest_options`
    are the ingest options used when a stage that also takes raw shards is given raw shards (it ingests them first,
    into `<output>/_ingest`)."""
    from curation.spark.executor import execute

    check_stage_output(output_dir, input_location)
    declaration = get_stage(stage.name)
    # The run's `spark.partitions` applies to the stages that have a partitions option; the others partition their
    # work by what it is (download and embed by shard, semdedup by cluster).
    partitions = None
    if "partitions" in stage.options:
        partitions = stage.options["partitions"] or (run_config.spark_partitions if run_config else None)
    raw_ingest = None
    if ingests_first(stage, input_location):
        ingest = get_stage(INGEST)
        raw_ingest = (ingest, ingest_options if ingest_options is not None else ingest.options({}, {}))
    elif declaration.input_kind != "raw":
        input_location = _single_folder(input_location)
    output_dir = Path(output_dir)
    with OutputLock(output_dir.parent / f".{output_dir.name}.lock", output_dir):
        return execute(spark, declaration, stage.options, config, input_location, output_dir, partitions,
                       run_config.raw if run_config else None, raw_ingest)


def _single_folder(input_location) -> Path:
    if isinstance(input_location, list | tuple):
        if len(input_location) != 1:
            raise ValueError(f"expected one stage folder as the input, got {len(input_location)} paths")
        input_location = input_location[0]
    return Path(input_location)


def command_stage(name: str, options: dict | None = None,
                  ingest_options: dict | None = None) -> tuple[StageConfig, dict | None]:
    """The stage `name` with the `options` it is given, the rest defaulted and checked as `curation run` does, and
    the checked ingest options it uses when given raw shards (None: ingest's defaults)."""
    stage = StageConfig(name, get_stage(name).options(options, COMMAND_RUN_DEFAULTS))
    ingest = get_stage(INGEST).options(ingest_options, COMMAND_RUN_DEFAULTS) if ingest_options is not None else None
    return stage, ingest


def run_one_stage(spark, name: str, input_location, output_dir: Path, options: dict | None = None,
                  ingest_options: dict | None = None) -> dict:
    """Run the stage `name` (see `command_stage`) from `input_location` (a stage folder, or raw shards for ingest
    and the stages that take them) into `output_dir`; the tests and the benchmarks use it."""
    stage, ingest = command_stage(name, options, ingest_options)
    return run_stage(spark, stage, hashed_config(stage), input_location, output_dir, ingest_options=ingest)


def run_pipeline(spark, run_config: RunConfig, run_dir: Path, force: bool = False,
                 configs: list[dict] | None = None) -> list[tuple[Path, dict, bool]]:
    """Run every configured stage in order; (folder, record, was it skipped) per stage. `configs` are the stages'
    `hashed_config`s when the caller computed them already (the CLI does, before Spark starts): the files they name
    are read and hashed once."""
    configs = configs if configs is not None else [hashed_config(stage) for stage in run_config.stages]
    run_dir = Path(run_dir).resolve()
    run = RunFolder(run_dir)
    check_run_output(run_dir, run_config.inputs)
    with run.lock():
        for folder in (run_dir, run.stages_dir):
            remove_leftovers(folder)
        return _run_stages(spark, run_config, configs, run_dir, force)


def check_run_output(run_dir: Path, inputs) -> None:
    """OutputError unless `curation run` may write `run_dir` (a new folder or a run folder of ours, apart from the
    inputs)."""
    check_apart(run_dir, inputs)
    RunFolder(run_dir).check_writable()


def check_stage_output(output_dir: Path, input_location) -> None:
    """OutputError unless a stage command may write `output_dir` (new, empty or a stage folder of ours, apart from
    its input)."""
    check_apart(output_dir, input_location)
    check_replaceable(output_dir)


def _run_stages(spark, run_config: RunConfig, configs: list[dict], run_dir: Path,
                force: bool) -> list[tuple[Path, dict, bool]]:
    results = []
    input_location = run_config.inputs
    upstream_redone = force
    for position, (stage, config) in enumerate(zip(run_config.stages, configs, strict=True), start=1):
        folder = stage_folder(run_dir, position, stage)
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
