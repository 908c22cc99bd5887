"""Image blocklists: the sha256 digests and 64-bit perceptual hashes of images that must never be published
(a data owner's request, known abuse material hash lists, images taken down from an earlier release).

File format (as the domain and URL blocklists, `curation.ops.blocklists`): UTF-8 text, one entry a line; blank lines
and lines starting with '#' are ignored, and anything after the first whitespace of a line is a comment
(`<hash>  <note>`, as `sha256sum` writes its output).

- sha256 list: the 64 hex digits of sha256 over the image bytes exactly as stored (the published `.jpg`, the
  download stage's tar member, the rows' image-bytes column); upper or lower case.
- perceptual-hash list: 16 hex digits, the 64-bit DCT pHash of `curation.ops.imagehash.perceptual_hash` (which is
  `imagehash.phash`'s value), the same bits dedup_image stores in `image_phash` (a signed long there: view it as
  unsigned, `format(value & (2**64 - 1), "016x")`). An optional `0x` prefix is accepted.
- a mixed image-hash list (`curation takedown --image-hashes`): either kind on each line, told apart by its length.

Perceptual matching (`PhashIndex`): an image is blocked when its hash is within Hamming distance `max_distance` of a
listed hash; the nearest listed hash is reported (ties: the smallest value). The lists are small next to the
corpus (up to ~1e5 entries: they are broadcast to every Spark task and indexed once per task). Matching is
vectorised numpy over the whole list: by the pigeonhole split of dedup_image (`pigeonhole_chunks`: two hashes
within distance d share one of d + 1 chunks), each image hash is looked up in d + 1 sorted chunk tables and only
the listed hashes sharing a chunk are compared, about `(d + 1) * n / 2**(64 / (d + 1))` of them (0.1 for 1e5 hashes
at d = 4, one exact lookup at d = 0); where that would be no cheaper than comparing with every listed hash (a small
list, or d >= 9), every listed hash is compared, in row blocks that keep memory under ~16 MB.
"""

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from curation.ops.blocklists import BlocklistError
from curation.ops.imagehash import MAX_DISTANCE_LIMIT, hamming_distances, pigeonhole_chunks

__all__ = [
    "BlocklistError",
    "PhashIndex",
    "format_phash",
    "load_image_hash_list",
    "load_phash_list",
    "load_sha256_list",
    "parse_phash",
    "sha256_matches",
]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PHASH = re.compile(r"(?:0[xX])?([0-9a-fA-F]{16})")
# Elements of one comparison block (rows x listed hashes, or candidate pairs): 2**22 uint64 = 32 MB at most.
_BLOCK_ELEMENTS = 1 << 22
# Lists up to this size are always compared entry by entry (an index costs more than it saves).
_SMALL_LIST = 64


def _entries(path: Path) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BlocklistError(f"cannot read image blocklist {path}: {error}") from error
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            entries.append((number, stripped.split(None, 1)[0]))
    return entries


def parse_phash(text: str) -> int:
    """The unsigned 64-bit value of a 16-hex-digit perceptual hash (ValueError otherwise)."""
    match = _PHASH.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a perceptual hash (16 hex digits)")
    return int(match.group(1), 16)


def format_phash(value: int) -> str:
    """16 lowercase hex digits of a 64-bit hash; a signed value (Spark's long) is read as its unsigned bits."""
    return format(int(value) & ((1 << 64) - 1), "016x")


def load_sha256_list(path: Path) -> frozenset[str]:
    """The lowercase hex digests of a sha256 list file."""
    digests = set()
    for number, entry in _entries(path):
        if not _SHA256.fullmatch(entry):
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a sha256 digest (64 hex digits)")
        digests.add(entry.lower())
    return frozenset(digests)


def load_phash_list(path: Path) -> np.ndarray:
    """The perceptual hashes of a phash list file: sorted, distinct uint64."""
    values = []
    for number, entry in _entries(path):
        try:
            values.append(parse_phash(entry))
        except ValueError:
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a perceptual hash (16 hex digits)") from None
    return np.unique(np.asarray(values, dtype=np.uint64))


def load_image_hash_list(path: Path) -> tuple[frozenset[str], np.ndarray]:
    """(sha256 digests, perceptual hashes) of a file mixing both kinds, told apart by length (64 or 16 hex)."""
    digests, values = set(), []
    for number, entry in _entries(path):
        if _SHA256.fullmatch(entry):
            digests.add(entry.lower())
            continue
        try:
            values.append(parse_phash(entry))
        except ValueError:
            raise BlocklistError(f"{path}:{number}: {entry!r} is neither a sha256 digest (64 hex digits) nor a "
                                 "perceptual hash (16 hex digits)") from None
    return frozenset(digests), np.unique(np.asarray(values, dtype=np.uint64))


def sha256_matches(digests: Sequence[str | None], blocked: frozenset[str]) -> np.ndarray:
    """Which of `digests` (hex, any case; None = no image) are on `blocked` (lowercase, `load_sha256_list`)."""
    if not blocked:
        return np.zeros(len(digests), dtype=bool)
    return np.fromiter((d is not None and d.lower() in blocked for d in digests), dtype=bool, count=len(digests))


class PhashIndex:
    """The listed perceptual hashes, indexed for nearest-within-`max_distance` lookups (module docstring)."""

    def __init__(self, blocked: Iterable[int] | np.ndarray, max_distance: int):
        if not 0 <= int(max_distance) <= MAX_DISTANCE_LIMIT:
            raise ValueError(f"max_distance must be in 0..{MAX_DISTANCE_LIMIT}, got {max_distance}")
        self.max_distance = int(max_distance)
        self.blocked = np.unique(np.asarray(list(blocked) if not isinstance(blocked, np.ndarray) else blocked,
                                            dtype=np.uint64))
        chunks = pigeonhole_chunks(self.max_distance)
        expected_candidates = sum(len(self.blocked) / 2.0 ** width for _, width in chunks)
        self.brute_force = len(self.blocked) <= _SMALL_LIST or expected_candidates * 8 >= len(self.blocked)
        self._tables = []
        if not self.brute_force:
            for offset, width in chunks:
                keys = (self.blocked >> np.uint64(offset)) & np.uint64((1 << width) - 1)
                order = np.argsort(keys, kind="stable")
                self._tables.append((offset, width, keys[order], order))

    def __len__(self) -> int:
        return len(self.blocked)

    def nearest(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance, listed hash) of the nearest listed hash within `max_distance` of each of `hashes` (uint64;
        a signed int64 array is viewed as its bits): distance -1 and hash 0 where none is that near."""
        hashes = np.asarray(hashes)
        if hashes.dtype == np.int64:
            hashes = hashes.view(np.uint64)
        hashes = hashes.astype(np.uint64, copy=False).reshape(-1)
        distance = np.full(len(hashes), -1, dtype=np.int16)
        nearest = np.zeros(len(hashes), dtype=np.uint64)
        if len(self.blocked) == 0 or len(hashes) == 0:
            return distance, nearest
        if self.brute_force:
            block = max(1, _BLOCK_ELEMENTS // len(self.blocked))
            for start in range(0, len(hashes), block):
                part = hashes[start:start + block]
                distances = hamming_distances(part[:, None], self.blocked[None, :])
                best = np.argmin(distances, axis=1)  # first minimum: the smallest listed hash among ties
                best_distance = distances[np.arange(len(part)), best].astype(np.int16)
                within = best_distance <= self.max_distance
                distance[start:start + block] = np.where(within, best_distance, -1)
                nearest[start:start + block] = np.where(within, self.blocked[best], np.uint64(0))
            return distance, nearest
        self._nearest_by_chunks(hashes, distance, nearest)
        return distance, nearest

    def _nearest_by_chunks(self, hashes: np.ndarray, distance: np.ndarray, nearest: np.ndarray) -> None:
        ranges = []
        for offset, width, keys, _ in self._tables:
            values = (hashes >> np.uint64(offset)) & np.uint64((1 << width) - 1)
            ranges.append((np.searchsorted(keys, values, "left"), np.searchsorted(keys, values, "right")))
        per_row = sum(high - low for low, high in ranges)
        # Rows in runs of at most _BLOCK_ELEMENTS candidate pairs (one row with more still forms its own run).
        cumulative = np.cumsum(per_row)
        start = 0
        while start < len(hashes):
            base = cumulative[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(cumulative, base + _BLOCK_ELEMENTS, "right")))
            self._nearest_rows(hashes, ranges, start, stop, distance, nearest)
            start = stop

    def _nearest_rows(self, hashes, ranges, start: int, stop: int, distance, nearest) -> None:
        rows_parts, listed_parts = [], []
        for (low, high), (_, _, _, order) in zip(ranges, self._tables, strict=True):
            counts = (high - low)[start:stop]
            total = int(counts.sum())
            if total == 0:
                continue
            rows = np.repeat(np.arange(start, stop), counts)
            first = np.repeat(low[start:stop], counts)
            within_run = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            rows_parts.append(rows)
            listed_parts.append(order[first + within_run])
        if not rows_parts:
            return
        rows, listed = np.concatenate(rows_parts), np.concatenate(listed_parts)
        distances = hamming_distances(hashes[rows], self.blocked[listed]).astype(np.int16)
        keep = distances <= self.max_distance
        rows, listed, distances = rows[keep], listed[keep], distances[keep]
        if len(rows) == 0:
            return
        # Per row the smallest distance, then the smallest listed index (the list is sorted: the smallest hash).
        order = np.lexsort((listed, distances, rows))
        rows, listed, distances = rows[order], listed[order], distances[order]
        first = np.concatenate(([True], rows[1:] != rows[:-1]))
        distance[rows[first]] = distances[first]
        nearest[rows[first]] = self.blocked[listed[first]]
