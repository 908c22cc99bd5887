"""dedup_text end to end on >= 1,000,000 rows with Spark local[2]: rows/s and peak memory of the process tree.

The rows are the demo corpus (Zipf concept captions with planted templated near-duplicate families), ingested
first; only the dedup_text stage is timed. Run: `python bench/bench_dedup_text.py --out bench/results/dedup_text.json`.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from benchkit import PeakMemory, demo_corpus_and_spark, write_result

logger = logging.getLogger("bench_dedup_text")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # Ingest drops about 2.4% of the demo rows (planted bad rows and exact duplicates): 1,025,000 raw rows leave
    # over 1,000,000 for dedup_text.
    parser.add_argument("--rows", type=int, default=1_025_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup_text.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from curation.pipeline import run_one_stage

    work, spark = demo_corpus_and_spark("bench-dedup-", args.rows, 8, args.master)
    run_one_stage(spark, "ingest", [str(work / "raw")], work / "ingest")
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    record = run_one_stage(spark, "dedup_text", work / "ingest", work / "dedup_text")
    seconds = time.perf_counter() - started
    peak = memory.stop()
    result = {
        "rows_in": record["rows_in"],
        "rows_out": record["rows_out"],
        "drops": record["drops"],
        "dedup": record["dedup"],
        "seconds": round(seconds, 2),
        "rows_per_second": round(record["rows_in"] / seconds),
        "peak_rss_process_tree_mib": round(peak / 2**20),
        "master": args.master,
        "cores": os.cpu_count(),
        "spark": spark.version,
    }
    spark.stop()
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
