"""The stage executor: the frame every stage shares, so that a stage's own code only computes.

`execute` builds the stage folder in a temporary sibling (`StageWriter`), hands the stage a `StageContext`, writes
the kept rows and the ledger the stage returns (`StageOutput.rows`: one tagged DataFrame, see
`curation.spark.common`), assembles the record (rows in and out, drops by reason, seconds, config hash, input
fingerprint; `StageRun` checks that no row is lost), moves the finished work folders the stage names into its
artifacts, and commits: rename, then `_SUCCESS` last. A stage never writes `_stage.json`, renames a folder or writes
its rows itself; it asks the context for a place for its artifacts (`artifact`), for a work folder that outlives a
failed attempt (`work_dir`), and hands the context what must be released after the write (`broadcast`, `persist`).

That is the seam the next steps grow through without touching the stages: a commit per uid range (one marker per
range), a marker written last on object stores, a filesystem other than the local one behind `StageWriter`, and
several row-local stages (`curation.spark.rowfilter`) fused into one pass.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from curation.io import StageWriter, fingerprint_files, list_files, remove_leftovers
from curation.run_folder import read_stage_record, resolve_data_dir
from curation.spark.common import StageRun, write_tagged
from curation.spark.session import apply_required_conf
from curation.stage import RowFilterStage, Stage

logger = logging.getLogger(__name__)

NESTED_INGEST = "_ingest"


@dataclass
class StageOutput:
    """What a stage hands back to the executor.

    rows: the tagged DataFrame of kept and dropped rows (tag columns null on kept rows), or None when the stage
    writes no rows (a pass-through stage such as count, whose rows are `data_from`'s, or a release).
    """

    rows: object | None = None
    columns: list[str] | None = None  # the data columns of the kept rows, in order
    rows_in: int | None = None  # default: the input stage's rows_out
    rows_out: int | None = None  # only when `rows` is None: default rows_in
    drops: dict[str, int] = field(default_factory=dict)  # only when `rows` is None
    data_from: Path | None = None  # pass-through: the folder holding this stage's rows
    input: dict | None = None  # the record's input; default: the input folder's link and fingerprint
    record: dict = field(default_factory=dict)  # more fields of the record (summaries)
    # Called after the write with the written rows' folder, rows out and drops by reason: more record fields
    # (balance's counts after the draw, filter's drops per rule) or a check (prune's quotas).
    after_write: Callable[[Path, int, dict[str, int]], dict] | None = None
    # Artifact name -> a folder of finished work (download's images, embed's embeddings): moved into `_artifacts/`
    # last, right before the commit, so that a crash before then still resumes from the work folder.
    finished_work: dict[str, Path] = field(default_factory=dict)


class StageContext:
    """What a running stage may use: Spark, its options, its input, and places in its (temporary) stage folder."""

    def __init__(self, spark, stage, options: dict, config: dict, input_location, writer: StageWriter,
                 partitions: int | None, run_config: dict | None, raw_ingest: tuple | None):
        self.spark = spark
        self.stage = stage
        self.options = options
        self.typed = stage.typed(options)
        self.config = config
        self.partitions = partitions
        self.run_config = run_config
        self.input_location = input_location
        self._writer = writer
        self._raw_ingest = raw_ingest
        self._input_dir: Path | None = None
        self._cleanups: list[Callable[[], None]] = []

    @property
    def input_dir(self) -> Path:
        """The stage folder this stage reads. Given raw shards (a stage that takes them, `raw_ingest` set), ingest
        runs first into `<output>/_ingest`, a complete stage folder of its own that the record links to."""
        if self._input_dir is None:
            if self._raw_ingest is not None:
                ingest, ingest_options = self._raw_ingest
                nested = self._writer.temp_dir / NESTED_INGEST
                execute(self.spark, ingest, ingest_options, ingest.hashed_config(ingest_options), self.input_location,
                        nested, self.partitions)
                self._input_dir = nested
            else:
                self._input_dir = Path(self.input_location)
        return self._input_dir

    @cached_property
    def rows_in(self) -> int:
        return read_stage_record(self.input_dir)["rows_out"]

    def read_rows(self):
        """The input's rows as a DataFrame, repartitioned to the stage's `partitions` when it has them."""
        df = self.spark.read.parquet(str(resolve_data_dir(self.input_dir)))
        return df.repartition(self.partitions) if self.partitions else df

    @cached_property
    def input_link(self) -> dict:
        """The record's input: the upstream folder relative to this one, and its data's fingerprint (listed once:
        work-folder identities use it too)."""
        data_dir = resolve_data_dir(self.input_dir)
        link = NESTED_INGEST if self._raw_ingest is not None else self._writer.link_to(self.input_dir)
        return {"stage": link, "fingerprint": fingerprint_files(list_files(data_dir))}

    def artifact(self, name: str) -> Path:
        """Where the artifact `name` goes (`_artifacts/name`, renamed into place with the folder)."""
        return self._writer.artifacts_dir / name

    @property
    def building_dir(self) -> Path:
        """The stage folder being built (a temporary sibling of the final one, renamed into place at the commit)."""
        return self._writer.temp_dir

    def work_dir(self, identity: dict) -> Path:
        """A folder that outlives a failed attempt with the same `identity` (finished shards a rerun resumes)."""
        return self._writer.open_work_dir(identity)

    def link_to(self, path: Path) -> str:
        """A path to `path` relative to the committed stage folder."""
        return self._writer.link_to(path)

    def broadcast(self, value):
        handle = self.spark.sparkContext.broadcast(value)
        self._cleanups.append(handle.unpersist)
        return handle

    def persist(self, df):
        from pyspark import StorageLevel

        persisted = df.persist(StorageLevel.MEMORY_AND_DISK)
        self._cleanups.append(persisted.unpersist)
        return persisted

    def close(self) -> None:
        """Release what the stage held for its write; a release that fails is logged, never hides the stage's own
        outcome."""
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as error:  # an unpersist failing must not mask the stage's result
                logger.warning("stage %s: releasing %s failed: %s", self.stage.name, cleanup, error)
        self._cleanups.clear()


def _run(stage: Stage, context: StageContext) -> StageOutput:
    if isinstance(stage, RowFilterStage):
        # Imported here: the row-filter adapter builds on this module.
        from curation.spark.rowfilter import run_row_filter

        return run_row_filter(context)
    return stage.run(context)


def execute(spark, stage, options: dict, config: dict, input_location, output_dir: Path,
            partitions: int | None = None, run_config: dict | None = None, raw_ingest: tuple | None = None) -> dict:
    """Run `stage` (a `curation.stage.Stage`) with `options` into the stage folder `output_dir`; its record.

    `config` is what the record stores (`Stage.hashed_config`); `raw_ingest` = (ingest stage, its options) when
    `input_location` is raw shards for a stage that reads a stage folder."""
    # Whoever made the session (spark-submit, a notebook, a test), every stage runs with the settings it relies on.
    apply_required_conf(spark)
    run = StageRun(stage.name, stage.version, config)
    with StageWriter(output_dir) as writer:
        context = StageContext(spark, stage, options, config, input_location, writer, partitions, run_config,
                               raw_ingest)
        try:
            output = _run(stage, context)
            if output.rows is not None:
                rows_out, drops = write_tagged(output.rows, output.columns, str(writer.temp_dir),
                                               str(writer.ledger_dir))
            else:
                rows_out, drops = output.rows_out, output.drops
            extra = dict(output.record)
            rows_in = output.rows_in if output.rows_in is not None else context.rows_in
            if rows_out is None:
                rows_out = rows_in
            if output.after_write is not None:
                extra.update(output.after_write(writer.temp_dir, rows_out, drops))
        finally:
            context.close()
        if output.data_from is not None:
            extra["data_from"] = writer.link_to(output.data_from)
        input_info = output.input if output.input is not None else context.input_link
        record = run.record(input_info, rows_in, rows_out, drops, **extra)
        for name, folder in output.finished_work.items():
            remove_leftovers(folder)  # attempts Spark retried after their worker died
            os.replace(folder, writer.artifacts_dir / name)
        writer.commit(record)
    return record
