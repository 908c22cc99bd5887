"""Writing stage folders atomically, and input fingerprints (DESIGN.md section 3); `curation.run_folder` reads them.

A stage folder holds its data as parquet parts, `_ledger/` (the rows this stage dropped, LEDGER_SCHEMA),
`_artifacts/` (small fitted outputs such as entry counts), `_stage.json` (the stage record) and `_SUCCESS`.
Names starting with '_' or '.' are ignored by Spark and pyarrow readers, so reading the folder reads the data only.
Everything is written under a hidden temporary sibling folder that is renamed into place; `_SUCCESS` is written
after the rename, so a folder without `_SUCCESS` (a crash between the two, or a non-atomic object-store rename)
counts as absent.
"""

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

STAGE_RECORD = "_stage.json"
SUCCESS_MARKER = "_SUCCESS"
LEDGER_DIR = "_ledger"
ARTIFACTS_DIR = "_artifacts"
WORK_IDENTITY = "_work.json"
RELEASE_DIR = "publish"  # a run folder's release (the publish stage's folder)


class OutputError(ValueError):
    """An output that would replace, or lie among, what is not ours to write over."""


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of_json(value) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def list_files(root: Path) -> list[Path]:
    """Every file below `root`, sorted, skipping hidden and underscore names (what Spark and pyarrow read)."""
    root = Path(root)
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(("_", ".")))
    return sorted(found)


def fingerprint_files(files: list[Path]) -> str:
    """Hash of each file's path, size and modification time: cheap, and changes whenever an input is rewritten."""
    digest = hashlib.sha256()
    for path in sorted(Path(f).resolve() for f in files):
        stat = path.stat()
        digest.update(f"{path}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def relative_link(from_dir: Path, to_dir: Path) -> str:
    return os.path.relpath(Path(to_dir).resolve(), Path(from_dir).resolve())


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove what killed writers left in `folder`: hidden temporary (`.*.tmp-*`) and replaced (`.*.old-*`) stage
    folders and files. Only for a folder no other run is writing to; work folders (`.*.work`) are kept, since
    they are what a rerun resumes from."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    if removed:
        logger.info("removed %d leftover(s) of an interrupted run in %s", len(removed), folder)
    return removed


def check_replaceable(stage_dir: Path) -> None:
    """OutputError unless `stage_dir` is absent, an empty folder or a stage folder of ours (it has its record): a
    writer replaces nothing else, and never renames or deletes a user's file."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists() and not stage_dir.is_symlink():
        return
    if stage_dir.is_symlink() or not stage_dir.is_dir():
        raise OutputError(f"{stage_dir} exists and is not a folder: refusing to write over it")
    if any(stage_dir.iterdir()) and not (stage_dir / STAGE_RECORD).is_file():
        raise OutputError(f"{stage_dir} exists and is not a stage folder of ours (no {STAGE_RECORD}): refusing to "
                          "replace it; give a new or empty folder")


def _is_remote(location: str) -> bool:
    return "://" in location or location.startswith("dbfs:")


GLOB_PREFIX = "glob:"  # what follows is a glob pattern: *, ?, [...] and ** (any depth of folders)


def input_wildcards(location: str, exists: bool) -> str:
    """The characters that are wildcards in an input location, '' when it names a path literally. The rule
    (README, "Inputs"), shared by the ingest planner and `check_apart`: after `glob:`, `*`, `?` and `[`; a path
    that exists names itself, whatever it holds (`/x/glob[1]/s.parquet` is never `/x/glob1/s.parquet`); any other
    location holding `*` or `?` is a pattern in which `[` and `]` are plain characters."""
    if location.startswith(GLOB_PREFIX):
        return "*?["
    if exists or not any(c in location for c in "*?"):
        return ""
    return "*?"


LOCAL_FILE_SCHEME = "file://"


def _local_input(location) -> tuple[Path, tuple[str, ...]]:
    """The local folder or file an input names (for a pattern, the folder before its first wildcard) and the
    pattern's parts below it (none for a literal path). `file://` URIs are local paths too."""
    location = str(location)
    prefix = GLOB_PREFIX if location.startswith(GLOB_PREFIX) else ""
    path_text = location.removeprefix(prefix).removeprefix(LOCAL_FILE_SCHEME)
    wildcards = input_wildcards(prefix + path_text, Path(path_text).expanduser().exists())
    parts = Path(path_text).expanduser().parts
    wildcard = next((i for i, part in enumerate(parts) if any(c in part for c in wildcards)), len(parts))
    pattern = tuple(part if "[" in wildcards else part.replace("[", "[[]") for part in parts[wildcard:])
    return (Path(*parts[:wildcard]).resolve() if wildcard else Path.cwd()), pattern


def _could_match_inside(pattern: tuple[str, ...], folder: tuple[str, ...]) -> bool:
    """Whether a pattern (parts below its root) could match a file inside `folder` (parts below the same root):
    `**` reaches any depth; otherwise the folder must be shallower than the pattern and match its first parts."""
    if any("**" in part for part in pattern):
        return True
    return len(folder) < len(pattern) and all(
        fnmatch.fnmatchcase(name, part) for name, part in zip(folder, pattern, strict=False)
    )


def check_apart(output: Path, inputs) -> None:
    """OutputError when the output is, is inside, or contains a local input, or could hold files an input pattern
    matches: writing it would delete the input, or a rerun would read its own output. An empty location is left to
    the planner, which refuses it."""
    output = Path(output).expanduser().resolve()
    for location in [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs):
        text = str(location).removeprefix(GLOB_PREFIX)
        if (_is_remote(text) and not text.startswith(LOCAL_FILE_SCHEME)) or not text.strip():
            continue
        root, pattern = _local_input(location)
        if output == root or output in root.parents:
            raise OutputError(f"the output {output} is or contains the input {location}: refusing to write there")
        if root in output.parents and (not pattern or _could_match_inside(pattern, output.relative_to(root).parts)):
            raise OutputError(f"the output {output} is inside the input {location}: a rerun would read its own "
                              "output; choose a folder outside it")


class OutputLock:
    """An exclusive lock on an output, held while a command writes it: a file naming the holder (host, pid, start)
    created atomically (hard-linked into place, so it never exists without its content). A lock whose holder is a
    process of this host that no longer runs is stale and taken over; another host's lock is only reported, since
    this host cannot tell whether that run is alive. Taking over and releasing read the file and then remove it, so
    both happen under `_one_at_a_time`: two runs finding the same stale lock would otherwise each remove it, the
    second removing the first's new lock, and both would hold it."""

    def __init__(self, path: Path, what: Path):
        self.path = Path(path)
        self.what = what
        self.holder: dict | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(UTC).isoformat()}
        temporary = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex[:12]}")
        temporary.write_text(json.dumps(holder))
        try:
            with _one_at_a_time(self.path.parent):
                for _ in range(2):
                    try:
                        os.link(temporary, self.path)
                        self.holder = holder
                        return self
                    except FileExistsError:
                        self._take_over_if_stale()
            raise OutputError(f"{self.what} is locked by another run ({self.path}): try again")
        finally:
            temporary.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        holder = _read_holder(self.path)
        if holder is None:
            return  # released meanwhile: try again
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _process_runs(pid):
            logger.warning("taking over the lock %s of a run that no longer runs (pid %s)", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        raise OutputError(f"{self.what} is in use by another run (host {host}, pid {pid}, since "
                          f"{holder.get('since')}); if that run is gone, remove {self.path}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.holder is None:
            return
        # Only our own lock: one taken over by hand, or by a run that thought us dead, is not ours to remove.
        with _one_at_a_time(self.path.parent):
            if _read_holder(self.path) == self.holder:
                self.path.unlink(missing_ok=True)
        self.holder = None


def _read_holder(lock_path: Path) -> dict | None:
    """The holder a lock file names ({} when it is unreadable), None when there is no lock file."""
    try:
        holder = json.loads(lock_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def _one_at_a_time(folder: Path):
    """An exclusive flock on `folder` for this host's processes: changes to a lock file in it are made one at a time.
    The kernel drops it when the process dies, so it never goes stale itself."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _process_runs(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class StageWriter:
    """Builds a stage folder in a temporary sibling and renames it into place on `commit`.

    Use as a context manager: leaving the block without `commit` (an exception) removes the temporary folder.
    """

    def __init__(self, final_dir: Path):
        check_replaceable(final_dir)
        self.final_dir = Path(final_dir).resolve()
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self.final_dir.parent / f".{self.final_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.committed = False

    @property
    def ledger_dir(self) -> Path:
        return self.temp_dir / LEDGER_DIR

    @property
    def artifacts_dir(self) -> Path:
        path = self.temp_dir / ARTIFACTS_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def work_dir(self) -> Path:
        """A folder that outlives a failed attempt (unlike `temp_dir`), for per-shard results a rerun resumes from:
        downloaded and embedded shards. `commit` removes it."""
        return self.final_dir.parent / f".{self.final_dir.name}.work"

    def open_work_dir(self, identity: dict) -> Path:
        """`work_dir`, kept from an earlier attempt only if that attempt had the same `identity` (config and input
        fingerprint); otherwise emptied, so no shard of another config or input is ever resumed."""
        marker = self.work_dir / WORK_IDENTITY
        if self.work_dir.exists():
            previous = json.loads(marker.read_text()) if marker.is_file() else None
            if previous == json.loads(canonical_json(identity)):
                logger.info("resuming from the finished shards in %s", self.work_dir)
                return self.work_dir
            logger.info("discarding %s: it belongs to another config or input", self.work_dir)
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)
        atomic_write_json(marker, identity)
        return self.work_dir

    def link_to(self, other_dir: Path) -> str:
        """A path to `other_dir` relative to the final folder, valid after the rename."""
        return relative_link(self.final_dir, other_dir)

    def commit(self, record: dict) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.temp_dir / STAGE_RECORD, record)
        check_replaceable(self.final_dir)  # again: the folder may have appeared while the stage ran
        if self.final_dir.exists():
            trash = self.final_dir.parent / f".{self.final_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(self.final_dir, trash)
            shutil.rmtree(trash)
        os.replace(self.temp_dir, self.final_dir)
        atomic_write_bytes(self.final_dir / SUCCESS_MARKER, b"")
        self.committed = True
        shutil.rmtree(self.work_dir, ignore_errors=True)
        logger.info("committed stage folder %s", self.final_dir)

    def __enter__(self) -> "StageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.temp_dir.exists():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
