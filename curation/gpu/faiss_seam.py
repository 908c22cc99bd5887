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
import math
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

    A two-level fit (`coarse` set, see `two_level_spherical_kmeans`) trains on every row at both levels:
    `objective[0]` is then the sum over the rows of the cosine similarity to the fine centroid each was fit
    with (to its nearest centroid for the few rows of a coarse cluster given no fine centroid), and one entry
    follows per refinement pass: its sum over the rows before it moved the centroids. `iterations` is the most
    any fine fit ran; `max_points_per_centroid` is the largest ceil(n_j / k_j); `coarse_of[i]` is the coarse
    cluster fine centroid i was fit in (and whose list `two_level_assign` finds it in); `refine_passes` and
    `refine_probes` say how the fine centroids were then moved together.
    """

    centroids: np.ndarray
    iterations: int
    objective: tuple[float, ...]
    device: str
    max_points_per_centroid: int
    sample_size: int
    seed: int
    init: str
    coarse: "KMeansResult | None" = None
    coarse_of: np.ndarray | None = None
    refine_passes: int = 0
    refine_probes: int = 0

    @property
    def levels(self) -> int:
        """1 for a flat fit, 2 for a two-level one."""
        return 1 if self.coarse is None else 2


# Above this k, `fit_spherical_kmeans` fits two levels. A flat fit costs k * n * d multiply-adds per iteration
# with n >= 39 k (faiss's floor): at k = 4096 on the default 500,000-row sample 1e12, about a minute per
# iteration on 2 CPU cores (bench/results/kmeans.json: 1.9e10 multiply-adds/s), and it grows as k^2 once the
# sample grows with k: at k = 1e5 over 3.9e6 rows 2e14 per iteration, 57 hours per 20-iteration fit on those
# cores (minutes on an H100). Two levels with their refinement cost 2.6e13 in all at k = 1e5, 150x less. The
# rule is by k alone so that the fit does not depend on the machine it ran on. Not a stage option: the stage
# config (and so the manifest) would gain a key.
FLAT_KMEANS_MAX_K = 4096
# Lloyd passes over all k centroids after the two levels, each row assigned through its 16 nearest coarse
# clusters: at k = 5,000 (71 coarse clusters, hierarchy-free synthetic data) 4 passes take the held-out mean
# cosine from 4.4% below the flat fit's with 8 probes to 1.9% below with 16 (bench/results/kmeans.md), for about
# the cost of the 20 fit iterations.
REFINE_PASSES = 4
REFINE_PROBES = 16
# faiss's own floor: with fewer training points per centroid it warns that the fit is unreliable.
MIN_POINTS_PER_CENTROID = 39


def _validated_kmeans_input(
    vectors: np.ndarray, k: int, iterations: int, max_points_per_centroid: int, init: str
) -> np.ndarray:
    """`vectors` as a checked float32 matrix, after checking the k-means parameters against it."""
    vectors = float32_matrix(vectors, "vectors")
    n = len(vectors)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of vectors {n}, got {k}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    return vectors


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
    vectors = _validated_kmeans_input(vectors, k, iterations, max_points_per_centroid, init)
    logger.info(
        "spherical k-means: %d points (training on %d), d=%d, k=%d, up to %d iterations, %s seeding, device %s",
        len(vectors),
        min(len(vectors), k * max_points_per_centroid),
        vectors.shape[1],
        k,
        iterations,
        init,
        device_for(device),
    )
    return _fit_unit_rows(
        _unit_rows(vectors, "vectors"), k, iterations=iterations, seed=seed,
        max_points_per_centroid=max_points_per_centroid, threads=threads, device=device, init=init,
    )


def _fit_unit_rows(
    unit_vectors: np.ndarray,
    k: int,
    *,
    iterations: int,
    seed: int,
    max_points_per_centroid: int,
    threads: int,
    device: str,
    init: str,
) -> KMeansResult:
    """The flat faiss fit of already checked and normalised rows."""
    n, dimension = unit_vectors.shape
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


def fit_spherical_kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    threads: int = 1,
    device: str = "auto",
    init: str = "random",
) -> KMeansResult:
    """Spherical k-means trained on every row of `vectors`: flat up to k = FLAT_KMEANS_MAX_K (the same fit as
    `spherical_kmeans` with max_points_per_centroid = ceil(n / k)), two-level above it."""
    vectors = float32_matrix(vectors, "vectors")
    n = len(vectors)
    if 1 <= k and n < MIN_POINTS_PER_CENTROID * k:
        logger.warning(
            "k-means: %d rows for k = %d is fewer than the %d per centroid faiss asks for (%d rows): "
            "centroids rest on few points each",
            n, k, MIN_POINTS_PER_CENTROID, MIN_POINTS_PER_CENTROID * k,
        )
    if k > FLAT_KMEANS_MAX_K:
        return two_level_spherical_kmeans(
            vectors, k, iterations=iterations, seed=seed, threads=threads, device=device, init=init
        )
    return spherical_kmeans(
        vectors, k, iterations=iterations, seed=seed, max_points_per_centroid=math.ceil(n / max(k, 1)),
        threads=threads, device=device, init=init,
    )


def coarse_k_for(k: int) -> int:
    """The number of coarse clusters of a two-level fit of k centroids: ceil(sqrt(k)), which minimises the
    per-iteration cost n * d * (k1 + k / k1)."""
    return math.isqrt(k - 1) + 1 if k > 1 else 1


def allocate_fine_k(coarse_sizes: np.ndarray, k: int) -> np.ndarray:
    """k_j, the fine centroids of each coarse cluster: in proportion to its rows n_j by largest remainder
    (Hamilton's rule; equal remainders go to the lower j), so sum k_j = k, and k_j <= n_j whenever k <= n.
    Exact integer arithmetic: the same sizes give the same k_j on any machine. A cluster of fewer than about
    n / k rows may get none; its rows then lie nearer another cluster's fine centroids than a centroid of
    their own would be worth."""
    sizes = np.asarray(coarse_sizes, dtype=np.int64)
    rows = int(sizes.sum())
    if (sizes < 0).any() or not 1 <= k <= rows:
        raise ValueError(f"k must be between 1 and the {rows} rows, and sizes >= 0, got k = {k}")
    # k * n_j <= k * n: exact in int64 for any sample a driver holds.
    quotas = k * sizes
    allocation = quotas // rows
    largest_remainders_first = np.lexsort((np.arange(len(sizes)), -(quotas % rows)))
    allocation[largest_remainders_first[: k - int(allocation.sum())]] += 1
    return allocation


def fine_seed(seed: int, coarse_cluster: int) -> int:
    """The faiss seed of the fine fit in coarse cluster j: a pure function of (seed, j), within faiss's int."""
    return int(np.random.SeedSequence([seed, coarse_cluster]).generate_state(1)[0] & 0x7FFFFFFF)


def two_level_spherical_kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    threads: int = 1,
    device: str = "auto",
    init: str = "random",
    refine_passes: int = REFINE_PASSES,
    refine_probes: int = REFINE_PROBES,
) -> KMeansResult:
    """Spherical k-means with k centroids in two levels, each trained on every row of `vectors`.

    Level 1 fits k1 = ceil(sqrt(k)) coarse centroids (flat, as `spherical_kmeans`) and assigns every row to
    one; level 2 fits k_j fine centroids (`allocate_fine_k`) on the n_j rows of each coarse cluster j, seeded
    by `fine_seed(seed, j)`. The centroids are concatenated in (coarse, fine) order. Then `refine_passes` Lloyd
    passes move all k at once, rows assigned through the levels (`two_level_assign` with `refine_probes`):
    a fine fit cannot see across its coarse cluster's border, and topics the border cuts cost the fit-only
    centroids about 6% of the mean cosine at k = 500 (bench/bench_kmeans.py). A flat fit costs k * n * d per iteration;
    this one about 2 sqrt(k) n d per fit iteration and (1 + probes) sqrt(k) n d per pass. Same input, seed
    and threads give bit-identical centroids. Rows keep their order within a coarse cluster, so a caller that
    sorts them (by uid) fixes what each fine fit sees.
    """
    vectors = _validated_kmeans_input(vectors, k, iterations, 1, init)
    device = device_for(device)
    unit_vectors = _unit_rows(vectors, "vectors")
    del vectors
    n, dimension = unit_vectors.shape
    coarse_k = coarse_k_for(k)
    coarse = _fit_unit_rows(
        unit_vectors, coarse_k, iterations=iterations, seed=seed, max_points_per_centroid=math.ceil(n / coarse_k),
        threads=threads, device=device, init=init,
    )
    index = flat_index(dimension, device=device)
    index.add(coarse.centroids)
    with _omp_threads(threads):
        coarse_cluster = index.search(unit_vectors, 1)[1][:, 0]
    members_by_cluster = np.argsort(coarse_cluster, kind="stable")
    sizes = np.bincount(coarse_cluster, minlength=coarse_k)
    boundaries = np.concatenate([[0], np.cumsum(sizes)])
    fine_k = allocate_fine_k(sizes, k)
    logger.info(
        "two-level spherical k-means: %d rows, d=%d, k=%d as %d coarse clusters (%d without fine centroids) of "
        "up to %d fine centroids, device %s",
        n, dimension, k, coarse_k, int((fine_k == 0).sum()), int(fine_k.max()), device,
    )

    centroids, coarse_of, fine_objective, fine_iterations, points_per_centroid = [], [], 0.0, 0, 1
    for cluster in range(coarse_k):
        if fine_k[cluster] == 0:
            continue
        rows = unit_vectors[members_by_cluster[boundaries[cluster] : boundaries[cluster + 1]]]
        cluster_points = math.ceil(len(rows) / fine_k[cluster])
        fine = _fit_unit_rows(
            rows, int(fine_k[cluster]), iterations=iterations, seed=fine_seed(seed, cluster),
            max_points_per_centroid=cluster_points, threads=threads, device=device, init=init,
        )
        centroids.append(fine.centroids)
        coarse_of.append(np.full(fine_k[cluster], cluster, dtype=np.int64))
        # When k_j == n_j faiss copies the rows as centroids and reports an objective of 0; every cosine is 1.
        fine_objective += float(len(rows)) if fine_k[cluster] == len(rows) else fine.objective[-1]
        fine_iterations = max(fine_iterations, fine.iterations)
        points_per_centroid = max(points_per_centroid, cluster_points)
    centroids = _unit_rows(np.concatenate(centroids), "centroids")
    coarse_of = np.concatenate(coarse_of)
    orphans = np.isin(coarse_cluster, np.flatnonzero((sizes > 0) & (fine_k == 0)))
    if orphans.any():
        # Rows of coarse clusters left without fine centroids (fewer than ~n / k rows each, so at most about
        # n / sqrt(k) rows in all) count in the objective with their nearest centroid.
        fine_objective += float(search(unit_vectors[orphans], centroids, 1, device=device)[0].sum())
    probes = min(refine_probes, len(np.unique(coarse_of)))
    centroids, refine_objectives = _refine(
        unit_vectors, centroids, coarse.centroids, coarse_of, passes=refine_passes, probes=probes, threads=threads,
        device=device,
    )
    return KMeansResult(
        centroids=_unit_rows(centroids, "centroids"),
        iterations=fine_iterations,
        objective=(fine_objective, *refine_objectives),
        device=device,
        max_points_per_centroid=points_per_centroid,
        sample_size=n,
        seed=seed,
        init=init,
        coarse=coarse,
        coarse_of=coarse_of,
        refine_passes=refine_passes,
        refine_probes=probes,
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


def two_level_assign(
    vectors: np.ndarray,
    centroids: np.ndarray,
    coarse_centroids: np.ndarray,
    coarse_of: np.ndarray,
    *,
    probes: int = 1,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """`assign` through the levels of a two-level fit: each row is compared with the `probes` nearest coarse
    centroids, then with the fine centroids fit within them (`coarse_of[i]`: the coarse cluster of fine
    centroid i). Costs (k1 + probes * k / k1) * d per row instead of k * d; a row whose nearest centroid lies
    under another coarse centroid gets the best one it was compared with (agreement with `assign`:
    bench/bench_kmeans.py)."""
    centroids = float32_matrix(centroids, "centroids")
    vectors = float32_matrix(vectors, "vectors", centroids.shape[1])
    index = _two_level_index(
        _unit_rows(centroids, "centroids"), coarse_centroids, coarse_of, probes=probes, device=device
    )
    ids = np.empty(len(vectors), dtype=np.int64)
    for rows in _batches(len(vectors), batch_size):
        ids[rows] = index.search(_unit_rows(vectors[rows], "vectors"), 1)[1][:, 0]
    return ids, row_cosines(vectors, centroids[ids])


def _two_level_index(unit_centroids: np.ndarray, coarse_centroids: np.ndarray, coarse_of: np.ndarray, *,
                     probes: int, device: str):
    """A faiss IndexIVFFlat whose lists are the coarse clusters and whose entries are the fine centroids."""
    coarse_centroids = float32_matrix(coarse_centroids, "coarse_centroids", unit_centroids.shape[1])
    coarse_of = np.asarray(coarse_of, dtype=np.int64)
    coarse_k, dimension = coarse_centroids.shape
    k = len(unit_centroids)
    if coarse_of.shape != (k,) or not ((0 <= coarse_of) & (coarse_of < coarse_k)).all():
        raise ValueError(f"coarse_of must give each of the {k} centroids a coarse cluster < {coarse_k}")
    # Only coarse centroids that own fine ones are probed, so every probe has a candidate.
    owners = np.unique(coarse_of)
    if not 1 <= probes <= len(owners):
        raise ValueError(f"probes must be between 1 and the {len(owners)} coarse centroids, got {probes}")
    quantizer = faiss.IndexFlatIP(dimension)
    quantizer.add(_unit_rows(coarse_centroids[owners], "coarse_centroids"))
    index = faiss.IndexIVFFlat(quantizer, dimension, len(owners), faiss.METRIC_INNER_PRODUCT)
    # swig_ptr holds no reference: each array it points into must stay bound to a name during the call.
    centroid_ids = np.arange(k, dtype=np.int64)
    list_of_centroid = np.searchsorted(owners, coarse_of).astype(np.int64)
    index.add_core(k, faiss.swig_ptr(unit_centroids), faiss.swig_ptr(centroid_ids), faiss.swig_ptr(list_of_centroid))
    index.nprobe = probes
    if device_for(device) == "cuda":
        return faiss.index_cpu_to_gpu(_gpu_resources(), GPU_DEVICE_ID, index)
    return index


def _refine(
    unit_vectors: np.ndarray,
    centroids: np.ndarray,
    coarse_centroids: np.ndarray,
    coarse_of: np.ndarray,
    *,
    passes: int,
    probes: int,
    threads: int,
    device: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, list[float]]:
    """(centroids, objective of each pass) after `passes` Lloyd passes over all k centroids at once, each row
    assigned through the levels with `probes` probes: what lets a topic cut by a coarse boundary gather under
    one fine centroid again. A centroid no row chose keeps its place. The sums run in float64 over
    uid-ordered batches in a fixed order, so the result does not depend on threads."""
    objectives = []
    for _ in range(passes):
        index = _two_level_index(centroids, coarse_centroids, coarse_of, probes=probes, device=device)
        sums = np.zeros(centroids.shape, dtype=np.float64)
        objective = 0.0
        with _omp_threads(threads):
            for rows in _batches(len(unit_vectors), batch_size):
                similarities, ids = index.search(unit_vectors[rows], 1)
                objective += float(similarities[:, 0].sum(dtype=np.float64))
                order = np.argsort(ids[:, 0], kind="stable")
                chosen, starts = np.unique(ids[order, 0], return_index=True)
                sums[chosen] += np.add.reduceat(unit_vectors[rows][order].astype(np.float64), starts, axis=0)
        objectives.append(objective)
        norms = np.linalg.norm(sums, axis=1)
        moved = norms > 0
        centroids = centroids.copy()
        centroids[moved] = (sums[moved] / norms[moved, None]).astype(np.float32)
    return centroids, objectives


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
