"""The release manifest (`curation.manifest/v1`, DESIGN.md section 3), its reading, its digest and its verification.

Paths inside a manifest are relative to the manifest's folder and may never leave it. Fields that legitimately
differ between two runs of the same input and config are listed in `volatile_fields`; everything else is
byte-identical across reruns and partition counts.

The release digest (`release_sha256`) is the sha256 of the manifest's canonical form: the parsed manifest.json
written as JSON with sorted keys, no whitespace, non-ASCII characters as themselves (not \\u escapes) and encoded as
UTF-8 (`curation.io.canonical_json`). Nothing is left out, volatile fields included: the digest names this one
release, and since the manifest holds every shard's, image tar's and ledger file's sha256, it pins their bytes too.
Reformatting manifest.json (indentation, key order) leaves the digest unchanged; changing any value changes it.
"""

import json
import logging
import math
import socket
import tarfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

import curation
from curation.io import sha256_of_file, sha256_of_json
from curation.run_folder import RELEASE_IMAGES_DIR, RELEASE_LEDGER_DIR, RELEASE_SHARDS_DIR, locate_manifest
from curation.schema import REASONS_SHARING_KEPT_UID, UID

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "curation.manifest/v1"
VOLATILE_FIELDS = ["created", "host", "execution", "stages[].seconds"]


class ManifestError(ValueError):
    """A manifest that cannot be read as a `curation.manifest/v1` manifest: the message names the file and the key."""


@dataclass(frozen=True)
class Nullable:
    """In a manifest shape: null or `shape`."""

    shape: object


@dataclass(frozen=True)
class ValuesOf:
    """In a manifest shape: an object whose every value has `shape` (its keys are free, e.g. drop reasons)."""

    shape: object


# In a manifest shape, COUNT is an integer of 0 or more, `[shape]` an array whose items have that shape, and
# `{key: shape}` an object that has at least these keys.
COUNT = "count"
_FILE_ENTRY = {"path": str, "rows": COUNT, "bytes": COUNT, "sha256": str}
# What every reader of a manifest relies on; `read_manifest` refuses a manifest without it. Keys beyond it (a
# takedown's `takedown` section, an entry's `fingerprint`) are allowed.
MANIFEST_SHAPE = {
    "format": str,
    "dataset": Nullable(str),
    "created": str,
    "host": str,
    "execution": Nullable(dict),
    "code_version": str,
    "config": dict,
    "config_sha256": str,
    "inputs": [{"rows": COUNT}],
    "skipped_inputs": list,
    "stages": [{"stage": str, "rows_in": COUNT, "rows_out": COUNT, "drops": ValuesOf(COUNT)}],
    "shards": [_FILE_ENTRY],
    "image_shards": [_FILE_ENTRY],
    "ledger": {"files": [_FILE_ENTRY], "rows": COUNT},
    "totals": {"rows_in": COUNT, "rows_published": COUNT, "rows_in_ledger": COUNT,
               "drops_by_reason": ValuesOf(COUNT)},
    "metadata": Nullable(dict),
    "balancing": Nullable(dict),
    "balancing_points": [{"stage_folder": Nullable(str), "rows_in": COUNT, "rows_out": COUNT}],
    "replaces": Nullable(dict),
    "volatile_fields": list,
}
_MISSING = object()
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", COUNT: "a count (an integer, 0 or more)"}


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
            "drops_by_reason": _drops_by_reason(stages),
        },
        "metadata": metadata,
        "balancing": balancing,
        "balancing_points": balancing_points or [],
        "replaces": replaces,
        "volatile_fields": VOLATILE_FIELDS,
    }


def _drops_by_reason(stages: list[dict]) -> dict[str, int]:
    drops: Counter = Counter()
    for stage in stages:
        drops.update(stage["drops"])
    return dict(sorted(drops.items()))


def without_volatile(manifest: dict) -> dict:
    """The manifest minus its volatile fields, for comparing two runs."""
    stable = {k: v for k, v in manifest.items() if k not in ("created", "host", "execution")}
    stable["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest.get("stages", [])]
    return stable


def release_sha256(manifest: dict) -> str:
    """The release digest: sha256 of the manifest's canonical form (module docstring)."""
    return sha256_of_json(manifest)


def read_manifest(path: Path) -> dict:
    """The manifest at `path` (a manifest file, a release folder or a run folder); ManifestError naming the file
    and the key when it is not valid JSON, not a v1 manifest, or a key every reader relies on is missing or of
    the wrong type (`MANIFEST_SHAPE`)."""
    manifest_path = locate_manifest(path)

    # Python's JSON reader takes NaN and Infinity, and makes 1e999 infinite; none of them is JSON, and the digest's
    # canonical form could not be written.
    def refuse_constant(name: str):
        raise ManifestError(f"{manifest_path}: {name} is not a JSON value")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ManifestError(f"{manifest_path}: the number {text} is out of range")
        return value

    # Python's reader keeps the last of two equal keys where another reader may keep the first: a second "shards"
    # would be a release the digest does not pin for every reader.
    def refuse_duplicate_keys(pairs: list) -> dict:
        keys = Counter(key for key, _ in pairs)
        repeated = sorted(key for key, count in keys.items() if count > 1)
        if repeated:
            raise ManifestError(f"{manifest_path}: key(s) {repeated} appear more than once in one object")
        return dict(pairs)

    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"), parse_constant=refuse_constant,
                              parse_float=finite, object_pairs_hook=refuse_duplicate_keys)
    except UnicodeDecodeError as error:
        raise ManifestError(f"{manifest_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{manifest_path}: not valid JSON ({error})") from None
    except RecursionError:
        raise ManifestError(f"{manifest_path}: nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{manifest_path}: holds {_describe(manifest)}, expected a manifest object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{manifest_path}: key 'format' is {manifest.get('format')!r}, expected "
                            f"{MANIFEST_FORMAT!r}")
    problem = _shape_problem(manifest, MANIFEST_SHAPE, "")
    if problem:
        raise ManifestError(f"{manifest_path}: {problem}")
    return manifest


def _describe(value) -> str:
    if value is None:
        return "null"
    return repr(value) if type(value) is int else _JSON_NAMES[type(value)]


def _shape_problem(value, shape, key: str) -> str | None:
    """What is wrong with `value` at `key` against `shape` (see MANIFEST_SHAPE), or None."""
    if isinstance(shape, Nullable):
        return None if value is None else _shape_problem(value, shape.shape, key)
    kind = list if isinstance(shape, list) else dict if isinstance(shape, dict | ValuesOf) else shape
    fits = (type(value) is int and value >= 0) if kind == COUNT else type(value) is kind
    if not fits:
        return f"key '{key}' is {_describe(value)}, expected {_JSON_NAMES[kind]}"
    if isinstance(shape, dict):
        inner = ((f"{key}.{name}" if key else name, value.get(name, _MISSING), item) for name, item in shape.items())
    elif isinstance(shape, list):
        inner = ((f"{key}[{index}]", item, shape[0]) for index, item in enumerate(value))
    elif isinstance(shape, ValuesOf):
        inner = ((f"{key}.{name}", item, shape.shape) for name, item in value.items())
    else:
        return None
    for inner_key, item, item_shape in inner:
        problem = (f"key '{inner_key}' is missing" if item is _MISSING
                   else _shape_problem(item, item_shape, inner_key))
        if problem:
            return problem
    return None


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


def verify_manifest(manifest_path: Path, expected_sha256: str | None = None) -> list[str]:
    """Every problem found in a release (empty = valid): the release digest differs from `expected_sha256` (when
    given); two places of the manifest state one count differently (`count_problems`); a shard, image tar or
    ledger file is missing or differs from its entry (size, sha256, rows); a uid is published twice, or published
    and dropped; the ledger files' rows per stage and reason differ from the stages' drops. ManifestError when the
    manifest cannot be read at all (`read_manifest`)."""
    manifest_path = locate_manifest(manifest_path)
    release_dir = manifest_path.parent
    manifest = read_manifest(manifest_path)
    problems: list[str] = []
    if expected_sha256 is not None:
        expected = _sha256_hex(expected_sha256)
        digest = release_sha256(manifest)
        if digest != expected:
            problems.append(f"release sha256 is {digest}, expected {expected}: this is not the release pinned")
    problems.extend(count_problems(manifest))
    files_problems: list[str] = []
    for kind, entries in (("shard", manifest["shards"]), ("ledger file", manifest["ledger"]["files"])):
        for entry in entries:
            files_problems.extend(_check_file(release_dir, kind, entry))
    for entry in manifest["image_shards"]:
        files_problems.extend(_check_tar(release_dir, entry))
    files_problems.extend(_unlisted_files(release_dir, manifest))
    if files_problems:
        return problems + files_problems

    published_uids: set[str] = set()
    duplicates = 0
    for entry in manifest["shards"]:
        uids = pq.read_table(safe_member(release_dir, entry["path"]), columns=[UID]).column(UID).to_pylist()
        before = len(published_uids)
        published_uids.update(uids)
        duplicates += len(uids) - (len(published_uids) - before)
    if duplicates:
        problems.append(f"{duplicates} uid(s) published more than once")
    both = 0
    in_ledger: Counter = Counter()
    for entry in manifest["ledger"]["files"]:
        ledger = pq.read_table(safe_member(release_dir, entry["path"]), columns=[UID, "stage", "reason"])
        counts = ledger.group_by(["stage", "reason"]).aggregate([([], "count_all")]).to_pydict()
        in_ledger.update(dict(zip(zip(counts["stage"], counts["reason"], strict=True), counts["count_all"],
                                  strict=True)))
        columns = ledger.select([UID, "reason"]).to_pydict()
        both += sum(
            1 for uid, reason in zip(columns[UID], columns["reason"], strict=True)
            if uid in published_uids and reason not in REASONS_SHARING_KEPT_UID
        )
    if both:
        problems.append(f"{both} uid(s) are both published and in the ledger")
    stated: Counter = Counter()
    for stage in manifest["stages"]:
        stated.update({(stage["stage"], reason): count for reason, count in stage["drops"].items()})
    for stage_name, reason in sorted((stated - in_ledger) + (in_ledger - stated)):
        problems.append(f"the ledger files hold {in_ledger[stage_name, reason]} row(s) of stage {stage_name!r} "
                        f"with reason {reason!r}, stages[].drops say {stated[stage_name, reason]}")
    return problems


def _unlisted_files(release_dir: Path, manifest: dict) -> list[str]:
    """A problem for each file in the release's shards/, images/ and ledger/ that the manifest does not list: a
    consumer reading `shards/*.parquet` would read it, and neither the checksums nor the digest cover it. Names
    starting with `.` or `_` (a killed task's temporary file) are not read by globs or datasets, so they pass."""
    entries = (*manifest["shards"], *manifest["image_shards"], *manifest["ledger"]["files"])
    listed = {entry["path"] for entry in entries}
    problems = []
    for folder in (RELEASE_SHARDS_DIR, RELEASE_IMAGES_DIR, RELEASE_LEDGER_DIR):
        for path in sorted((release_dir / folder).rglob("*")):
            name = path.relative_to(release_dir).as_posix()
            hidden = any(part.startswith((".", "_")) for part in path.relative_to(release_dir).parts)
            if not (hidden or path.is_dir() or name in listed):
                problems.append(f"{name} is in the release but not in the manifest")
    return problems


def _sha256_hex(text: str) -> str:
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"expected sha256 {text!r} is not 64 hexadecimal digits")
    return digest


def count_problems(manifest: dict) -> list[str]:
    """Where two places of a (well-shaped) manifest state one count or digest differently, each as
    `KEY = VALUE but KEY = VALUE`: config_sha256 and the config; inputs[], totals.rows_in and the first stage's rows
    in; each stage's rows in, out and drops, and its rows in and the previous stage's rows out; the last stage's
    rows out, totals.rows_published and shards[]; ledger.rows, ledger.files[], totals.rows_in_ledger and the drops;
    totals.drops_by_reason and the stages' drops; image_shards[] and their parquet twins; balancing_points[] and
    their stages; a takedown's rows removed and its stage."""
    totals, stages, ledger = manifest["totals"], manifest["stages"], manifest["ledger"]
    if not stages:
        return ["stages is empty: a release has at least its ingest stage"]
    last = len(stages) - 1
    by_reason = _drops_by_reason(stages)
    stated_twice = [
        (("config_sha256", manifest["config_sha256"]), ("the sha256 of config", sha256_of_json(manifest["config"]))),
        (("the sum of inputs[].rows", sum(entry["rows"] for entry in manifest["inputs"])),
         ("totals.rows_in", totals["rows_in"])),
        (("totals.rows_in", totals["rows_in"]), (f"stages[0].rows_in ({stages[0]['stage']})", stages[0]["rows_in"])),
        (("totals.rows_in", totals["rows_in"]),
         ("totals.rows_published + totals.rows_in_ledger", totals["rows_published"] + totals["rows_in_ledger"])),
        ((f"stages[{last}].rows_out ({stages[last]['stage']})", stages[last]["rows_out"]),
         ("totals.rows_published", totals["rows_published"])),
        (("totals.rows_published", totals["rows_published"]),
         ("the sum of shards[].rows", sum(entry["rows"] for entry in manifest["shards"]))),
        (("ledger.rows", ledger["rows"]), ("the sum of ledger.files[].rows", sum(f["rows"] for f in ledger["files"]))),
        (("totals.rows_in_ledger", totals["rows_in_ledger"]), ("ledger.rows", ledger["rows"])),
        (("totals.rows_in_ledger", totals["rows_in_ledger"]),
         ("the sum of totals.drops_by_reason", sum(totals["drops_by_reason"].values()))),
    ]
    for index, stage in enumerate(stages):
        rows_in = (f"stages[{index}].rows_in ({stage['stage']})", stage["rows_in"])
        stated_twice.append((rows_in, (f"stages[{index}].rows_out + its drops",
                                       stage["rows_out"] + sum(stage["drops"].values()))))
        if index:
            previous = stages[index - 1]
            stated_twice.append(
                (rows_in, (f"stages[{index - 1}].rows_out ({previous['stage']})", previous["rows_out"])))
    for reason in sorted(set(by_reason) | set(totals["drops_by_reason"])):
        stated_twice.append(((f"totals.drops_by_reason.{reason}", totals["drops_by_reason"].get(reason, 0)),
                             (f"the sum of stages[].drops.{reason}", by_reason.get(reason, 0))))
    stage_of_folder = {stage.get("folder"): index for index, stage in enumerate(stages)}
    for index, point in enumerate(manifest["balancing_points"]):
        stage_index = stage_of_folder.get(point["stage_folder"])
        if stage_index is not None:
            stated_twice.extend(((f"balancing_points[{index}].{key}", point[key]),
                                 (f"stages[{stage_index}].{key}", stages[stage_index][key]))
                                for key in ("rows_in", "rows_out"))
    takedown = manifest.get("takedown")
    if isinstance(takedown, dict) and stages[last]["stage"] == "takedown":
        stated_twice.append((("takedown.rows_removed", takedown.get("rows_removed")),
                             (f"the drops of stages[{last}] (takedown)", sum(stages[last]["drops"].values()))))
    problems = [f"{first} = {value} but {second} = {other}"
                for (first, value), (second, other) in stated_twice if value != other]
    return problems + _image_shard_problems(manifest) + _balancing_problems(manifest, stage_of_folder)


def _image_shard_problems(manifest: dict) -> list[str]:
    """Each image tar has the rows of its parquet twin (the shard of the same name), and with images every shard
    has its tar."""
    if not manifest["image_shards"]:
        return []
    shards = {PurePosixPath(entry["path"]).stem: (index, entry) for index, entry in enumerate(manifest["shards"])}
    problems, twinned = [], set()
    for index, tar in enumerate(manifest["image_shards"]):
        stem = PurePosixPath(tar["path"]).stem
        if stem not in shards:
            problems.append(f"image_shards[{index}] ({tar['path']}) has no parquet shard of the same name in shards")
            continue
        twinned.add(stem)
        shard_index, shard = shards[stem]
        if tar["rows"] != shard["rows"]:
            problems.append(f"image_shards[{index}].rows = {tar['rows']} but shards[{shard_index}].rows "
                            f"({shard['path']}) = {shard['rows']}")
    for stem in sorted(set(shards) - twinned):
        index, shard = shards[stem]
        problems.append(f"shards[{index}] ({shard['path']}) has no image tar in image_shards")
    return problems


def _balancing_problems(manifest: dict, stage_of_folder: dict) -> list[str]:
    """Each of balancing_points[] names a folder of stages[]; `balancing` is the last of them."""
    problems = [f"balancing_points[{index}].stage_folder {point['stage_folder']!r} is not a folder of stages[]"
                for index, point in enumerate(manifest["balancing_points"])
                if point["stage_folder"] not in stage_of_folder]
    points = manifest["balancing_points"]
    if manifest["balancing"] != (points[-1] if points else None):
        problems.append("balancing differs from the last of balancing_points")
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
