"""The Stage contract: what one declaration of a stage says, once.

A stage declaration (one module in `curation/stages/`) subclasses `Stage` and names

- `name`, `version`, a one-line `summary` (CLI help) and the README's `description` and `drops` text;
- `Options`: a nested `StageOptions` subclass (a frozen dataclass) whose fields are made with `option(...)`, so every
  option's type (the annotation), default and help text are written exactly once; `StageOptions.check` holds the
  rules that tie options together (exactly one of t / target_size / tail_share, say);
- the files its options name (`hashed_files`: their content hashes join the config hash, so editing a blocklist
  redoes the stage instead of skipping it);
- `adapter`: the Spark adapter that runs it, as "module:function" (imported when the stage runs, so that importing a
  declaration imports no Spark); the function takes the `StageContext` and returns a `StageOutput`-like result to
  the executor (`curation.spark.executor`), which owns the stage folder, the writers, the record and the commit. A
  row-filter stage names its `planner` instead (see `RowFilterStage`);
- for `curation run --dry-run`: `estimated_by`, the `curation.dry_run.Estimator` method that estimates its rows out
  and time (the generic one unless it says otherwise), and `survival(options)`.

Config loading, the CLI's stage commands and flags, `curation run` dispatch, the dry run, the README tables and the
spark-submit entry point are derived from the registry of declarations (`curation.stages`). This module imports
nothing of the project but the other contracts.
"""

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

from curation.config import ConfigError
from curation.io import fingerprint_files, list_files, sha256_of_file
from curation.run_folder import resolve_data_dir


@dataclass(frozen=True)
class OptionText:
    """What `option(...)` says of an option besides its default and type."""

    help: str
    choices: tuple | None = None
    from_run: bool = False  # unset, it takes the run's top-level value of that name (seed, metadata, name)
    off_by_null_or_zero: bool = False  # on by default; null in YAML or 0 on the command line turns it off
    hashed_file: bool = False  # names a file whose content hash joins the config hash as `<option>_sha256`
    default_text: str | None = None  # how the README and --help name a default that is not a plain value
    # The range of a number: at least / above the lower bound, at most / below the upper one.
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None


_OPTION = "curation_option"  # the dataclass field metadata key of an OptionText


def option(default, help: str, **how):
    """A field of a stage's Options dataclass: its default, its help text, and how it is checked and filled (the
    keywords are OptionText's: choices, from_run, off_by_null_or_zero, hashed_file, default_text and a number's
    range at_least, above, at_most, below)."""
    metadata = {_OPTION: OptionText(help, **how)}
    if isinstance(default, list):
        frozen = list(default)
        return dataclasses.field(default_factory=lambda: list(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def partitions_option():
    return option(None, "Spark partitions of this stage (never changes the output)", default_text="Spark's",
                  at_least=1)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the loader, the CLI and the docs see it."""

    name: str
    kind: type  # bool, int, float, str or list (of str)
    nullable: bool
    default: object
    help: str
    choices: tuple | None
    from_run: bool
    off_by_null_or_zero: bool
    hashed_file: bool
    default_text: str | None
    at_least: float | None
    above: float | None
    at_most: float | None
    below: float | None

    @property
    def switches_off(self) -> bool:
        """A switch that is on by default: its command-line flag is `--no-NAME`."""
        return self.kind is bool and self.default is True

    @property
    def flag(self) -> str:
        return ("--no-" if self.switches_off else "--") + self.name.replace("_", "-")

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.from_run:
            return f"run's `{self.name}`"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, list):
            return ", ".join(map(str, self.default)) if self.default else "[]"
        return str(self.default)

    def check(self, stage: str, value) -> None:
        """Raise ConfigError naming the stage, the option and what it allows, unless `value` fits."""
        if value is None:
            if self.nullable or self.off_by_null_or_zero:
                return
            raise ConfigError(f"stage {stage}: option {self.name} must not be null; allowed: {self.allowed()}")
        fits = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            str: _is_text,
            list: lambda v: isinstance(v, list) and all(_is_text(item) for item in v),
        }[self.kind](value)
        if not fits or (self.choices is not None and value not in self.choices) or not self._in_range(value):
            raise ConfigError(f"stage {stage}: option {self.name} is {value!r}; allowed: {self.allowed()}")

    def _in_range(self, value) -> bool:
        # Written so that NaN, which compares false to everything, is out of any range.
        return ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))

    def allowed(self) -> str:
        if self.choices is not None:
            text = " | ".join(map(str, self.choices))
        else:
            text = {bool: "true | false", int: "an integer", float: "a number", str: "a non-empty string",
                    list: "a list of non-empty strings"}[self.kind] + self.range_text()
        return text + (" | null" if self.nullable else "")

    def limits(self) -> str:
        """What the README and --help add to the help text: the choices or the range, if the option has them."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        bounds = self.range_text().strip().removeprefix("in ")
        return f"allowed: {bounds}" if bounds else ""

    def range_text(self) -> str:
        """" in (0, 1]", " >= 1", ... or "" for an option without a range."""
        low = f"[{_bound(self.at_least)}" if self.at_least is not None else f"({_bound(self.above)}" \
            if self.above is not None else None
        high = f"{_bound(self.at_most)}]" if self.at_most is not None else f"{_bound(self.below)})" \
            if self.below is not None else None
        if low and high:
            return f" in {low}, {high}"
        if low:
            return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return ""


def _bound(value: float) -> str:
    """A range's bound as written: every digit of an integer (178956970, not 1.78957e+08), a fraction as Python
    writes it."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _is_text(value) -> bool:
    # No option (a path, a column, a name, a choice) means anything by "" or blanks: such a value is a slip, like
    # an unset variable in a templated config, and would otherwise reach a stage as "this column" or "this file".
    return isinstance(value, str) and value.strip() != ""


def _kind_of(annotation) -> tuple[type, bool]:
    """(base type, nullable) of an option's annotation: bool, int, float, str, list[str], optionally `| None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1:
            raise TypeError(f"an option's type is one type or one type | None, not {annotation}")
        return _kind_of(others[0])[0], True
    if typing.get_origin(annotation) is list or annotation is list:
        return list, False
    if annotation in (bool, int, float, str):
        return annotation, False
    raise TypeError(f"an option's type must be bool, int, float, str or list[str], not {annotation}")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(option,))
@dataclass(frozen=True)
class StageOptions:
    """Base of every stage's Options. Subclasses add fields made with `option(...)` and may override `check` for
    rules that tie options together (raise ConfigError naming the options). A subclass is made a frozen dataclass as
    it is defined, so no declaration repeats the decorator."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)

    @classmethod
    @cache
    def specs(cls) -> tuple[OptionSpec, ...]:
        """Every option of the class, in declaration order (computed once per class; list defaults are copied by
        whoever fills them)."""
        hints = typing.get_type_hints(cls)
        specs = []
        for item in dataclasses.fields(cls):
            kind, nullable = _kind_of(hints[item.name])
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            specs.append(OptionSpec(item.name, kind, nullable, default, **dataclasses.asdict(item.metadata[_OPTION])))
        return tuple(specs)

    def check(self) -> None:
        """Rules between options; the loader calls it after filling every option."""


def exactly_one(stage: str, options: StageOptions, names: tuple[str, ...], required: bool = True) -> None:
    """ConfigError unless exactly one (or, when not `required`, at most one) of `names` is set."""
    given = [name for name in names if getattr(options, name) is not None]
    if len(given) > 1 or (required and not given):
        wanted = "exactly one" if required else "at most one"
        raise ConfigError(f"stage {stage}: give {wanted} of {', '.join(names)} (got {', '.join(given) or 'none'})")


def required(stage: str, options: StageOptions, name: str, what: str) -> None:
    """ConfigError unless option `name` is set; `what` says what it takes."""
    if not getattr(options, name):
        raise ConfigError(f"stage {stage} needs `{name}`: {what}")


def check_with(stage: str, validate) -> None:
    """Run an op's own check of the options at load time: its ValueError becomes a ConfigError naming the stage."""
    try:
        validate()
    except ValueError as error:
        raise ConfigError(f"stage {stage}: {error}") from error


@dataclass(frozen=True)
class RateAssumption:
    """A stage's throughput for the dry run when a benchmark gave none: `rate` per core (rows or images per second),
    the basis, and `survival`, the share of its input it is assumed to keep (stages whose drops depend on the data
    say so with `Stage.drops_depend_on` instead)."""

    rate: float
    unit: str
    basis: str
    survival: float = 1.0
    per: str = "per core"


class Stage:
    """One stage, declared once. Subclasses set the class attributes; the rest has generic defaults."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = StageOptions  # a nested subclass; this default: no options
    summary: ClassVar[str]  # one line: the CLI's help
    description: ClassVar[str]  # the README's stage table: what it does
    drops: ClassVar[str] = "-"  # the README's stage table: the ledger reasons
    flow: ClassVar[int]  # where the stage usually sits in the data flow (orders listings, not runs)
    input_help: ClassVar[str] = "stage folder to read"
    # What `--input` is: "stage" (a stage folder), "raw" (parquet shards: ingest), or "either" (raw shards are
    # ingested first, into `<output>/_ingest`).
    input_kind: ClassVar[str] = "stage"
    release: ClassVar[bool] = False  # writes RUN_DIR/publish (a release), not a stage folder
    reads_images: ClassVar[bool] = False
    assumed_rate: ClassVar[RateAssumption]
    passes_all_rows: ClassVar[bool] = False  # drops no row, whatever its options
    # What the dry run says of the rows it may drop: "duplicates", or what its drops depend on (None: the assumption).
    drops_depend_on: ClassVar[str | None] = None
    adapter: ClassVar[str]  # "module:function" of the Spark adapter that runs the stage: function(context)
    estimated_by: ClassVar[str] = "generic"  # the `curation.dry_run.Estimator` method that estimates the stage

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    @property
    def takes_raw_shards(self) -> bool:
        return self.input_kind in ("raw", "either")

    # --- options

    def specs(self) -> tuple[OptionSpec, ...]:
        return self.Options.specs()

    def options(self, given: dict | None, run_defaults: dict) -> dict:
        """The full, checked option dict: defaults, then the run-level values for `from_run` options, then what
        the stage gives (a given None means "the default", except for off_by_null_or_zero options, where None and
        0 turn the option off). Unknown options, wrong types and broken rules raise ConfigError."""
        given = dict(given or {})
        specs = {spec.name: spec for spec in self.specs()}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise ConfigError(f"stage {self.name}: unknown option(s) {unknown}; options are {sorted(specs)}")
        options = {}
        for spec in specs.values():
            value = given.get(spec.name)
            if spec.off_by_null_or_zero and spec.name in given and (value is None or value == 0):
                options[spec.name] = None
                continue
            if value is None:
                value = run_defaults.get(spec.name) if spec.from_run else None
                if value is None:
                    value = list(spec.default) if isinstance(spec.default, list) else spec.default
            spec.check(self.name, value)
            options[spec.name] = value
        self.Options(**options).check()
        return options

    def typed(self, options: dict) -> StageOptions:
        return self.Options(**options)

    def hashed_files(self, options: dict) -> dict:
        """Content hashes of the files the options name, added to the stage's config (so a changed file redoes the
        stage). Generic: each `hashed_file` option's file as `<option>_sha256`; stages with other files extend it."""
        return {f"{spec.name}_sha256": sha256_of_file(Path(options[spec.name]))
                for spec in self.specs() if spec.hashed_file and options.get(spec.name)}

    def hashed_config(self, options: dict) -> dict:
        """What the stage record stores as its config: the options, plus the content hashes of the files they
        name."""
        return {"stage": self.name, **options, **self.hashed_files(options)}

    # --- running

    def input_fingerprint(self, options: dict, input_location) -> str:
        """What the record's input fingerprint is now (a rerun redoes the stage when it changed): the paths, sizes and
        modification times of the input stage's data files."""
        return fingerprint_files(list_files(resolve_data_dir(input_location)))

    def run(self, context):
        """Compute the stage's rows, drops and artifacts from `context` (a `curation.spark.executor.StageContext`)
        and return a `curation.spark.executor.StageOutput`: the declared `adapter` does."""
        return _function(self.adapter)(context)

    # --- the dry run

    def survival(self, options: dict) -> tuple[float, str]:
        """(share of its input the stage keeps, what that share rests on) for the dry run."""
        if self.passes_all_rows:
            return 1.0, "exact: drops nothing"
        if self.drops_depend_on == "duplicates":
            return 1.0, "upper bound: duplicates grow with the corpus, a sample shows too few to extrapolate"
        if self.drops_depend_on is not None:
            return 1.0, f"upper bound: what it drops depends on the {self.drops_depend_on}"
        survival = self.assumed_rate.survival
        if survival == 1.0:
            return 1.0, "assumed: keeps every row"
        return survival, f"assumed: keeps {survival:.0%}"

    def estimate(self, estimator, stage, rows: float):
        """The dry run's estimate of rows out and time (a `curation.dry_run.StageEstimate`), by the `estimator`'s
        method the declaration names."""
        return getattr(estimator, self.estimated_by)(stage, rows)


class RowFilterStage(Stage):
    """A stage that keeps or drops each row on its own (after whole-input work done on the driver or in a Spark pass
    before): filter, nsfw, block_images, decontaminate, flag_logos, sample. It declares `plan` instead of `run`; the
    executor runs it through the one row-filter adapter (`curation.spark.rowfilter`)."""

    planner: ClassVar[str]  # "module:function" that makes the stage's FilterPlan: function(context, rows)

    def plan(self, context, rows):
        """A `curation.spark.rowfilter.FilterPlan` for the input `rows` (a DataFrame): the declared `planner` makes
        it."""
        return _function(self.planner)(context, rows)


def _function(qualified_name: str):
    """The function a declaration names as "module:function", imported now: a declaration is imported by the CLI,
    which must not pay for (or need) Spark."""
    module, _, function = qualified_name.partition(":")
    return getattr(importlib.import_module(module), function)


def folder_fingerprint(path: str) -> str:
    """The input fingerprint of a folder (or file) an option names: paths, sizes and modification times."""
    return fingerprint_files(list_files(Path(path)))
