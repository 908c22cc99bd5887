"""Embeddings as Spark can carry them: one float16 vector per row packed into a binary value.

The embed stage stores embeddings as parquet fixed-size lists of float16, which Spark cannot read (it has no half
float type). Stages that need embeddings (cluster, semdedup, prune) read those files with pyarrow in Spark tasks and
move each vector as `dim * 2` little-endian bytes: half the size of float32 on every shuffle, and exactly the
stored values.

`EmbedOptions` are the embed stage's model settings, as its record stores them: the embed stage builds its model
from them, and decontaminate and the logo stages rebuild the same model from the record.
"""

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBEDDING_COLUMN = "_embedding"
ENGINES = ("local", "spark")
# `pretrained` value that means random initialisation (tests, benchmarks): YAML null means "the default" here.
RANDOM_INIT = "random"


@dataclass(frozen=True)
class EmbedOptions:
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    num_workers: int = 2
    engine: str = "local"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be positive and num_workers >= 0")

    @classmethod
    def from_options(cls, options: dict) -> "EmbedOptions":
        """From the embed stage's option dict."""
        return cls(**{field.name: options[field.name] for field in fields(cls)})

    @property
    def weights(self) -> str | None:
        return None if self.pretrained == RANDOM_INIT else self.pretrained


def float32_matrix(vectors: np.ndarray, name: str, dimension: int | None = None) -> np.ndarray:
    """`vectors` as a C-contiguous float32 (n, d) array, or a ValueError saying what is wrong with it. Shared by the
    FAISS seam and SemDeDup, which both take embedding matrices from callers."""
    if not isinstance(vectors, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(vectors).__name__}")
    if vectors.dtype != np.float32:
        # Converting here would hide a full-size copy of a possibly huge array from the caller.
        raise ValueError(f"{name} must be float32, got {vectors.dtype}; convert with .astype(np.float32)")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n, d) with d > 0, got {vectors.shape}")
    if dimension is not None and vectors.shape[1] != dimension:
        raise ValueError(f"{name} has dimension {vectors.shape[1]}, expected {dimension}")
    return np.ascontiguousarray(vectors)


def pack(matrix: np.ndarray) -> pa.LargeBinaryArray:
    """Rows of a float16 (n, d) matrix as n large_binary values of d * 2 bytes.

    large_binary has int64 offsets: with binary's int32 ones an array stops at 2 GiB, about 2.1M rows at d = 512,
    which one k-means sample or one SemDeDup cluster can exceed.
    """
    matrix = np.ascontiguousarray(matrix, dtype="<f2")
    rows, dim = matrix.shape
    offsets = np.arange(rows + 1, dtype=np.int64) * dim * 2
    return pa.Array.from_buffers(pa.large_binary(), rows,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())])


def unpack(values: pa.Array | pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """The float32 (n, d) matrix of binary or large_binary values made by `pack` (null values are refused).

    binary stays accepted (a logo bank stores its vectors as binary in parquet); neither type is cast, so a column
    over 2 GiB is read as it is."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.large_binary())
    if values.null_count:
        raise ValueError(f"{values.null_count} embedding(s) are missing")
    if values.type not in (pa.binary(), pa.large_binary()):
        raise ValueError(f"embeddings must be binary or large_binary values, got {values.type}")
    offset_type = np.int64 if values.type == pa.large_binary() else np.int32
    rows = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=offset_type)[values.offset : values.offset + rows + 1]
    lengths = np.diff(offsets)
    width = int(lengths[0]) if rows else (dim or 0) * 2
    if rows and (lengths != width).any():
        raise ValueError("embeddings of different lengths in one column")
    if dim is not None and width != dim * 2:
        raise ValueError(f"embeddings have {width // 2} dimensions, expected {dim}")
    if not rows:
        return np.empty((0, dim or 0), dtype=np.float32)
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("<f2").reshape(rows, width // 2).astype(np.float32)


def read_packed(path: str, column: str = "image_embedding") -> pa.RecordBatch:
    """(uid, EMBEDDING_COLUMN) of one embed-stage output file, `column` packed."""
    table = pq.read_table(path, columns=["uid", column])
    vectors = table.column(column).combine_chunks()
    dim = vectors.type.list_size
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
    return pa.RecordBatch.from_arrays([table.column("uid").combine_chunks(), pack(matrix)],
                                      names=["uid", EMBEDDING_COLUMN])
