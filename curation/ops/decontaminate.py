"""Evaluation-set decontamination, the pure layer: read an evaluation set and hash it, so that the corpus images within
a perceptual-hash Hamming distance of any of its images can be found (numpy / Pillow / pyarrow; no Spark, no torch).

A zero-shot evaluation is only honest if its images were not in the training data. The decontaminate stage drops
every corpus image that is a near duplicate of an evaluation image: within `max_distance` of one by 64-bit DCT
pHash (`curation.ops.imagehash`), and, when an embed stage is upstream, within cosine `min_cosine` by image
embedding (the GPU layer, `curation.gpu.decontaminate`).

Evaluation sets (`iter_eval_images`): `eval_images` is a folder or a single file. Its files are read in sorted
order (hidden and `_` names skipped, as `curation.io.list_files` lists them): image files by extension
(`EVAL_IMAGE_EXTENSIONS`) are one image each; `.parquet` files give one image per row from `eval_image_column`
(binary, or a struct with a `bytes` field, the way Hugging Face `datasets` stores an Image feature); other files
(labels.csv, README) are ignored and counted. So a folder of images, one parquet file, or a folder of parquet
shards all work.

Undecodable evaluation images are an error naming the file (and row), not a skip: an evaluation image that cannot
be hashed cannot be protected, and a silently smaller evaluation set would make the stage's promise false. Fix or
remove the file. An evaluation set without any image is an error too. Decoding is `decode_image`'s (the same web
formats and pixel limit as the corpus), so an evaluation image and its copy in the corpus hash alike.

Matching: the evaluation hashes are indexed once per task (`curation.ops.imagehash.PhashIndex`: exact, by the
pigeonhole split dedup_image shuffles on) and each corpus hash gets the nearest evaluation image within `max_distance`,
ties by the lowest evaluation index. For m = 1e5 evaluation images at d = 4 a corpus image costs about 60
xor-popcounts instead of m, and never more than the m of a brute-force scan (roughly 1e9 per second and core).

Cost of the evaluation set: decoding and hashing it happens once, on the driver, in a thread pool (Pillow releases
the GIL while decoding and resizing): about 5-10 ms per web-sized image and core, i.e. minutes for 1e5 images. The
hashes are broadcast to the workers as 8 bytes per image.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import list_files
from curation.ops.imagehash import MAX_DISTANCE_LIMIT, DecodeFailure, decode_image, perceptual_hash

__all__ = [
    "EVAL_IMAGE_EXTENSIONS",
    "TEST_COSINE",
    "TEST_PHASH",
    "DecontaminateOptions",
    "EvalImage",
    "EvalSet",
    "EvalSetError",
    "hash_eval_set",
    "iter_eval_images",
    "match_detail",
]

EVAL_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".ico")
PARQUET_EXTENSION = ".parquet"
USE_EMBEDDINGS = ("auto", "always", "never")
# The `test` of a ledger detail: which comparison found the evaluation image.
TEST_PHASH = "phash"
TEST_COSINE = "cosine"
# Rows read from an evaluation parquet file at a time (bounds the driver's memory, not the result).
_PARQUET_BATCH_ROWS = 256


class EvalSetError(ValueError):
    """An evaluation set that cannot be used: missing, empty, or holding an image that does not decode."""


@dataclasses.dataclass(frozen=True)
class DecontaminateOptions:
    """The options of the decontaminate stage (`curation.stages.decontaminate`) that its adapter uses, their value
    ranges checked."""

    eval_images: str
    eval_image_column: str = "jpg"
    max_distance: int = 4
    min_cosine: float = 0.95
    use_embeddings: str = "auto"
    image_column: str = "jpg"

    def __post_init__(self):
        if not self.eval_images:
            raise ValueError("decontaminate needs eval_images: a folder of images or a parquet file")
        if not 0 <= int(self.max_distance) <= MAX_DISTANCE_LIMIT:
            raise ValueError(f"max_distance must be in 0..{MAX_DISTANCE_LIMIT}, got {self.max_distance}")
        if not -1.0 <= float(self.min_cosine) <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.use_embeddings not in USE_EMBEDDINGS:
            raise ValueError(f"use_embeddings must be one of {USE_EMBEDDINGS}, got {self.use_embeddings!r}")

    @classmethod
    def from_options(cls, options: dict) -> "DecontaminateOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        given = {name: value for name, value in options.items() if name in names and value is not None}
        if "eval_images" not in given:
            raise ValueError("decontaminate needs eval_images: a folder of images or a parquet file")
        given["eval_images"] = str(given["eval_images"])
        for name, kind in (("max_distance", int), ("min_cosine", float)):
            if name in given:
                given[name] = kind(given[name])
        return cls(**given)


# --------------------------------------------------------------------------------------------------
# Reading an evaluation set


@dataclasses.dataclass(frozen=True)
class EvalImage:
    """One evaluation image: the file it came from (relative to the set's root), its parquet row (None for an image
    file) and its encoded bytes."""

    file: str
    row: int | None
    data: bytes | None

    @property
    def label(self) -> str:
        return self.file if self.row is None else f"{self.file}[row {self.row}]"


def _relative(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _image_values(column: pa.ChunkedArray | pa.Array, name: str, file: str) -> list:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise EvalSetError(f"{file}: column {name!r} is a struct without a 'bytes' field ({column.type})")
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise EvalSetError(f"{file}: column {name!r} holds {column.type}, not encoded image bytes")
    return column.to_pylist()


def _parquet_images(path: Path, label: str, column: str) -> Iterator[EvalImage]:
    try:
        reader = pq.ParquetFile(path)
    except Exception as error:
        raise EvalSetError(f"{label}: not a readable parquet file ({type(error).__name__}: {error})") from error
    if column not in reader.schema_arrow.names:
        raise EvalSetError(f"{label}: no image column {column!r} (eval_image_column); columns are "
                           f"{reader.schema_arrow.names}")
    row = 0
    for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
        for data in _image_values(batch.column(0), column, label):
            yield EvalImage(label, row, data)
            row += 1


def iter_eval_images(source: Path | str, column: str = "jpg") -> Iterator[EvalImage]:
    """The evaluation images of `source` in a fixed order (module docstring); files that are neither images nor
    parquet are skipped (`count_eval_files` counts them)."""
    root = Path(source)
    if not root.exists():
        raise EvalSetError(f"eval_images {root} does not exist")
    for path in list_files(root):
        suffix = path.suffix.lower()
        label = _relative(path, root)
        if suffix == PARQUET_EXTENSION:
            yield from _parquet_images(path, label, column)
        elif suffix in EVAL_IMAGE_EXTENSIONS:
            yield EvalImage(label, None, path.read_bytes())


def count_eval_files(source: Path | str) -> dict[str, int]:
    """How many files of `source` are image files, parquet files, and ignored (neither)."""
    counts = {"image_files": 0, "parquet_files": 0, "ignored_files": 0}
    for path in list_files(Path(source)):
        suffix = path.suffix.lower()
        key = "parquet_files" if suffix == PARQUET_EXTENSION else \
            "image_files" if suffix in EVAL_IMAGE_EXTENSIONS else "ignored_files"
        counts[key] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A hashed evaluation set. ``hashes[i]`` (uint64) is the pHash of image i, which came from ``files[i]`` (row
    ``rows[i]`` of a parquet file, else None). ``fingerprint`` is the sha256 over every image's file, row and bytes
    sha256 in order: it changes exactly when the set's content does."""

    source: str
    files: list[str]
    rows: list[int | None]
    hashes: np.ndarray
    fingerprint: str
    file_counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.hashes)

    def summary(self) -> dict:
        return {"source": self.source, "images": len(self), "fingerprint": self.fingerprint, **self.file_counts}


def _hash_one(image: EvalImage) -> tuple[int, str]:
    decoded = decode_image(image.data)
    if isinstance(decoded, DecodeFailure):
        raise EvalSetError(f"evaluation image {image.label} does not decode ({decoded}); every evaluation image must "
                           "be usable, or it could not be protected: fix or remove it")
    return perceptual_hash(decoded.image), hashlib.sha256(image.data).hexdigest()


def hash_eval_set(source: Path | str, column: str = "jpg", threads: int | None = None) -> EvalSet:
    """Read, decode and pHash every evaluation image of `source` (a thread pool of `threads`, default the CPU
    count; the result does not depend on it). Raises EvalSetError for a missing or empty set or an undecodable
    image."""
    threads = threads or os.cpu_count() or 1
    files, rows, hashes = [], [], []
    fingerprint = hashlib.sha256()
    chunk: list[EvalImage] = []

    def flush(pool) -> None:
        for image, (value, digest) in zip(chunk, pool.map(_hash_one, chunk), strict=True):
            files.append(image.file)
            rows.append(image.row)
            hashes.append(value)
            fingerprint.update(json.dumps([image.file, image.row, digest]).encode() + b"\n")
        chunk.clear()

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for image in iter_eval_images(source, column):
            chunk.append(image)
            if len(chunk) >= 64 * threads:
                flush(pool)
        flush(pool)
    if not hashes:
        raise EvalSetError(f"eval_images {source} holds no evaluation image (image files by extension "
                           f"{', '.join(EVAL_IMAGE_EXTENSIONS)}, or parquet files with a {column!r} column)")
    return EvalSet(str(source), files, rows, np.array(hashes, dtype=np.uint64), fingerprint.hexdigest(),
                   count_eval_files(source))


def match_detail(eval_set_files: list[str], eval_set_rows: list, index: int, test: str, value) -> str:
    """The ledger detail of a row dropped for evaluation image `index`: which image, by which test and value."""
    measure = {"distance": int(value)} if test == TEST_PHASH else {"cosine": round(float(value), 6)}
    return json.dumps({"test": test, "eval_file": eval_set_files[index], "eval_row": eval_set_rows[index],
                       "eval_index": int(index), **measure})
