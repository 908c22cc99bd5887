"""The one reader of a run folder and its stage folders (DESIGN.md section 3); `io.StageWriter` is the one writer.

    RUN/
      stages/NN_<stage>/   a stage folder: data parts, _ledger/, _artifacts/, _stage.json, _SUCCESS
      publish/             the release: shards/, ledger/, images/, manifest.json, _stage.json, _SUCCESS
      report.html

A stage folder counts only with both `_SUCCESS` and `_stage.json` (its record). Each record names the folder it read
(`input.stage`, relative), so a run's stages in order are the chain of input links that ends at its release (or at
its last complete stage folder); a stage folder outside that chain was left by an earlier config. Report, inspect,
verify, takedown, the dry run, the pipeline and the Spark adapters read runs through this module only, and the
file names of stage artifacts are defined here once.
"""

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from curation.io import (
    ARTIFACTS_DIR,
    LEDGER_DIR,
    RELEASE_DIR,
    STAGE_RECORD,
    SUCCESS_MARKER,
    OutputError,
    OutputLock,
    list_files,
)

STAGES_DIR = "stages"
RELEASE_SHARDS_DIR = "shards"
RELEASE_LEDGER_DIR = "ledger"
RELEASE_IMAGES_DIR = "images"
RELEASE_STAGE = "publish"
REPORT_NAME = "report.html"
RUN_LOCK = ".curation-run.lock"  # held by the run writing the folder (io.OutputLock)
MANIFEST_NAME = "manifest.json"  # in the release
INCOMPLETE = f"no {SUCCESS_MARKER} or {STAGE_RECORD}"  # why a folder is not a complete stage folder


class Artifact:
    """File and folder names in a stage's `_artifacts/`: the stages write them, report and inspect read them."""

    METADATA = "metadata.json"  # match: the metadata entries it matched against
    ENTRY_COUNTS = "entry_counts.parquet"  # count, balance: entry_id, entry, count
    BALANCED_COUNTS = "balanced_counts.parquet"  # balance: entry_id, entry, count_before, count_after
    IMAGES = "images"  # download: the image tars the rows point into
    EMBEDDINGS = "embeddings"  # embed: vectors in parquet, one file per image tar
    CENTROIDS = "centroids.npy"  # cluster
    CLUSTER_SIZES = "cluster_sizes.parquet"  # cluster
    ASSIGNMENTS = "assignments"  # cluster: uid -> cluster
    PRUNE_CENTROIDS = "prune_centroids.npy"  # prune
    PRUNING_CLUSTERS = "pruning_clusters.parquet"  # prune: per-cluster complexity and quota
    LOGO_BANK = "logo_bank.parquet"  # logo_bank
    LOGO_BANK_IMAGES = "bank"  # logo_bank
    MINING = "mining.parquet"  # mine_logos: per-logo spuriousness
    CONTACT_SHEET = "contact_sheet.png"  # mine_logos


def locate_manifest(path: Path) -> Path:
    """A release manifest's path from a manifest file, a release folder or a run folder."""
    path = Path(path)
    for candidate in (path, path / MANIFEST_NAME, path / RELEASE_DIR / MANIFEST_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {MANIFEST_NAME} at {path} (nor in {path}/{RELEASE_DIR})")


class StageFolderError(ValueError):
    """A stage folder that is missing, incomplete or inconsistent."""


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / SUCCESS_MARKER).is_file() and (Path(stage_dir) / STAGE_RECORD).is_file()


def is_stage_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / STAGE_RECORD).is_file()


def read_stage_record(stage_dir: Path) -> dict:
    stage_dir = Path(stage_dir)
    if not is_complete(stage_dir):
        raise StageFolderError(f"{stage_dir} is not a complete stage folder ({INCOMPLETE})")
    return json.loads((stage_dir / STAGE_RECORD).read_text())


def resolve_data_dir(stage_dir: Path) -> Path:
    """The folder holding a stage's rows: itself, or for a pass-through stage (count) the folder it points to."""
    stage_dir = Path(stage_dir)
    data_from = read_stage_record(stage_dir).get("data_from")
    return resolve_data_dir(stage_dir / data_from) if data_from else stage_dir


def stage_chain(stage_dir: Path) -> list[tuple[Path, dict]]:
    """The stage folders from the first (ingest) to `stage_dir`, following each record's input link."""
    chain = []
    current: Path | None = Path(stage_dir)
    while current is not None:
        record = read_stage_record(current)
        chain.append((current, record))
        upstream = record.get("input", {}).get("stage")
        current = (current / upstream).resolve() if upstream else None
    return list(reversed(chain))


def find_upstream(stage_dir: Path, stage_name: str) -> Path | None:
    """The nearest stage folder named `stage_name` in the chain ending at `stage_dir`."""
    for folder, record in reversed(stage_chain(stage_dir)):
        if record["stage"] == stage_name:
            return folder
    return None


def artifact_path(stage_dir: Path, name: str) -> Path:
    return Path(stage_dir) / ARTIFACTS_DIR / name


def downloaded_images_dir(stage_dir: Path) -> Path:
    """The folder of image tars that the rows of `stage_dir` point into (`image_shard`, `image_key`): the artifacts
    of its nearest upstream download stage."""
    download_dir = find_upstream(stage_dir, "download")
    if download_dir is None:
        raise StageFolderError(f"{stage_dir} has no download stage upstream: run download first")
    return artifact_path(download_dir, Artifact.IMAGES)


def parquet_files(folder: Path) -> list[Path]:
    """The parquet files below `folder` in path order (none when it does not exist)."""
    return [path for path in list_files(folder) if path.suffix == ".parquet"]


@dataclass(frozen=True)
class StageFolder:
    """A complete stage folder (or the release) of a run, with its record."""

    folder: Path
    record: dict
    label: str  # the folder relative to the run folder, e.g. stages/06_balance

    @property
    def name(self) -> str:
        return self.record["stage"]

    @property
    def is_release(self) -> bool:
        return self.name == RELEASE_STAGE

    @property
    def passes_through(self) -> bool:
        """Whether its rows are another stage's (count and mine_logos point at them with `data_from`)."""
        return bool(self.record.get("data_from"))

    @cached_property
    def data_dir(self) -> Path:
        """The folder of this stage's rows: the release's shards, the folder a pass-through stage points to, or the
        stage folder itself."""
        return self.folder / RELEASE_SHARDS_DIR if self.is_release else resolve_data_dir(self.folder).resolve()

    @cached_property
    def data_files(self) -> list[Path]:
        return parquet_files(self.data_dir)

    @cached_property
    def ledger_files(self) -> list[Path]:
        """The rows this stage dropped (the release's `ledger/` is not among them: it copies every stage's)."""
        return parquet_files(self.folder / LEDGER_DIR)

    @cached_property
    def data_schema(self) -> pa.Schema | None:
        """The schema of its rows; None when it has no data file."""
        import pyarrow.dataset as ds  # loads pandas: not for the CLI's start-up

        return ds.dataset([str(p) for p in self.data_files], format="parquet").schema if self.data_files else None

    def artifact(self, name: str) -> Path:
        return artifact_path(self.folder, name)


def _position_key(folder: Path) -> tuple[int, str]:
    prefix = folder.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else -1, folder.name)


class RunFolder:
    """A run folder (or, for inspect and report, a lone stage folder) as every reader sees it."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()

    @property
    def stages_dir(self) -> Path:
        return self.path / STAGES_DIR

    @property
    def release_dir(self) -> Path:
        return self.path / RELEASE_DIR

    @property
    def manifest_path(self) -> Path:
        return self.release_dir / MANIFEST_NAME

    def is_run(self) -> bool:
        return self.stages_dir.is_dir()

    def has_release(self) -> bool:
        return is_complete(self.release_dir)

    def stage_dir(self, position: int, stage_name: str, release: bool) -> Path:
        """Where the run's stage at `position` (from 1) is written: stages/NN_<stage>, or the release."""
        return self.release_dir if release else self.stages_dir / f"{position:02d}_{stage_name}"

    def stage_folders(self) -> list[Path]:
        """Every folder in stages/, complete or not, in stage order (hidden temporaries left out)."""
        if not self.stages_dir.is_dir():
            return []
        present = [p for p in self.stages_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(present, key=_position_key)

    def complete_stage_folders(self) -> list[Path]:
        return [folder for folder in self.stage_folders() if is_complete(folder)]

    def end(self) -> Path | None:
        """The folder the run's chain ends at: the release, else the last complete stage folder, else the folder
        itself when it is a complete stage folder; None when there is none."""
        if self.has_release():
            return self.release_dir
        complete = self.complete_stage_folders()
        if complete:
            return complete[-1]
        return self.path if is_complete(self.path) else None

    def label(self, folder: Path) -> str:
        try:
            return Path(os.path.relpath(Path(folder).resolve(), self.path)).as_posix()
        except ValueError:
            return str(folder)

    def stage(self, folder: Path, record: dict | None = None) -> StageFolder:
        folder = Path(folder).resolve()
        return StageFolder(folder, record if record is not None else read_stage_record(folder), self.label(folder))

    def chain(self) -> list[StageFolder]:
        """The run's stages in order (see the module docstring); StageFolderError when it has none or a link is
        broken."""
        end = self.end()
        if end is None:
            raise StageFolderError(f"{self.path} is not a run folder: it has no complete {RELEASE_DIR}/ or "
                                   f"{STAGES_DIR}/NN_<stage>/ folder")
        return [self.stage(folder, record) for folder, record in stage_chain(end)]

    def outside_chain(self, chain: list[StageFolder]) -> list[tuple[Path, bool]]:
        """The folders in stages/ that are not in `chain`, with whether each is complete: left by an earlier config
        or an interrupted run."""
        in_chain = {stage.folder for stage in chain}
        return [(folder, is_complete(folder)) for folder in self.stage_folders() if folder.resolve() not in in_chain]

    def check_writable(self) -> None:
        """OutputError unless the folder is absent, empty or a run folder of ours (it has stages/ or a release):
        `curation run` writes nowhere else. Inside it, each stage folder is replaced only when it is ours
        (`io.check_replaceable`)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise OutputError(f"{self.path} exists and is not a folder: refusing to write a run there")
        if any(self.path.iterdir()) and not (self.is_run() or is_stage_folder(self.release_dir)):
            raise OutputError(f"{self.path} exists and is not a run folder (no {STAGES_DIR}/ or {RELEASE_DIR}/): "
                              "refusing to write a run among its files; give a new or empty folder")

    def lock(self) -> OutputLock:
        """The lock a run holds on this folder while it writes."""
        return OutputLock(self.path / RUN_LOCK, self.path)

    def published_shards(self) -> list[Path]:
        return parquet_files(self.release_dir / RELEASE_SHARDS_DIR) if self.has_release() else []
