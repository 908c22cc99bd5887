"""The FAISS seam on the CPU reference path: k-means, assignment and exact search against numpy."""

import faiss
import numpy as np
import pytest

from curation.gpu import faiss_seam
from curation.gpu.faiss_seam import (
    FlatIndex,
    allocate_fine_k,
    assign,
    device_for,
    fit_spherical_kmeans,
    flat_index,
    search,
    spherical_kmeans,
    two_level_assign,
    two_level_spherical_kmeans,
)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def separated_clusters(
    clusters: int = 8, per_cluster: int = 200, dimension: int = 64, noise: float = 0.002, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters around random directions on the unit sphere: (unit float32 vectors, true labels)."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((clusters, dimension)))
    labels = np.repeat(np.arange(clusters), per_cluster)
    vectors = unit_rows(centers[labels] + noise * rng.standard_normal((len(labels), dimension)))
    return vectors, labels


def random_unit(n: int, dimension: int, seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((n, dimension)))


def purity(found: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose found cluster's majority true label is their own."""
    majority = sum(np.bincount(labels[found == cluster]).max() for cluster in np.unique(found))
    return majority / len(labels)


def test_device_for_falls_back_to_cpu_without_gpu_faiss(monkeypatch):
    monkeypatch.setattr(faiss_seam, "gpu_faiss_available", lambda: False)
    assert device_for("auto") == "cpu"
    assert device_for("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="cannot use a GPU"):
        device_for("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        device_for("gpu")


def test_faiss_cpu_build_is_not_mistaken_for_a_gpu_build(monkeypatch):
    # faiss-cpu answers get_num_gpus() but has no StandardGpuResources: both must be required.
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    assert device_for("auto") == "cpu"
    assert type(flat_index(4, device="auto")) is FlatIndex


def test_kmeans_recovers_well_separated_clusters():
    vectors, labels = separated_clusters()
    result = spherical_kmeans(vectors, 8, seed=0, max_points_per_centroid=256, init="kmeans++", device="cpu")
    found, similarity = assign(vectors, result.centroids, device="cpu")
    assert purity(found, labels) == 1.0
    assert len(np.unique(found)) == 8
    assert similarity.min() > 0.99
    assert result.centroids.dtype == np.float32 and result.centroids.shape == (8, 64)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    assert (result.device, result.init, result.seed) == ("cpu", "kmeans++", 0)
    assert 1 <= result.iterations <= 20 and len(result.objective) == result.iterations


def test_kmeans_is_deterministic_and_independent_of_thread_count():
    vectors = random_unit(3000, 32, seed=1)
    first = spherical_kmeans(vectors, 16, seed=5, max_points_per_centroid=100, device="cpu")
    second = spherical_kmeans(vectors, 16, seed=5, max_points_per_centroid=100, device="cpu")
    assert np.array_equal(first.centroids, second.centroids)
    assert first.objective == second.objective
    threaded = spherical_kmeans(vectors, 16, seed=5, max_points_per_centroid=100, threads=2, device="cpu")
    # faiss assigns and sums each centroid's members in a fixed order, whatever the thread count.
    assert np.array_equal(first.centroids, threaded.centroids)
    other_seed = spherical_kmeans(vectors, 16, seed=6, max_points_per_centroid=100, device="cpu")
    assert not np.array_equal(first.centroids, other_seed.centroids)


def test_kmeans_restores_the_callers_faiss_thread_count():
    before = faiss.omp_get_max_threads()
    spherical_kmeans(random_unit(200, 8, seed=2), 4, max_points_per_centroid=50, threads=3, device="cpu")
    assert faiss.omp_get_max_threads() == before


def test_max_points_per_centroid_bounds_the_training_sample():
    vectors, _ = separated_clusters(clusters=4, per_cluster=500, dimension=32)
    result = spherical_kmeans(vectors, 4, max_points_per_centroid=50, init="kmeans++", device="cpu")
    assert result.max_points_per_centroid == 50
    assert result.sample_size == 200
    # The objective sums cosine similarities (each <= 1, here ~1) over the points faiss trained on,
    # so it shows faiss used the 200-point sample, not all 2000 points.
    assert 0.95 * result.sample_size < result.objective[-1] <= result.sample_size + 1e-3

    unsampled = spherical_kmeans(vectors, 4, max_points_per_centroid=500, device="cpu")
    assert unsampled.sample_size == 2000
    assert unsampled.objective[-1] > 1000


def test_kmeans_normalises_its_input():
    vectors = random_unit(500, 16, seed=3)
    scales = np.random.default_rng(4).uniform(0.1, 10.0, size=(500, 1)).astype(np.float32)
    plain = spherical_kmeans(vectors, 5, max_points_per_centroid=100, device="cpu")
    scaled = spherical_kmeans(vectors * scales, 5, max_points_per_centroid=100, device="cpu")
    np.testing.assert_allclose(plain.centroids, scaled.centroids, atol=1e-5)


def test_assign_matches_numpy_argmax():
    vectors = random_unit(5000, 48, seed=5)
    centroids = random_unit(37, 48, seed=6)
    ids, similarity = assign(vectors, centroids, device="cpu", batch_size=512)
    scores = vectors @ centroids.T
    expected = scores.argmax(axis=1)
    assert ids.dtype == np.int64 and similarity.dtype == np.float32
    ordered = np.sort(scores, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > 1e-5  # near-ties may resolve either way in float32
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ids[clear], expected[clear])
    np.testing.assert_allclose(similarity, scores.max(axis=1), atol=1e-5)


def test_assign_and_search_do_not_depend_on_the_batch_size():
    vectors, database = random_unit(1000, 16, seed=7), random_unit(300, 16, seed=8)
    whole = search(vectors, database, 5, device="cpu")
    batched = search(vectors, database, 5, device="cpu", batch_size=97)
    np.testing.assert_array_equal(whole[1], batched[1])
    np.testing.assert_array_equal(whole[0], batched[0])
    np.testing.assert_array_equal(
        assign(vectors, database, device="cpu")[0], assign(vectors, database, device="cpu", batch_size=333)[0]
    )


def test_search_matches_brute_force_top_k():
    queries, database = random_unit(400, 32, seed=9), random_unit(2000, 32, seed=10)
    similarities, ids = search(queries, database, 10, device="cpu")
    scores = queries @ database.T
    expected_ids = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    expected_similarities = np.take_along_axis(scores, expected_ids, axis=1)
    assert similarities.shape == ids.shape == (400, 10)
    assert ids.dtype == np.int64 and similarities.dtype == np.float32
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
    assert np.all(np.diff(similarities, axis=1) <= 0)
    # Ids must agree except where two neighbours are tied within float32 rounding.
    boundary = np.sort(scores, axis=1)[:, ::-1][:, 9:11]
    clear = np.all(np.abs(np.diff(expected_similarities, axis=1)) > 1e-5, axis=1) & (
        boundary[:, 0] - boundary[:, 1] > 1e-5
    )
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ids[clear], expected_ids[clear])


def test_search_finds_each_database_vector_itself():
    database = random_unit(500, 24, seed=11)
    similarities, ids = search(database * 3.0, database, 1, device="cpu")
    np.testing.assert_array_equal(ids[:, 0], np.arange(500))
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)


def test_flat_index_ids_continue_across_adds():
    database = random_unit(100, 8, seed=12)
    index = flat_index(8, device="cpu", batch_size=16)
    index.add(database[:60])
    index.add(database[60:])
    assert index.size == 100 and index.device == "cpu"
    _, ids = index.search(database[75:76], 1)
    assert ids[0, 0] == 75


def test_fit_below_the_threshold_is_the_flat_fit_on_every_row():
    vectors = random_unit(2000, 16, seed=20)
    fitted = fit_spherical_kmeans(vectors, 30, seed=4, device="cpu", init="kmeans++")
    flat = spherical_kmeans(vectors, 30, seed=4, max_points_per_centroid=67, device="cpu", init="kmeans++")
    assert np.array_equal(fitted.centroids, flat.centroids)
    assert fitted.objective == flat.objective
    assert (fitted.levels, fitted.coarse, fitted.coarse_of, fitted.sample_size) == (1, None, None, 2000)


def test_fit_above_the_threshold_is_two_level(monkeypatch):
    monkeypatch.setattr(faiss_seam, "FLAT_KMEANS_MAX_K", 20)
    vectors = random_unit(2000, 16, seed=21)
    assert fit_spherical_kmeans(vectors, 20, device="cpu").levels == 1
    fitted = fit_spherical_kmeans(vectors, 21, seed=2, device="cpu")
    assert np.array_equal(fitted.centroids, two_level_spherical_kmeans(vectors, 21, seed=2, device="cpu").centroids)
    assert (fitted.levels, fitted.coarse.centroids.shape, fitted.centroids.shape) == (2, (5, 16), (21, 16))


@pytest.mark.parametrize(
    ("sizes", "k", "expected"),
    [
        ([10, 0, 5, 1, 84], 20, [2, 0, 1, 0, 17]),  # quotas 2, 0, 1, 0.2, 16.8: the largest remainder wins
        ([30, 60, 90], 6, [1, 2, 3]),  # exact quotas
        ([1, 1, 1, 1], 2, [1, 1, 0, 0]),  # equal remainders go to the lower j
        ([3, 4], 7, [3, 4]),  # k = n: one centroid per row
        ([0, 5], 1, [0, 1]),
    ],
)
def test_fine_k_is_allocated_by_largest_remainder(sizes, k, expected):
    assert allocate_fine_k(np.array(sizes), k).tolist() == expected


def test_fine_k_sums_to_k_and_never_exceeds_a_clusters_rows():
    rng = np.random.default_rng(22)
    for _ in range(200):
        # Many empty and one-row clusters among larger ones.
        sizes = rng.integers(0, 50, size=rng.integers(1, 40)) * (rng.random(1) < 0.5) + rng.integers(0, 3)
        if sizes.sum() == 0:
            continue
        k = int(rng.integers(1, sizes.sum() + 1))
        allocation = allocate_fine_k(sizes, k)
        assert allocation.sum() == k
        assert (allocation <= sizes).all() and (allocation >= 0).all()
    with pytest.raises(ValueError, match="between 1 and the 3 rows"):
        allocate_fine_k(np.array([1, 2]), 4)


def test_two_level_kmeans_is_deterministic():
    vectors = random_unit(4000, 24, seed=23)
    first = two_level_spherical_kmeans(vectors, 150, seed=5, device="cpu")
    again = two_level_spherical_kmeans(vectors, 150, seed=5, device="cpu")
    threaded = two_level_spherical_kmeans(vectors, 150, seed=5, threads=2, device="cpu")
    assert np.array_equal(first.centroids, again.centroids) and np.array_equal(first.centroids, threaded.centroids)
    assert first.objective == again.objective == threaded.objective
    assert np.array_equal(first.coarse_of, again.coarse_of)
    other_seed = two_level_spherical_kmeans(vectors, 150, seed=6, device="cpu")
    assert not np.array_equal(first.centroids, other_seed.centroids)


def test_two_level_kmeans_shape_order_and_objective():
    vectors = random_unit(4000, 24, seed=24)
    result = two_level_spherical_kmeans(vectors, 150, seed=1, device="cpu")
    assert result.centroids.shape == (150, 24) and result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    assert result.coarse.centroids.shape == (13, 24)  # ceil(sqrt(150))
    # (coarse, fine) order: each coarse cluster's fine centroids are contiguous, coarse clusters ascending.
    assert (np.diff(result.coarse_of) >= 0).all()
    assert (result.levels, result.sample_size, len(result.objective)) == (2, 4000, 1 + faiss_seam.REFINE_PASSES)
    # Probes are capped at the 13 coarse clusters there are.
    assert result.refine_passes == faiss_seam.REFINE_PASSES
    assert result.refine_probes == min(faiss_seam.REFINE_PROBES, 13)
    assert result.objective[-1] > result.objective[0]

    fit_only = two_level_spherical_kmeans(vectors, 150, seed=1, device="cpu", refine_passes=0)
    assert np.array_equal(fit_only.coarse_of, result.coarse_of) and fit_only.objective == result.objective[:1]
    # objective[0] sums each row's cosine to the fine centroid it was fit with: no more than to its nearest.
    _, nearest = assign(vectors, fit_only.centroids, device="cpu")
    assert 0.9 * nearest.sum() < fit_only.objective[0] <= nearest.sum() + 1e-2
    _, refined_nearest = assign(vectors, result.centroids, device="cpu")
    assert refined_nearest.mean() > nearest.mean()


def test_two_level_kmeans_recovers_well_separated_clusters():
    vectors, labels = separated_clusters(clusters=64, per_cluster=30, dimension=32)
    result = two_level_spherical_kmeans(vectors, 64, seed=0, init="kmeans++", device="cpu")
    found, similarity = assign(vectors, result.centroids, device="cpu")
    assert purity(found, labels) == 1.0
    assert len(np.unique(found)) == 64
    assert similarity.min() > 0.99
    assert result.objective[0] == pytest.approx(len(vectors), rel=1e-3)


def test_two_level_kmeans_with_one_centroid_per_row():
    vectors = random_unit(40, 8, seed=25)
    result = two_level_spherical_kmeans(vectors, 40, device="cpu")
    _, similarity = assign(vectors, result.centroids, device="cpu")
    np.testing.assert_allclose(similarity, 1.0, atol=1e-6)
    assert result.objective[0] == pytest.approx(40.0)


def test_two_level_assign_agrees_with_exact_assign():
    vectors, labels = separated_clusters(clusters=64, per_cluster=30, dimension=32)
    result = two_level_spherical_kmeans(vectors, 64, seed=0, init="kmeans++", device="cpu")
    exact, exact_similarity = assign(vectors, result.centroids, device="cpu")
    ids, similarity = two_level_assign(
        vectors, result.centroids, result.coarse.centroids, result.coarse_of, device="cpu", batch_size=500
    )
    np.testing.assert_array_equal(ids, exact)
    np.testing.assert_array_equal(similarity, exact_similarity)

    spread = random_unit(3000, 16, seed=26)
    spread_fit = two_level_spherical_kmeans(spread, 100, seed=0, device="cpu")
    exact_spread, _ = assign(spread, spread_fit.centroids, device="cpu")
    agreement = [
        (two_level_assign(spread, spread_fit.centroids, spread_fit.coarse.centroids, spread_fit.coarse_of,
                          probes=probes, device="cpu")[0] == exact_spread).mean()
        for probes in (1, 3, 10)
    ]
    # Uniform directions are the worst case for a coarse level; probing every coarse centroid is exact.
    assert agreement[0] > 0.5 and agreement[0] <= agreement[1] <= agreement[2] == 1.0


def test_two_level_assign_rejects_bad_levels():
    vectors, centroids, coarse = random_unit(10, 4, seed=27), random_unit(6, 4, seed=28), random_unit(2, 4, seed=29)
    with pytest.raises(ValueError, match="coarse_of must give each of the 6 centroids"):
        two_level_assign(vectors, centroids, coarse, np.array([0, 0, 1, 1, 2, 2]), device="cpu")
    with pytest.raises(ValueError, match="probes must be between 1 and the 1 coarse"):
        two_level_assign(vectors, centroids, coarse, np.zeros(6, dtype=np.int64), probes=2, device="cpu")


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.ones((10, 4), dtype=np.float64), "must be float32"),
        (np.ones(10, dtype=np.float32), "shape"),
        (np.ones((10, 0), dtype=np.float32), "shape"),
        ([[1.0, 0.0]] * 10, "numpy array"),
        (np.where(np.eye(10, 4) > 0, np.nan, 1.0).astype(np.float32), "NaN or infinite"),
        (np.vstack([np.ones((9, 4)), np.zeros((1, 4))]).astype(np.float32), "all-zero"),
    ],
)
def test_kmeans_rejects_bad_vectors(vectors, message):
    with pytest.raises(ValueError, match=message):
        spherical_kmeans(vectors, 2, max_points_per_centroid=10, device="cpu")


def test_kmeans_rejects_bad_parameters():
    vectors = random_unit(10, 4, seed=13)
    with pytest.raises(ValueError, match="k must be between 1 and the number of vectors 10"):
        spherical_kmeans(vectors, 11, max_points_per_centroid=10, device="cpu")
    with pytest.raises(ValueError, match="max_points_per_centroid"):
        spherical_kmeans(vectors, 2, max_points_per_centroid=0, device="cpu")
    with pytest.raises(ValueError, match="iterations"):
        spherical_kmeans(vectors, 2, iterations=0, max_points_per_centroid=10, device="cpu")
    with pytest.raises(ValueError, match="threads"):
        spherical_kmeans(vectors, 2, max_points_per_centroid=10, threads=0, device="cpu")
    with pytest.raises(ValueError, match="init must be one of"):
        spherical_kmeans(vectors, 2, max_points_per_centroid=10, init="greedy", device="cpu")
    with pytest.raises(TypeError):
        spherical_kmeans(vectors, 2, device="cpu")  # max_points_per_centroid has no default on purpose


def test_assign_and_search_reject_bad_input():
    vectors, centroids = random_unit(20, 8, seed=14), random_unit(3, 8, seed=15)
    with pytest.raises(ValueError, match="dimension 4, expected 8"):
        assign(vectors[:, :4].copy(), centroids, device="cpu")
    with pytest.raises(ValueError, match="float32"):
        assign(vectors.astype(np.float16), centroids, device="cpu")
    with pytest.raises(ValueError, match="NaN or infinite"):
        assign(vectors, np.full((3, 8), np.inf, dtype=np.float32), device="cpu")
    with pytest.raises(ValueError, match="k must be between 1 and the index size 3"):
        search(vectors, centroids, 4, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        search(vectors, centroids, 1, device="cpu", batch_size=0)
