"""The run folder as the report's sections read it (through `curation.run_folder`): stages in order, columns and
ledger rows through pyarrow, images by uid."""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.report.markup import thumbnail
from curation.run_folder import INCOMPLETE, Artifact, RunFolder, StageFolder
from curation.schema import CAPTION, UID

logger = logging.getLogger(__name__)

# The caption and score histograms read at most this many rows per side (the first data files, in file order).
MAX_SAMPLE_ROWS = 2_000_000


class ReportError(ValueError):
    """A folder that is not a run folder (no stage folder to report on)."""


def stages_named(stages: list[StageFolder], *names: str) -> list[StageFolder]:
    return [s for s in stages if s.name in names]


def stages_by_name(stages: list[StageFolder], *names: str) -> list[list[StageFolder]]:
    """For each of `names`, the stages of that name in order."""
    return [stages_named(stages, name) for name in names]


def has_columns(files: list[Path], columns: list[str]) -> bool:
    if not files:
        return False
    names = set(pq.read_schema(files[0]).names)
    return all(column in names for column in columns)


def read_columns(files: list[Path], columns: list[str], limit: int | None = None, filters=None) -> tuple[pa.Table,
                                                                                                          bool]:
    """`columns` of the rows in `files` (in file order), at most `limit` rows; (table, whether it was cut)."""
    tables, rows = [], 0
    for path in files:
        table = pq.read_table(path, columns=columns, filters=filters)
        tables.append(table)
        rows += len(table)
        if limit is not None and rows >= limit:
            return pa.concat_tables(tables).slice(0, limit), True
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns}), False
    return pa.concat_tables(tables), False


def read_ledger(stage: StageFolder, reasons: list[str], columns: list[str]) -> pa.Table:
    """The stage's ledger rows with one of `reasons` (only `columns`)."""
    tables = [pq.read_table(p, columns=columns, filters=[("reason", "in", reasons)]) for p in stage.ledger_files]
    tables = [t for t in tables if len(t)]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def numbers(column) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.cast(pa.float64()).to_numpy(zero_copy_only=False)


def ledger_detail(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class RunView:
    """A run folder as the sections read it: its stages in order, notes on folders outside their chain, and images
    by uid."""

    def __init__(self, run_dir: Path):
        self.folder = RunFolder(run_dir)
        if not self.folder.path.is_dir():
            raise ReportError(f"{run_dir} is not a folder")
        self.stages, self.notes = self._stages_and_notes()
        if not self.stages:
            raise ReportError(f"{run_dir} holds no complete stage folder (stages/NN_<stage>/ or publish/): "
                              "is it a run folder?")

    def _stages_and_notes(self) -> tuple[list[StageFolder], list[str]]:
        """The run's chain, or when a link in it is broken every complete stage folder on its own, with a note on
        each folder that is not part of it."""
        notes = []
        try:
            stages = self.folder.chain()
        except (OSError, ValueError, KeyError) as error:
            logger.warning("report: cannot follow the run's stage chain (%s)", error)
            stages = []
            ends = self.folder.complete_stage_folders() + ([self.folder.release_dir] if self.folder.has_release()
                                                           else [])
            for folder in ends:
                try:
                    stages.append(self.folder.stage(folder))
                except (OSError, ValueError) as unreadable:
                    notes.append(f"{self.folder.label(folder)}: unreadable stage record ({unreadable})")
        for folder, complete in self.folder.outside_chain(stages):
            label = self.folder.label(folder)
            if any(note.startswith(label + ":") for note in notes):
                continue
            notes.append(f"{label}: " + ("complete, but not in the chain that ends at the last stage" if complete
                                         else f"incomplete ({INCOMPLETE})"))
        return stages, notes

    def published_files(self) -> list[Path]:
        return self.folder.published_shards()

    def images_for(self, uids: list[str], stage: StageFolder) -> dict[str, tuple[bytes | None, str | None]]:
        """uid -> (thumbnail PNG or None, caption) for `uids`, from the image column named by `stage`'s record (if
        the rows carry one) or from the download stage's tars."""
        from curation.ops.tars import TarReader

        download = next((s for s in reversed(self.stages) if s.name == "download"
                         and self.stages.index(s) < self.stages.index(stage)), None)
        if download is None:
            return {}
        files = download.data_files
        image_column = (stage.record.get("dedup_image") or {}).get("image_column", "jpg")
        found: dict[str, tuple[bytes | None, str | None]] = {}
        if has_columns(files, [UID, CAPTION, image_column]):
            rows, _ = read_columns(files, [UID, CAPTION, image_column], filters=[(UID, "in", uids)])
            for uid, caption, data in zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True):
                found[uid] = (thumbnail(data), caption)
            return found
        if not has_columns(files, [UID, CAPTION, "image_shard", "image_key"]):
            return {}
        rows, _ = read_columns(files, [UID, CAPTION, "image_shard", "image_key"], filters=[(UID, "in", uids)])
        images_dir = download.artifact(Artifact.IMAGES)
        located = sorted(zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True),
                         key=lambda row: (str(row[2]), str(row[3])))
        with TarReader() as reader:
            for uid, caption, shard, key in located:
                image = None
                if shard and key and (images_dir / shard).is_file():
                    try:
                        hit = reader.image(images_dir / shard, key)
                        image = hit[1] if hit else None
                    except (OSError, ValueError) as error:
                        logger.warning("report: cannot read %s from %s (%s)", key, shard, error)
                found[uid] = (thumbnail(image), caption)
        return found
