"""SemDeDup throughput (Abbas et al. 2023, arXiv:2303.09540; DESIGN.md section 4) on synthetic CLIP-like embeddings.

    python bench/bench_semdedup.py [--rows 1000000] [--dim 512] [--k 1000] [--device cpu|cuda]
                                   [--out bench/results/semdedup.json]

Data: --rows L2-normalised float32 vectors of --dim dimensions, generated in chunks by a seeded numpy Generator:
rows scatter around --k * 2 random "topic" directions with lognormal popularity (cosine ~0.6 to their topic,
~0.37 between two rows of one topic, like the clumpy but far-from-duplicate bulk of a web corpus), and
--duplicate-share of the rows are planted near-duplicates: a noisy copy of another, unplanted row, with a noise
norm uniform in [0.05, 0.3] (cosine 0.96-0.999 to the source, all above the 0.93 threshold of eps 0.07).

Measured, each phase timed on its own:
1. spherical k-means fit through `curation.gpu.faiss_seam.spherical_kmeans` (20 iterations, random seeding,
   max_points_per_centroid 100, so faiss trains on 100 * k sampled rows; all cores; --device), reported as
   sample rows/s, and assignment of every row through `faiss_seam.assign`, reported as rows/s;
2. SemDeDup: `curation.ops.semdedup.semdedup_cluster` on each cluster (rows grouped by an argsort of the
   assignment), rows/s over all rows, at eps 0.07; the eps-free max_sim values then give the kept share at other
   eps and `eps_for_keep_fraction` for some target shares;
3. the peak resident memory of the process (benchkit.PeakMemory, sampled every 0.2 s);
4. agreement: on the largest cluster and --check-clusters random ones, the keep decisions, kept members and
   max_sim against a naive reference (full m x m similarity, a Python loop over members applying the rule
   literally): keep masks must be identical.

numpy's BLAS uses every core; faiss gets as many OpenMP threads as the process may use.
"""

import argparse
import logging
import math
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
from benchkit import PeakMemory, cpu_model, write_result

from curation.gpu import faiss_seam
from curation.ops.semdedup import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_EPS,
    eps_for_keep_fraction,
    max_similarity_to_earlier,
    semdedup_cluster,
)

logger = logging.getLogger("bench_semdedup")

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATION_CHUNK_ROWS = 65_536
TOPIC_NOISE = 1.3  # row = topic + 1.3 * (unit-ish Gaussian): cosine ~ 1 / sqrt(1 + 1.3^2) = 0.61 to the topic
COPY_NOISE_RANGE = (0.05, 0.3)  # noise norm of a planted copy: cosine 1 / sqrt(1 + r^2) = 0.999 .. 0.958
MAX_POINTS_PER_CENTROID = 100
KMEANS_ITERATIONS = 20
EPS_TABLE = (0.005, 0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
KEEP_FRACTIONS = (0.99, 0.97, 0.95, 0.9, 0.63)


def normalise_rows(rows: np.ndarray) -> None:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)


def synthetic_embeddings(rows: int, dimension: int, topics: int, duplicate_share: float, seed: int):
    """(unit float32 (rows, dimension), planted source per row or -1) generated chunk by chunk."""
    rng = np.random.default_rng(seed)
    topic_directions = rng.standard_normal((topics, dimension)).astype(np.float32)
    normalise_rows(topic_directions)
    popularity = rng.lognormal(0.0, 0.5, size=topics)
    popularity /= popularity.sum()
    embeddings = np.empty((rows, dimension), dtype=np.float32)
    scale = np.float32(TOPIC_NOISE / math.sqrt(dimension))
    for start in range(0, rows, GENERATION_CHUNK_ROWS):
        end = min(start + GENERATION_CHUNK_ROWS, rows)
        chunk = rng.standard_normal((end - start, dimension), dtype=np.float32)
        chunk *= scale
        chunk += topic_directions[rng.choice(topics, size=end - start, p=popularity)]
        normalise_rows(chunk)
        embeddings[start:end] = chunk

    copies = int(rows * duplicate_share)
    copy_rows = np.sort(rng.choice(rows, size=copies, replace=False))
    source_of = np.full(rows, -1, dtype=np.int64)
    unplanted = np.setdiff1d(np.arange(rows), copy_rows)
    sources = rng.choice(unplanted, size=copies)  # a source may get several copies: one group
    for start in range(0, copies, GENERATION_CHUNK_ROWS):
        part = slice(start, min(start + GENERATION_CHUNK_ROWS, copies))
        noise = rng.standard_normal((len(copy_rows[part]), dimension), dtype=np.float32)
        noise *= (rng.uniform(*COPY_NOISE_RANGE, size=(len(noise), 1)) / math.sqrt(dimension)).astype(np.float32)
        noise += embeddings[sources[part]]
        normalise_rows(noise)
        embeddings[copy_rows[part]] = noise
    source_of[copy_rows] = sources
    return embeddings, source_of


def naive_keep(embeddings: np.ndarray, similarity: np.ndarray, uids: np.ndarray, eps: float):
    """The rule read literally, as the reference: full m x m similarity, members visited by a Python loop.

    Returns (keep, kept row, max_sim) in row order.
    """
    order = sorted(range(len(uids)), key=lambda row: (float(similarity[row]), uids[row]))
    ordered = embeddings[order]
    pairwise = ordered @ ordered.T
    threshold = 1.0 - eps
    keep = np.empty(len(order), dtype=bool)
    kept_row = np.empty(len(order), dtype=np.int64)
    max_sim = np.empty(len(order), dtype=np.float64)
    kept_position = [0] * len(order)
    for j, row in enumerate(order):
        earlier = pairwise[j, :j]
        dropped = bool((earlier > threshold).any())
        kept_position[j] = kept_position[int(np.argmax(earlier))] if dropped else j
        keep[row] = not dropped
        kept_row[row] = order[kept_position[j]]
        max_sim[row] = earlier.max() if j else -np.inf
    return keep, kept_row, max_sim


def check_agreement(clusters: list[np.ndarray], embeddings, similarity, uids, eps: float) -> dict:
    checked = []
    for rows in clusters:
        members = embeddings[rows]
        result = semdedup_cluster(members, similarity[rows], uids[rows], eps)
        keep, kept_row, max_sim = naive_keep(members, similarity[rows], uids[rows], eps)
        finite = np.isfinite(max_sim)
        checked.append(
            {
                "members": len(rows),
                "dropped": int((~keep).sum()),
                "keep_identical": bool(np.array_equal(result.keep, keep)),
                "kept_member_identical": bool(np.array_equal(result.kept_row, kept_row)),
                "max_abs_max_sim_difference": float(np.abs(result.max_sim[finite] - max_sim[finite]).max())
                if finite.any()
                else 0.0,
            }
        )
        logger.info("agreement: %s", checked[-1])
    return {
        "clusters": checked,
        "all_keep_masks_identical": all(c["keep_identical"] for c in checked),
        "all_kept_members_identical": all(c["kept_member_identical"] for c in checked),
    }


def write_markdown(result: dict, path: Path) -> None:
    fit, assign, semdedup = result["kmeans_fit"], result["assign"], result["semdedup"]
    predrawn = result["kmeans_fit_on_predrawn_sample"]
    big = result["one_big_cluster"]
    sizes = result["cluster_sizes"]
    planted = result["planted"]
    agreement = result["agreement"]
    lines = [
        "# SemDeDup throughput",
        "",
        f"{result['rows']:,} x {result['dim']} synthetic unit float32 embeddings ({result['topics']:,} lognormal "
        f"topics, {planted['copies']:,} planted near-copies = {result['duplicate_share']:.0%}), k = {result['k']}, "
        f"eps = {result['eps']}, device {result['device']}; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores.",
        "",
        "| phase | seconds | rows/s |",
        "|---|---:|---:|",
        f"| k-means fit ({fit['sample_rows']:,}-row sample, {fit['iterations']} iterations) | {fit['seconds']:.1f} | "
        f"{fit['sample_rows_per_second']:,} |",
        f"| k-means fit, only a pre-drawn {predrawn['sample_rows']:,}-row sample passed ({predrawn['iterations']} "
        f"iterations) | {predrawn['seconds']:.1f} | {predrawn['sample_rows_per_second']:,} |",
        f"| assign ({result['rows']:,} rows) | {assign['seconds']:.1f} | {assign['rows_per_second']:,} |",
        f"| SemDeDup ({result['k']} clusters) | {semdedup['seconds']:.1f} | {semdedup['rows_per_second']:,} |",
        *(
            [
                f"| `max_similarity_to_earlier`, one cluster of {big['members']:,} members | {big['seconds']:.1f} | "
                f"{big['rows_per_second']:,} |"
            ]
            if big
            else []
        ),
        "",
        "The first k-means row passes all rows to the seam, which normalises a copy of every row before faiss "
        "samples 100 x k of them; the second passes only a sample, as the cluster stage does. The total below "
        "covers generation, the first fit, assign and SemDeDup.",
        "",
        *(
            [
                f"The {big['members']:,}-member cluster: numpy's traced peak during the call was "
                f"{big['traced_peak_mib']:,} MiB (blocks of {big['block_rows']} rows and columns), where the "
                f"all-pairs matrix would be {big['all_pairs_matrix_mib']:,} MiB.",
                "",
            ]
            if big
            else []
        ),
        f"Total {result['total_seconds']:.1f} s including {result['generation_seconds']:.1f} s of data generation; "
        f"peak RSS {result['peak_rss_mib']:,} MiB (the embeddings are {result['embeddings_mib']:,} MiB, and the "
        "seam's normalised copy of them during the first fit as much again). "
        f"Cluster sizes: min {sizes['min']:,}, median {sizes['median']:,}, max {sizes['max']:,}; "
        f"sum of squared sizes {sizes['sum_of_squares']:.3g} (SemDeDup's work is proportional to it).",
        "",
        f"Kept at eps {result['eps']}: {semdedup['kept']:,} ({semdedup['kept_fraction']:.2%}). Planted groups (a "
        f"source and its copies): {planted['groups']:,}; with exactly one survivor "
        f"{planted['groups_with_one_survivor']:,}, with several {planted['groups_with_several_survivors']:,} "
        f"({planted['groups_split_across_clusters']:,} groups have members in different clusters, and two copies "
        "of one source can be less alike than 1 - eps when both precede it), with none "
        f"{planted['groups_with_no_survivor']:,}. Rows outside planted groups dropped: "
        f"{planted['unplanted_rows_dropped']:,}.",
        "",
        "| eps | kept share |",
        "|---:|---:|",
        *[f"| {eps} | {share:.4f} |" for eps, share in result["kept_fraction_by_eps"].items()],
        "",
        "`eps_for_keep_fraction` (over all max_sim values, "
        f"{result['eps_for_keep_fraction_seconds']:.2f} s per call): "
        + ", ".join(f"{fraction} -> eps {eps:.4f}" for fraction, eps in result["eps_for_keep_fraction"].items())
        + ".",
        "",
        f"Agreement with the naive all-pairs reference on {len(agreement['clusters'])} clusters "
        f"({', '.join(str(c['members']) for c in agreement['clusters'])} members): keep masks identical: "
        f"{agreement['all_keep_masks_identical']}, kept members identical: "
        f"{agreement['all_kept_members_identical']}, largest max_sim difference "
        f"{max(c['max_abs_max_sim_difference'] for c in agreement['clusters']):.2g}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000, help="clusters (default: ~1,000 members each at 1M rows)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS)
    parser.add_argument("--duplicate-share", type=float, default=0.05)
    parser.add_argument("--check-clusters", type=int, default=10, help="random clusters checked besides the largest")
    parser.add_argument(
        "--big-cluster-rows", type=int, default=100_000, help="members of the one-big-cluster measurement (0: skip)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where k-means and assign run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "semdedup.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    embeddings, source_of = synthetic_embeddings(args.rows, args.dim, 2 * args.k, args.duplicate_share, args.seed)
    # uid order deliberately unrelated to row order.
    uids = np.array(
        [f"{value:016x}" for value in np.random.default_rng(args.seed + 1).permutation(args.rows)], dtype=object
    )
    generation_seconds = time.perf_counter() - started
    logger.info("generated %d x %d in %.1f s", args.rows, args.dim, generation_seconds)

    def fit(vectors: np.ndarray):
        return faiss_seam.spherical_kmeans(
            vectors, args.k, iterations=KMEANS_ITERATIONS, seed=args.seed,
            max_points_per_centroid=MAX_POINTS_PER_CENTROID, threads=threads, device=args.device,
        )

    phase = time.perf_counter()
    kmeans = fit(embeddings)
    fit_seconds = time.perf_counter() - phase
    logger.info("k-means fit: %.1f s on %d sampled rows", fit_seconds, kmeans.sample_size)

    phase = time.perf_counter()
    cluster, similarity = faiss_seam.assign(embeddings, kmeans.centroids, device=args.device)
    assign_seconds = time.perf_counter() - phase
    logger.info("assign: %.1f s", assign_seconds)

    phase = time.perf_counter()
    by_cluster = np.argsort(cluster, kind="stable")
    sizes = np.bincount(cluster, minlength=args.k)
    boundaries = np.concatenate([[0], np.cumsum(sizes)])
    keep = np.empty(args.rows, dtype=bool)
    max_sim = np.empty(args.rows, dtype=np.float32)
    kept_row = np.empty(args.rows, dtype=np.int64)
    for index in range(args.k):
        rows = by_cluster[boundaries[index] : boundaries[index + 1]]
        if len(rows) == 0:
            continue
        result = semdedup_cluster(embeddings[rows], similarity[rows], uids[rows], args.eps)
        keep[rows] = result.keep
        max_sim[rows] = result.max_sim
        kept_row[rows] = rows[result.kept_row]
    semdedup_seconds = time.perf_counter() - phase
    logger.info("semdedup: %.1f s, kept %d of %d", semdedup_seconds, keep.sum(), args.rows)
    total_seconds = time.perf_counter() - started

    # max_sim does not depend on eps: every other eps is a comparison away.
    phase = time.perf_counter()
    eps_by_fraction = {str(fraction): eps_for_keep_fraction(max_sim, fraction) for fraction in KEEP_FRACTIONS}
    eps_seconds = (time.perf_counter() - phase) / len(KEEP_FRACTIONS)
    widened = max_sim.astype(np.float64)
    kept_by_eps = {str(eps): float((widened <= 1.0 - eps).mean()) for eps in EPS_TABLE}

    # A planted group is a source row and its copies; SemDeDup should keep exactly one of each.
    planted_rows = np.flatnonzero(source_of >= 0)
    group_of = np.arange(args.rows)
    group_of[planted_rows] = source_of[planted_rows]
    in_group = np.zeros(args.rows, dtype=bool)
    in_group[planted_rows] = True
    in_group[source_of[planted_rows]] = True
    group_ids = np.unique(group_of[in_group])
    survivors = np.bincount(group_of[in_group & keep], minlength=args.rows)[group_ids]
    planted = {
        "copies": len(planted_rows),
        "groups": len(group_ids),
        "groups_with_one_survivor": int((survivors == 1).sum()),
        "groups_with_no_survivor": int((survivors == 0).sum()),
        # Two copies with noise ~0.3 each are only ~0.92 alike: if both precede their source, both survive.
        "groups_with_several_survivors": int((survivors > 1).sum()),
        "groups_split_across_clusters": int(
            len(np.unique(group_of[planted_rows][cluster[planted_rows] != cluster[source_of[planted_rows]]]))
        ),
        "unplanted_rows_dropped": int((~keep & ~in_group).sum()),
    }
    logger.info("planted: %s", planted)

    rng = np.random.default_rng(args.seed + 2)
    nonempty = np.flatnonzero(sizes)
    checked = [int(np.argmax(sizes))] + [
        int(c) for c in rng.choice(nonempty[nonempty != np.argmax(sizes)], size=args.check_clusters, replace=False)
    ]
    agreement = check_agreement(
        [by_cluster[boundaries[c] : boundaries[c + 1]] for c in checked], embeddings, similarity, uids, args.eps
    )
    peak = memory.stop()

    # How the cluster stage calls the seam: only a pre-drawn sample, so faiss's own training time is visible
    # without the seam's normalised copy of every row.
    sample = embeddings[np.sort(rng.choice(args.rows, size=kmeans.sample_size, replace=False))]
    phase = time.perf_counter()
    sample_kmeans = fit(sample)
    sample_fit_seconds = time.perf_counter() - phase
    del sample
    logger.info("k-means fit on a pre-drawn %d-row sample: %.1f s", sample_kmeans.sample_size, sample_fit_seconds)

    big_cluster = None
    if args.big_cluster_rows:
        members = embeddings[: min(args.big_cluster_rows, args.rows)]  # a view: nothing copied
        tracemalloc.start()
        phase = time.perf_counter()
        max_similarity_to_earlier(members, DEFAULT_BLOCK_ROWS)
        big_seconds = time.perf_counter() - phase
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        big_cluster = {
            "members": len(members),
            "seconds": round(big_seconds, 2),
            "rows_per_second": round(len(members) / big_seconds),
            "traced_peak_mib": round(traced_peak / 2**20, 1),
            "all_pairs_matrix_mib": round(len(members) ** 2 * 4 / 2**20),
            "block_rows": DEFAULT_BLOCK_ROWS,
        }
        logger.info("one cluster of %d members: %s", len(members), big_cluster)

    result = {
        "benchmark": "semdedup",
        "rows": args.rows,
        "dim": args.dim,
        "k": args.k,
        "topics": 2 * args.k,
        "duplicate_share": args.duplicate_share,
        "eps": args.eps,
        "device": kmeans.device,
        "seed": args.seed,
        "generation_seconds": round(generation_seconds, 2),
        "kmeans_fit": {
            "seconds": round(fit_seconds, 2),
            "sample_rows": kmeans.sample_size,
            "iterations": kmeans.iterations,
            "max_points_per_centroid": MAX_POINTS_PER_CENTROID,
            "sample_rows_per_second": round(kmeans.sample_size / fit_seconds),
            "note": "includes the seam's normalised copy of all rows before faiss samples",
        },
        "kmeans_fit_on_predrawn_sample": {
            "seconds": round(sample_fit_seconds, 2),
            "sample_rows": sample_kmeans.sample_size,
            "iterations": sample_kmeans.iterations,
            "sample_rows_per_second": round(sample_kmeans.sample_size / sample_fit_seconds),
        },
        "assign": {"seconds": round(assign_seconds, 2), "rows_per_second": round(args.rows / assign_seconds)},
        "semdedup": {
            "seconds": round(semdedup_seconds, 2),
            "rows_per_second": round(args.rows / semdedup_seconds),
            "kept": int(keep.sum()),
            "kept_fraction": float(keep.mean()),
            "block_rows": DEFAULT_BLOCK_ROWS,
        },
        "one_big_cluster": big_cluster,
        "total_seconds": round(total_seconds, 2),
        "rows_per_second_end_to_end": round(args.rows / (total_seconds - generation_seconds)),
        "cluster_sizes": {
            "min": int(sizes.min()),
            "median": int(np.median(sizes)),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
            "sum_of_squares": float((sizes.astype(np.float64) ** 2).sum()),
        },
        "kept_fraction_by_eps": kept_by_eps,
        "eps_for_keep_fraction": eps_by_fraction,
        "eps_for_keep_fraction_seconds": round(eps_seconds, 3),
        "planted": planted,
        "agreement": agreement,
        "peak_rss_mib": round(peak / 2**20),
        "embeddings_mib": round(embeddings.nbytes / 2**20),
        "machine": {
            "cpu": cpu_model(),
            "cores": threads,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
        },
    }
    write_result(result, args.out)
    write_markdown(result, args.out.with_suffix(".md"))
    logger.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    if not (agreement["all_keep_masks_identical"] and agreement["all_kept_members_identical"]):
        logger.error("SemDeDup disagrees with the naive reference")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
