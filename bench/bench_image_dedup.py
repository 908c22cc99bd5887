"""Exact image near-duplicate groups (issue 18): recall and cost of `curation.ops.phash_neighbors` against the old
pigeonhole-with-anchors scheme, the Spark path's agreement with the op, and a dense cluster in bounded memory.

    python bench/bench_image_dedup.py [--sizes 100000 1000000 10000000] [--old-sizes 100000 1000000]
                                      [--spark-sizes 100000 1000000] [--dense 1000000]
                                      [--out bench/results/image_dedup.json]

Data: N uniformly random 64-bit hashes from a seeded numpy Generator; --planted rows at random positions are
copies of --planted other rows at random positions with 1, 2, 3 or 4 random bits flipped (a quarter each):
planted pairs at Hamming distance 1..4, found when both rows end up in one group at max_distance 4. (Random
positions matter for the old scheme: its anchors are the first members of a bucket in uid order.)

Measured, each phase on its own:
1. the op, `near_duplicate_groups(hashes, 4)`, at each --sizes N: seconds, peak RSS of the process (benchkit,
   sampled every 0.2 s; the process holds the inputs too), tables, chance candidates per distinct hash the plan
   expected and measured (2 x pairs compared / distinct hashes: the other hashes a hash meets in its buckets),
   verified edges, recall of the planted pairs; the plan minimises tables + chance candidates / 64 per hash
   (`CANDIDATES_PER_KEY`);
2. the old scheme at each --old-sizes N, re-implemented here in numpy as the baseline (the Spark code it
   replaces: d + 1 = 5 chunks of 12-13 bits, a bucket of up to 64 members compares all pairs, a larger one pairs
   member i with the first min(i, 8) members in uid = row order, verified pairs joined by connected components):
   recall, candidate pairs per row, seconds;
3. the Spark path, `curation.spark.image_dedup.near_duplicate_hash_groups` on local[2] over the same hashes
   (uids "u%010d" so that uid order is row order) at each --spark-sizes N: seconds (from a parquet file already
   written, to the groups collected), and whether every row's group equals the op's;
4. --dense hashes drawn uniformly within Hamming radius 2 of one centre: distinct count, pairs compared, verified
   edges, seconds, peak RSS of the op.
The process tree's RSS includes the Spark JVM and workers in phase 3 only (phases 1, 2, 4 run before Spark
starts).
"""

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchkit import PeakMemory, cpu_model, write_result

from curation.ops.imagehash import hamming_distances, pigeonhole_chunks
from curation.ops.phash_neighbors import CANDIDATES_PER_KEY, near_duplicate_groups

logger = logging.getLogger("bench_image_dedup")

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_DISTANCE = 4
OLD_FULL_PAIRS_LIMIT = 64
OLD_MAX_ANCHORS = 8


def flip_bits(rng, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values[i] with counts[i] distinct random bits flipped."""
    order = np.argsort(rng.random((len(values), 64)), axis=1)
    chosen = order < counts[:, None]
    masks = (chosen.astype(np.uint64) << np.arange(64, dtype=np.uint64)[None, :]).sum(axis=1, dtype=np.uint64)
    return values ^ masks


def planted_hashes(rows: int, planted: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, source rows, copy rows): copy i is source i at distance 1 + i % 4; all at random positions."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
    positions = rng.permutation(rows)[: 2 * planted]
    sources, copies = positions[:planted], positions[planted:]
    hashes[copies] = flip_bits(rng, hashes[sources], 1 + np.arange(planted) % 4)
    return hashes, sources, copies


def planted_recall(groups: np.ndarray, sources: np.ndarray, copies: np.ndarray) -> float:
    return float((groups[sources] == groups[copies]).mean())


def components_of(rows: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(rows, rows))
    return connected_components(graph, directed=False)[1]


def old_scheme(hashes: np.ndarray) -> tuple[np.ndarray, int]:
    """(component label per row, candidate pairs) of the replaced pigeonhole + anchors pairing, verified."""
    rows = len(hashes)
    lefts, rights, candidates = [], [], 0
    for offset, width in pigeonhole_chunks(MAX_DISTANCE):
        values = (hashes >> np.uint64(offset)) & np.uint64((1 << width) - 1)
        order = np.argsort(values, kind="stable")  # stable: members in row (uid) order within a bucket
        sorted_values = values[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        sizes = np.diff(np.r_[starts, rows])
        rank = np.arange(rows) - np.repeat(starts, sizes)
        partners = np.where(np.repeat(sizes, sizes) <= OLD_FULL_PAIRS_LIMIT, rank, np.minimum(rank, OLD_MAX_ANCHORS))
        total = int(partners.sum())
        candidates += total
        right = np.repeat(np.arange(rows), partners)
        left = np.repeat(np.repeat(starts, sizes), partners) + (np.arange(total) - np.repeat(np.cumsum(partners)
                                                                                             - partners, partners))
        within = hamming_distances(hashes[order[left]], hashes[order[right]]) <= MAX_DISTANCE
        lefts.append(order[left[within]])
        rights.append(order[right[within]])
    return components_of(rows, np.concatenate(lefts), np.concatenate(rights)), candidates


def measure_op(hashes: np.ndarray) -> dict:
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    groups, counters = near_duplicate_groups(hashes, MAX_DISTANCE)
    seconds = time.perf_counter() - started
    return {
        "groups": groups,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(memory.stop() / 2**20),
        "distinct": counters.distinct,
        "tables": counters.tables,
        "expected_candidates_per_hash": round(counters.expected_candidates, 2),
        "candidates_per_hash": round(2 * counters.compared / max(counters.distinct, 1), 2),
        "pairs_compared": counters.compared,
        "edges": counters.edges,
    }


def spark_groups(spark, hashes: np.ndarray) -> tuple[dict[int, int], float]:
    """{row: group row} for the rows in groups of two or more, and the seconds the Spark path took."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.spark.image_dedup import near_duplicate_hash_groups

    folder = Path(tempfile.mkdtemp(prefix="bench_image_dedup_"))
    uids = pa.array([f"u{row:010d}" for row in range(len(hashes))], pa.string())
    pq.write_table(pa.table({"uid": uids, "image_phash": pa.array(hashes.view(np.int64))}), folder / "rows.parquet")
    started = time.perf_counter()
    result = near_duplicate_hash_groups(spark.read.parquet(str(folder / "rows.parquet")), MAX_DISTANCE)
    collected = result.groups.collect()
    seconds = time.perf_counter() - started
    return {int(row["uid"][1:]): int(row["group"][1:]) for row in collected}, seconds


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()


def write_markdown(result: dict, out: Path) -> None:
    lines = [
        "# Exact image near-duplicate groups",
        "",
        f"Commit `{result['commit']}`, `{result['command']}`; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, shared with other jobs (5-minute load average "
        f"{result['machine']['load_average_at_end'][1]:.0f} at the end: timings are upper bounds).",
        "",
        f"N random 64-bit hashes with {result['planted']:,} planted pairs at distance 1-4, max_distance "
        f"{MAX_DISTANCE}. Candidates per hash: other hashes a hash meets in its buckets; the plan minimises tables + "
        f"expected candidates / {CANDIDATES_PER_KEY} per hash.",
        "",
        "| N | tables | expected cand./hash | measured cand./hash | pairs compared per hash | edges | recall | "
        "seconds | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["op"]:
        lines.append(f"| {row['rows']:,} | {row['tables']} | {row['expected_candidates_per_hash']} | "
                     f"{row['candidates_per_hash']} | {row['pairs_compared'] / row['distinct']:.2f} | "
                     f"{row['edges']:,} | {row['recall']} | {row['seconds']} | {row['peak_rss_mib']:,} |")
    lines += ["", "Old scheme (5 chunks, buckets over 64 members paired with 8 anchors), the baseline:", "",
              "| N | candidate pairs per row | recall | seconds |", "|---:|---:|---:|---:|"]
    for row in result["old"]:
        lines.append(f"| {row['rows']:,} | {row['candidates_per_row']} | {row['recall']} | {row['seconds']} |")
    lines += ["", "Spark path (`near_duplicate_hash_groups`, local[2]) against the op:", "",
              "| N | seconds | rows in groups | groups identical |", "|---:|---:|---:|---|"]
    for row in result["spark"]:
        lines.append(f"| {row['rows']:,} | {row['seconds']} | {row['rows_in_groups']:,} | {row['identical']} |")
    dense = result.get("dense")
    if dense:
        lines += ["", f"Dense cluster: {dense['rows']:,} hashes uniformly within radius 2 of one centre collapse to "
                  f"{dense['distinct']:,} distinct values; {dense['pairs_compared']:,} pairs compared, "
                  f"{dense['edges']:,} verified edges, one group: {dense['one_group']}; {dense['seconds']} s, "
                  f"peak RSS {dense['peak_rss_mib']:,} MiB."]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--old-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--spark-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--dense", type=int, default=1_000_000, help="hashes within radius 2 of one centre (0: skip)")
    parser.add_argument("--planted", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "image_dedup.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    op_rows, old_rows, spark_rows, op_groups = [], [], [], {}
    for rows in sorted(set(args.sizes) | set(args.spark_sizes)):
        hashes, sources, copies = planted_hashes(rows, args.planted, args.seed)
        measured = measure_op(hashes)
        groups = measured.pop("groups")
        measured = {"rows": rows, **measured, "recall": planted_recall(groups, sources, copies)}
        logger.info("op: %s", measured)
        if rows in args.sizes:
            op_rows.append(measured)
        if rows in args.spark_sizes:
            op_groups[rows] = groups
        if rows in args.old_sizes:
            started = time.perf_counter()
            labels, candidates = old_scheme(hashes)
            old = {"rows": rows, "candidates_per_row": round(candidates / rows, 2),
                   "recall": planted_recall(labels, sources, copies),
                   "seconds": round(time.perf_counter() - started, 2)}
            logger.info("old scheme: %s", old)
            old_rows.append(old)

    dense = None
    if args.dense:
        rng = np.random.default_rng(args.seed + 1)
        centre = rng.integers(0, 2**64, dtype=np.uint64)
        hashes = flip_bits(rng, np.full(args.dense, centre, dtype=np.uint64), rng.integers(0, 3, size=args.dense))
        measured = measure_op(hashes)
        groups = measured.pop("groups")
        dense = {"rows": args.dense, **measured, "one_group": bool((groups == 0).all())}
        logger.info("dense: %s", dense)

    if args.spark_sizes:
        from curation.spark.session import get_spark

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = get_spark(master="local[2]", conf={"spark.driver.memory": "4g"})
        for rows in args.spark_sizes:
            memory = PeakMemory()
            memory.start()
            found, seconds = spark_groups(spark, planted_hashes(rows, args.planted, args.seed)[0])
            groups = op_groups[rows]
            sizes = np.bincount(groups, minlength=rows)
            expected = {int(row): int(groups[row]) for row in np.flatnonzero(sizes[groups] > 1)}
            spark_rows.append({"rows": rows, "seconds": round(seconds, 1), "rows_in_groups": len(found),
                               "identical": found == expected,
                               "peak_rss_mib_with_spark": round(memory.stop() / 2**20)})
            logger.info("spark: %s", spark_rows[-1])
        spark.stop()

    result = {
        "benchmark": "image_dedup",
        "commit": git_commit(),
        "command": "python bench/bench_image_dedup.py " + " ".join(sys.argv[1:]),
        "max_distance": MAX_DISTANCE,
        "planted": args.planted,
        "candidates_per_key": CANDIDATES_PER_KEY,
        "op": op_rows,
        "old": old_rows,
        "spark": spark_rows,
        "dense": dense,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average_at_end": os.getloadavg()},
    }
    write_result(result, args.out)
    write_markdown(result, args.out.with_suffix(".md"))
    exact = all(row["recall"] == 1.0 for row in op_rows) and all(row["identical"] for row in spark_rows)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
