"""MinHash signatures of captions, datasketch-compatible, computed per batch.

DESIGN.md section 4 "Near-duplicate captions": MinHash (datasketch-compatible signatures) over shingles (default
character 5-grams; `curation.ops.shingles`), LSH bands (`curation.ops.lsh`), candidates verified by exact Jaccard
(`curation.ops.jaccard`), groups by connected components (the Spark adapter's job, `curation.spark.dedup`), survivors
by a keep policy (`curation.ops.survivors`). Pure numpy / pyarrow: a Spark adapter calls it inside ``mapInArrow``.

MinHash follows Broder (1997) with the permutation families of datasketch 2.0.0
(``datasketch/minhash.py``), reproduced bit for bit so that a signature equals
``datasketch.MinHash(num_perm, seed, scheme=...)`` updated with each shingle's UTF-8 bytes.
"""

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa

from curation.ops.shingles import (
    ShingleKind,
    ShingleOccurrences,
    TextBatch,
    as_text_list,
    check_shingle_args,
    list_shingle_occurrences,
    python_list_occurrences,
    text_shingle_occurrences,
)

__all__ = ["EMPTY_HASH_VALUE", "MinHasher"]

logger = logging.getLogger(__name__)

Scheme = Literal["affine32", "legacy"]

# datasketch's constants (minhash.py): the legacy scheme works modulo the Mersenne prime 2^61 - 1
# and keeps the low 32 bits; both supported schemes produce values in [0, 2^32 - 1].
_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH_32 = np.uint64((1 << 32) - 1)
EMPTY_HASH_VALUE = int(_MAX_HASH_32)
"""Every hash value of a MinHash that saw no shingle (datasketch's ``_max_hash``, its "empty" state)."""

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
        check_shingle_args(kind, size)
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
                occurrences_of = list_shingle_occurrences
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
                self._text_occurrences if first is None or isinstance(first, str) else python_list_occurrences
            )
        blocks = [
            self._signatures_of(occurrences_of(items[start : start + _TEXTS_PER_HASH_BLOCK]))
            for start in range(0, len(items), _TEXTS_PER_HASH_BLOCK)
        ]
        return np.concatenate(blocks) if blocks else np.empty((0, self.num_perm), dtype=np.uint64)

    def _text_occurrences(self, texts: TextBatch) -> ShingleOccurrences:
        return text_shingle_occurrences(as_text_list(texts), self.kind, self.size)

    def _signatures_of(self, shingles: ShingleOccurrences) -> np.ndarray:
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

