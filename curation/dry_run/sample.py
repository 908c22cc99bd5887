"""The dry run's inputs (from parquet footers) and its sample: rows read from evenly spaced shards and put through
ingest's pure part, timed."""

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.inputs import InputPlan, _filesystem_and_path
from curation.ops.ingest import IngestOptions, normalise_rows

SAMPLE_FILES = 8  # the sample is spread over at most this many evenly spaced shards


def size_text(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} PB"


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def input_lines(plan: InputPlan, options: IngestOptions) -> list[str]:
    total_bytes = sum(f.size for f in plan.files)
    lines = [f"inputs: {len(plan.files):,} shard{'s' if len(plan.files) != 1 else ''}, {plan.rows:,} rows, "
             f"{size_text(total_bytes)} (parquet footers)"]
    shown = plan.files if len(plan.files) <= 10 else plan.files[:5]
    for input_file in shown:
        lines.append(f"  {input_file.path}: {input_file.rows:,} rows in {len(input_file.row_group_rows)} row "
                     f"group{'s' if len(input_file.row_group_rows) != 1 else ''}, {size_text(input_file.size)}; url "
                     f"{input_file.url_column!r}, text {input_file.text_column!r}")
    if len(shown) < len(plan.files):
        lines.append(f"  ... and {len(plan.files) - len(shown):,} more shards")
    for skipped in plan.skipped:
        lines.append(f"  skipped (unreadable): {skipped['path']}: {skipped['error']}")
    lines.append(
        f"  ingest options: url_column={options.url_column or 'detected'}, "
        f"text_column={options.text_column or 'detected'}, max_caption_chars={options.max_caption_chars}, "
        f"keep_columns={list(options.keep_columns)}, "
        f"blocked domains {len(options.blocked_domains):,}, blocked urls {len(options.blocked_urls):,}"
    )
    return lines


@dataclass
class Sample:
    """The sample's rows after ingest's pure part, and what the dry run measured on it."""

    raw_rows: int = 0
    raw_bytes: int = 0
    read_seconds: float = 0.0
    normalise_seconds: float = 0.0
    kept: pa.Table | None = None
    drops: dict[str, int] = field(default_factory=dict)
    files: int = 0

    @property
    def kept_rows(self) -> int:
        return 0 if self.kept is None else self.kept.num_rows


def _sample_files(plan: InputPlan) -> list:
    """At most SAMPLE_FILES shards, evenly spaced over the plan (deterministic)."""
    files = plan.files
    if len(files) <= SAMPLE_FILES:
        return list(files)
    return [files[round(i * (len(files) - 1) / (SAMPLE_FILES - 1))] for i in range(SAMPLE_FILES)]


def _first_rows(path: str, rows: int, columns: list[str]) -> pa.Table:
    """The first `rows` rows of a shard (from its first row groups), only `columns`."""
    filesystem, fs_path = _filesystem_and_path(path)
    with filesystem.open_input_file(fs_path) as handle:
        parquet = pq.ParquetFile(handle)
        batches, taken = [], 0
        for batch in parquet.iter_batches(batch_size=min(rows, 65_536), columns=columns):
            batches.append(batch.slice(0, rows - taken))
            taken += min(len(batch), rows - taken)
            if taken >= rows:
                break
        schema = parquet.schema_arrow
        return pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in columns]))


def read_sample(plan: InputPlan, options: IngestOptions, sample_rows: int) -> Sample:
    sample = Sample()
    chosen = _sample_files(plan)
    if sample_rows <= 0 or not chosen:
        return sample
    quota = math.ceil(sample_rows / len(chosen))
    kept_tables = []
    for input_file in chosen:
        want = min(quota, sample_rows - sample.raw_rows, input_file.rows)
        if want <= 0:
            continue
        columns = list(dict.fromkeys([input_file.url_column, input_file.text_column, *options.keep_columns]))
        started = time.perf_counter()
        table = _first_rows(input_file.path, want, columns)
        sample.read_seconds += time.perf_counter() - started
        file_options = replace(options, url_column=input_file.url_column, text_column=input_file.text_column)
        if not sample.files:
            normalise_rows(table.slice(0, 16), file_options, input_file.path)  # warm-up: first-call costs aside
        started = time.perf_counter()
        kept, rejected = normalise_rows(table, file_options, input_file.path)
        sample.normalise_seconds += time.perf_counter() - started
        sample.raw_rows += table.num_rows
        sample.raw_bytes += table.nbytes
        sample.files += 1
        kept_tables.append(kept.drop_columns(["_source_row"]))
        for reason, count in zip(*np.unique(rejected.column("reason").to_numpy(zero_copy_only=False),
                                            return_counts=True), strict=True):
            sample.drops[str(reason)] = sample.drops.get(str(reason), 0) + int(count)
    if kept_tables:
        sample.kept = pa.concat_tables(kept_tables, promote_options="permissive")
    return sample
