"""`curation verify RUN_DIR`: the whole run re-checked, stage by stage, then the release (DESIGN.md section 3).

Every problem is reported with what and where; an empty list means the run is consistent:
- every stage folder is complete (`_SUCCESS` and `_stage.json`) and its record balances (rows in = rows out +
  rows dropped);
- its ledger holds exactly the rows it says it dropped, and its data the rows it says it kept;
- each stage's input link leads to the stage before it, whose rows out are this stage's rows in;
- across the run, the rows read by ingest = rows published + rows in all the stages' ledgers;
- the release's shards, image shards and ledger match the manifest's checksums and counts, and every count the
  manifest states twice agrees (`verify_manifest`); its stages[] are the records of the stages before publish;
- with an expected sha256, the release digest (`curation.manifest.release_sha256`) is that one;
- nothing in the run folder is world-writable.
"""

import logging
import stat
from pathlib import Path

import pyarrow.parquet as pq

from curation.io import LEDGER_DIR
from curation.manifest import read_manifest, verify_manifest
from curation.run_folder import INCOMPLETE, RELEASE_STAGE, RunFolder, StageFolderError

logger = logging.getLogger(__name__)

# What a manifest's stages[] repeats from each stage's record.
_STAGE_COUNTS = ("stage", "rows_in", "rows_out", "drops")


def _parquet_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def _stage_folders(run: RunFolder) -> list[Path]:
    """The run's chain: from its release back to ingest by the records' input links (folders of stages an earlier
    config had are not part of it); without a complete release, every stage folder in order."""
    if run.has_release():
        chain = run.chain()
        stale = [folder.name for folder, _ in run.outside_chain(chain)]
        if stale:
            logger.info("not part of the run's chain (left by an earlier config): %s", stale)
        return [stage.folder for stage in chain]
    return run.stage_folders()


def _check_stage(run: RunFolder, folder: Path) -> tuple[list[str], dict | None]:
    where = folder.name
    try:
        stage = run.stage(folder)
    except StageFolderError:
        return [f"{where}: incomplete stage folder ({INCOMPLETE}): rerun the run"], None
    record = stage.record
    problems = []
    dropped = sum(record["drops"].values())
    if record["rows_in"] != record["rows_out"] + dropped:
        problems.append(f"{where}: record says {record['rows_in']} rows in but {record['rows_out']} out + "
                        f"{dropped} dropped")
    if not stage.is_release:
        ledger_rows = _parquet_rows(stage.ledger_files)
        if ledger_rows != dropped:
            problems.append(f"{where}: {LEDGER_DIR}/ holds {ledger_rows} rows, the record says {dropped} dropped")
        if not stage.passes_through:
            data_rows = _parquet_rows(stage.data_files)
            if data_rows != record["rows_out"]:
                problems.append(f"{where}: data holds {data_rows} rows, the record says {record['rows_out']} out")
    return problems, record


def _world_writable(run_dir: Path) -> list[str]:
    return [f"{path}: world-writable" for path in [run_dir, *run_dir.rglob("*")]
            if not path.is_symlink() and path.stat().st_mode & stat.S_IWOTH]


def _manifest_stage_problems(manifest: dict, records: list[tuple[Path, dict]]) -> list[str]:
    """stages[] of the manifest against the records of the stages before publish, position by position."""
    summaries = [{key: record[key] for key in _STAGE_COUNTS} for _, record in records]
    stated = [{key: stage[key] for key in _STAGE_COUNTS} for stage in manifest["stages"]]
    if len(stated) != len(summaries):
        return [f"stages[] lists {len(stated)} stages, the run has {len(summaries)} before publish"]
    return [f"stages[{index}] = {stage} but the record of {folder.name} says {summary}"
            for index, (stage, summary, (folder, _)) in enumerate(zip(stated, summaries, records, strict=True))
            if stage != summary]


def verify_run(run_dir: Path, expected_sha256: str | None = None) -> list[str]:
    """Every inconsistency found in the run folder `run_dir` (see the module docstring); empty = consistent.
    ManifestError when its release's manifest cannot be read at all."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if not run.is_run():
        return [f"{run_dir}: not a run folder (no stages/)"]
    problems: list[str] = []
    records: list[tuple[Path, dict]] = []
    for folder in _stage_folders(run):
        stage_problems, record = _check_stage(run, folder)
        problems.extend(stage_problems)
        if record is not None:
            records.append((folder, record))
    for (previous_folder, previous), (folder, record) in zip(records, records[1:], strict=False):
        link = record.get("input", {}).get("stage")
        if link is None or (folder / link).resolve() != previous_folder.resolve():
            problems.append(f"{folder.name}: its input is {link!r}, not the stage before it ({previous_folder.name})")
        elif previous["rows_out"] != record["rows_in"]:
            problems.append(f"{folder.name}: {record['rows_in']} rows in, but {previous_folder.name} put out "
                            f"{previous['rows_out']}")
    if records and records[-1][1]["stage"] == RELEASE_STAGE:
        rows_read = records[0][1]["rows_in"]
        in_ledgers = sum(sum(record["drops"].values()) for _, record in records)
        published = records[-1][1]["rows_out"]
        if rows_read != published + in_ledgers:
            problems.append(f"run: {rows_read} rows read != {published} published + {in_ledgers} in the ledgers")
        problems.extend(f"publish: {problem}" for problem in verify_manifest(run.manifest_path, expected_sha256))
        problems.extend(f"publish: {problem}"
                        for problem in _manifest_stage_problems(read_manifest(run.manifest_path), records[:-1]))
    elif expected_sha256 is not None:
        problems.append(f"{run_dir}: no complete release, so no release sha256 to compare with {expected_sha256}")
    problems.extend(_world_writable(run_dir))
    return problems
