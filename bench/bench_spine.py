"""End-to-end spine benchmark: ingest -> match -> count -> balance on >= 1,000,000 rows with Spark local[2].

Reports rows/s per stage and overall, and the peak resident memory of the whole process tree (driver, JVM and
Python workers, sampled from /proc every 0.2 s). Run: `python bench/bench_spine.py --out bench/results/spine.json`.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from benchkit import PeakMemory, cpu_model, demo_corpus_and_spark, write_result

logger = logging.getLogger("bench_spine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--t", type=float, default=2_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/spine.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from curation.ops.metadata import load_metadata
    from curation.pipeline import run_one_stage

    work, spark = demo_corpus_and_spark("bench-spine-", args.rows, args.shards, args.master)
    entries = load_metadata(work / "metadata.json")
    memory = PeakMemory()
    memory.start()
    timings = {}
    started = time.perf_counter()
    for name, call in (
        ("ingest", lambda: run_one_stage(spark, "ingest", [str(work / "raw")], work / "ingest")),
        ("match", lambda: run_one_stage(spark, "match", work / "ingest", work / "match",
                                        {"metadata": str(work / "metadata.json")})),
        ("count", lambda: run_one_stage(spark, "count", work / "match", work / "count")),
        ("balance", lambda: run_one_stage(spark, "balance", work / "count", work / "balance", {"t": args.t})),
    ):
        stage_started = time.perf_counter()
        stage_record = call()
        seconds = time.perf_counter() - stage_started
        timings[name] = {"seconds": round(seconds, 2), "rows_in": stage_record["rows_in"],
                         "rows_out": stage_record["rows_out"],
                         "rows_per_second": round(stage_record["rows_in"] / seconds)}
        logger.info("%s: %s", name, timings[name])
    total = time.perf_counter() - started
    memory.stop()
    result = {
        "rows": args.rows,
        "metadata_entries": len(entries),
        "master": args.master,
        "stages": timings,
        "total_seconds": round(total, 2),
        "rows_per_second_end_to_end": round(args.rows / total),
        "peak_rss_process_tree_mib": round(memory.peak / 2**20),
        "kept": timings["balance"]["rows_out"],
        "t": args.t,
        "python": sys.version.split()[0],
        "spark": spark.version,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    spark.stop()
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
