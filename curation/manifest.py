"""The release manifest (`curation.manifest/v1`, DESIGN.md section 3) and its verification.

Paths inside a manifest are relative to the manifest's folder and may never leave it. Fields that legitimately
differ between two runs of the same input and config are listed in `volatile_fields`; everything else is
byte-identical across reruns and partition counts.
"""

import json
import logging
import socket
import tarfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

import curation
from curation.io import sha256_of_file
from curation.run_folder import locate_manifest
from curation.schema import REASONS_SHARING_KEPT_UID, UID

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "curation.manifest/v1"
VOLATILE_FIELDS = ["created", "host", "execution", "stages[].seconds"]


def file_entry(release_dir: Path, path: Path) -> dict:
    return {
        "path": Path(path).relative_to(release_dir).as_posix(),
        "rows": pq.ParquetFile(path).metadata.num_rows,
        "bytes": Path(path).stat().st_size,
        "sha256": sha256_of_file(path),
    }


def tar_entry(release_dir: Path, path: Path, rows: int) -> dict:
    """A webdataset tar of the release: its samples (`rows`, as many as its parquet twin) and checksum."""
    return {
        "path": Path(path).relative_to(release_dir).as_posix(),
        "rows": rows,
        "bytes": Path(path).stat().st_size,
        "sha256": sha256_of_file(path),
    }


def build_manifest(
    *, name: str, config: dict, config_sha256: str, inputs: list[dict], skipped_inputs: list[dict],
    stages: list[dict], shards: list[dict], ledger_files: list[dict], metadata: dict | None,
    balancing: dict | None, execution: dict | None = None, replaces: dict | None = None,
    image_shards: list[dict] | None = None, balancing_points: list[dict] | None = None,
) -> dict:
    """The manifest of a release. `balancing` is the last balance stage's summary (the distribution as published);
    `balancing_points` holds every balance stage's summary in run order, e.g. before and after the image stages."""
    rows_in = sum(i["rows"] for i in inputs)
    published = sum(s["rows"] for s in shards)
    in_ledger = sum(f["rows"] for f in ledger_files)
    drops: dict[str, int] = {}
    for stage in stages:
        for reason, count in stage["drops"].items():
            drops[reason] = drops.get(reason, 0) + count
    return {
        "format": MANIFEST_FORMAT,
        "dataset": name,
        "created": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "execution": execution,
        "code_version": curation.__version__,
        "config": config,
        "config_sha256": config_sha256,
        "inputs": inputs,
        "skipped_inputs": skipped_inputs,
        "stages": stages,
        "shards": shards,
        "image_shards": image_shards or [],
        "ledger": {"files": ledger_files, "rows": in_ledger},
        "totals": {
            "rows_in": rows_in,
            "rows_published": published,
            "rows_in_ledger": in_ledger,
            "drops_by_reason": dict(sorted(drops.items())),
        },
        "metadata": metadata,
        "balancing": balancing,
        "balancing_points": balancing_points or [],
        "replaces": replaces,
        "volatile_fields": VOLATILE_FIELDS,
    }


def without_volatile(manifest: dict) -> dict:
    """The manifest minus its volatile fields, for comparing two runs."""
    stable = {k: v for k, v in manifest.items() if k not in ("created", "host", "execution")}
    stable["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest.get("stages", [])]
    return stable


def safe_member(release_dir: Path, relative: str) -> Path:
    """`release_dir / relative` for a path read from a manifest; ValueError when it is not a relative path inside
    the release folder (absolute, with a `..` part, empty or not a string), since a manifest is input that anything
    reading or rewriting a release must not let address files elsewhere."""
    if not isinstance(relative, str) or not PurePosixPath(relative).parts:
        raise ValueError(f"manifest path {relative!r} is not a file path inside the release folder")
    posix = PurePosixPath(relative)
    if posix.is_absolute() or ".." in posix.parts:
        raise ValueError(f"manifest path {relative!r} escapes the release folder")
    return release_dir / posix


def verify_manifest(manifest_path: Path) -> list[str]:
    """Every problem found: a shard or ledger file missing, a wrong size, sha256 or row count, or a broken ledger
    invariant (rows in = rows published + rows in the ledger; no uid both published and dropped). Empty = valid."""
    manifest_path = locate_manifest(manifest_path)
    release_dir = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        return [f"{manifest_path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"]
    problems: list[str] = []
    published_uids: set[str] = set()
    for kind, entries in (("shard", manifest["shards"]), ("ledger file", manifest["ledger"]["files"])):
        for entry in entries:
            problems.extend(_check_file(release_dir, kind, entry))
    for entry in manifest.get("image_shards", []):
        problems.extend(_check_tar(release_dir, entry))
    if problems:
        return problems

    duplicates = 0
    for entry in manifest["shards"]:
        uids = pq.read_table(safe_member(release_dir, entry["path"]), columns=[UID]).column(UID).to_pylist()
        before = len(published_uids)
        published_uids.update(uids)
        duplicates += len(uids) - (len(published_uids) - before)
    if duplicates:
        problems.append(f"{duplicates} uid(s) published more than once")
    both = 0
    for entry in manifest["ledger"]["files"]:
        ledger = pq.read_table(safe_member(release_dir, entry["path"]), columns=[UID, "reason"]).to_pydict()
        both += sum(
            1 for uid, reason in zip(ledger[UID], ledger["reason"], strict=True)
            if uid in published_uids and reason not in REASONS_SHARING_KEPT_UID
        )
    if both:
        problems.append(f"{both} uid(s) are both published and in the ledger")

    totals = manifest["totals"]
    published = sum(s["rows"] for s in manifest["shards"])
    in_ledger = sum(f["rows"] for f in manifest["ledger"]["files"])
    rows_in = sum(i["rows"] for i in manifest["inputs"])
    if (published, in_ledger, rows_in) != (totals["rows_published"], totals["rows_in_ledger"], totals["rows_in"]):
        problems.append(f"totals {totals} do not match the files (published {published}, ledger {in_ledger})")
    if rows_in != published + in_ledger:
        problems.append(
            f"ledger invariant broken: {rows_in} rows in != {published} published + {in_ledger} in the ledger"
        )
    for stage in manifest["stages"]:
        dropped = sum(stage["drops"].values())
        if stage["rows_in"] != stage["rows_out"] + dropped:
            problems.append(
                f"stage {stage['stage']}: {stage['rows_in']} in != {stage['rows_out']} out + {dropped} dropped"
            )
    return problems


def _check_tar(release_dir: Path, entry: dict) -> list[str]:
    problems = _check_file(release_dir, "image shard", entry, parquet=False)
    if problems:
        return problems
    try:
        with tarfile.open(safe_member(release_dir, entry["path"]), "r:") as tar:
            samples = {member.name.split(".", 1)[0] for member in tar if member.isfile()}
    except tarfile.TarError as error:
        return [f"image shard {entry['path']}: unreadable tar ({error})"]
    if len(samples) != entry["rows"]:
        return [f"image shard {entry['path']}: {len(samples)} samples, manifest says {entry['rows']}"]
    return []


def _check_file(release_dir: Path, kind: str, entry: dict, parquet: bool = True) -> list[str]:
    try:
        path = safe_member(release_dir, entry["path"])
    except ValueError as error:
        return [str(error)]
    if not path.is_file():
        return [f"{kind} {entry['path']} is missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{kind} {entry['path']}: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_of_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{kind} {entry['path']}: sha256 {digest}, manifest says {entry['sha256']}")
        return problems
    if not parquet:
        return problems
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as error:  # noqa: BLE001 - any unreadable file is a verification failure, reported
        return problems + [f"{kind} {entry['path']}: unreadable parquet ({error})"]
    if rows != entry["rows"]:
        problems.append(f"{kind} {entry['path']}: {rows} rows, manifest says {entry['rows']}")
    return problems
