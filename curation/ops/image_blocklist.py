"""Image blocklists: the sha256 digests and 64-bit perceptual hashes of images that must never be published
(a data owner's request, known abuse material hash lists, images taken down from an earlier release).

File format (as the domain and URL blocklists, `curation.ops.blocklists`): UTF-8 text, one entry a line; blank lines
and lines starting with '#' are ignored, and anything after the first whitespace of a line is a comment
(`<hash>  <note>`, as `sha256sum` writes its output).

- sha256 list: the 64 hex digits of sha256 over the image bytes exactly as stored (the published `.jpg`, the
  download stage's tar member, the rows' image-bytes column) or over the original file as served (the download
  stage's `image_source_sha256`, before resizing and re-encoding: what a data owner can hash); upper or lower case.
  block_images and takedown match a listed digest against both where the rows carry `image_source_sha256`.
- perceptual-hash list: 16 hex digits, the 64-bit DCT pHash of `curation.ops.imagehash.perceptual_hash` (which is
  `imagehash.phash`'s value), the same bits dedup_image stores in `image_phash` (a signed long there: view it as
  unsigned, `format(value & (2**64 - 1), "016x")`). An optional `0x` prefix is accepted.
- a mixed image-hash list (`curation takedown --image-hashes`): either kind on each line, told apart by its length.

Perceptual matching (`curation.ops.imagehash.PhashIndex` over the sorted, distinct hashes of `load_phash_list` or
`load_image_hash_list`): an image is blocked when its hash is within Hamming distance `max_distance` of a listed hash;
the nearest listed hash is reported (ties: the lowest index, i.e. the smallest value). The lists are small next to the
corpus (up to ~1e5 entries: they are broadcast to every Spark task and indexed once per task); the index compares an
image with the listed hashes sharing a pigeonhole chunk with it, about `(d + 1) * n / 2**(64 / (d + 1))` of them (0.1
for 1e5 hashes at d = 4, one exact lookup at d = 0), or with every listed hash where that is cheaper (a small list, or
d >= 8).
"""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from curation.ops.blocklists import BlocklistError

__all__ = [
    "BlocklistError",
    "format_phash",
    "load_image_hash_list",
    "load_phash_list",
    "load_sha256_list",
    "parse_phash",
    "sha256_matches",
]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PHASH = re.compile(r"(?:0[xX])?([0-9a-fA-F]{16})")


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
