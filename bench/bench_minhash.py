"""MinHash signatures per second: curation's MinHasher against datasketch.MinHash.bulk, on one core.

    python bench/bench_minhash.py [--out bench/results/minhash.json] [--repeats 3]

Input: 100,000 real captions, the caption columns of captions_mixed, captions_cc3m, captions_coco and
captions_img2dataset/test_10000 (in that order, cut at 100,000; cycled should they ever fall short).
captions_mixed already holds the other three, so about half of the captions are second copies;
they sit far apart, never in the same 10,000-caption batch. Data comes from $CURATION_TEST_DATA or
<repo>/../shared/data.

Both sides compute the same thing, char:5 shingles and 128 permutations with seed 1, and every
signature is checked to be identical. datasketch is timed on shingles prepared beforehand (its
``bulk`` takes shingle lists), MinHasher three ways: from captions in 10,000-row Arrow batches (the
Spark ``mapInArrow`` case, shingling included), from all captions in one call, and from the very
shingle lists datasketch gets. Each figure is the best of --repeats runs, the two sides interleaved,
in one process pinned to one CPU with one thread for numpy and Arrow.
"""

# ruff: noqa: E402  (the thread limits below must be set before numpy and pyarrow load)
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import datasketch
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from benchkit import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(REPO_ROOT))

from curation.ops.minhash import MinHasher
from curation.ops.shingles import shingle_texts

logger = logging.getLogger("bench_minhash")

CAPTION_COUNT = 100_000
SPARK_BATCH_ROWS = 10_000
NUM_PERM, SEED, KIND, SIZE = 128, 1, "char", 5
SOURCES = [
    ("captions_mixed/captions_mixed.parquet", "caption"),
    ("captions_cc3m/cc3m_validation.parquet", "caption"),
    ("captions_coco/coco_karpathy_test5k_captions.parquet", "caption"),
    ("captions_img2dataset/test_10000.parquet", "TEXT"),
]


def data_dir() -> Path:
    configured = os.environ.get("CURATION_TEST_DATA")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        logger.error("caption data not found at %s (set CURATION_TEST_DATA to the shared data folder)", path)
        sys.exit(2)
    return path


def load_captions(root: Path) -> tuple[list[str | None], bool]:
    captions: list[str | None] = []
    for relative, column in SOURCES:
        captions.extend(pq.read_table(root / relative, columns=[column]).column(column).to_pylist())
    cycled = len(captions) < CAPTION_COUNT
    while len(captions) < CAPTION_COUNT:
        captions.extend(captions[: CAPTION_COUNT - len(captions)])
    return captions[:CAPTION_COUNT], cycled


def bench_scheme(scheme: str, captions: list, shingle_bytes: list, shingle_strings: list, repeats: int) -> dict:
    hasher = MinHasher(NUM_PERM, SEED, kind=KIND, size=SIZE, scheme=scheme)
    texts = pa.array(captions, type=pa.string())
    batches = [texts.slice(start, SPARK_BATCH_ROWS) for start in range(0, len(texts), SPARK_BATCH_ROWS)]
    runs = {
        "datasketch_bulk": lambda: np.array(
            [
                m.hashvalues
                for m in datasketch.MinHash.bulk(shingle_bytes, num_perm=NUM_PERM, seed=SEED, scheme=scheme)
            ],
            dtype=np.uint64,
        ),
        "minhasher_arrow_batches_of_10000": lambda: np.concatenate([hasher.signatures(batch) for batch in batches]),
        "minhasher_one_call": lambda: hasher.signatures(texts),
        "minhasher_same_shingle_lists": lambda: hasher.signatures(shingle_strings),
    }
    seconds = {name: float("inf") for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            results[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    reference = results["datasketch_bulk"]
    for name, signatures in results.items():
        if not np.array_equal(signatures, reference):
            raise AssertionError(f"{scheme}: {name} signatures differ from datasketch's")
    logger.info("%s: all %d signatures identical to datasketch's in every mode", scheme, len(reference))
    baseline = seconds["datasketch_bulk"]
    return {
        name: {
            "seconds": round(elapsed, 4),
            "signatures_per_second": round(len(captions) / elapsed),
            "speedup_vs_datasketch_bulk": round(baseline / elapsed, 2),
        }
        for name, elapsed in seconds.items()
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# MinHash signature throughput (one core)",
        "",
        f"{report['captions']:,} real captions ({report['distinct_captions']:,} distinct), char:{SIZE} shingles, "
        f"{NUM_PERM} permutations, seed {SEED}; {report['shingle_occurrences']:,} shingles "
        "(distinct within each caption). "
        f"Sources: {', '.join(report['sources'])} (cycled: {report['cycled']}; captions_mixed contains the other "
        "three, so about half are second copies, never within one 10,000-row batch).",
        "",
        "Every MinHasher signature is identical to datasketch's. datasketch gets ready-made shingle lists; "
        "MinHasher's caption modes include normalising and shingling. Best of "
        f"{report['repeats']} interleaved runs; process pinned to one CPU, one numpy/Arrow thread.",
        "",
        "| scheme | mode | seconds | signatures/s | speedup vs datasketch bulk |",
        "|---|---|---:|---:|---:|",
    ]
    for scheme, modes in report["schemes"].items():
        for mode, figures in modes.items():
            lines.append(
                f"| {scheme} | {mode} | {figures['seconds']:.3f} | {figures['signatures_per_second']:,} | "
                f"{figures['speedup_vs_datasketch_bulk']:.2f}x |"
            )
    lines += [
        "",
        f"Python-side shingling of all captions (`shingle_texts`, not in datasketch's time): "
        f"{report['python_shingling_seconds']:.3f} s.",
        "",
        f"Machine: {report['machine']['cpu']}, Python {report['machine']['python']}, numpy "
        f"{report['machine']['numpy']}, pyarrow {report['machine']['pyarrow']}, datasketch "
        f"{report['machine']['datasketch']}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "minhash.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    captions, cycled = load_captions(data_dir())
    started = time.perf_counter()
    shingle_strings = shingle_texts(captions, KIND, SIZE)
    shingling_seconds = time.perf_counter() - started
    shingle_bytes = [[shingle.encode("utf-8") for shingle in shingles] for shingles in shingle_strings]
    logger.info("%d captions, %d shingles; timing", len(captions), sum(map(len, shingle_strings)))

    report = {
        "benchmark": "minhash_signatures",
        "captions": len(captions),
        "distinct_captions": len(set(captions)),
        "shingle_occurrences": sum(map(len, shingle_strings)),
        "sources": [relative for relative, _ in SOURCES],
        "cycled": cycled,
        "shingles": f"{KIND}:{SIZE}",
        "num_perm": NUM_PERM,
        "seed": SEED,
        "repeats": args.repeats,
        "python_shingling_seconds": round(shingling_seconds, 4),
        "schemes": {
            scheme: bench_scheme(scheme, captions, shingle_bytes, shingle_strings, args.repeats)
            for scheme in ("affine32", "legacy")
        },
        "machine": {
            "cpu": cpu_model(),
            "cores_used": 1,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "datasketch": datasketch.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    for scheme, modes in report["schemes"].items():
        for mode, figures in modes.items():
            logger.info(
                "%-8s %-34s %8.3f s %9d sig/s %6.2fx",
                scheme,
                mode,
                figures["seconds"],
                figures["signatures_per_second"],
                figures["speedup_vs_datasketch_bulk"],
            )
    logger.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
