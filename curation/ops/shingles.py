"""Shingles of captions, the sets near-duplicate detection compares: text normalisation, each text's shingles,
and a batch's shingles as integer ids.

DESIGN.md section 4 "Near-duplicate captions": MinHash over shingles (default character 5-grams), candidates verified
by the exact Jaccard of their shingle sets. `shingle_texts` is the readable reference definition of those sets;
`text_shingle_occurrences` computes the same sets for a whole batch without a Python object per shingle, for the
signatures (`curation.ops.minhash`) and the verification (`curation.ops.jaccard`). Pure numpy / pyarrow.

Text normalisation before shingling: lowercase (``str.lower``), then whitespace collapsed the way
``" ".join(text.split())`` does it (leading/trailing whitespace removed, every run of Unicode
whitespace becomes one space). A null text is treated as the empty text: it has no shingles.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ShingleKind",
    "ShingleOccurrences",
    "TextBatch",
    "as_text_list",
    "check_shingle_args",
    "list_shingle_occurrences",
    "normalise_texts",
    "parse_shingle_spec",
    "python_list_occurrences",
    "shingle_texts",
    "text_shingle_occurrences",
]

ShingleKind = Literal["char", "word"]
TextBatch = pa.Array | pa.ChunkedArray | Sequence[str | None]

_SPACE = ord(" ")


def parse_shingle_spec(spec: str) -> tuple[ShingleKind, int]:
    """Parse ``"char:N"`` or ``"word:N"`` (N >= 1) into ``(kind, N)``."""
    kind, separator, size_text = spec.strip().partition(":")
    if separator != ":" or kind not in ("char", "word") or not size_text.isdigit() or int(size_text) < 1:
        raise ValueError(f"bad shingle spec {spec!r}: expected 'char:N' or 'word:N' with an integer N >= 1")
    return kind, int(size_text)  # type: ignore[return-value]  # kind was checked above


def normalise_texts(texts: TextBatch) -> list[str]:
    """Lowercase and collapse whitespace (see the module docstring); None becomes ''."""
    return [" ".join(text.lower().split()) if text else "" for text in as_text_list(texts)]


def _text_shingles(normalised: str, kind: ShingleKind, size: int) -> list[str]:
    if not normalised:
        return []
    units = list(normalised) if kind == "char" else normalised.split(" ")
    if len(units) < size:
        return [normalised]
    joiner = "" if kind == "char" else " "
    return list(dict.fromkeys(joiner.join(units[start : start + size]) for start in range(len(units) - size + 1)))


def shingle_texts(texts: TextBatch, kind: ShingleKind = "char", size: int = 5) -> list[list[str]]:
    """The distinct shingles of each text, in order of first appearance.

    ``char`` shingles are all N-character substrings of the normalised text, ``word`` shingles all
    runs of N words joined by one space. A text shorter than N (characters or words) has its whole
    normalised text as its only shingle; an empty or null text has none. This is the readable
    reference definition; `text_shingle_occurrences` computes the same sets vectorised.
    """
    check_shingle_args(kind, size)
    return [_text_shingles(normalised, kind, size) for normalised in normalise_texts(texts)]


def check_shingle_args(kind: str, size: int) -> None:
    if kind not in ("char", "word"):
        raise ValueError(f"shingle kind must be 'char' or 'word', got {kind!r}")
    if size < 1:
        raise ValueError(f"shingle size must be >= 1, got {size}")


def as_text_list(texts: TextBatch) -> list[str | None]:
    if isinstance(texts, pa.ChunkedArray | pa.Array):
        return texts.to_pylist()
    return list(texts)


@dataclass(frozen=True)
class ShingleOccurrences:
    """A batch's shingles as integer ids: text i has ids[offsets[i]:offsets[i + 1]] (duplicates allowed).

    Ids are dense (0 .. unique_count - 1) and mean the same shingle everywhere in the batch.
    The UTF-8 encoding of shingle k is utf8[utf8_starts[k]:utf8_ends[k]].
    """

    ids: np.ndarray
    offsets: np.ndarray
    utf8: bytes
    utf8_starts: np.ndarray
    utf8_ends: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Map equal keys to equal int32 ids in 0..count-1 (hash-based, not a sort)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int32), 0
    encoded = pa.array(keys).dictionary_encode()
    return encoded.indices.to_numpy(), len(encoded.dictionary)


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def text_shingle_occurrences(texts: list[str | None], kind: ShingleKind, size: int) -> ShingleOccurrences:
    """Shingle a batch without a Python object per shingle.

    The normalised texts are concatenated into one code-point array. Tokens (code points, or words)
    get dense integer ids; an N-gram's key packs its N token ids into one uint64 (re-densified
    whenever the packed width would exceed 64 bits), so equal keys are exactly equal shingles.
    Each distinct shingle is located by the byte span of one of its occurrences, for hashing.
    """
    normalised = normalise_texts(texts)
    joined = "".join(normalised)
    code_points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    char_counts = np.fromiter(map(len, normalised), dtype=np.int64, count=len(normalised))
    char_offsets = _offsets(char_counts)
    if kind == "char":
        token_ids, token_count = _dense_code_points(code_points)
        token_counts = char_counts
    else:
        token_ids, token_count, word_starts, word_ends, token_counts = _words(normalised, code_points, char_offsets)

    window_counts = np.where(token_counts >= size, token_counts - size + 1, 0)
    token_offsets = _offsets(token_counts)
    window_offsets = _offsets(window_counts)
    window_starts = np.arange(window_offsets[-1], dtype=np.int64) + np.repeat(
        token_offsets[:-1] - window_offsets[:-1], window_counts
    )
    window_ids, window_unique_count = _ngram_ids(token_ids, token_count, window_starts, size)

    # A text with fewer than N tokens is one shingle, its whole text. It has fewer than N tokens and
    # every window has exactly N, so the two id ranges can never name the same string.
    short_texts = np.flatnonzero((token_counts > 0) & (token_counts < size))
    short_ids, short_unique_count = _dense_ids(np.array([normalised[index] for index in short_texts], dtype=object))
    short_ids = short_ids.astype(np.int64) + window_unique_count

    counts = window_counts.copy()
    counts[short_texts] = 1
    offsets = _offsets(counts)
    if len(short_texts):
        ids = np.empty(offsets[-1], dtype=np.int64)
        is_window_slot = np.repeat(window_counts > 0, counts)
        ids[is_window_slot] = window_ids
        ids[~is_window_slot] = short_ids
    else:
        ids = window_ids

    # Any occurrence of a shingle spells it, so whichever occurrence each assignment keeps will do.
    window_of_id = np.empty(window_unique_count, dtype=np.int64)
    window_of_id[window_ids] = window_starts
    if kind == "char":
        window_char_starts, window_char_ends = window_of_id, window_of_id + size
    else:
        window_char_starts, window_char_ends = word_starts[window_of_id], word_ends[window_of_id + size - 1]
    short_text_of_id = np.empty(short_unique_count, dtype=np.int64)
    short_text_of_id[short_ids - window_unique_count] = short_texts
    char_starts = np.concatenate([window_char_starts, char_offsets[short_text_of_id]])
    char_ends = np.concatenate([window_char_ends, char_offsets[short_text_of_id + 1]])
    utf8 = joined.encode("utf-8")
    if len(utf8) != len(code_points):
        byte_offsets = _offsets(1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000))
        char_starts, char_ends = byte_offsets[char_starts], byte_offsets[char_ends]
    return ShingleOccurrences(ids=ids, offsets=offsets, utf8=utf8, utf8_starts=char_starts, utf8_ends=char_ends)


def _dense_code_points(code_points: np.ndarray) -> tuple[np.ndarray, int]:
    """Code points renumbered 0..count-1 (uint64), so that N of them pack into fewer bits."""
    if len(code_points) == 0:
        return code_points.astype(np.uint64), 0
    present = np.zeros(int(code_points.max()) + 1, dtype=np.uint64)
    present[code_points] = 1
    rank = np.cumsum(present) - np.uint64(1)
    return rank[code_points], int(present.sum())


def _words(
    normalised: list[str], code_points: np.ndarray, char_offsets: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """Word tokens of the normalised texts: uint64 ids, distinct count, code-point spans, words per text."""
    words = pc.split_pattern(pa.array(normalised, type=pa.large_string()), " ")
    word_counts = pc.list_value_length(words).to_numpy().astype(np.int64)
    # An empty text splits into one empty word; normalised texts have no other empty words.
    word_counts[np.diff(char_offsets) == 0] = 0
    flat_words = pc.list_flatten(words)
    flat_words = flat_words.filter(pc.greater(pc.utf8_length(flat_words), 0))
    encoded = flat_words.dictionary_encode()
    is_start = code_points != _SPACE
    is_start[1:] &= code_points[:-1] == _SPACE
    is_start[char_offsets[:-1][word_counts > 0]] = True
    word_starts = np.flatnonzero(is_start)
    word_ends = word_starts + pc.utf8_length(flat_words).to_numpy().astype(np.int64)
    word_ids = encoded.indices.to_numpy().astype(np.uint64)
    return word_ids, len(encoded.dictionary), word_starts, word_ends, word_counts


def _ngram_ids(tokens: np.ndarray, token_count: int, starts: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Dense ids of the N-grams of uint64 `tokens` starting at `starts` (positions in the token array)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int32), 0
    # Keys are built for every position that has N tokens after it, text boundaries or not: shifted
    # views of one array are cheaper than gathering each window, and the unused keys are dropped at
    # the end.
    bits = max(1, (token_count - 1).bit_length())
    keys = tokens[: len(tokens) - size + 1].copy()
    key_bits = bits
    for offset in range(1, size):
        if key_bits + bits > 64:
            dense, distinct = _dense_ids(keys)
            keys, key_bits = dense.astype(np.uint64), max(1, (distinct - 1).bit_length())
        keys <<= np.uint64(bits)
        keys |= tokens[offset : offset + len(keys)]
        key_bits += bits
    return _dense_ids(keys[starts])


def list_shingle_occurrences(shingle_lists: pa.Array) -> ShingleOccurrences:
    counts = pc.fill_null(pc.list_value_length(shingle_lists), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(shingle_lists)
    if flat.null_count:
        raise ValueError("shingle lists must not contain null shingles")
    if len(flat) == 0:
        nothing = np.zeros(0, dtype=np.int64)
        return ShingleOccurrences(
            ids=nothing, offsets=_offsets(counts), utf8=b"", utf8_starts=nothing, utf8_ends=nothing
        )
    string_or_binary = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if not any(is_type(flat.type) for is_type in string_or_binary):
        raise TypeError(f"shingles must be str or bytes, got {flat.type}")
    encoded = flat.dictionary_encode()
    # A string dictionary's data buffer already holds the UTF-8 bytes, so the spans come from its offsets.
    dictionary = encoded.dictionary.cast(pa.large_binary())
    _, offsets_buffer, data_buffer = dictionary.buffers()
    value_offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        dictionary.offset : dictionary.offset + len(dictionary) + 1
    ]
    return ShingleOccurrences(
        ids=encoded.indices.to_numpy(),
        offsets=_offsets(counts),
        utf8=data_buffer.to_pybytes() if data_buffer is not None else b"",
        utf8_starts=value_offsets[:-1],
        utf8_ends=value_offsets[1:],
    )


def python_list_occurrences(shingle_lists: list) -> ShingleOccurrences:
    # Arrow converts lists and tuples directly; other iterables (sets) are listed first.
    convertible = [item if item is None or isinstance(item, list | tuple) else list(item) for item in shingle_lists]
    return list_shingle_occurrences(pa.array(convertible))

