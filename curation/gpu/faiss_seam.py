"""One seam for FAISS k-means and exact nearest-neighbour search: numpy in, numpy out (DESIGN.md section 5).

Every caller (SemDeDup, density-based pruning, decontamination) goes through these functions, so none of them
branches on the device or touches faiss objects. The CPU path is the reference; the GPU path differs only in
where the flat inner-product index lives (`GpuFlatIndex` overrides one method of `FlatIndex`).

Vectors are treated as directions: every input is L2-normalised here, so an inner product is a cosine
similarity (SemDeDup and density-based pruning, DESIGN.md section 4, are defined on cosine similarity).

GPU selection needs both `faiss.get_num_gpus() > 0` and `faiss.StandardGpuResources`: faiss-cpu reports
`get_num_gpus()` and accepts `Kmeans(gpu=True)`, but then silently runs on the CPU.
"""

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from curation.ops.embeddings import float32_matrix

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
# "random": k distinct training points (faiss's default, as in SemDeDup); "kmeans++": D^2-weighted seeding,
# which far more often gives every well-separated cluster its own centroid (random seeding often puts two
# centroids in one cluster and leaves them there), at the price of k sequential passes over the sample.
INIT_METHODS = ("random", "kmeans++")
# Rows per faiss call in add/search/assign: 65,536 x 512 float32 is 128 MiB of normalised copy per batch.
DEFAULT_BATCH_SIZE = 65_536
GPU_DEVICE_ID = 0


def gpu_faiss_available() -> bool:
    """True when this faiss build can run on a visible GPU (a GPU build and at least one device)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def device_for(requested: str = "auto") -> str:
    """The device faiss work runs on: "cuda" or "cpu". "auto" picks "cuda" when a GPU faiss is usable."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    if gpu_faiss_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError(
            "device 'cuda' requested but faiss cannot use a GPU here "
            f"(faiss {faiss.__version__}: get_num_gpus()={faiss.get_num_gpus()}, "
            f"StandardGpuResources {'present' if hasattr(faiss, 'StandardGpuResources') else 'absent'}); "
            "install the GPU build (FAISS_EXTRA=gpu) on a CUDA machine, or use device 'cpu' or 'auto'"
        )
    return "cpu"


@functools.cache
def _gpu_resources():
    # One StandardGpuResources per process: each instance reserves its own scratch memory on the device.
    return faiss.StandardGpuResources()


@contextlib.contextmanager
def _omp_threads(threads: int) -> Iterator[None]:
    # faiss's OpenMP thread count is process-global: set it for this call only, then restore the caller's.
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    """A normalised copy of float32 rows; rows that are non-finite or zero cannot be directions, so they raise."""
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} contains {int((norms == 0).sum())} all-zero row(s), which have no direction")
    return (vectors / norms).astype(np.float32, copy=False)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class FlatIndex:
    """Exact inner-product index over L2-normalised vectors (faiss IndexFlatIP): the CPU reference."""

    device = "cpu"

    def __init__(self, dimension: int, *, batch_size: int = DEFAULT_BATCH_SIZE):
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        self.dimension = dimension
        self.batch_size = batch_size
        self.faiss_index = self._new_faiss_index(dimension)

    def _new_faiss_index(self, dimension: int):
        return faiss.IndexFlatIP(dimension)

    @property
    def size(self) -> int:
        """Number of vectors added so far."""
        return self.faiss_index.ntotal

    def add(self, vectors: np.ndarray) -> None:
        """Append normalised copies of `vectors`; their ids continue from `size` in row order."""
        vectors = float32_matrix(vectors, "vectors", self.dimension)
        for rows in _batches(len(vectors), self.batch_size):
            self.faiss_index.add(_unit_rows(vectors[rows], "vectors"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities float32 (nq, k), ids int64 (nq, k)) of the k nearest indexed vectors, best first.

        Among equal similarities the order of ids is whatever faiss returns.
        """
        queries = float32_matrix(queries, "queries", self.dimension)
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be between 1 and the index size {self.size}, got {k}")
        similarities = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for rows in _batches(len(queries), self.batch_size):
            similarities[rows], ids[rows] = self.faiss_index.search(_unit_rows(queries[rows], "queries"), k)
        return similarities, ids


class GpuFlatIndex(FlatIndex):
    """The same exact index held on the GPU (faiss GpuIndexFlatIP)."""

    device = "cuda"

    def _new_faiss_index(self, dimension: int):
        config = faiss.GpuIndexFlatConfig()
        config.device = GPU_DEVICE_ID
        return faiss.GpuIndexFlatIP(_gpu_resources(), dimension, config)


def flat_index(dimension: int, *, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE) -> FlatIndex:
    """An empty exact inner-product index on the resolved device; callers never pick the class themselves."""
    index_class = GpuFlatIndex if device_for(device) == "cuda" else FlatIndex
    return index_class(dimension, batch_size=batch_size)


@dataclass(frozen=True)
class KMeansResult:
    """Spherical k-means output plus what is needed to reproduce and audit it.

    objective[i] is faiss's objective after iteration i: for the inner-product index used by spherical
    k-means, the sum over the training sample of the cosine similarity to the assigned centroid (higher is
    better). faiss may stop before the requested iterations once the objective stops improving, so
    `iterations` is the number actually run. sample_size is the number of points faiss trained on:
    min(n, k * max_points_per_centroid).
    """

    centroids: np.ndarray
    iterations: int
    objective: tuple[float, ...]
    device: str
    max_points_per_centroid: int
    sample_size: int
    seed: int
    init: str


def spherical_kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    max_points_per_centroid: int,
    threads: int = 1,
    device: str = "auto",
    init: str = "random",
) -> KMeansResult:
    """Spherical k-means of the L2-normalised rows of `vectors` (float32, (n, d)); centroids are unit vectors.

    Used by SemDeDup and density-based pruning (DESIGN.md section 4). faiss trains on a seeded random subsample
    of k * max_points_per_centroid points when n is larger, so the caller must choose that bound (faiss's
    default of 256 is applied silently otherwise). With the same input, seed and threads the CPU result is
    bit-identical across runs; `threads` also bounds faiss's OpenMP threads, which Spark executors share.
    """
    vectors = float32_matrix(vectors, "vectors")
    n, dimension = vectors.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of vectors {n}, got {k}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    unit_vectors = _unit_rows(vectors, "vectors")

    parameters = faiss.ClusteringParameters()
    parameters.niter = iterations
    parameters.seed = seed
    parameters.spherical = True
    parameters.max_points_per_centroid = max_points_per_centroid
    if init == "kmeans++":
        if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            raise RuntimeError(f"faiss {faiss.__version__} has no k-means++ seeding; use init='random'")
        parameters.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    clustering = faiss.Clustering(dimension, k, parameters)
    index = flat_index(dimension, device=device)
    sample_size = min(n, k * max_points_per_centroid)
    logger.info(
        "spherical k-means: %d points (training on %d), d=%d, k=%d, up to %d iterations, %s seeding, device %s",
        n,
        sample_size,
        dimension,
        k,
        iterations,
        init,
        index.device,
    )
    with _omp_threads(threads):
        clustering.train(unit_vectors, index.faiss_index)

    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, dimension)
    stats = clustering.iteration_stats
    objective = tuple(float(stats.at(i).obj) for i in range(stats.size()))
    return KMeansResult(
        # faiss normalises spherical centroids each iteration; normalising again pins the float32 unit norm.
        centroids=_unit_rows(centroids, "centroids"),
        iterations=len(objective),
        objective=objective,
        device=index.device,
        max_points_per_centroid=max_points_per_centroid,
        sample_size=sample_size,
        seed=seed,
        init=init,
    )


def assign(
    vectors: np.ndarray, centroids: np.ndarray, *, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id int64 (n,), cosine similarity to that centroid float32 (n,)) of each row of `vectors`.

    The nearest centroid by inner product of normalised vectors; rows are processed `batch_size` at a time so
    memory stays bounded by the batch, not by n. faiss's similarities depend in their last bits on how many rows
    share a call, so the returned similarity is recomputed row by row (`row_cosines`): the same row gets the same
    bits however a caller batches it (Spark's Arrow batches follow the partitioning).
    """
    centroids = float32_matrix(centroids, "centroids")
    index = flat_index(centroids.shape[1], device=device, batch_size=batch_size)
    index.add(centroids)
    vectors = float32_matrix(vectors, "vectors", index.dimension)
    _, ids = index.search(vectors, 1)
    return ids[:, 0], row_cosines(vectors, centroids[ids[:, 0]])


def row_cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """cos(left[i], right[i]) per row as float32, computed in float64 row by row (no BLAS blocking), so that a
    row's value does not depend on the other rows of the call."""
    left64 = left.astype(np.float64)
    right64 = right.astype(np.float64)
    dots = np.einsum("ij,ij->i", left64, right64)
    norms = np.sqrt(np.einsum("ij,ij->i", left64, left64) * np.einsum("ij,ij->i", right64, right64))
    return (dots / norms).astype(np.float32)


def search(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `database` for each query by cosine similarity: (similarities float32 (nq, k),
    database row ids int64 (nq, k)), best first."""
    database = float32_matrix(database, "database")
    index = flat_index(database.shape[1], device=device, batch_size=batch_size)
    index.add(database)
    return index.search(queries, k)
