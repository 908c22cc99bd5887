"""Run configuration: what `curation run` reads from YAML, as data.

Which stages exist and what each accepts is the registry's (`curation.stages`): it loads and checks a YAML file into
a `RunConfig` (`curation.stages.load_run_config`). This module holds only the shapes and the error type, so that
every layer may use them.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curation.io import sha256_of_json

RUN_KEYS = {"name", "input", "metadata", "seed", "spark", "stages"}
SPARK_KEYS = {"master", "partitions", "conf"}
DEFAULT_RELEASE_NAME = "curation-release"


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the stage, the option and what it allows."""


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


# A run configuration is a page of YAML; a larger file is a mistake (or an attack), not a config.
MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` references let a few lines expand without bound ("billion laughs"), and a
    run configuration has no use for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in a run configuration "
                              f"(line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def read_yaml(path: Path):
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a configuration may have")
        return yaml.load(path.read_text(), Loader=_NoAliasLoader)  # a SafeLoader: no Python objects either
    except ConfigError as error:
        raise ConfigError(f"cannot read run configuration {path}: {error}") from None
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read run configuration {path}: {error}") from error
