"""Model-free image dedup primitives: sha256 of the bytes, safe decoding, DCT pHash, pigeonhole keys,
and the nearest hash of a fixed list.

DESIGN.md section 4 "Image dedup": exact duplicates share the sha256 of their image bytes; near
duplicates have 64-bit perceptual hashes within Hamming distance d. This module is the pure layer
(numpy / Pillow, no Spark). Pairs among the corpus's own hashes are found by the block-subset tables of
`curation.ops.phash_neighbors`; the pigeonhole split of the hash into d + 1 chunks
(`pigeonhole_chunks`) indexes a fixed list of hashes in memory (`PhashIndex`) for the stages that
compare every image with one list: decontaminate (the evaluation set), block_images and takedown
(image blocklists).

Perceptual hash: the DCT pHash of Zauner (2010) / hackerfactor "Looks Like It" (2011), exactly as
``imagehash.phash`` (ImageHash 4.3) computes it:

1. grayscale with Pillow's ``convert("L")`` (ITU-R 601-2 luma, after `decode_image`'s mode
   normalisation; see `to_hashable`);
2. resize to 32x32 with ``Image.Resampling.LANCZOS`` (imagehash's ``ANTIALIAS``);
3. 2-D DCT-II, unnormalised like ``scipy.fftpack.dct`` (``y[k] = 2 * sum_n x[n] cos(pi k (2n + 1) / 64)``),
   computed as ``C @ X @ C.T`` with a precomputed 32x32 matrix ``C``;
4. keep the top-left 8x8 block (lowest frequencies, DC term included);
5. bit = coefficient > median of all 64 coefficients of that block (DC included, nothing excluded;
   the median of an even count is the mean of the two middle values, as ``np.median``);
6. bits in row-major order of the block, coefficient (0, 0) as the most significant bit, so that the
   integer equals ``int(str(imagehash.phash(image)), 16)``.

One deliberate difference: coefficients are rounded to 6 decimals before the median comparison.
Coefficients that are mathematically equal (all AC terms of a flat image are exactly 0) otherwise
differ by floating-point noise (~1e-12) that depends on summation order (BLAS kernel, FMA, FFT),
which would make such hashes random and machine-dependent; one grey level at one pixel moves a
coefficient by up to 4, so the rounding changes nothing else. A flat image hashes to ``1 << 63``
(only the DC bit set) or 0 (black).
"""

import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from curation.schema import MAX_PHASH_DISTANCE

__all__ = [
    "DECODABLE_FORMATS",
    "HASH_BITS",
    "MAX_DISTANCE_LIMIT",
    "NO_MATCH",
    "PIL_DEFAULT_MAX_PIXELS",
    "DecodeFailure",
    "DecodedImage",
    "PhashIndex",
    "contiguous_blocks",
    "decode_image",
    "hamming_distances",
    "image_sha256",
    "perceptual_hash",
    "perceptual_hashes",
    "pigeonhole_chunks",
    "to_hashable",
]

logger = logging.getLogger(__name__)

HASH_BITS = 64
PIL_DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about 0.25 GiB of 24-bit pixels)."""

DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO")
"""Formats `decode_image` lets Pillow try: the web's image formats. Others are refused on purpose:
EPS is rendered by running Ghostscript on the untrusted bytes, and the scientific/legacy formats
(FITS, PSD, SPIDER, ...) are attack surface no web image needs. Pillow skips names it lacks (AVIF)."""

_THUMBNAIL_SIDE = 32
_BLOCK_SIDE = 8
_RESIZE_FILTER = Image.Resampling.LANCZOS
_COEFFICIENT_DECIMALS = 6
_WHITE = (255, 255, 255, 255)
# 16-bit samples map to 8 bits by value / 257 (65535 -> 255), the inverse of the usual 8-to-16-bit
# widening v * 257, so a 16-bit copy of an 8-bit image hashes like the original. "I" is included
# because that is how older Pillow versions and some TIFF files present 16-bit grayscale.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

MAX_DISTANCE_LIMIT = MAX_PHASH_DISTANCE


def _dct_matrix(size: int) -> np.ndarray:
    """Unnormalised DCT-II matrix: ``C[k, n] = 2 cos(pi k (2n + 1) / (2 size))`` (scipy.fftpack's type 2)."""
    frequencies = np.arange(size, dtype=np.float64)[:, None]
    samples = np.arange(size, dtype=np.float64)[None, :]
    return 2.0 * np.cos(np.pi * frequencies * (2.0 * samples + 1.0) / (2.0 * size))


_DCT = _dct_matrix(_THUMBNAIL_SIDE)
# Only the 8 lowest frequencies are kept, so only those rows of C are needed:
# (C @ X @ C.T)[:8, :8] == C[:8] @ X @ C[:8].T.
_DCT_LOW = np.ascontiguousarray(_DCT[:_BLOCK_SIDE])


# --------------------------------------------------------------------------------------------------
# Exact hash and decoding


def image_sha256(data: bytes) -> str:
    """Lowercase hex sha256 of the image bytes exactly as downloaded (the exact-duplicate key)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: its first frame, upright (EXIF orientation applied), mode "L" or "RGB".

    ``width`` and ``height`` are those of ``image``; ``format`` is Pillow's name for the encoding
    (``"JPEG"``, ``"PNG"``, ...) and ``source_mode`` the mode it was decoded in (``"CMYK"``, ``"P"``, ...).
    """

    image: Image.Image
    width: int
    height: int
    format: str
    source_mode: str


@dataclass(frozen=True)
class DecodeFailure:
    """Why bytes gave no image. ``reason`` is a stable code for ledgers, ``detail`` is for people.

    Reasons: ``missing`` (null), ``empty`` (zero bytes), ``not_an_image`` (no supported format
    recognised it, or its header could not be parsed), ``decompression_bomb`` (more pixels than
    allowed, refused before decoding), ``corrupt`` (the decoder failed: truncated or malformed data).
    """

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def decode_image(data: bytes | None, max_pixels: int = PIL_DEFAULT_MAX_PIXELS) -> DecodedImage | DecodeFailure:
    """Decode untrusted bytes into a `DecodedImage`, or say why not; never raises for bad data.

    The pixel limit is ``min(max_pixels, Image.MAX_IMAGE_PIXELS)`` (Pillow's limit always holds) and is
    checked on the header's size before any pixel is decoded, so a bomb costs no memory (Pillow still
    emits its ``DecompressionBombWarning`` when opening one of 1-2x its limit and refuses larger ones
    itself). Only the first frame of an animated image is decoded. Truncated data is refused (Pillow's
    ``LOAD_TRUNCATED_IMAGES`` is not touched). Modes are normalised by `to_hashable`.
    """
    if data is None:
        return DecodeFailure("missing", "no image bytes (null)")
    if len(data) == 0:
        return DecodeFailure("empty", "zero bytes")
    pixel_limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        with Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS) as opened:
            width, height = opened.size
            if width * height > pixel_limit:
                return DecodeFailure(
                    "decompression_bomb", f"{width}x{height} = {width * height} pixels > limit {pixel_limit}"
                )
            source_format, source_mode = opened.format or "unknown", opened.mode
            # Opening leaves the reader on frame 0; loading it is what decodes pixels.
            opened.load()
            # Both steps return new images, so closing `opened` does not invalidate the result.
            image = to_hashable(ImageOps.exif_transpose(opened))
    except UnidentifiedImageError:
        return DecodeFailure("not_an_image", f"no supported format recognised {len(data)} bytes")
    except Image.DecompressionBombError as error:
        return DecodeFailure("decompression_bomb", str(error))
    # Decoders of third-party formats raise whatever their parser hits on malformed input
    # (OSError for truncation, SyntaxError, ValueError, struct.error, EOFError, MemoryError, ...);
    # any of them means these bytes are not a usable image, never a reason to fail the batch.
    except Exception as error:
        return DecodeFailure("corrupt", f"{type(error).__name__}: {error}")
    return DecodedImage(image, image.width, image.height, source_format, source_mode)


def to_hashable(image: Image.Image) -> Image.Image:
    """The image as mode "L" or "RGB", so that Pillow's ``convert("L")`` gives a faithful grayscale.

    - transparency (RGBA, LA, PA, and P or L/RGB with a ``transparency`` key) is composited over
      white: the colour under fully transparent pixels is arbitrary, and a logo saved with alpha
      should hash like the same logo flattened onto a white page;
    - 16-bit grayscale (``I;16*``, ``I``) is scaled by 1/257, because Pillow's own conversion
      clips every value above 255 to white;
    - "1" and "L" become "L"; every other mode (P, CMYK, YCbCr, LAB, HSV, RGBX, F) becomes "RGB"
      through Pillow's conversion (CMYK without an ICC profile, as Pillow does it).
    """
    mode = image.mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(np.clip(samples, 0, 65535) / 257.0).astype(np.uint8), mode="L")
    if mode == "L":
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "RGB":
        return image
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Perceptual hash


def _grayscale_thumbnail(image: Image.Image) -> np.ndarray:
    """Steps 1-2 of the module docstring: 32x32 float64 luma pixels."""
    small = image.convert("L").resize((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), _RESIZE_FILTER)
    return np.asarray(small, dtype=np.float64)


def _hash_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """Steps 3-6 of the module docstring for a stack of shape (n, 32, 32); returns uint64 (n,)."""
    coefficients = np.round(_DCT_LOW @ thumbnails @ _DCT_LOW.T, _COEFFICIENT_DECIMALS)
    flat = coefficients.reshape(len(thumbnails), _BLOCK_SIDE * _BLOCK_SIDE)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    # packbits is big-endian within each byte and the bytes are read as a big-endian uint64, so
    # bit 0 of the row-major block (the DC coefficient) becomes the most significant bit.
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT pHash (module docstring) of a Pillow image, as an unsigned int in [0, 2**64).

    The image is first normalised by `to_hashable` (a no-op for "L" and "RGB"; `decode_image`
    output already is), so for opaque 8-bit images this equals ``imagehash.phash``.
    """
    thumbnail = _grayscale_thumbnail(to_hashable(image))
    return int(_hash_thumbnails(thumbnail[None])[0])


def perceptual_hashes(
    images: Iterable[bytes | None], max_pixels: int = PIL_DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[DecodeFailure | None]]:
    """pHash a batch of encoded images, e.g. an Arrow binary column's ``to_pylist()`` (bytes or None).

    Returns ``(hashes, failures)``: ``hashes`` is uint64 of the batch's length; ``failures[i]`` is
    None when image i was hashed, else its `DecodeFailure` (``.reason`` for the ledger) and
    ``hashes[i]`` is 0, which is also a valid hash: always check ``failures``.
    """
    failures: list[DecodeFailure | None] = []
    thumbnails: list[np.ndarray] = []
    for data in images:
        decoded = decode_image(data, max_pixels=max_pixels)
        if isinstance(decoded, DecodeFailure):
            failures.append(decoded)
            thumbnails.append(np.zeros((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE)))
        else:
            failures.append(None)
            thumbnails.append(_grayscale_thumbnail(decoded.image))
    if not thumbnails:
        return np.zeros(0, dtype=np.uint64), failures
    hashes = _hash_thumbnails(np.stack(thumbnails))
    failed = np.fromiter((failure is not None for failure in failures), dtype=bool, count=len(failures))
    hashes[failed] = 0
    if failed.any():
        logger.debug("perceptual_hashes: %d of %d images not decoded", int(failed.sum()), len(failures))
    return hashes, failures


# --------------------------------------------------------------------------------------------------
# Hamming distance


_BYTE_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _popcount_by_bytes(values: np.ndarray) -> np.ndarray:
    """Bits set in each uint64, by a 256-entry byte table (numpy < 2.0 has no bitwise_count)."""
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8).reshape(*values.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


_popcount = getattr(np, "bitwise_count", _popcount_by_bytes)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes, element-wise with numpy broadcasting.

    ``hamming_distances(x, y)`` compares pairs; ``hamming_distances(x[:, None], y[None, :])`` gives the
    full matrix. Returns uint8 values in 0..64.
    """
    return _popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# --------------------------------------------------------------------------------------------------
# Pigeonhole candidates


def _check_max_distance(max_distance: int) -> None:
    if not 0 <= max_distance <= MAX_DISTANCE_LIMIT:
        raise ValueError(f"max_distance must be in 0..{MAX_DISTANCE_LIMIT}, got {max_distance}")


def pigeonhole_chunks(max_distance: int) -> list[tuple[int, int]]:
    """Split the 64 hash bits into ``max_distance + 1`` contiguous chunks, as ``(bit_offset, width)``.

    Chunk i holds bits ``bit_offset .. bit_offset + width - 1`` counted from the least significant bit,
    i.e. its value is ``(hash >> bit_offset) & (2**width - 1)``; chunk 0 starts at bit 0. Widths differ
    by at most one (the first ``64 % (d + 1)`` chunks are one bit wider).

    Pigeonhole guarantee: two hashes within Hamming distance d differ in at most d bits, and those
    bits fall into at most d of the d + 1 chunks, so at least one chunk is identical in both.
    """
    _check_max_distance(max_distance)
    return contiguous_blocks(max_distance + 1)


def contiguous_blocks(block_count: int) -> list[tuple[int, int]]:
    """The 64 bits as `block_count` contiguous blocks ``(bit_offset, width)`` from the least significant bit;
    widths differ by at most one, the first ``64 % block_count`` blocks are one bit wider."""
    if not 1 <= block_count <= HASH_BITS:
        raise ValueError(f"block_count must be in 1..{HASH_BITS}, got {block_count}")
    narrow, wider = divmod(HASH_BITS, block_count)
    blocks, offset = [], 0
    for index in range(block_count):
        width = narrow + (index < wider)
        blocks.append((offset, width))
        offset += width
    return blocks


# --------------------------------------------------------------------------------------------------
# Nearest hash of a fixed list


NO_MATCH = -1
"""`PhashIndex.nearest`'s index and distance for a query with no indexed hash within max_distance."""
# Pairs compared per step of `PhashIndex.nearest`, whichever path: 4M pairs are 32 MiB of uint64 xor.
_PAIRS_PER_STEP = 1 << 22
# Up to this many hashes an index costs more than it saves: every query is compared with all of them.
_SMALL_INDEX = 64
# A candidate pair found through the chunk tables costs about this many pairs of a full scan (searchsorted,
# np.repeat and gathers per pair; measured 20-27 with numpy 2.4 for 1e4-1e5 hashes), so the tables only pay
# where they cut the compared pairs by more: for random hashes up to d = 7, whatever the list size.
_CANDIDATE_COST = 24


def _hash_bits(values) -> np.ndarray:
    """Hashes as contiguous 1-D uint64; signed int64 (a Spark long such as dedup_image's ``image_phash``)
    is read as its bits."""
    array = np.asarray(values).reshape(-1)
    if array.dtype == np.int64:
        array = array.view(np.uint64)
    return np.ascontiguousarray(array, dtype=np.uint64)


def _chunk_values(hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
    return (hashes >> np.uint64(offset)) & np.uint64((1 << width) - 1)


class PhashIndex:
    """A fixed list of 64-bit hashes (an evaluation set, a blocklist), indexed for exact nearest-within-
    ``max_distance`` lookups (`nearest`).

    The pigeonhole split of `pigeonhole_chunks`: a query within distance d of a listed hash equals it in at
    least one of the d + 1 chunks of `pigeonhole_chunks`. Each chunk's listed values are sorted once; a
    query looks up its d + 1 chunk values (``np.searchsorted``) and is compared bit by bit with the listed
    hashes found there only, so the answer is exact. With evenly spread bits a chunk of w = 64 / (d + 1)
    bits matches m / 2**w of m listed hashes by chance (m = 1e5, d = 4: about 60 candidates per query
    against 1e5 for a full scan). The index is d + 1 sorted arrays of m values, built in milliseconds.

    Comparing with every listed hash is used instead where it is cheaper: for a small list, for d >= 8
    (chunks too narrow to filter: see `_CANDIDATE_COST`), and for a query whose candidates would cost more
    than the m comparisons (pHash bits are not perfectly even: flat and near-flat images share hashes and
    crowd their chunks), so a query never costs much more than a full scan. Either path compares in steps
    of about `_PAIRS_PER_STEP` pairs, so the comparisons' memory is bounded whatever the list size; the
    lookup's own bookkeeping is 2 (d + 1) int64 per query.
    """

    def __init__(self, hashes, max_distance: int):
        """`hashes`: uint64 values, or signed int64 read as their bits (an array or a sequence of ints)."""
        self.hashes = _hash_bits(hashes)
        self.max_distance = int(max_distance)
        self.chunks = pigeonhole_chunks(self.max_distance)  # raises ValueError outside 0..MAX_DISTANCE_LIMIT
        expected_candidates = sum(len(self.hashes) / 2.0**width for _, width in self.chunks)
        self.brute_force = (len(self.hashes) <= _SMALL_INDEX
                            or expected_candidates * _CANDIDATE_COST >= len(self.hashes))
        self._order: list[np.ndarray] = []
        self._sorted: list[np.ndarray] = []
        if not self.brute_force:
            for offset, width in self.chunks:
                values = _chunk_values(self.hashes, offset, width)
                order = np.argsort(values, kind="stable")
                self._order.append(order)
                self._sorted.append(values[order])

    def __len__(self) -> int:
        return len(self.hashes)

    def nearest(self, queries) -> tuple[np.ndarray, np.ndarray]:
        """(index into ``hashes`` of the nearest listed hash within max_distance of each query, its distance),
        both int64 of len(queries), NO_MATCH (-1) in both where none is that near. Among listed hashes at
        the same distance the lowest index wins. Queries are read as the constructor's `hashes`."""
        queries = _hash_bits(queries)
        best_index = np.full(len(queries), NO_MATCH, dtype=np.int64)
        best_distance = np.full(len(queries), NO_MATCH, dtype=np.int64)
        if not len(queries) or not len(self.hashes):
            return best_index, best_distance
        if self.brute_force:
            self._scan(queries, np.arange(len(queries)), best_index, best_distance)
            return best_index, best_distance
        lows = np.empty((len(self.chunks), len(queries)), dtype=np.int64)
        highs = np.empty_like(lows)
        for c, (offset, width) in enumerate(self.chunks):
            values = _chunk_values(queries, offset, width)
            lows[c] = np.searchsorted(self._sorted[c], values, side="left")
            highs[c] = np.searchsorted(self._sorted[c], values, side="right")
        candidates = (highs - lows).sum(axis=0)
        crowded = candidates * _CANDIDATE_COST >= len(self.hashes)
        self._scan(queries, np.flatnonzero(crowded), best_index, best_distance)
        looked_up = np.flatnonzero(~crowded)
        if len(looked_up):
            # Groups of consecutive queries with about _PAIRS_PER_STEP candidates in all (one query at least).
            group = (np.cumsum(candidates[looked_up]) - 1) // _PAIRS_PER_STEP
            for rows in np.split(looked_up, np.flatnonzero(np.diff(group)) + 1):
                best_index[rows], best_distance[rows] = self._lookup(queries[rows], lows[:, rows], highs[:, rows])
        return best_index, best_distance

    def _scan(self, queries: np.ndarray, rows: np.ndarray, best_index: np.ndarray, best_distance: np.ndarray) -> None:
        """Compare queries[rows] with every listed hash, in steps of about _PAIRS_PER_STEP pairs."""
        step = max(1, _PAIRS_PER_STEP // len(self.hashes))
        for first in range(0, len(rows), step):
            part = rows[first : first + step]
            distances = hamming_distances(queries[part][:, None], self.hashes[None, :])
            nearest = distances.argmin(axis=1).astype(np.int64)  # the first (lowest) index among equal distances
            found = distances[np.arange(len(part)), nearest].astype(np.int64)
            within = found <= self.max_distance
            best_index[part[within]] = nearest[within]
            best_distance[part[within]] = found[within]

    def _lookup(self, queries: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best_index = np.full(len(queries), NO_MATCH, dtype=np.int64)
        best_distance = np.full(len(queries), NO_MATCH, dtype=np.int64)
        query_rows, listed_rows = [], []
        for c in range(len(self.chunks)):
            counts = highs[c] - lows[c]
            total = int(counts.sum())
            if not total:
                continue
            # Position j of query r's run of equal chunk values is lows[c, r] + (j - where r's run starts).
            run_starts = np.repeat(np.cumsum(counts) - counts, counts)
            positions = np.repeat(lows[c], counts) + (np.arange(total) - run_starts)
            query_rows.append(np.repeat(np.arange(len(queries)), counts))
            listed_rows.append(self._order[c][positions])
        if not query_rows:
            return best_index, best_distance
        query_row = np.concatenate(query_rows)
        listed_row = np.concatenate(listed_rows).astype(np.int64)
        distances = hamming_distances(queries[query_row], self.hashes[listed_row]).astype(np.int64)
        within = distances <= self.max_distance
        if within.any():
            # One int64 key per pair, smallest = nearest, then lowest listed index: distance * m + index.
            size = len(self.hashes)
            keys = distances[within] * size + listed_row[within]
            best = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(best, query_row[within], keys)
            matched = best != np.iinfo(np.int64).max
            best_distance[matched], best_index[matched] = np.divmod(best[matched], size)
        return best_index, best_distance
