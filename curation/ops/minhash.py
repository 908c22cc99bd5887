"""Near-duplicate captions: shingles, MinHash signatures, LSH bands, exact Jaccard, keep policies.

DESIGN.md section 4 "Near-duplicate captions": MinHash (datasketch-compatible signatures) over
shingles (default character 5-grams), LSH bands chosen so that a pair at the threshold is a candidate
with probability >= 0.98, candidates verified by the exact Jaccard of their shingle sets, groups by
connected components. This module is the pure layer (numpy / pyarrow, no Spark): every function takes
one Arrow batch or numpy arrays, so a Spark adapter can call it inside ``mapInArrow`` /
``applyInPandas``. The connected components themselves are the adapter's job.

Text normalisation before shingling: lowercase (``str.lower``), then whitespace collapsed the way
``" ".join(text.split())`` does it (leading/trailing whitespace removed, every run of Unicode
whitespace becomes one space). A null text is treated as the empty text: it has no shingles.

MinHash follows Broder (1997) with the permutation families of datasketch 2.0.0
(``datasketch/minhash.py``), reproduced bit for bit so that a signature equals
``datasketch.MinHash(num_perm, seed, scheme=...)`` updated with each shingle's UTF-8 bytes.
"""

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.polynomial.legendre import leggauss

__all__ = [
    "EMPTY_HASH_VALUE",
    "KeepPolicy",
    "MinHasher",
    "anchor_edges",
    "band_hashes",
    "candidate_probability",
    "choose_bands",
    "exact_jaccard",
    "exact_jaccard_pairs",
    "normalise_texts",
    "parse_policy",
    "parse_shingle_spec",
    "select_survivors",
    "shingle_texts",
]

logger = logging.getLogger(__name__)

ShingleKind = Literal["char", "word"]
Scheme = Literal["affine32", "legacy"]
TextBatch = pa.Array | pa.ChunkedArray | Sequence[str | None]

# datasketch's constants (minhash.py): the legacy scheme works modulo the Mersenne prime 2^61 - 1
# and keeps the low 32 bits; both supported schemes produce values in [0, 2^32 - 1].
_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH_32 = np.uint64((1 << 32) - 1)
EMPTY_HASH_VALUE = int(_MAX_HASH_32)
"""Every hash value of a MinHash that saw no shingle (datasketch's ``_max_hash``, its "empty" state)."""

_SPACE = ord(" ")
# Bytes of permuted hash values handled at once; sized to stay in a core's L2 cache, where the
# gather-and-min of the signature step runs faster than from main memory.
_CHUNK_BYTES = 1 << 21
# `MinHasher.signatures` SHA-1-hashes each distinct shingle once per block of this many texts. SHA-1
# is the largest single cost and the distinct fraction falls with block size (real captions, char:5:
# 2.6M shingles over 51k captions are 380k distinct in 10k-text blocks, 203k in one 51k block); the
# block's memory, 4-6 KB per caption at its peak (90-140 MB here), is what bounds it.
_TEXTS_PER_HASH_BLOCK = 25_000
# The table of permuted values (distinct shingles x num_perm x 4 bytes) is built per sub-block of
# about this many shingle occurrences (~10,000 captions), which bounds it whatever the block's
# vocabulary: ~30 MB for captions, at most 2^19 rows (256 MB at 128 permutations). A shingle
# recurring in several sub-blocks is permuted again in each: no measurable cost with affine32,
# ~8% of the total with legacy.
_OCCURRENCES_PER_TABLE = 1 << 19


# --------------------------------------------------------------------------------------------------
# Shingles


def parse_shingle_spec(spec: str) -> tuple[ShingleKind, int]:
    """Parse ``"char:N"`` or ``"word:N"`` (N >= 1) into ``(kind, N)``."""
    kind, separator, size_text = spec.strip().partition(":")
    if separator != ":" or kind not in ("char", "word") or not size_text.isdigit() or int(size_text) < 1:
        raise ValueError(f"bad shingle spec {spec!r}: expected 'char:N' or 'word:N' with an integer N >= 1")
    return kind, int(size_text)  # type: ignore[return-value]  # kind was checked above


def normalise_texts(texts: TextBatch) -> list[str]:
    """Lowercase and collapse whitespace (see the module docstring); None becomes ''."""
    return [" ".join(text.lower().split()) if text else "" for text in _as_text_list(texts)]


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
    reference definition; `MinHasher` and `exact_jaccard_pairs` compute the same sets vectorised.
    """
    _check_shingle_args(kind, size)
    return [_text_shingles(normalised, kind, size) for normalised in normalise_texts(texts)]


def _check_shingle_args(kind: str, size: int) -> None:
    if kind not in ("char", "word"):
        raise ValueError(f"shingle kind must be 'char' or 'word', got {kind!r}")
    if size < 1:
        raise ValueError(f"shingle size must be >= 1, got {size}")


def _as_text_list(texts: TextBatch) -> list[str | None]:
    if isinstance(texts, pa.ChunkedArray | pa.Array):
        return texts.to_pylist()
    return list(texts)


@dataclass(frozen=True)
class _ShingleOccurrences:
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


def _text_shingle_occurrences(texts: list[str | None], kind: ShingleKind, size: int) -> _ShingleOccurrences:
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
    return _ShingleOccurrences(ids=ids, offsets=offsets, utf8=utf8, utf8_starts=char_starts, utf8_ends=char_ends)


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


def _list_shingle_occurrences(shingle_lists: pa.Array) -> _ShingleOccurrences:
    counts = pc.fill_null(pc.list_value_length(shingle_lists), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(shingle_lists)
    if flat.null_count:
        raise ValueError("shingle lists must not contain null shingles")
    if len(flat) == 0:
        nothing = np.zeros(0, dtype=np.int64)
        return _ShingleOccurrences(
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
    return _ShingleOccurrences(
        ids=encoded.indices.to_numpy(),
        offsets=_offsets(counts),
        utf8=data_buffer.to_pybytes() if data_buffer is not None else b"",
        utf8_starts=value_offsets[:-1],
        utf8_ends=value_offsets[1:],
    )


def _python_list_occurrences(shingle_lists: list) -> _ShingleOccurrences:
    # Arrow converts lists and tuples directly; other iterables (sets) are listed first.
    convertible = [item if item is None or isinstance(item, list | tuple) else list(item) for item in shingle_lists]
    return _list_shingle_occurrences(pa.array(convertible))


# --------------------------------------------------------------------------------------------------
# MinHash


def _sha1_hash32(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """datasketch.hashfunc.sha1_hash32 of each data[start:end]: the first 4 bytes of SHA-1, little-endian."""
    sha1 = hashlib.sha1
    spans = zip(starts.tolist(), ends.tolist(), strict=True)
    digests = b"".join([sha1(data[start:end]).digest() for start, end in spans])
    # A SHA-1 digest is 20 bytes, i.e. five uint32 words; the hash is the first word of each.
    return np.frombuffer(digests, dtype="<u4")[::5].astype(np.uint64)


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch 2.0's ``_fmix(hv, 32)`` (uint32 wraparound)."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


class MinHasher:
    """Batch MinHash signatures identical to datasketch's, several times faster.

    ``signatures(batch)[i]`` equals ``datasketch.MinHash(num_perm, seed, scheme=scheme)`` after
    ``update_batch`` with the UTF-8 bytes of text i's shingles (default hash function
    ``sha1_hash32``), value for value. Two permutation families are offered:

    - ``"affine32"`` (default): datasketch >= 2.0's default, i.e. plain ``MinHash(num_perm, seed)``
      there. The SHA-1 hash is pre-mixed with MurmurHash3's finalizer, then ``a * h + b mod 2^32``.
    - ``"legacy"``: datasketch < 2.0's only scheme (and ``scheme="legacy"`` in 2.x):
      ``(a * h + b) % (2^61 - 1) & (2^32 - 1)`` where ``a * h + b`` wraps modulo 2^64 first, as
      datasketch's uint64 numpy arithmetic does.

    Both draw (a, b) from ``np.random.RandomState(seed)`` exactly as datasketch does. Values lie in
    [0, 2^32 - 1] and are returned as uint64. A text with no shingles (empty, whitespace-only or
    null) gets the empty MinHash: `EMPTY_HASH_VALUE` (2^32 - 1, datasketch's ``_max_hash``) for
    every permutation, so all such texts share one signature; drop them before banding.

    Speed (about 5-6x datasketch's ``MinHash.bulk`` on one core, see bench/results/minhash.md)
    comes from doing per batch what datasketch does per shingle: shingles become integer ids without
    a Python object each, every distinct shingle of a block of texts is SHA-1-hashed once, its
    permuted values are computed once as a row of a (distinct shingles x num_perm) uint32 table, and
    each signature is a min over gathered table rows, taken for many texts of similar shingle counts
    at once. Memory peaks at roughly 4-6 KB per caption of a block (`_TEXTS_PER_HASH_BLOCK` captions).
    """

    def __init__(
        self,
        num_perm: int = 128,
        seed: int = 1,
        *,
        kind: ShingleKind = "char",
        size: int = 5,
        scheme: Scheme = "affine32",
    ) -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if scheme not in ("affine32", "legacy"):
            raise ValueError(f"scheme must be 'affine32' or 'legacy', got {scheme!r}")
        _check_shingle_args(kind, size)
        self.num_perm = num_perm
        self.seed = seed
        self.kind = kind
        self.size = size
        self.scheme = scheme
        generator = np.random.RandomState(seed)
        if scheme == "legacy":
            # datasketch draws a and b alternately, one pair per permutation; the order matters.
            pairs = [
                (
                    generator.randint(1, _MERSENNE_PRIME, dtype=np.uint64),
                    generator.randint(0, _MERSENNE_PRIME, dtype=np.uint64),
                )
                for _ in range(num_perm)
            ]
            self._a, self._b = np.array(pairs, dtype=np.uint64).T.copy()
        else:
            self._a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
            self._b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def signatures(self, batch: TextBatch | Sequence[Iterable[str | bytes] | None]) -> np.ndarray:
        """MinHash signatures, shape (len(batch), num_perm), dtype uint64.

        `batch` is either texts (a pyarrow string / large_string array or a sequence of str/None),
        shingled with this hasher's kind and size, or ready-made shingle lists (a pyarrow list array
        of strings/binaries, or a sequence of iterables of str/bytes; str is hashed as UTF-8).
        """
        if isinstance(batch, pa.ChunkedArray):
            batch = batch.combine_chunks()
        if isinstance(batch, pa.Array):
            items = batch
            if pa.types.is_list(batch.type) or pa.types.is_large_list(batch.type):
                occurrences_of = _list_shingle_occurrences
            elif pa.types.is_string(batch.type) or pa.types.is_large_string(batch.type):
                occurrences_of = self._text_occurrences
            else:
                raise TypeError(f"expected a string or list<string> array, got {batch.type}")
        else:
            items = list(batch)
            first = next((item for item in items if item is not None), None)
            if isinstance(first, bytes):
                raise TypeError("texts must be str; pass shingle lists as iterables of str or bytes")
            occurrences_of = (
                self._text_occurrences if first is None or isinstance(first, str) else _python_list_occurrences
            )
        blocks = [
            self._signatures_of(occurrences_of(items[start : start + _TEXTS_PER_HASH_BLOCK]))
            for start in range(0, len(items), _TEXTS_PER_HASH_BLOCK)
        ]
        return np.concatenate(blocks) if blocks else np.empty((0, self.num_perm), dtype=np.uint64)

    def _text_occurrences(self, texts: TextBatch) -> _ShingleOccurrences:
        return _text_shingle_occurrences(_as_text_list(texts), self.kind, self.size)

    def _signatures_of(self, shingles: _ShingleOccurrences) -> np.ndarray:
        hashes = _sha1_hash32(shingles.utf8, shingles.utf8_starts, shingles.utf8_ends)
        text_count = len(shingles.offsets) - 1
        logger.debug("minhash block: %d texts, %d shingles, %d distinct", text_count, len(shingles.ids), len(hashes))
        # Every text with shingles gets its row below; filling only the rest saves a pass over the result.
        result = np.empty((text_count, self.num_perm), dtype=np.uint64)
        result[shingles.counts == 0] = _MAX_HASH_32
        # One table buffer for all sub-blocks: a fresh array each time costs its page faults again.
        table_buffer = np.empty((0, self.num_perm), dtype=np.uint32)
        first_text = 0
        while first_text < text_count:
            last_fitting = np.searchsorted(
                shingles.offsets, shingles.offsets[first_text] + _OCCURRENCES_PER_TABLE, side="right"
            )
            end_text = min(text_count, max(first_text + 1, int(last_fitting) - 1))
            offsets = shingles.offsets[first_text : end_text + 1]
            block_ids = shingles.ids[offsets[0] : offsets[-1]]
            present = np.zeros(len(hashes), dtype=bool)
            present[block_ids] = True
            local_of_global = np.cumsum(present) - 1
            local_hashes = hashes[present]
            if len(table_buffer) < len(local_hashes):
                table_buffer = np.empty((len(local_hashes), self.num_perm), dtype=np.uint32)
            table = table_buffer[: len(local_hashes)]
            self._permute_into(local_hashes, table)
            _min_rows_per_text(table, local_of_global[block_ids], offsets - offsets[0], result[first_text:end_text])
            first_text = end_text
        return result

    def _permute_into(self, hashes: np.ndarray, table: np.ndarray) -> None:
        """Row k of `table` (uint32): the permuted values of hash k under every permutation."""
        rows_per_chunk = max(1, _CHUNK_BYTES // (8 * self.num_perm))
        if self.scheme == "affine32":
            mixed = _fmix32(hashes.astype(np.uint32))
            for start in range(0, len(hashes), rows_per_chunk):
                chunk = table[start : start + rows_per_chunk]
                np.multiply(mixed[start : start + rows_per_chunk, None], self._a, out=chunk)
                chunk += self._b
            return
        for start in range(0, len(hashes), rows_per_chunk):
            table[start : start + rows_per_chunk] = _legacy_permute(
                hashes[start : start + rows_per_chunk], self._a, self._b
            )


def _legacy_permute(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """datasketch's legacy ``(a * h + b) % _mersenne_prime & _max_hash`` for every hash x permutation.

    ``a * h + b`` wraps modulo 2^64 first, as datasketch's uint64 numpy arithmetic does. The
    remainder modulo p = 2^61 - 1 avoids a division (several times slower in numpy): 2^61 = 1
    (mod p), so y = (x >> 61) + (x & p) = x (mod p) and y < 2p. When y >= p, x mod p = y - p =
    y + 1 - 2^61, whose low 32 bits are those of y + 1, and y >= p exactly when (y + 1) >> 61 is 1.
    """
    shift = np.uint64(61)
    x = hashes[:, None] * a
    x += b
    carry = x >> shift
    x &= _MERSENNE_PRIME
    x += carry
    np.add(x, np.uint64(1), out=carry)
    carry >>= shift
    x += carry
    x &= _MAX_HASH_32
    return x


def _min_rows_per_text(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """out[i] = min of table[ids[offsets[i]:offsets[i + 1]]] row-wise; texts without ids are left as they are.

    Texts are sorted by id count and handled in groups whose counts differ by at most 25%, each
    padded to the group's longest (repeating a text's own last id, which cannot change its min),
    so one gather and one min over the padded axis serve many texts; ``minimum.reduceat`` over rows
    is several times slower because numpy runs it segment by segment.
    """
    counts = np.diff(offsets)
    nonempty = np.flatnonzero(counts > 0)
    order = nonempty[np.argsort(counts[nonempty], kind="stable")]
    sorted_counts = counts[order]
    row_bytes = table.shape[1] * table.itemsize
    # One gather buffer for all chunks: a fresh multi-megabyte array per chunk costs page faults
    # that can take longer than the gather itself.
    gather_buffer = np.empty(_CHUNK_BYTES // table.itemsize, dtype=table.dtype)
    position = 0
    while position < len(order):
        group_end = int(np.searchsorted(sorted_counts, int(sorted_counts[position] * 1.25) + 1, side="left"))
        width = int(sorted_counts[group_end - 1])
        texts_per_chunk = _CHUNK_BYTES // (width * row_bytes)
        if texts_per_chunk == 0:
            for text in order[position:group_end].tolist():
                out[text] = _min_rows_of_long_text(table, ids[offsets[text] : offsets[text + 1]])
        else:
            columns = np.arange(width)
            for chunk_start in range(position, group_end, texts_per_chunk):
                texts = order[chunk_start : min(group_end, chunk_start + texts_per_chunk)]
                # Padded slot j of every text in the chunk, laid out slot-major so that the min runs
                # over whole contiguous (texts x num_perm) planes, which numpy vectorises best.
                within = np.minimum(columns[:, None], counts[texts][None, :] - 1)
                slots = ids[offsets[texts][None, :] + within]
                gathered = gather_buffer[: slots.size * table.shape[1]].reshape(*slots.shape, table.shape[1])
                table.take(slots, axis=0, out=gathered, mode="clip")
                out[texts] = gathered.min(axis=0)
        position = group_end


def _min_rows_of_long_text(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    rows_per_chunk = max(1, _CHUNK_BYTES // (table.shape[1] * table.itemsize))
    running = table[ids[0]].copy()
    for start in range(0, len(ids), rows_per_chunk):
        np.minimum(running, table.take(ids[start : start + rows_per_chunk], axis=0).min(axis=0), out=running)
    return running


# --------------------------------------------------------------------------------------------------
# LSH banding


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(a pair with Jaccard `similarity` shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def _false_positive_areas(threshold: float, max_degree: int) -> Callable[[int, int], float]:
    """A function (b, r) -> integral of the candidate probability over [0, threshold], for b * r <= max_degree.

    The probability is a polynomial of degree b * r in s, so Gauss-Legendre quadrature with
    max_degree // 2 + 1 nodes integrates it exactly (up to rounding): no tolerance to tune.
    """
    nodes, weights = leggauss(max_degree // 2 + 1)
    similarities = (nodes + 1.0) * (threshold / 2.0)
    weights = weights * (threshold / 2.0)
    return lambda bands, rows: float(np.dot(weights, candidate_probability(similarities, bands, rows)))


def choose_bands(num_perm: int, threshold: float, min_candidate_probability: float = 0.98) -> tuple[int, int]:
    """LSH (bands, rows) with bands * rows <= num_perm for near-duplicates at Jaccard >= `threshold`.

    Banding as in Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, section 3.4: two texts
    are candidates when all r values of at least one of b bands agree. Among all (b, r) whose
    candidate probability at the threshold, 1 - (1 - t^r)^b, is at least `min_candidate_probability`
    (DESIGN.md: 0.98), return the one with the smallest false-positive area, the integral of that
    probability over similarities [0, threshold] (the same objective as datasketch's
    ``_optimal_param``, but under a recall floor instead of a weighted sum). For a fixed r the
    probability grows with b everywhere, so only the smallest feasible b per r is a contender. Ties
    go to fewer permutations used. Pairs above the threshold are candidates with at least that
    probability too, since it rises with similarity. Raises ValueError when no (b, r) reaches the
    floor (too few permutations for a low threshold and a high floor).

    >>> choose_bands(128, 0.8)
    (17, 7)
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 < min_candidate_probability < 1.0:
        raise ValueError(f"min_candidate_probability must be in (0, 1), got {min_candidate_probability}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    false_positive_area = _false_positive_areas(threshold, num_perm)
    contenders = []
    for rows in range(1, num_perm + 1):
        most_bands = num_perm // rows
        if candidate_probability(threshold, most_bands, rows) < min_candidate_probability:
            continue
        # Smallest feasible b by bisection: the probability rises with b, and a closed form through
        # logarithms breaks down where t^r underflows.
        low, high = 1, most_bands
        while low < high:
            middle = (low + high) // 2
            if candidate_probability(threshold, middle, rows) >= min_candidate_probability:
                high = middle
            else:
                low = middle + 1
        contenders.append((false_positive_area(low, rows), low * rows, rows, low))
    if not contenders:
        raise ValueError(
            f"no LSH banding of {num_perm} permutations makes a pair at Jaccard {threshold} a candidate with "
            f"probability >= {min_candidate_probability}; use more permutations or a lower probability"
        )
    _, _, rows, bands = min(contenders)
    return bands, rows


_FMIX64_C1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX64_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _fmix64(values: np.ndarray) -> np.ndarray:
    shift = np.uint64(33)
    values = values ^ (values >> shift)
    values = values * _FMIX64_C1
    values = values ^ (values >> shift)
    values = values * _FMIX64_C2
    return values ^ (values >> shift)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per LSH band, shape (n, bands), dtype uint64.

    Band k covers signature columns [k * rows, (k + 1) * rows); columns past bands * rows are unused.
    The key starts from a per-band salt and folds in each value with MurmurHash3's 64-bit finalizer
    (h = fmix64(h ^ v)), all in uint64 arithmetic, so it is the same on every process and platform
    and never depends on byte order. Equal bands give equal keys; different bands collide with
    probability ~2^-64, and a collision only adds a candidate that exact Jaccard then rejects.
    """
    signatures = np.asarray(signatures)
    if signatures.ndim != 2 or bands < 1 or rows < 1 or bands * rows > signatures.shape[1]:
        raise ValueError(f"cannot cut {bands} bands of {rows} rows from signatures of shape {signatures.shape}")
    values = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    salts = _fmix64(np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN_GAMMA)
    keys = np.broadcast_to(salts, (len(signatures), bands)).copy()
    for row in range(rows):
        keys = _fmix64(keys ^ values[:, :, row])
    return keys


# --------------------------------------------------------------------------------------------------
# Verification


def exact_jaccard(shingles_a: Iterable, shingles_b: Iterable) -> float:
    """|A & B| / |A | B| of two shingle collections (duplicates ignored).

    Two empty sets give 0.0, not 1.0: texts without shingles carry no evidence of being duplicates
    of each other, and must never be grouped by the near-duplicate stage.
    """
    set_a, set_b = set(shingles_a), set(shingles_b)
    union = len(set_a | set_b)
    return len(set_a & set_b) / union if union else 0.0


def exact_jaccard_pairs(
    texts_a: TextBatch, texts_b: TextBatch, kind: ShingleKind = "char", size: int = 5
) -> np.ndarray:
    """`exact_jaccard` of the shingle sets of texts_a[i] and texts_b[i] for every i (float64).

    Vectorised: both sides are shingled together into one id space, each text's ids are made
    distinct, and an id present on both sides of pair i is one element of the intersection.
    """
    _check_shingle_args(kind, size)
    left, right = _as_text_list(texts_a), _as_text_list(texts_b)
    if len(left) != len(right):
        raise ValueError(f"texts_a and texts_b differ in length: {len(left)} != {len(right)}")
    pair_count = len(left)
    if pair_count == 0:
        return np.zeros(0, dtype=np.float64)
    shingles = _text_shingle_occurrences(left + right, kind, size)
    text_of_occurrence = np.repeat(np.arange(2 * pair_count, dtype=np.uint64), shingles.counts)
    # Sort-based distinct: numpy's hash-based np.unique is ~100x slower on these uint64 keys.
    distinct = np.sort((text_of_occurrence << np.uint64(32)) | shingles.ids.astype(np.uint64))
    distinct = distinct[np.concatenate(([True], distinct[1:] != distinct[:-1]))]
    text_index = (distinct >> np.uint64(32)).astype(np.int64)
    set_sizes = np.bincount(text_index, minlength=2 * pair_count)
    pair_keys = ((text_index % pair_count).astype(np.uint64) << np.uint64(32)) | (distinct & _MAX_HASH_32)
    pair_keys.sort()
    shared = pair_keys[1:][pair_keys[1:] == pair_keys[:-1]]
    intersections = np.bincount((shared >> np.uint64(32)).astype(np.int64), minlength=pair_count)
    unions = set_sizes[:pair_count] + set_sizes[pair_count:] - intersections
    return np.divide(intersections, unions, out=np.zeros(pair_count, dtype=np.float64), where=unions > 0)


# --------------------------------------------------------------------------------------------------
# Candidate pairs from one LSH bucket


def anchor_edges(
    bucket_member_uids_sorted: Sequence | np.ndarray, max_anchors: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of one LSH bucket: every member paired with each of the first `max_anchors` members.

    Returns (left, right) arrays of uids with left < right, one candidate pair per position:
    member i (i >= 1) is paired with members 0 .. min(i, A) - 1. A bucket of n members yields
    A(A - 1)/2 + (n - A)A pairs for n >= A (all n(n - 1)/2 pairs when n <= A + 1), so a 100,000-member
    template bucket ("stock photo of ...") costs O(A n) verifications instead of O(n^2).

    Recall cost: two non-anchor members are only connected through an anchor, i.e. when both
    verify as near-duplicates of some anchor (then connected components joins them). If neither
    is similar enough to any anchor, their pair is missed in this band, though it may still be
    found in another band where they share a bucket with fewer or more similar members. Members
    must be sorted by uid so the anchors, and hence the result, do not depend on partitioning.
    """
    if max_anchors < 1:
        raise ValueError(f"max_anchors must be >= 1, got {max_anchors}")
    members = np.asarray(bucket_member_uids_sorted)
    if len(members) > 1 and not np.all(members[1:] > members[:-1]):
        raise ValueError("bucket members must be sorted by uid, without repeats")
    member_count = len(members)
    anchor_count = np.minimum(np.arange(member_count), max_anchors)
    right = np.repeat(np.arange(member_count), anchor_count)
    left = np.arange(len(right)) - np.repeat(_offsets(anchor_count)[:-1], anchor_count)
    return members[left], members[right]


# --------------------------------------------------------------------------------------------------
# Which members of a near-duplicate group survive


@dataclass(frozen=True)
class KeepPolicy:
    """How many members of each near-duplicate group to keep: `cap` of them, or all when None (tag)."""

    cap: int | None

    def __str__(self) -> str:
        if self.cap is None:
            return "tag"
        return "keep_one" if self.cap == 1 else f"cap:{self.cap}"


def parse_policy(spec: str) -> KeepPolicy:
    """``"cap:K"`` (K >= 1) keeps K members per group, ``"keep_one"`` is ``cap:1``, ``"tag"`` keeps all."""
    spec = spec.strip()
    if spec == "tag":
        return KeepPolicy(cap=None)
    if spec == "keep_one":
        return KeepPolicy(cap=1)
    kind, separator, cap_text = spec.partition(":")
    if kind == "cap" and separator and cap_text.isdigit() and int(cap_text) >= 1:
        return KeepPolicy(cap=int(cap_text))
    raise ValueError(f"bad keep policy {spec!r}: expected 'cap:K' with an integer K >= 1, 'keep_one' or 'tag'")


def select_survivors(group_ids: np.ndarray, uniform_keys: np.ndarray, policy: KeepPolicy | str) -> np.ndarray:
    """Boolean keep mask: per group, the `policy.cap` members with the smallest uniform key.

    `uniform_keys` are the rows' u(seed, uid, purpose) draws (DESIGN.md section 3), so which members
    survive is random across groups yet reproducible and independent of row order. Every row is in
    a group (a row that is nobody's duplicate is a group of one). Equal keys, which a good hash
    makes vanishingly rare, are broken by row position, the one case where row order matters.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    group_ids, uniform_keys = np.asarray(group_ids), np.asarray(uniform_keys, dtype=np.float64)
    if group_ids.shape != uniform_keys.shape or group_ids.ndim != 1:
        raise ValueError(
            f"group_ids and uniform_keys must be 1-D of one length: {group_ids.shape} vs {uniform_keys.shape}"
        )
    if np.isnan(uniform_keys).any():
        raise ValueError("uniform_keys contain NaN")
    if policy.cap is None or len(group_ids) == 0:
        return np.ones(len(group_ids), dtype=bool)
    _, group_codes = np.unique(group_ids, return_inverse=True)
    order = np.lexsort((np.arange(len(group_ids)), uniform_keys, group_codes))
    sorted_codes = group_codes[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(order)) - np.repeat(group_starts, np.diff(np.r_[group_starts, len(order)]))
    keep = np.zeros(len(group_ids), dtype=bool)
    keep[order] = rank < policy.cap
    return keep

