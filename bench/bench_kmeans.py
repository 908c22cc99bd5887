"""Two-level spherical k-means against the flat fit (issue 18 part 3) on synthetic clumpy CLIP-like embeddings.

    python bench/bench_kmeans.py [--rows 500000] [--dim 512] [--k 5000] [--flat-rows 500000]
                                 [--flat-iterations 20] [--holdout 50000] [--device cpu|cuda]
                                 [--out bench/results/kmeans.json]

Data: bench/bench_semdedup.py's generator (rows scattered around 2 k random topic directions with lognormal
popularity, cosine ~0.6 to their topic), no planted duplicates; --rows form the training sample and another
--holdout rows from the same topics are only assigned.

Measured, each phase timed on its own (k-means: 20 iterations, random seeding, --seed, all cores):
1. the two-level fit `faiss_seam.two_level_spherical_kmeans` of k centroids on the --rows sample: seconds, the
   process tree's peak RSS during the fit (benchkit.PeakMemory), and multiply-adds per second counted as
   n * d * iterations * (k1 + k / k1) (the coarse fit and the fine fits) plus n * d * k1 (the coarse assignment);
2. the flat fit `faiss_seam.spherical_kmeans` of the same k on the first --flat-rows rows, every row trained on
   (max_points_per_centroid = ceil(flat_rows / k)), for --flat-iterations: seconds, n * d * k * iterations
   multiply-adds per second; 0 skips it;
3. quality, the same way for both fits: the mean cosine of each sample row and each held-out row to its nearest
   centroid (exact `faiss_seam.assign`), and faiss's own objective per row;
4. assignment: exact `faiss_seam.assign` of the held-out rows against `faiss_seam.two_level_assign` with 1, 2,
   4, 8 and 16 probes: rows per second, the share of rows given the same centroid, and the mean cosine lost;
5. a projection to k = 100,000 on a 3.9-million-row sample (39 per centroid, d = 512, 20 iterations) from the
   multiply-add rates measured in 1 and 2: time and memory of the flat and the two-level fit on this machine.
   An H100's figures are argued in bench/results/kmeans.md from its fp32 peak, not measured here.

numpy's BLAS uses every core; faiss gets as many OpenMP threads as the process may use. The result records the
git commit measured and the command line.
"""

import argparse
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from bench_semdedup import synthetic_embeddings
from benchkit import PeakMemory, cpu_model, write_result

from curation.gpu import faiss_seam

logger = logging.getLogger("bench_kmeans")

REPO_ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 20
PROBES = (1, 2, 4, 8, 16)
PROJECTED_K = 100_000
PROJECTED_ROWS = faiss_seam.MIN_POINTS_PER_CENTROID * PROJECTED_K
FLOAT32_BYTES = 4


def git_commit() -> dict:
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def nearest_cosine(vectors: np.ndarray, centroids: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(nearest centroid ids, their cosines, seconds) by the exact flat assignment."""
    started = time.perf_counter()
    ids, cosines = faiss_seam.assign(vectors, centroids, device=device)
    return ids, cosines, time.perf_counter() - started


def quality(result, sample: np.ndarray, holdout: np.ndarray, device: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """The fit's quality measures, and the exact assignment of the held-out rows (ids, cosines)."""
    _, sample_cosines, _ = nearest_cosine(sample, result.centroids, device)
    holdout_ids, holdout_cosines, seconds = nearest_cosine(holdout, result.centroids, device)
    sizes = np.bincount(holdout_ids, minlength=len(result.centroids))
    return (
        {
            "objective_per_row": round(result.objective[-1] / result.sample_size, 5),
            "sample_mean_nearest_cosine": round(float(sample_cosines.mean()), 5),
            "holdout_mean_nearest_cosine": round(float(holdout_cosines.mean()), 5),
            "holdout_centroids_used": int((sizes > 0).sum()),
            "holdout_exact_assign_rows_per_second": round(len(holdout) / seconds),
        },
        holdout_ids,
        holdout_cosines,
    )


def two_level_multiply_adds(rows: int, dimension: int, k: int, iterations: int) -> int:
    coarse_k = faiss_seam.coarse_k_for(k)
    return rows * dimension * (iterations * (coarse_k + math.ceil(k / coarse_k)) + coarse_k)


def projection(two_level_rate: float, flat_rate: float | None, dimension: int) -> dict:
    """Time and memory of a k = 100,000 fit on 3.9 million rows at the rates measured here."""
    two_level = two_level_multiply_adds(PROJECTED_ROWS, dimension, PROJECTED_K, ITERATIONS)
    flat = PROJECTED_ROWS * dimension * PROJECTED_K * ITERATIONS
    sample_gib = PROJECTED_ROWS * dimension * FLOAT32_BYTES / 2**30
    return {
        "k": PROJECTED_K,
        "sample_rows": PROJECTED_ROWS,
        "dim": dimension,
        "iterations": ITERATIONS,
        "two_level_multiply_adds": two_level,
        "flat_multiply_adds": flat,
        "two_level_hours_here": round(two_level / two_level_rate / 3600, 2),
        "flat_hours_here": round(flat / flat_rate / 3600) if flat_rate else None,
        "sample_gib": round(sample_gib, 2),
        # The caller's float32 sample, the seam's normalised copy, and per row a coarse id and its sort order.
        "two_level_fit_gib": round(2 * sample_gib + PROJECTED_ROWS * 16 / 2**30, 2),
        "centroids_mib": round(PROJECTED_K * dimension * FLOAT32_BYTES / 2**20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000, help="training sample of the two-level fit")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--flat-rows", type=int, default=500_000, help="training rows of the flat fit (0: skip)")
    parser.add_argument("--flat-iterations", type=int, default=ITERATIONS)
    parser.add_argument("--holdout", type=int, default=50_000, help="rows only assigned, never trained on")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "kmeans.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    started = time.perf_counter()
    embeddings, _ = synthetic_embeddings(args.rows + args.holdout, args.dim, 2 * args.k, 0.0, args.seed)
    sample, holdout = embeddings[: args.rows], embeddings[args.rows :]
    generation_seconds = time.perf_counter() - started
    logger.info("generated %d x %d in %.1f s", len(embeddings), args.dim, generation_seconds)

    memory = PeakMemory()
    memory.start()
    phase = time.perf_counter()
    two_level = faiss_seam.two_level_spherical_kmeans(
        sample, args.k, iterations=ITERATIONS, seed=args.seed, threads=threads, device=args.device
    )
    two_level_seconds = time.perf_counter() - phase
    two_level_peak = memory.stop()
    work = two_level_multiply_adds(args.rows, args.dim, args.k, ITERATIONS)
    logger.info("two-level fit: %.1f s, peak RSS %.0f MiB", two_level_seconds, two_level_peak / 2**20)
    two_level_quality, exact_ids, exact_cosines = quality(two_level, sample, holdout, args.device)
    fine_sizes = np.bincount(two_level.coarse_of, minlength=len(two_level.coarse.centroids))
    result = {
        "benchmark": "kmeans",
        "git": git_commit(),
        "command": " ".join(["python", *sys.argv]),
        "rows": args.rows,
        "holdout_rows": args.holdout,
        "dim": args.dim,
        "k": args.k,
        "topics": 2 * args.k,
        "iterations": ITERATIONS,
        "device": args.device,
        "seed": args.seed,
        "generation_seconds": round(generation_seconds, 1),
        "two_level_fit": {
            "seconds": round(two_level_seconds, 1),
            "peak_rss_mib": round(two_level_peak / 2**20),
            "sample_mib": round(sample.nbytes / 2**20),
            "coarse_k": len(two_level.coarse.centroids),
            "coarse_iterations": two_level.coarse.iterations,
            "fine_k_min_max": [int(fine_sizes.min()), int(fine_sizes.max())],
            "coarse_clusters_without_fine_centroids": int((fine_sizes == 0).sum()),
            "multiply_adds": work,
            "multiply_adds_per_second": round(work / two_level_seconds),
            **two_level_quality,
        },
    }

    flat_rate = None
    if args.flat_rows:
        flat_sample = sample[: args.flat_rows]
        memory = PeakMemory()
        memory.start()
        phase = time.perf_counter()
        flat = faiss_seam.spherical_kmeans(
            flat_sample, args.k, iterations=args.flat_iterations, seed=args.seed,
            max_points_per_centroid=math.ceil(len(flat_sample) / args.k), threads=threads, device=args.device,
        )
        flat_seconds = time.perf_counter() - phase
        flat_peak = memory.stop()
        flat_rate = len(flat_sample) * args.dim * args.k * flat.iterations / flat_seconds
        logger.info("flat fit: %.1f s, peak RSS %.0f MiB", flat_seconds, flat_peak / 2**20)
        flat_quality, _, _ = quality(flat, sample, holdout, args.device)
        result["flat_fit"] = {
            "rows": len(flat_sample),
            "iterations": flat.iterations,
            "seconds": round(flat_seconds, 1),
            "peak_rss_mib": round(flat_peak / 2**20),
            "multiply_adds_per_second": round(flat_rate),
            "objective_per_row_by_iteration": [round(value / len(flat_sample), 5) for value in flat.objective],
            **flat_quality,
        }
        result["two_level_speedup"] = round(flat_seconds / two_level_seconds, 1)

    levels = (two_level.centroids, two_level.coarse.centroids, two_level.coarse_of)
    assignment = {"exact_rows_per_second": two_level_quality["holdout_exact_assign_rows_per_second"], "by_probes": []}
    for probes in PROBES:
        phase = time.perf_counter()
        ids, cosines = faiss_seam.two_level_assign(holdout, *levels, probes=probes, device=args.device)
        seconds = time.perf_counter() - phase
        assignment["by_probes"].append(
            {
                "probes": probes,
                "rows_per_second": round(len(holdout) / seconds),
                "same_centroid_share": round(float((ids == exact_ids).mean()), 5),
                "mean_cosine_lost": round(float((exact_cosines - cosines).mean()), 6),
            }
        )
        logger.info("two-level assign: %s", assignment["by_probes"][-1])
    result["holdout_assignment"] = assignment
    result["projection"] = projection(result["two_level_fit"]["multiply_adds_per_second"], flat_rate, args.dim)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = {
        "cpu": cpu_model(),
        "cores": threads,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
