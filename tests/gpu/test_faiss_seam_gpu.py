"""The FAISS seam's GPU path against its CPU reference (DESIGN.md section 5). Skipped without CUDA and GPU faiss."""

import faiss
import numpy as np
import pytest
import torch

from curation.gpu.faiss_seam import (
    GpuFlatIndex,
    assign,
    device_for,
    flat_index,
    search,
    spherical_kmeans,
    two_level_assign,
    two_level_spherical_kmeans,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")),
        reason="needs CUDA and a GPU build of faiss",
    ),
]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def separated_clusters(clusters: int, per_cluster: int, dimension: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((clusters, dimension)))
    labels = np.repeat(np.arange(clusters), per_cluster)
    return unit_rows(centers[labels] + 0.002 * rng.standard_normal((len(labels), dimension)))


def matched_agreement(left: np.ndarray, right: np.ndarray) -> float:
    """Share of points on which two clusterings agree, mapping each cluster of one to its best match in the
    other; the smaller of both directions, so a merge on either side lowers it."""

    def one_way(source: np.ndarray, target: np.ndarray) -> float:
        return sum(np.bincount(target[source == cluster]).max() for cluster in np.unique(source)) / len(source)

    return min(one_way(left, right), one_way(right, left))


def test_auto_picks_the_gpu():
    assert device_for("auto") == "cuda"
    assert type(flat_index(16)) is GpuFlatIndex


def test_gpu_kmeans_matches_cpu_reference():
    vectors = separated_clusters(clusters=64, per_cluster=300, dimension=128, seed=0)
    common = {"seed": 3, "max_points_per_centroid": 256, "iterations": 20}
    cpu = spherical_kmeans(vectors, 64, device="cpu", **common)
    gpu = spherical_kmeans(vectors, 64, device="cuda", **common)
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    assert gpu.sample_size == cpu.sample_size == 64 * 256
    np.testing.assert_allclose(np.linalg.norm(gpu.centroids, axis=1), 1.0, atol=1e-5)
    cpu_ids, _ = assign(vectors, cpu.centroids, device="cpu")
    gpu_ids, _ = assign(vectors, gpu.centroids, device="cpu")
    assert matched_agreement(cpu_ids, gpu_ids) >= 0.999


def test_gpu_assign_matches_cpu_reference():
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng.standard_normal((200_000, 256)))
    centroids = unit_rows(rng.standard_normal((1000, 256)))
    cpu_ids, cpu_similarity = assign(vectors, centroids, device="cpu")
    gpu_ids, gpu_similarity = assign(vectors, centroids, device="cuda", batch_size=30_000)
    assert gpu_ids.dtype == np.int64 and gpu_similarity.dtype == np.float32
    assert (cpu_ids == gpu_ids).mean() >= 0.999
    np.testing.assert_allclose(gpu_similarity, cpu_similarity, atol=1e-4)


def test_gpu_search_matches_cpu_reference():
    rng = np.random.default_rng(2)
    queries = unit_rows(rng.standard_normal((2000, 128)))
    database = unit_rows(rng.standard_normal((50_000, 128)))
    cpu_similarities, cpu_ids = search(queries, database, 11, device="cpu")
    gpu_similarities, gpu_ids = search(queries, database, 10, device="cuda")
    np.testing.assert_allclose(gpu_similarities, cpu_similarities[:, :10], atol=1e-4)
    # Ids must be equal wherever a neighbour is not tied, within the rounding of the two GEMMs, with the one
    # ranked before or after it (the 11th CPU neighbour catches a swap across the k boundary).
    close = np.abs(np.diff(cpu_similarities, axis=1)) < 1e-4
    tied = np.zeros((len(queries), 10), dtype=bool)
    tied[:, 1:] |= close[:, :9]
    tied |= close
    assert (~tied).mean() > 0.95
    np.testing.assert_array_equal(gpu_ids[~tied], cpu_ids[:, :10][~tied])


def test_gpu_two_level_kmeans_and_assign_match_cpu_reference():
    vectors = separated_clusters(clusters=400, per_cluster=50, dimension=64, seed=4)
    common = {"seed": 1, "init": "kmeans++"}
    cpu = two_level_spherical_kmeans(vectors, 400, device="cpu", **common)
    gpu = two_level_spherical_kmeans(vectors, 400, device="cuda", **common)
    assert (cpu.device, gpu.device, gpu.levels) == ("cpu", "cuda", 2)
    assert gpu.centroids.shape == cpu.centroids.shape == (400, 64)
    cpu_ids, _ = assign(vectors, cpu.centroids, device="cpu")
    gpu_ids, _ = assign(vectors, gpu.centroids, device="cpu")
    assert matched_agreement(cpu_ids, gpu_ids) >= 0.99
    levels = (gpu.centroids, gpu.coarse.centroids, gpu.coarse_of)
    through_cpu, _ = two_level_assign(vectors, *levels, probes=3, device="cpu")
    through_gpu, _ = two_level_assign(vectors, *levels, probes=3, device="cuda")
    assert (through_cpu == through_gpu).mean() >= 0.999
