"""Attribute filters (the `filter` stage): CLIP-score and ALIGN-style rules over Arrow tables, one ledger reason
per rule.

Rules, in the order they are tried; a dropped row carries the reason of the FIRST rule it fails, and its detail
is a JSON object with the measured value and the rule's threshold:

  low_clip_score          clip_score < min_clip_score (LAION-400M used 0.28 with ViT-B/32)
  clip_score_not_top      not among the top ceil(f * N) rows of the stage's whole input by clip_score
                          (DataComp's CLIP-score filter), f = clip_score_top_fraction
  image_too_small         shorter side < min_image_side (ALIGN: 200)
  extreme_aspect_ratio    long side / short side > max_aspect_ratio (ALIGN: 3)
  too_few_caption_words   fewer than min_caption_words words (ALIGN: 3)
  too_many_caption_words  more than max_caption_words words (ALIGN: 20)
  boilerplate_caption     the exact caption is shared by more than max_caption_repeats rows of the stage's whole
                          input (ALIGN used 10; our default is 1,000)

A rule is off when its option is None; max_caption_repeats is on by default. Boundaries keep the row: a score
equal to min_clip_score, a side equal to min_image_side, a ratio equal to max_aspect_ratio, a word count equal to
either word limit and a caption shared by exactly max_caption_repeats rows are all kept.

Columns. The clip_score rules read `clip_score` (written by embed). The image rules read the size before
resizing, `image_original_width`/`image_original_height` (written by download; ALIGN's rule is about the image
as published), and fall back to `image_width`/`image_height` (the decoded size, written by dedup_image over rows
that carry image bytes) when the rows have no original-size columns. The choice is made per table, never per row:
after a resizing download `image_width` is the resized size, which says nothing about the original. The caption
rules read `caption`.

Missing values. A row whose value for an active rule is null (or NaN, for clip_score) fails that rule: a row the
rule cannot vouch for is not kept by it. Its detail says so ({"clip_score": null, "min": 0.28, "missing": true}).
An image side of 0 or less gives no aspect ratio and fails extreme_aspect_ratio (detail aspect_ratio null).

Words are the whitespace-separated tokens of the caption, ALIGN's unigram count: the same tokens as Python's
`str.split()` with no argument (Unicode whitespace), counted in Arrow by WORD_PATTERN.

The two global rules need the whole input, which one table of a Spark partition does not have; the caller
computes them over the whole input and passes them in, so the outcome never depends on the partitioning:

- clip_score_not_top: the rows are ranked by clip_score, highest first, ties broken by the smaller uid; rows with
  a missing clip_score rank after all others and are never in the top. The top keep_count = ceil(f * N) rows are
  kept, N counting ALL the stage's input rows (also those an earlier rule drops, and those with a missing score),
  so the fraction means the same thing whatever other rule is on: with min_clip_score also on, fewer than
  ceil(f * N) rows may survive. The ranking is summarised by a `TopCutoff`: the (score, uid) of the last row in
  the top; a row is in the top iff it ranks at or before it. `top_cutoff` computes it in memory; the Spark
  adapter computes the same one with a distributed sort.
- boilerplate_caption: `caption_repeats` gives, per row, the number of rows of the whole input with exactly the
  same caption (null or anything not above the limit means "not boilerplate"); `caption_repeat_counts` computes
  it in memory, the Spark adapter with a groupBy count.
"""

import json
import math
import numbers
from dataclasses import dataclass, fields
from decimal import ROUND_CEILING, Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import CAPTION, UID, Reason

__all__ = [
    "CLIP_SCORE",
    "IMAGE_SIZE_COLUMNS",
    "RULES",
    "WORD_PATTERN",
    "FilterOptions",
    "TopCutoff",
    "apply_filter",
    "caption_repeat_counts",
    "caption_word_counts",
    "image_size_columns",
    "rule_columns",
    "top_cutoff",
    "top_keep_count",
]

CLIP_SCORE = "clip_score"
# Preferred first: the size before download resized the image, then the decoded size of the stored bytes.
IMAGE_SIZE_COLUMNS = (("image_original_width", "image_original_height"), ("image_width", "image_height"))

# The rules in the order they are tried, and the option that turns each on.
RULES: tuple[tuple[str, str], ...] = (
    (Reason.LOW_CLIP_SCORE, "min_clip_score"),
    (Reason.CLIP_SCORE_NOT_TOP, "clip_score_top_fraction"),
    (Reason.IMAGE_TOO_SMALL, "min_image_side"),
    (Reason.EXTREME_ASPECT_RATIO, "max_aspect_ratio"),
    (Reason.TOO_FEW_CAPTION_WORDS, "min_caption_words"),
    (Reason.TOO_MANY_CAPTION_WORDS, "max_caption_words"),
    (Reason.BOILERPLATE_CAPTION, "max_caption_repeats"),
)

# A run of characters that are not whitespace in Python's sense (str.isspace): RE2's \s is ASCII
# [\t\n\f\r ], so \v, the information separators U+001C-U+001F, NEL and the Unicode separators (\p{Z}) are named.
WORD_PATTERN = r"[^\s\x0b\x1c-\x1f\x85\p{Z}]+"

DEFAULT_MAX_CAPTION_REPEATS = 1000


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _as_count(name: str, value, minimum: int) -> int:
    if not _is_number(value) or float(value) != int(value) or int(value) < minimum:
        raise ValueError(f"filter option {name} must be an integer >= {minimum} (or null to turn its rule off), "
                         f"got {value!r}")
    return int(value)


@dataclass(frozen=True)
class FilterOptions:
    """The rule thresholds; None turns a rule off. Checked on construction: a bad value names its option."""

    min_clip_score: float | None = None
    clip_score_top_fraction: float | None = None
    min_image_side: int | None = None
    max_aspect_ratio: float | None = None
    min_caption_words: int | None = None
    max_caption_words: int | None = None
    max_caption_repeats: int | None = DEFAULT_MAX_CAPTION_REPEATS

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.min_clip_score is not None:
            if not _is_number(self.min_clip_score):
                raise ValueError(f"filter option min_clip_score must be a finite number, got {self.min_clip_score!r}")
            put("min_clip_score", float(self.min_clip_score))
        if self.clip_score_top_fraction is not None:
            fraction = self.clip_score_top_fraction
            if not _is_number(fraction) or not 0.0 < float(fraction) <= 1.0:
                raise ValueError(f"filter option clip_score_top_fraction must be in (0, 1], got {fraction!r}")
            put("clip_score_top_fraction", float(fraction))
        if self.min_image_side is not None:
            put("min_image_side", _as_count("min_image_side", self.min_image_side, 1))
        if self.max_aspect_ratio is not None:
            ratio = self.max_aspect_ratio
            if not _is_number(ratio) or float(ratio) < 1.0:
                raise ValueError("filter option max_aspect_ratio must be a number >= 1 (the long side over the short "
                                 f"side is never below 1), got {ratio!r}")
            put("max_aspect_ratio", float(ratio))
        if self.min_caption_words is not None:
            put("min_caption_words", _as_count("min_caption_words", self.min_caption_words, 1))
        if self.max_caption_words is not None:
            put("max_caption_words", _as_count("max_caption_words", self.max_caption_words, 1))
        if self.max_caption_repeats is not None:
            put("max_caption_repeats", _as_count("max_caption_repeats", self.max_caption_repeats, 1))
        if (self.min_caption_words is not None and self.max_caption_words is not None
                and self.min_caption_words > self.max_caption_words):
            raise ValueError(f"filter option min_caption_words ({self.min_caption_words}) is above max_caption_words "
                             f"({self.max_caption_words}): every caption would be dropped")
        if not self.active_rules():
            raise ValueError("the filter stage has every rule off: set at least one of "
                             + ", ".join(option for _, option in RULES))

    @classmethod
    def from_options(cls, options: dict) -> "FilterOptions":
        """From a stage's option dict (the filter stage's options; keys that are not thresholds, such as partitions,
        are ignored). An option left out takes its default; an option given as None is off."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in options.items() if name in names})

    def active_rules(self) -> list[str]:
        """The reasons of the rules that are on, in the order they are tried."""
        return [reason for reason, option in RULES if getattr(self, option) is not None]


# ---------------------------------------------------------------------------------------------------- columns


def image_size_columns(column_names) -> tuple[str, str] | None:
    """(width, height) columns the image rules read: the original size when the rows have it, else the decoded
    size; None when the rows have neither pair."""
    names = set(column_names)
    return next((pair for pair in IMAGE_SIZE_COLUMNS if set(pair) <= names), None)


def rule_columns(options: FilterOptions, column_names) -> dict[str, tuple[str, ...]]:
    """The columns each active rule reads, by reason. A rule whose columns the rows lack is an error naming the
    rule, the columns it needs and the columns the rows have."""
    names = list(column_names)
    have = f"the rows have {sorted(names)}"
    needed: dict[str, tuple[str, ...]] = {}
    for reason in options.active_rules():
        if reason in (Reason.LOW_CLIP_SCORE, Reason.CLIP_SCORE_NOT_TOP):
            if CLIP_SCORE not in names:
                raise ValueError(f"filter rule {reason} needs the column {CLIP_SCORE} (written by the embed stage): "
                                 f"{have}")
            needed[reason] = (CLIP_SCORE,)
        elif reason in (Reason.IMAGE_TOO_SMALL, Reason.EXTREME_ASPECT_RATIO):
            pair = image_size_columns(names)
            if pair is None:
                wanted = " or ".join("/".join(p) for p in IMAGE_SIZE_COLUMNS)
                raise ValueError(f"filter rule {reason} needs the image size columns {wanted} (written by the "
                                 f"download stage): {have}")
            needed[reason] = pair
        else:
            if CAPTION not in names:
                raise ValueError(f"filter rule {reason} needs the column {CAPTION}: {have}")
            needed[reason] = (CAPTION,)
    return needed


# ---------------------------------------------------------------------------------------------------- measures


def caption_word_counts(captions) -> pa.Array:
    """Words per caption (int64; null for a null caption): whitespace-separated tokens, as `str.split()`."""
    counts = pc.count_substring_regex(captions, WORD_PATTERN)
    counts = counts.combine_chunks() if isinstance(counts, pa.ChunkedArray) else counts
    return counts.cast(pa.int64())


def caption_repeat_counts(captions) -> pa.Array:
    """Per row, the number of rows in `captions` with exactly the same caption (null for a null caption): the
    in-memory form of the boilerplate count, for a caller that holds the whole input."""
    captions = captions.combine_chunks() if isinstance(captions, pa.ChunkedArray) else captions
    encoded = captions.dictionary_encode()
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(captions.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    per_value = np.bincount(indices[valid].astype(np.int64), minlength=len(encoded.dictionary))
    counts = np.zeros(len(captions), dtype=np.int64)
    counts[valid] = per_value[indices[valid].astype(np.int64)]
    return pa.array(counts, pa.int64(), mask=~valid)


def top_keep_count(fraction: float, rows: int) -> int:
    """ceil(fraction * rows) with the fraction taken as written (its shortest decimal form), so 0.3 of 10 rows is
    3, not 4 through the binary value 0.30000000000000004."""
    exact = Decimal(repr(float(fraction))) * int(rows)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class TopCutoff:
    """The clip_score top of the whole input: keep_count = ceil(fraction * rows) rows are kept; (score, uid) is the
    last row in the top by (score descending, uid ascending), or None when every row with a score is in the top."""

    fraction: float
    rows: int
    keep_count: int
    score: float | None = None
    uid: str | None = None

    def summary(self) -> dict:
        return {"clip_score_top_fraction": self.fraction, "ranked_rows": self.rows, "keep_count": self.keep_count,
                "cutoff_score": self.score, "cutoff_uid": self.uid}


def _float_values(column) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64 with NaN for missing, missing mask) of a numeric column."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool) | np.isnan(values)
    return values, missing


def top_cutoff(scores, uids, fraction: float, rows: int | None = None) -> TopCutoff:
    """The TopCutoff of an in-memory whole input (`rows` defaults to len(scores)): the reference the Spark adapter's
    distributed computation must agree with."""
    values, missing = _float_values(scores)
    uids = uids.to_pylist() if isinstance(uids, (pa.Array, pa.ChunkedArray)) else list(uids)
    if len(uids) != len(values):
        raise ValueError(f"{len(uids)} uids for {len(values)} scores")
    rows = len(values) if rows is None else int(rows)
    keep = top_keep_count(fraction, rows)
    valid = np.flatnonzero(~missing)
    if len(valid) <= keep:
        return TopCutoff(float(fraction), rows, keep)
    ranked = sorted(valid.tolist(), key=lambda i: (-values[i], uids[i].encode()))
    last = ranked[keep - 1]
    return TopCutoff(float(fraction), rows, keep, float(values[last]), str(uids[last]))


def _in_top(values: np.ndarray, missing: np.ndarray, uids: pa.Array, cutoff: TopCutoff) -> np.ndarray:
    """Whether each row ranks at or before the cutoff row (uids compare as UTF-8 bytes, as Spark sorts them)."""
    if cutoff.score is None:
        return ~missing
    with np.errstate(invalid="ignore"):
        above = values > cutoff.score
        tied = values == cutoff.score
    not_after = pc.fill_null(pc.less_equal(uids, pa.scalar(cutoff.uid, uids.type)), False)
    return ~missing & (above | (tied & not_after.to_numpy(zero_copy_only=False)))


# ---------------------------------------------------------------------------------------------------- rules


def _shown(value: float, arrow_type: pa.DataType):
    """A measured value for the detail JSON: a float32 as its shortest decimal (0.21, not 0.20999999344348907),
    integral sizes as integers, missing as null."""
    if math.isnan(value):
        return None
    if pa.types.is_integer(arrow_type):
        return int(value)
    if pa.types.is_float32(arrow_type) or pa.types.is_float16(arrow_type):
        return float(str(np.float32(value)))
    return float(value)


def _column(table: pa.Table, name: str):
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _missing(flag: bool) -> dict:
    return {"missing": True} if flag else {}


def _rule_checks(table: pa.Table, options: FilterOptions, columns: dict, cutoff: TopCutoff | None, repeats):
    """(reason, fails mask, detail(i) -> dict) for each active rule, in order."""
    checks = []
    if Reason.LOW_CLIP_SCORE in columns or Reason.CLIP_SCORE_NOT_TOP in columns:
        score_column = _column(table, CLIP_SCORE)
        scores, score_missing = _float_values(score_column)

        def score(i):
            return {"clip_score": _shown(scores[i], score_column.type), **_missing(score_missing[i])}

    if Reason.LOW_CLIP_SCORE in columns:
        with np.errstate(invalid="ignore"):
            fails = score_missing | (scores < options.min_clip_score)
        checks.append((Reason.LOW_CLIP_SCORE, fails, lambda i: {**score(i), "min": options.min_clip_score}))
    if Reason.CLIP_SCORE_NOT_TOP in columns:
        if cutoff is None:
            raise ValueError("filter rule clip_score_not_top needs the TopCutoff of the stage's whole input "
                             "(see top_cutoff)")
        fails = ~_in_top(scores, score_missing, _column(table, UID), cutoff)
        shown_cutoff = None if cutoff.score is None else _shown(cutoff.score, score_column.type)
        checks.append((Reason.CLIP_SCORE_NOT_TOP, fails, lambda i: {
            **score(i), "top_fraction": cutoff.fraction, "keep_count": cutoff.keep_count,
            "cutoff_score": shown_cutoff, "cutoff_uid": cutoff.uid}))
    image_pair = columns.get(Reason.IMAGE_TOO_SMALL) or columns.get(Reason.EXTREME_ASPECT_RATIO)
    if image_pair is not None:
        width_column, height_column = _column(table, image_pair[0]), _column(table, image_pair[1])
        widths, width_missing = _float_values(width_column)
        heights, height_missing = _float_values(height_column)
        size_missing = width_missing | height_missing
        shorter, longer = np.fmin(widths, heights), np.fmax(widths, heights)

        def size(i):
            return {"width": _shown(widths[i], width_column.type), "height": _shown(heights[i], height_column.type),
                    **_missing(size_missing[i])}

    if Reason.IMAGE_TOO_SMALL in columns:
        with np.errstate(invalid="ignore"):
            fails = size_missing | (shorter < options.min_image_side)
        checks.append((Reason.IMAGE_TOO_SMALL, fails, lambda i: {
            **size(i), "shorter_side": None if size_missing[i] else _shown(shorter[i], width_column.type),
            "min": options.min_image_side}))
    if Reason.EXTREME_ASPECT_RATIO in columns:
        no_ratio = size_missing | ~(shorter > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = np.where(no_ratio, np.nan, longer / np.where(no_ratio, 1.0, shorter))
            fails = no_ratio | (ratios > options.max_aspect_ratio)
        checks.append((Reason.EXTREME_ASPECT_RATIO, fails, lambda i: {
            **size(i), "aspect_ratio": None if no_ratio[i] else round(float(ratios[i]), 6),
            "max": options.max_aspect_ratio}))
    if Reason.TOO_FEW_CAPTION_WORDS in columns or Reason.TOO_MANY_CAPTION_WORDS in columns:
        words, words_missing = _float_values(caption_word_counts(_column(table, CAPTION)))

        def word_count(i):
            return {"words": None, "missing": True} if words_missing[i] else {"words": int(words[i])}

    if Reason.TOO_FEW_CAPTION_WORDS in columns:
        with np.errstate(invalid="ignore"):
            fails = words_missing | (words < options.min_caption_words)
        checks.append((Reason.TOO_FEW_CAPTION_WORDS, fails,
                       lambda i: {**word_count(i), "min": options.min_caption_words}))
    if Reason.TOO_MANY_CAPTION_WORDS in columns:
        with np.errstate(invalid="ignore"):
            fails = words_missing | (words > options.max_caption_words)
        checks.append((Reason.TOO_MANY_CAPTION_WORDS, fails,
                       lambda i: {**word_count(i), "max": options.max_caption_words}))
    if Reason.BOILERPLATE_CAPTION in columns:
        if repeats is None:
            raise ValueError("filter rule boilerplate_caption needs each row's caption count over the stage's whole "
                             "input (see caption_repeat_counts)")
        counts, counts_missing = _float_values(repeats)
        if len(counts) != table.num_rows:
            raise ValueError(f"caption_repeats has {len(counts)} values for {table.num_rows} rows")
        fails = ~counts_missing & (np.nan_to_num(counts) > options.max_caption_repeats)
        checks.append((Reason.BOILERPLATE_CAPTION, fails,
                       lambda i: {"repeats": int(counts[i]), "max": options.max_caption_repeats}))
    return checks


def apply_filter(
    table: pa.Table, options: FilterOptions, *, top_cutoff: TopCutoff | None = None, caption_repeats=None,
) -> tuple[pa.Table, pa.Table]:
    """(kept rows, dropped rows as uid, reason, detail) of `table` under `options`.

    `top_cutoff` (clip_score_top_fraction) and `caption_repeats` (max_caption_repeats, one count per row of
    `table`) are computed over the stage's whole input by the caller (module docstring); each is required when
    its rule is on. Every row of `table` ends in exactly one of the two outputs.
    """
    columns = rule_columns(options, table.column_names)
    reasons = np.full(table.num_rows, None, dtype=object)
    details = np.full(table.num_rows, None, dtype=object)
    for reason, fails, detail in _rule_checks(table, options, columns, top_cutoff, caption_repeats):
        newly = np.flatnonzero(fails & (reasons == None))  # noqa: E711
        reasons[newly] = reason
        for i in newly.tolist():
            details[i] = json.dumps(detail(i), sort_keys=True)
    dropped_index = np.flatnonzero(reasons != None)  # noqa: E711
    kept = table.filter(pa.array(reasons == None))  # noqa: E711
    dropped = pa.table({
        UID: _column(table, UID).take(pa.array(dropped_index, pa.int64())),
        "reason": pa.array(reasons[dropped_index].tolist(), pa.string()),
        "detail": pa.array(details[dropped_index].tolist(), pa.string()),
    })
    return kept, dropped
