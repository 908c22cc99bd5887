"""SemDeDup of one cluster larger than an Arrow array with 32-bit offsets can hold, through the Spark path.

    python bench/bench_semdedup_large.py [--rows 2500000] [--dim 512] [--cap <stage default>]
                                         [--subsample-rows 20000] [--subsample-cap 5000] [--master local[2]]
                                         [--out bench/results/semdedup_large.json]

Data: --rows float16 vectors of --dim dimensions, ALL in cluster 0 (at 2.5M x 512 the packed vectors are 2.4 GiB,
past the 2 GiB of one binary Arrow array), generated inside Spark tasks: task c makes rows
[c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS) from numpy's Generator seeded by (--seed, c), so the driver never holds a
vector. A row is 0.6 * centroid + 0.8 * (a random unit direction), normalised (cosine ~0.6 to the centroid, ~0.36
between two rows: far from duplicates), or with --topics T, 0.8 * one of T topic directions (each itself
0.6 * centroid + 0.8 * a random direction) + 0.6 * a random direction (cosine ~0.64 between two rows of one topic):
a cluster with structure inside, as a real oversized cluster has; the last --copy-share of each chunk are planted
near-copies of other rows of their chunk (noise norm uniform in [0.05, 0.3]: cosine 0.958-0.999, all above the
0.93 threshold of eps 0.07). uids are blake2b-128 of (seed, row). centroid_similarity is the float16 row's cosine
to the centroid, as the cluster stage's assignment would give.

Measured:
1. the large run: `curation.spark.semantic.semdedup_similarities` with --cap (default: the semdedup stage's
   `max_cluster_rows`), i.e. the stage's own Spark path: the sub-k-means split of the over-cap cluster (fit on a
   u(seed, uid) sample on the driver), one shuffle of the vectors by (cluster, part) sorted into SemDeDup order,
   and the streamed blockwise similarities through a memmap; then the eps 0.07 decisions per part
   (`resolved_decisions`). Wall time of each phase, the process tree's peak RSS (benchkit.PeakMemory: the driver,
   Spark's JVM and its Python workers), the part sizes, kept rows, and per planted group (a source and its copies)
   how many members survive (exactly one is right; a split that separated a group would leave two);
2. the split against the unsplit algorithm on the first --subsample-rows rows of the same data: SemDeDup with
   cap --subsample-cap (so the subsample IS split) and with no split (cap = the subsample size); how many kept
   members differ.

Skip 1 with --skip-large. Timings depend on the machine's load: say so when quoting them.
"""

import argparse
import dataclasses
import hashlib
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from benchkit import PeakMemory, cpu_model, write_result

from curation.ops.embeddings import EMBEDDING_COLUMN, pack
from curation.spark.semantic import CENTROID_SIMILARITY, CLUSTER, resolved_decisions, semdedup_similarities
from curation.spark.session import get_spark
from curation.stages.semdedup import STAGE as SEMDEDUP_STAGE

logger = logging.getLogger("bench_semdedup_large")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNK_ROWS = 10_000
CENTROID_WEIGHT, NOISE_WEIGHT = 0.6, 0.8
TOPIC_WEIGHT, TOPIC_NOISE_WEIGHT = 0.8, 0.6
COPY_NOISE_RANGE = (0.05, 0.3)
EPS = 0.07
GENERATED_SCHEMA = f"uid string, {CLUSTER} int, {CENTROID_SIMILARITY} float, {EMBEDDING_COLUMN} binary, _group long"


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _uids(seed: int, rows: np.ndarray) -> list[str]:
    return [hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=16).hexdigest() for row in rows.tolist()]


def _generator(rows: int, dim: int, copy_share: float, topics: int, seed: int):
    """mapInArrow worker: chunk ids in, the chunk's generated rows out (see the module docstring)."""

    def run(batches):
        shared = np.random.default_rng([seed, 1 << 40])
        centroid = _unit(shared.standard_normal((1, dim)))[0]
        topic_directions = _unit(CENTROID_WEIGHT * centroid + NOISE_WEIGHT * _unit(
            shared.standard_normal((max(topics, 1), dim))))
        for batch in batches:
            for chunk in batch.column(0).to_pylist():
                start, end = chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, rows)
                rng = np.random.default_rng([seed, chunk])
                count = end - start
                copies = int(count * copy_share)
                directions = _unit(rng.standard_normal((count, dim)))
                if topics:
                    anchors = topic_directions[rng.integers(0, topics, size=count)]
                    vectors = _unit(TOPIC_WEIGHT * anchors + TOPIC_NOISE_WEIGHT * directions)
                else:
                    vectors = _unit(CENTROID_WEIGHT * centroid + NOISE_WEIGHT * directions)
                sources = rng.integers(0, count - copies, size=copies)
                noise = _unit(rng.standard_normal((copies, dim))) * rng.uniform(*COPY_NOISE_RANGE, size=(copies, 1))
                vectors[count - copies :] = _unit(vectors[sources] + noise)
                half = vectors.astype(np.float16)
                stored = _unit(half.astype(np.float32))
                group = np.arange(start, end, dtype=np.int64)
                group[count - copies :] = start + sources
                yield pa.RecordBatch.from_arrays([
                    pa.array(_uids(seed, np.arange(start, end)), pa.string()),
                    pa.array(np.zeros(count, np.int32)),
                    pa.array((stored @ centroid.astype(np.float32)).astype(np.float32)),
                    pack(half),
                    pa.array(group),
                ], names=["uid", CLUSTER, CENTROID_SIMILARITY, EMBEDDING_COLUMN, "_group"])

    return run


def generated_rows(spark, rows: int, dim: int, copy_share: float, topics: int, seed: int):
    chunks = math.ceil(rows / CHUNK_ROWS)
    ids = spark.range(chunks, numPartitions=max(1, min(chunks, 64))).selectExpr("cast(id as int) as chunk")
    return ids.mapInArrow(_generator(rows, dim, copy_share, topics, seed), GENERATED_SCHEMA)


def run_semdedup(spark, generated, dim: int, cap: int, seed: int, block_rows: int) -> dict:
    """Phases of the stage's SemDeDup on `generated`; the kept uids are not collected (see kept_uids)."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    emb_df = generated.drop("_group").localCheckpoint()
    generated_seconds = time.perf_counter() - started
    started = time.perf_counter()
    similarities, oversized = semdedup_similarities(emb_df, block_rows, cap, seed, spark.sparkContext.broadcast)
    similarity_seconds = time.perf_counter() - started
    started = time.perf_counter()
    decisions = resolved_decisions(similarities, EPS).localCheckpoint()
    resolve_seconds = time.perf_counter() - started
    part_sizes = sorted(r["count"] for r in similarities.groupBy("_part").count().collect())
    groups = (generated.select("uid", "_group").join(decisions, "uid").groupBy("_group")
              .agg(F.count("*").alias("members"), F.sum(F.col("_keep").cast("int")).alias("kept")))
    # (planted group?, survivors capped at 2) -> groups.
    tally = {(r["planted"], r["kept"]): r["count"] for r in
             groups.groupBy((F.col("members") > 1).alias("planted"), F.least(F.col("kept"), F.lit(2)).alias("kept"))
             .count().collect()}
    return {
        "cap": cap, "split_clusters": len(oversized), "parts": len(part_sizes), "part_sizes": part_sizes,
        "largest_part_memmap_mib": round(max(part_sizes) * dim * 4 / 2**20, 1),
        "seconds": {"generate_and_checkpoint": round(generated_seconds, 1),
                    "split_shuffle_and_streamed_similarity": round(similarity_seconds, 1),
                    "resolve_eps": round(resolve_seconds, 1)},
        "kept": decisions.filter("_keep").count(),
        "planted_groups": {"exactly_one_kept": tally.get((True, 1), 0), "several_kept": tally.get((True, 2), 0),
                           "none_kept": tally.get((True, 0), 0)},
        "unplanted_rows_dropped": tally.get((False, 0), 0),
        "decisions": decisions,
    }


def kept_uids(decisions) -> set[str]:
    return {row["uid"] for row in decisions.filter("_keep").select("uid").collect()}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()


def main() -> int:
    default_cap = {field.name: field.default for field in dataclasses.fields(SEMDEDUP_STAGE.Options)}[
        "max_cluster_rows"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=2_500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cap", type=int, default=default_cap, help="max_cluster_rows (default: the stage's)")
    parser.add_argument("--copy-share", type=float, default=0.05)
    parser.add_argument("--topics", type=int, default=0, help="sub-topics inside the cluster (0: none)")
    parser.add_argument("--block-rows", type=int, default=2048)
    parser.add_argument("--subsample-rows", type=int, default=20_000)
    parser.add_argument("--subsample-cap", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "semdedup_large.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spark = get_spark(master=args.master, conf={"spark.driver.memory": "3g"})
    result = {
        "command": " ".join(["python", *sys.argv]), "commit": git_commit(), "cpu": cpu_model(),
        "master": args.master, "python": platform.python_version(), "rows": args.rows, "dim": args.dim,
        "copy_share": args.copy_share, "topics": args.topics, "eps": EPS, "block_rows": args.block_rows,
        "packed_vector_gib": round(args.rows * args.dim * 2 / 2**30, 2),
    }

    subsample = generated_rows(spark, args.subsample_rows, args.dim, args.copy_share, args.topics, args.seed)
    split = run_semdedup(spark, subsample, args.dim, args.subsample_cap, args.seed, args.block_rows)
    unsplit = run_semdedup(spark, subsample, args.dim, args.subsample_rows, args.seed, args.block_rows)
    split_kept, unsplit_kept = kept_uids(split.pop("decisions")), kept_uids(unsplit.pop("decisions"))
    result["subsample"] = {"rows": args.subsample_rows, "split": split, "unsplit": unsplit,
                           "kept_only_when_split": len(split_kept - unsplit_kept),
                           "kept_only_when_unsplit": len(unsplit_kept - split_kept)}
    logger.info("subsample: %s", result["subsample"])

    if not args.skip_large:
        memory = PeakMemory()
        memory.start()
        started = time.perf_counter()
        generated = generated_rows(spark, args.rows, args.dim, args.copy_share, args.topics, args.seed)
        large = run_semdedup(spark, generated, args.dim, args.cap, args.seed, args.block_rows)
        large.pop("decisions")
        large["total_seconds"] = round(time.perf_counter() - started, 1)
        large["peak_rss_mib"] = round(memory.stop() / 2**20)
        result["large"] = large
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
