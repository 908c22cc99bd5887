"""Ingest: map a raw shard's columns to (uid, url, caption), validate, and route bad rows to the ledger.

Pure functions over Arrow data; the Spark adapter (`curation.spark.ingest`) plans one work unit per parquet row
group and calls `normalise_rows` on each.
"""

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.ops.uid import compute_uids
from curation.schema import CAPTION, UID, URL, Reason

# Column names of the common web image-text schemas, most specific first: img2dataset/CC3M, LAION, DataComp.
URL_COLUMN_CANDIDATES = ("url", "URL", "Url", "image_url")
TEXT_COLUMN_CANDIDATES = ("caption", "TEXT", "text", "txt", "Caption", "alt_text")

DEFAULT_MAX_CAPTION_CHARS = 4096


class IngestError(ValueError):
    """Input that cannot be ingested at all (unreadable shard, missing or mistyped column); names the file."""


@dataclass(frozen=True)
class IngestOptions:
    """How raw rows are read and judged; `url_column`/`text_column` override the schema detection."""

    url_column: str | None = None
    text_column: str | None = None
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    keep_columns: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")


def resolve_columns(column_names: list[str], options: IngestOptions, source: str) -> tuple[str, str]:
    """The (url, text) column names of a shard: the explicit options win, else the first known name present."""
    url_column = _resolve_one(column_names, options.url_column, URL_COLUMN_CANDIDATES, "url", source)
    text_column = _resolve_one(column_names, options.text_column, TEXT_COLUMN_CANDIDATES, "text", source)
    missing_keep = [c for c in options.keep_columns if c not in column_names]
    if missing_keep:
        raise IngestError(f"{source}: keep column(s) {missing_keep} not found; the shard has {column_names}")
    return url_column, text_column


def _resolve_one(names: list[str], explicit: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if explicit is not None:
        if explicit not in names:
            raise IngestError(f"{source}: {what} column {explicit!r} not found; the shard has columns {names}")
        return explicit
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise IngestError(
        f"{source}: no {what} column found (looked for {list(candidates)}); the shard has columns {names}; "
        f"name it with --{what}-column"
    )


def _as_binary(column: pa.Array, name: str, source: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
        return column.cast(pa.binary())
    if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type):
        return column.cast(pa.large_binary()).cast(pa.binary())
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.binary())
    raise IngestError(f"{source}: column {name!r} has type {column.type}, expected a string or binary column")


def _decode_utf8(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(text as string with invalid entries set to null, mask of entries that were not valid UTF-8)."""
    try:
        return column.cast(pa.string()), np.zeros(len(column), dtype=bool)
    except pa.ArrowInvalid:
        decoded, invalid = [], np.zeros(len(column), dtype=bool)
        for i, raw in enumerate(column.to_pylist()):
            if raw is None:
                decoded.append(None)
                continue
            try:
                decoded.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                decoded.append(None)
                invalid[i] = True
        return pa.array(decoded, type=pa.string()), invalid


def _filled(mask: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def normalise_rows(
    table: pa.Table, options: IngestOptions, source: str, first_row: int = 0
) -> tuple[pa.Table, pa.Table]:
    """Split raw rows into (kept, rejected).

    kept: uid, url, caption, the keep columns, and `_source_row` (row number within the source file).
    rejected: uid, reason, detail (JSON with file and row) — one row per rejected input row, first reason wins in
    the order: missing/empty url, missing/empty caption, invalid UTF-8, not an http(s) url, caption too long.
    """
    url_name, text_name = resolve_columns(table.column_names, options, source)
    url_raw = _as_binary(table.column(url_name), url_name, source)
    text_raw = _as_binary(table.column(text_name), text_name, source)
    uids = compute_uids(url_raw, text_raw)
    urls, url_invalid = _decode_utf8(url_raw)
    captions, caption_invalid = _decode_utf8(text_raw)

    rows = len(table)
    reasons = np.full(rows, None, dtype=object)

    def assign(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == None)] = reason  # noqa: E711 - elementwise comparison on an object array

    assign(_filled(url_raw.is_null()), Reason.MISSING_URL)
    assign(_filled(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(urls)), 0)), Reason.EMPTY_URL)
    assign(_filled(text_raw.is_null()), Reason.MISSING_CAPTION)
    assign(_filled(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0)), Reason.EMPTY_CAPTION)
    assign(url_invalid | caption_invalid, Reason.INVALID_UTF8)
    assign(~_filled(pc.match_substring_regex(urls, r"^[hH][tT][tT][pP][sS]?://[^/\s?#]+")), Reason.NOT_HTTP_URL)
    assign(_filled(pc.greater(pc.utf8_length(captions), options.max_caption_chars)), Reason.CAPTION_TOO_LONG)

    source_rows = np.arange(first_row, first_row + rows, dtype=np.int64)
    rejected_mask = reasons != None  # noqa: E711
    kept_mask = pa.array(~rejected_mask)
    kept_columns = {UID: uids, URL: urls, CAPTION: captions}
    for name in options.keep_columns:
        kept_columns[name] = table.column(name)
    kept_columns["_source_row"] = pa.array(source_rows)
    kept = pa.table(kept_columns).filter(kept_mask)

    rejected_index = np.flatnonzero(rejected_mask)
    rejected = pa.table(
        {
            UID: uids.take(pa.array(rejected_index, type=pa.int64())),
            "reason": pa.array(reasons[rejected_index].tolist(), type=pa.string()),
            "detail": pa.array(
                [json.dumps({"file": source, "row": int(source_rows[i])}) for i in rejected_index], type=pa.string()
            ),
        }
    )
    return kept, rejected
