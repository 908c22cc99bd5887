"""Finding and checking the raw input shards before any Spark work is planned.

Inputs are files, folders (searched recursively for parquet files) and glob patterns, on the local file system or
any URI pyarrow.fs understands (s3://, gs://, hdfs://). A path that exists is taken literally; `glob:PATTERN` is a
pattern (`*`, `?`, `[...]`, `**`); a location that does not exist and holds `*` or `?` is a pattern in which `[` is
a plain character (`curation.io.input_wildcards`). Every file's parquet footer is read up front, so an
unreadable shard fails the run at once with its name, before hours of work, unless the caller chose to skip such
shards (they are then listed in the stage record and the manifest).
"""

import fnmatch
import glob
import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import GLOB_PREFIX, input_wildcards
from curation.ops.ingest import IngestError, IngestOptions, check_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    size: int
    mtime_ns: int
    rows: int
    row_group_rows: tuple[int, ...]
    url_column: str
    text_column: str


@dataclass
class InputPlan:
    files: list[InputFile] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    keep_fields: list[pa.Field] = field(default_factory=list)  # as the first usable shard has them

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def units(self) -> list[tuple[int, str, int, int, int]]:
        """One work unit per row group: (file index, path, row group, first row of the group in its file, rows of
        the group as its footer says)."""
        units = []
        for input_file in self.files:
            first_row = 0
            for group, group_rows in enumerate(input_file.row_group_rows):
                units.append((input_file.index, input_file.path, group, first_row, group_rows))
                first_row += group_rows
        return units


def _filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location and not location.startswith("file://"):
        return pafs.FileSystem.from_uri(location)
    local = location.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def _is_listed(name: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in name.split("/") if part)


def _as_location(location: str, path: str) -> str:
    """The path pyarrow.fs returned, as a location `_filesystem_and_path` understands again."""
    if "://" in location and not location.startswith("file://"):
        return f"{location.split('://', 1)[0]}://{path}"
    return path


def expand_inputs(locations: list[str]) -> list[tuple[pafs.FileSystem, str]]:
    """(file system, location) of every input file, sorted by location, each once."""
    if not locations:
        raise IngestError("no input given")
    found: dict[str, pafs.FileSystem] = {}
    for location in map(str, locations):
        if not location.removeprefix(GLOB_PREFIX).strip():
            raise IngestError(f"input: the location {location!r} is empty (it would read the current folder); name "
                              "a file, a folder or glob:PATTERN")
        try:
            found.update(_expand(location))
        except OSError as error:  # an unreachable store: its message may span lines, the CLI shows one
            raise IngestError(f"cannot read input {location!r}: {' '.join(str(error).split())}") from error
    return [(found[p], p) for p in sorted(found)]


def _expand(location: str) -> dict[str, pafs.FileSystem]:
    target = location.removeprefix(GLOB_PREFIX)
    filesystem, path = _filesystem_and_path(target)
    info = None if location.startswith(GLOB_PREFIX) else filesystem.get_file_info(path)
    exists = info is not None and info.type != pafs.FileType.NotFound
    # Judged on the path, not the URI: the '?' of a query string (s3://b/k?endpoint_override=...) is no wildcard.
    wildcards = input_wildcards(location.removesuffix(target) + path, exists)
    if wildcards:
        matches = _glob(filesystem, path, wildcards)
        if not matches:
            raise IngestError(f"input pattern {location!r} matches no file")
        return dict.fromkeys((_as_location(target, m) for m in matches), filesystem)
    if not exists:
        literal = f" (brackets are taken literally: write {GLOB_PREFIX}{location} for a pattern)"
        raise IngestError(f"input {location!r} does not exist{literal if '[' in location else ''}")
    if info.type != pafs.FileType.Directory:
        return {_as_location(target, path): filesystem}
    selector = pafs.FileSelector(path, recursive=True)
    listed = [
        i.path
        for i in filesystem.get_file_info(selector)
        if i.type == pafs.FileType.File and _is_listed(os.path.relpath(i.path, path))
    ]
    if not listed:
        raise IngestError(f"input folder {location!r} holds no files")
    return dict.fromkeys((_as_location(target, p) for p in listed), filesystem)


def _glob(filesystem: pafs.FileSystem, pattern: str, wildcards: str) -> list[str]:
    """The files `pattern` matches; outside `glob:` (no `[` among the wildcards) a `[` matches itself."""
    first_wildcard = min((pattern.index(c) for c in wildcards if c in pattern), default=len(pattern))
    base = pattern[:first_wildcard].rsplit("/", 1)[0]
    if "[" not in wildcards:
        pattern = pattern.replace("[", "[[]")
    if isinstance(filesystem, pafs.LocalFileSystem):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern))


def _check_keep_types(schema, options: IngestOptions, keep_fields: list[pa.Field], source: str) -> None:
    """Every shard's keep columns must have the types of the first usable shard's (`keep_fields`, filled from it):
    the stage's output schema is built from that one, and Spark cannot cast a shard's column into another type in
    flight."""
    if not keep_fields:
        keep_fields.extend(schema.field(name) for name in options.keep_columns)
    for expected in keep_fields:
        found = schema.field(expected.name).type
        if found != expected.type:
            raise IngestError(
                f"{source}: keep column {expected.name!r} has type {found}, but earlier shards have {expected.type}; "
                "every shard must give a keep column the same type"
            )


def _check_row_counts(metadata: pq.FileMetaData, columns: tuple[str, str], source: str) -> None:
    """IngestError when the footer's row counts disagree with each other. pyarrow trusts a row group's num_rows:
    a footer saying 2 where the pages hold 3 rows silently drops one, and one saying 4 yields 3 rows that no longer
    add up to the rows counted in. The url and text columns are flat, so each of their chunks holds one value per
    row (nulls included)."""
    leaves = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    group_rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    if sum(group_rows) != metadata.num_rows:
        raise IngestError(f"{source}: the footer says {metadata.num_rows} rows but its row groups hold "
                          f"{sum(group_rows)}; the file is damaged")
    for group, rows in enumerate(group_rows):
        for name in columns:
            values = metadata.row_group(group).column(leaves[name]).num_values
            if values != rows:
                raise IngestError(f"{source}: the footer says row group {group} has {rows} rows, but its column "
                                  f"{name!r} holds {values} values; the file is damaged")


def plan_inputs(locations: list[str], options: IngestOptions, skip_bad_files: bool = False) -> InputPlan:
    plan = InputPlan()
    for filesystem, path in expand_inputs(locations):
        try:
            info = filesystem.get_file_info(_filesystem_and_path(path)[1])
            with filesystem.open_input_file(_filesystem_and_path(path)[1]) as handle:
                metadata = pq.ParquetFile(handle).metadata
                schema = metadata.schema.to_arrow_schema()
            url_column, text_column = check_schema(schema, options, path)
            _check_row_counts(metadata, (url_column, text_column), path)
            _check_keep_types(schema, options, plan.keep_fields, path)
        except Exception as error:  # noqa: BLE001 - any failure to read a footer means an unusable shard
            message = f"cannot use input shard {path}: {error}"
            if not skip_bad_files:
                raise IngestError(message + " (pass --skip-bad-files to record and skip it)") from error
            logger.warning("skipping %s", message)
            plan.skipped.append({"path": path, "error": str(error)})
            continue
        plan.files.append(
            InputFile(
                index=len(plan.files),
                path=path,
                size=info.size,
                mtime_ns=info.mtime_ns or 0,
                rows=metadata.num_rows,
                row_group_rows=tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)),
                url_column=url_column,
                text_column=text_column,
            )
        )
    if not plan.files:
        raise IngestError(f"no readable parquet shard in {locations}")
    logger.info("ingest plan: %d shards, %d rows, %d skipped", len(plan.files), plan.rows, len(plan.skipped))
    return plan


def read_row_group(path: str, row_group: int, columns: list[str], footer_rows: int):
    """One row group of a planned shard, only `columns` of it. Its footer was read at planning, but its pages are
    first read here: a corrupt page fails the Spark task with an IngestError naming the file and the row group
    (pyarrow's own message, e.g. "Invalid BYTE_ARRAY value", names neither), and so do rows other than the
    `footer_rows` planned (the file was rewritten since), which would break rows in = rows out + dropped."""
    filesystem, fs_path = _filesystem_and_path(path)
    try:
        with filesystem.open_input_file(fs_path) as handle:
            table = pq.ParquetFile(handle).read_row_group(row_group, columns=columns)
    except Exception as error:  # noqa: BLE001 - whatever the decoder raised, the message must name the shard
        raise IngestError(
            f"cannot read row group {row_group} of input shard {path}: {type(error).__name__}: {error} (the footer "
            "was readable, so --skip-bad-files did not skip it; repair or remove the shard)"
        ) from error
    if len(table) != footer_rows:
        raise IngestError(f"input shard {path}: row group {row_group} gave {len(table)} rows where its footer said "
                          f"{footer_rows} when the run was planned; was it rewritten during the run?")
    return table
