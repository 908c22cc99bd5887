"""What `curation inspect` shares between a sample's and an entry's story: the run's chain (through
`curation.run_folder`), filtered scans, and how values are shown."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from curation.run_folder import Artifact, RunFolder, StageFolder, StageFolderError
from curation.terminal import printable

MAX_SHOWN_ENTRIES = 30
MAX_TEXT_CHARS = 300
class InspectError(LookupError):
    """An unknown uid or entry, or a folder that is not a run: the message is what to show."""


# ------------------------------------------------------------------------------------------------- the run's chain


def chain(run: RunFolder) -> list[StageFolder]:
    if not run.path.exists():
        raise InspectError(f"{run.path} does not exist")
    if run.end() is None:
        raise InspectError(f"{run.path} is not a run folder: it has no complete publish/ or stages/NN_<stage>/ folder")
    try:
        return run.chain()
    except StageFolderError as error:
        raise InspectError(f"{run.path}: the stage chain is broken: {error}") from error


def scan(files: list[Path], columns: list[str], row_filter=None) -> pa.Table:
    """The listed columns (those the files have) of the rows passing `row_filter`."""
    if not files:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    dataset = ds.dataset([str(p) for p in files], format="parquet")
    present = [name for name in columns if name in dataset.schema.names or name == "__filename"]
    return dataset.to_table(columns=present, filter=row_filter)


def displayable(schema: pa.Schema) -> list[str]:
    """Columns worth printing: no bytes (images) and no fixed-size lists (embeddings)."""
    shown = []
    for schema_field in schema:
        kind = schema_field.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_list(kind):
            continue
        shown.append(schema_field.name)
    return shown


# ------------------------------------------------------------------------------------------------- formatting


def text(value, limit: int = MAX_TEXT_CHARS) -> str:
    text = printable(value if isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        shown = ", ".join(value_text(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]" + (f" ({len(value)})" if len(value) > 8 else "")
    if isinstance(value, str):
        return text(value, 120)
    return "null" if value is None else str(value)


def pairs(row: dict, names) -> str:
    return ", ".join(f"{name}={value_text(row[name])}" for name in names if name in row)


def detail_text(detail: str | None) -> str:
    if not detail:
        return "-"
    try:
        parsed = json.loads(detail)
    except json.JSONDecodeError:
        return text(detail)
    if isinstance(parsed, dict):
        return ", ".join(f"{key}={value_text(value)}" for key, value in parsed.items())
    return text(detail)


def metadata_entries(stages: list[StageFolder], before: int | None = None) -> tuple[list[str], StageFolder] | None:
    """The metadata entries of the last match stage (up to stage index `before`), and that stage."""
    matches = [s for i, s in enumerate(stages) if s.name == "match" and (before is None or i <= before)]
    if not matches:
        return None
    path = matches[-1].artifact(Artifact.METADATA)
    if not path.is_file():
        return None
    return json.loads(path.read_bytes()), matches[-1]


