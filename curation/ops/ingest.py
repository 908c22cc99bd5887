"""Ingest: map a raw shard's columns to (uid, url, caption), validate, and route bad rows to the ledger.

Pure functions over Arrow data; the Spark adapter (`curation.spark.ingest`) plans one work unit per parquet row
group and calls `normalise_rows` on each.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.ops.blocklists import blocked_masks, load_domain_blocklist, load_url_blocklist
from curation.ops.uid import compute_uids
from curation.ops.url_host import host_disagreements
from curation.schema import CAPTION, UID, URL, Reason

# Column names of the common web image-text schemas, most specific first: img2dataset/CC3M, LAION, DataComp.
URL_COLUMN_CANDIDATES = ("url", "URL", "Url", "image_url")
TEXT_COLUMN_CANDIDATES = ("caption", "TEXT", "text", "txt", "Caption", "alt_text")

DEFAULT_MAX_CAPTION_CHARS = 4096

# Output columns of the ingest stage (and its internal ones, which all start with "_"): a keep column of the same
# name would shadow the computed value (a shard's own `uid` column replacing the real uid) or clash in Spark.
RESERVED_OUTPUT_COLUMNS = frozenset({UID, URL, CAPTION})

# NUL is the uid's separator (uid = sha256(url + NUL + caption)): were it allowed inside a url or caption, two
# different pairs could share one uid ("a\x00b" + "c" and "a" + "b\x00c"), so that a published row and a ledgered
# row, or two distinct published pairs, carried the same key. Such text counts as invalid, as PostgreSQL rejects
# NUL in UTF-8 text ("invalid byte sequence for encoding UTF8: 0x00"), and is ledgered as nul_character.
_NUL = "\x00"
# Control characters that no HTTP client can put in a request line (http.client refuses them); tab, CR and LF are
# left alone because URL parsers strip them before sending.
_URL_CONTROL_CHARACTERS = r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]"


class IngestError(ValueError):
    """Input that cannot be ingested at all (unreadable shard, missing or mistyped column); names the file."""


@dataclass(frozen=True)
class IngestOptions:
    """How raw rows are read and judged; `url_column`/`text_column` override the schema detection."""

    url_column: str | None = None
    text_column: str | None = None
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    keep_columns: tuple[str, ...] = ()
    blocked_domains: frozenset[str] = frozenset()
    blocked_urls: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")
        # Spark resolves column names ignoring case, so `UID` or `Caption` would clash with the output's own columns.
        reserved = [c for c in self.keep_columns if c.lower() in RESERVED_OUTPUT_COLUMNS or c.startswith("_")]
        if reserved:
            raise ValueError(
                f"keep_columns {reserved} clash with the ingest stage's own columns ({sorted(RESERVED_OUTPUT_COLUMNS)}"
                " in any case, and names starting with '_'); rename them in the shards"
            )
        repeated = sorted(name for name, count in Counter(c.lower() for c in self.keep_columns).items() if count > 1)
        if repeated:
            raise ValueError(f"keep_columns names {repeated} more than once (Spark ignores the case of names)")
        # Spark reads `a.b` as field b of column a, and a backtick as a quote, in every later stage's select.
        unquotable = [c for c in self.keep_columns if "." in c or "`" in c]
        if unquotable:
            raise ValueError(f"keep_columns {unquotable} hold '.' or '`', which Spark reads as a field path or a "
                             "quote; rename them in the shards")

    @classmethod
    def from_options(cls, options: dict) -> "IngestOptions":
        """From the ingest stage's option dict, with the blocklist files it names loaded."""
        domains, urls = options.get("blocked_domains_file"), options.get("blocked_urls_file")
        return cls(
            url_column=options["url_column"],
            text_column=options["text_column"],
            max_caption_chars=int(options["max_caption_chars"]),
            keep_columns=tuple(options["keep_columns"]),
            blocked_domains=load_domain_blocklist(Path(domains)) if domains else frozenset(),
            blocked_urls=load_url_blocklist(Path(urls)) if urls else frozenset(),
        )


def described_columns(names: list[str], shown: int = 20) -> str:
    """A shard's column names for an error message, at most `shown` of them: a shard may have 100,000 columns."""
    if len(names) <= shown:
        return f"columns {names}"
    return f"{len(names)} columns {names[:shown]} ..."


def resolve_columns(column_names: list[str], options: IngestOptions, source: str) -> tuple[str, str]:
    """The (url, text) column names of a shard: the explicit options win, else the first known name present."""
    present = set(column_names)
    url_column = _resolve_one(present, column_names, options.url_column, URL_COLUMN_CANDIDATES, "url", source)
    text_column = _resolve_one(present, column_names, options.text_column, TEXT_COLUMN_CANDIDATES, "text", source)
    missing_keep = [c for c in options.keep_columns if c not in present]
    if missing_keep:
        raise IngestError(
            f"{source}: keep column(s) {missing_keep} not found; the shard has {described_columns(column_names)}"
        )
    return url_column, text_column


def _resolve_one(present: set[str], names: list[str], explicit: str | None, candidates: tuple[str, ...], what: str,
                 source: str) -> str:
    if explicit is not None:
        if explicit not in present:
            raise IngestError(
                f"{source}: {what} column {explicit!r} not found; the shard has {described_columns(names)}"
            )
        return explicit
    for candidate in candidates:
        if candidate in present:
            return candidate
    raise IngestError(
        f"{source}: no {what} column found (looked for {list(candidates)}); the shard has {described_columns(names)}; "
        f"name it with --{what}-column"
    )


def _is_text_type(data_type: pa.DataType) -> bool:
    """Types a url or caption column may have: any string or binary layout, dictionary-encoded ones (how pandas
    categoricals come back from parquet), and the null type (a column that is null throughout)."""
    if pa.types.is_dictionary(data_type):
        return _is_text_type(data_type.value_type)
    return (
        pa.types.is_string(data_type) or pa.types.is_binary(data_type) or pa.types.is_large_string(data_type)
        or pa.types.is_large_binary(data_type) or pa.types.is_string_view(data_type)
        or pa.types.is_binary_view(data_type) or pa.types.is_null(data_type)
    )


_SPARK_CARRIED_TYPES = (
    "bool, int8-int64, float32/64, decimal128, string, binary, date32, timestamp[us] without a time zone, and "
    "lists, structs and maps of these"
)


def _spark_carries(data_type: pa.DataType) -> bool:
    """Whether a keep column of this type reaches the release unchanged through Spark's Arrow bridge (checked with
    Spark 4 by a real ingest of each type). Refused: unsigned integers, float16, time32/64, decimal256, dictionary and
    view encodings, large and fixed-size lists, fixed-size binary, timestamps in another unit than us (the bridge
    fails on them); durations (written as bare int64) and timestamps with a time zone (written without it) would
    arrive as another type. A large string or binary arrives as a string or binary."""
    if pa.types.is_list(data_type) or pa.types.is_struct(data_type) or pa.types.is_map(data_type):
        return all(_spark_carries(data_type.field(i).type) for i in range(data_type.num_fields))
    if pa.types.is_timestamp(data_type):
        return data_type.unit == "us" and data_type.tz is None
    return (
        pa.types.is_null(data_type) or pa.types.is_boolean(data_type) or pa.types.is_signed_integer(data_type)
        or pa.types.is_float32(data_type) or pa.types.is_float64(data_type) or pa.types.is_decimal128(data_type)
        or pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type) or pa.types.is_date(data_type)
    )


def check_schema(schema: pa.Schema, options: IngestOptions, source: str) -> tuple[str, str]:
    """`resolve_columns`, and the types checked up front so that a mistyped shard fails (or is skipped) at planning,
    naming the file, the column and its type, instead of inside a Spark task hours later. Linear in the number of
    columns: a shard may have 100,000."""
    names = schema.names
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise IngestError(
            f"{source}: column name(s) {repeated[:20]} appear more than once; the shard has {described_columns(names)}"
        )
    url_column, text_column = resolve_columns(names, options, source)
    for what, name in (("url", url_column), ("text", text_column)):
        if not _is_text_type(schema.field(name).type):
            raise IngestError(
                f"{source}: {what} column {name!r} has type {schema.field(name).type}, expected a string or binary "
                "column"
            )
    for name in options.keep_columns:
        if not _spark_carries(schema.field(name).type):
            raise IngestError(
                f"{source}: keep column {name!r} has type {schema.field(name).type}, which Spark cannot carry into "
                f"the release; write it as one of: {_SPARK_CARRIED_TYPES}"
            )
    return url_column, text_column


def _as_binary(column: pa.Array, name: str, source: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not _is_text_type(column.type):
        raise IngestError(f"{source}: column {name!r} has type {column.type}, expected a string or binary column")
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.binary())
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type):
        column = column.cast(pa.large_binary())
    return column.cast(pa.binary())


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


def _detail(source: str, row: int, why: str | None) -> str:
    return json.dumps({"file": source, "row": row} | ({"why": why} if why else {}))


def normalise_rows(
    table: pa.Table, options: IngestOptions, source: str, first_row: int = 0
) -> tuple[pa.Table, pa.Table]:
    """Split raw rows into (kept, rejected).

    kept: uid, url, caption, the keep columns, and `_source_row` (row number within the source file).
    rejected: uid, reason, detail (JSON with file and row) — one row per rejected input row, first reason wins in
    the order: missing/empty url, missing/empty caption, invalid UTF-8, a NUL character in the url or caption
    (see `_NUL`), not an http(s) url (also a url holding a control character no HTTP request can carry, and a url
    whose host urllib reads otherwise than the WHATWG URL Standard, the `why` of its detail saying how), caption too
    long, a url on the url blocklist, a host on the domain blocklist. Other control characters in a caption (ESC,
    bidi overrides) are text and are kept byte for byte.
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
    holds_nul = _filled(pc.match_substring(urls, _NUL)) | _filled(pc.match_substring(captions, _NUL))
    assign(url_invalid | caption_invalid, Reason.INVALID_UTF8)
    assign(holds_nul, Reason.NUL_CHARACTER)
    assign(~_filled(pc.match_substring_regex(urls, r"^[hH][tT][tT][pP][sS]?://[^/\s?#]+")), Reason.NOT_HTTP_URL)
    assign(_filled(pc.match_substring_regex(urls, _URL_CONTROL_CHARACTERS)), Reason.NOT_HTTP_URL)
    # which server an ambiguous url names depends on who parses it, so neither blocklist can vouch for it
    why_ambiguous = np.where(reasons == None, host_disagreements(urls), None)  # noqa: E711
    assign(why_ambiguous != None, Reason.NOT_HTTP_URL)  # noqa: E711
    assign(_filled(pc.greater(pc.utf8_length(captions), options.max_caption_chars)), Reason.CAPTION_TOO_LONG)
    if options.blocked_domains or options.blocked_urls:
        by_domain, by_url = blocked_masks(urls, options.blocked_domains, options.blocked_urls)
        assign(by_url, Reason.BLOCKED_URL)
        assign(by_domain, Reason.BLOCKED_DOMAIN)

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
                [_detail(source, int(source_rows[i]), why_ambiguous[i]) for i in rejected_index], type=pa.string()
            ),
        }
    )
    return kept, rejected
