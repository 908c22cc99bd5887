"""The registry of stages: every module of this package declares one stage as `STAGE` (a `curation.stage.Stage`).

Adding a module here adds the stage everywhere: the YAML loader below, `curation <stage>` and its flags, `curation
run`, the dry run, the README's tables (`make docs`) and the spark-submit entry point `jobs/stage.py`. Importing the
registry imports the declarations only; a stage's Spark, torch or faiss code is imported when it runs.
"""

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from curation.config import (
    DEFAULT_RELEASE_NAME,
    RUN_KEYS,
    SPARK_KEYS,
    ConfigError,
    RunConfig,
    StageConfig,
    read_yaml,
)
from curation.stage import Stage


@cache
def _registry() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for module in pkgutil.iter_modules(__path__):
        stage = importlib.import_module(f"{__name__}.{module.name}").STAGE
        if stage.name in found:
            raise TypeError(f"two declarations of stage {stage.name}")
        found[stage.name] = stage
    return dict(sorted(found.items(), key=lambda item: (item[1].flow, item[0])))


def all_stages() -> list[Stage]:
    """Every declared stage, in data-flow order."""
    return list(_registry().values())


def get_stage(name: str) -> Stage:
    stages = _registry()
    if name not in stages:
        raise ConfigError(f"unknown stage {name!r}; stages are {sorted(stages)}")
    return stages[name]


def stage_options(stage: str, given: dict | None, run_defaults: dict) -> dict:
    """The full, checked option dict of `stage` (see `Stage.options`)."""
    return get_stage(stage).options(given, run_defaults)


def hashed_config(stage: StageConfig) -> dict:
    return get_stage(stage.name).hashed_config(stage.options)


def parse_run_config(raw: dict) -> RunConfig:
    """A checked RunConfig: unknown keys and options, wrong types and broken rules between options fail here,
    before anything runs, naming the stage, the option and what it allows."""
    if not isinstance(raw, dict):
        raise ConfigError("the run configuration must be a mapping")
    unknown = sorted(set(raw) - RUN_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; keys are {sorted(RUN_KEYS)}")
    if "input" not in raw:
        raise ConfigError("`input` is required: a path, folder or glob of parquet shards, or a list of them")
    inputs = raw["input"] if isinstance(raw["input"], list) else [raw["input"]]
    spark = _spark_settings(raw.get("spark"))
    name = raw.get("name", DEFAULT_RELEASE_NAME)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"`name` must be a non-empty string, got {name!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"`seed` must be an integer, got {seed!r}")
    run_defaults = {"metadata": raw.get("metadata"), "seed": seed, "name": name}
    listed = raw.get("stages") or []
    if not isinstance(listed, list):
        raise ConfigError(f"`stages` must be a list of stages, got {listed!r}")
    stages = []
    for item in listed:
        if isinstance(item, str):
            stage_name, given = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            stage_name, given = next(iter(item.items()))
        else:
            raise ConfigError(f"a stage must be a name or a one-key mapping, got {item!r}")
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"options of stage {stage_name} must be a mapping, got {given!r}")
        stages.append(StageConfig(stage_name, stage_options(stage_name, given, run_defaults)))
    _check_stage_order([get_stage(stage.name) for stage in stages])
    return RunConfig(
        name=name, inputs=[str(i) for i in inputs], seed=seed, stages=stages, spark_master=spark.get("master"),
        spark_partitions=spark.get("partitions"), spark_conf=dict(spark.get("conf") or {}), raw=raw,
    )


def _spark_settings(spark) -> dict:
    """The `spark` mapping, checked: master a string, partitions a positive integer, conf a mapping of settings."""
    spark = spark or {}
    if not isinstance(spark, dict):
        raise ConfigError(f"`spark` must be a mapping with keys {sorted(SPARK_KEYS)}, got {spark!r}")
    unknown_spark = sorted(set(spark) - SPARK_KEYS)
    if unknown_spark:
        raise ConfigError(f"unknown spark key(s) {unknown_spark}; keys are {sorted(SPARK_KEYS)}")
    master = spark.get("master")
    if master is not None and (not isinstance(master, str) or not master.strip()):
        raise ConfigError(f"`spark.master` must be a Spark master URL such as local[*], got {master!r}")
    partitions = spark.get("partitions")
    if partitions is not None and (not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1):
        raise ConfigError(f"`spark.partitions` must be an integer >= 1 (or null: Spark's), got {partitions!r}")
    conf = spark.get("conf") or {}
    if not isinstance(conf, dict) or not all(isinstance(key, str) and isinstance(value, str | int | float | bool)
                                             for key, value in conf.items()):
        raise ConfigError(f"`spark.conf` must map Spark settings to values (spark.driver.memory: 8g), got {conf!r}")
    return spark


def _check_stage_order(stages: list[Stage]) -> None:
    """The stage that reads the raw shards runs once, first; the release is written once, last."""
    if not stages:
        raise ConfigError("`stages` is empty: list the stages to run, e.g. [ingest, match, count, balance, publish]")
    if stages[0].input_kind != "raw":
        readers = " or ".join(stage.name for stage in all_stages() if stage.input_kind == "raw")
        raise ConfigError(f"`stages`: the first stage must be {readers}, got {stages[0].name}")
    for position, stage in enumerate(stages[1:], start=2):
        if stage.input_kind == "raw":
            raise ConfigError(f"`stages`: {stage.name} is listed again at position {position}; it reads the raw "
                              "shards and runs once, first")
    for position, stage in enumerate(stages[:-1], start=1):
        if stage.release:
            later = [later.name for later in stages[position:]]
            raise ConfigError(f"`stages`: {', '.join(later)} {'comes' if len(later) == 1 else 'come'} after "
                              f"{stage.name} (position {position}); {stage.name} writes the release and must be "
                              "the last stage")


def load_run_config(path: Path) -> RunConfig:
    raw = read_yaml(path)
    try:
        return parse_run_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
