"""dedup_text on the two inputs that stress MinHash-LSH buckets most, end to end with Spark local[2].

    python bench/bench_dedup_text_extremes.py [--rows 1000000] [--case repeated|one_char|both]
                                              [--out bench/results/dedup_text_extremes.json]

Cases (each --rows rows with distinct urls, so ingest keeps them all):
- `repeated`: one caption repeated --rows times. dedup_text collapses captions equal after normalisation before
  MinHash (`caption_similarity_edges`): one text enters LSH, the others are linked to its smallest uid directly,
  so the cost is a group-by on the normalised caption and a star of --rows - 1 edges for connected components.
- `one_char`: --rows distinct captions that each differ from one base caption (a real CC3M caption) in one
  character: row r replaces the character at position r // A by chr(0x4E00 + r % A) (CJK ideographs, none in the
  base; A = ceil(rows / len(base))). Every variant shares most LSH bands with all others, so each band's bucket
  holds nearly every row; a bucket above `full_pairs_limit` pairs each member with `max_anchors` anchors (the
  smallest uids), so candidates are about bands x anchors x rows before `distinct`, and anchors x rows after.

Measured: the dedup_text stage alone (ingest runs first, untimed), seconds, peak RSS of the process tree
(driver + JVM + Python workers, benchkit.PeakMemory), the stage record (verified edges, groups, largest group), and
for `one_char` the LSH bucket sizes and candidate pairs, recomputed on the driver with the stage's own MinHash and
band functions (not timed).
"""

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from benchkit import PeakMemory, write_result

logger = logging.getLogger("bench_dedup_text_extremes")

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "captions_cc3m" / "cc3m_validation.parquet"
# Used when ../shared/data is absent: a caption of the same shape as CC3M's.
FALLBACK_CAPTION = "an angler fishes the river on a snowy day near the old stone bridge in the valley ."
SHARDS = 8
SEED = 0
FIRST_REPLACEMENT = 0x4E00


def base_caption() -> str:
    """The longest CC3M validation caption of at most 100 characters (a typical alt-text length)."""
    if not CAPTIONS.exists():
        logger.warning("%s is absent: using a fixed caption", CAPTIONS)
        return FALLBACK_CAPTION
    captions = pq.read_table(CAPTIONS, columns=["caption"]).column("caption").to_pylist()
    return max((c for c in captions if c and len(c) <= 100), key=lambda c: (len(c), c))


def captions_for(case: str, rows: int, base: str) -> list[str]:
    if case == "repeated":
        return [base] * rows
    alphabet = math.ceil(rows / len(base))
    return [base[: r // alphabet] + chr(FIRST_REPLACEMENT + r % alphabet) + base[r // alphabet + 1 :]
            for r in range(rows)]


def write_raw(folder: Path, captions: list[str]) -> None:
    folder.mkdir(parents=True)
    per_shard = math.ceil(len(captions) / SHARDS)
    for shard in range(SHARDS):
        rows = range(shard * per_shard, min(len(captions), (shard + 1) * per_shard))
        pq.write_table(pa.table({
            "url": [f"http://images.example/{r}.jpg" for r in rows],
            "caption": captions[rows.start : rows.stop],
        }), folder / f"part-{shard:05d}.parquet")


def bucket_statistics(captions: list[str], record: dict, max_anchors: int, full_pairs_limit: int) -> dict:
    """LSH bucket sizes and candidate pairs of the distinct captions, with the stage's MinHash and band keys."""
    from curation.ops.lsh import band_hashes
    from curation.ops.minhash import MinHasher
    from curation.ops.shingles import parse_shingle_spec

    info = record["dedup"]
    kind, size = parse_shingle_spec(info["shingles"])
    hasher = MinHasher(info["num_perm"], SEED, kind=kind, size=size)
    distinct = sorted(set(captions))
    keys = np.concatenate([band_hashes(hasher.signatures(distinct[start : start + 50_000]), info["bands"],
                                       info["rows_per_band"]) for start in range(0, len(distinct), 50_000)])
    largest, candidates = [], 0
    for band in range(keys.shape[1]):
        _, counts = np.unique(keys[:, band], return_counts=True)
        largest.append(int(counts.max()))
        full = counts[counts <= full_pairs_limit]
        anchored = counts[counts > full_pairs_limit]
        candidates += int((full * (full - 1) // 2).sum())
        candidates += int((max_anchors * (max_anchors - 1) // 2 + (anchored - max_anchors) * max_anchors).sum())
    return {"distinct_captions": len(distinct), "largest_bucket_per_band": largest,
            "candidate_pairs_before_distinct": candidates}


def run_case(spark, case: str, rows: int, base: str) -> dict:
    from curation.pipeline import run_one_stage
    from curation.stages.dedup_text import STAGE

    work = Path(tempfile.mkdtemp(prefix=f"bench-dedup-{case}-"))
    captions = captions_for(case, rows, base)
    write_raw(work / "raw", captions)
    run_one_stage(spark, "ingest", [str(work / "raw")], work / "ingest")
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    record = run_one_stage(spark, "dedup_text", work / "ingest", work / "dedup_text", options={"seed": SEED})
    seconds = time.perf_counter() - started
    peak = memory.stop()
    defaults = STAGE.Options()
    result = {
        "case": case, "rows_in": record["rows_in"], "rows_out": record["rows_out"], "drops": record["drops"],
        "dedup": record["dedup"], "seconds": round(seconds, 2), "rows_per_second": round(record["rows_in"] / seconds),
        "peak_rss_process_tree_mib": round(peak / 2**20), "base_caption": base,
    }
    if case == "one_char":
        result["lsh"] = bucket_statistics(captions, record, defaults.max_anchors, defaults.full_pairs_limit)
    logger.info("%s: %s", case, result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--case", choices=("repeated", "one_char", "both"), default="both")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup_text_extremes.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from curation.spark.session import get_spark

    spark = get_spark(master=args.master, conf={"spark.driver.memory": "4g"})
    base = base_caption()
    cases = ("repeated", "one_char") if args.case == "both" else (args.case,)
    results = {"cases": [run_case(spark, case, args.rows, base) for case in cases], "master": args.master,
               "cores": os.cpu_count(), "spark": spark.version}
    spark.stop()
    write_result(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
