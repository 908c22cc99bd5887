"""Benchmark: vectorised MetaCLIP matching (curation.ops.metaclip.Matcher) against MetaCLIP's procedure.

    python bench/bench_match.py [--captions N] [--repeats R] [--out bench/results/match.json]

Metadata: WordNet 3.0 lemma names, WordNet synset names (text up to the first '.', '_' -> ' ') plus
'0'..'99' (DESIGN.md section 4), and the wordfreq English 'large' list, deduplicated, blanks dropped.
Captions: the real caption sets under the shared data folder, cycled if N exceeds them (the output says
so). Both methods run in this process, pinned to one CPU with one thread; each match is timed R times,
alternating, and the best time counts. The Matcher reads an Arrow array (what Spark's mapInArrow hands
over); the reference loops over Python strings (what MetaCLIP's code does) and sorts each result.
"""

import argparse
import csv
import gzip
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from benchkit import cpu_model

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.ops.metaclip import Matcher, build_reference_automaton, reference_match

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("bench_match")

CAPTION_SOURCES = (
    ("captions_mixed/captions_mixed.parquet", "caption"),
    ("captions_cc3m/cc3m_validation.parquet", "caption"),
    ("captions_coco/coco_karpathy_test5k_captions.parquet", "caption"),
    ("captions_img2dataset/test_10000.parquet", "TEXT"),
    ("captions_img2dataset/test_1000.parquet", "TEXT"),
)
MINIMUM_ENTRIES = 300_000
SPARK_BATCH_ROWS = 10_000  # spark.sql.execution.arrow.maxRecordsPerBatch's default


def shared_data_dir() -> Path:
    configured = os.environ.get("CURATION_TEST_DATA")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise SystemExit(
            f"shared data folder {path} is absent: set CURATION_TEST_DATA or place the data at <repo>/../shared/data"
        )
    return path


def build_metadata(data: Path) -> list[str]:
    """WordNet lemma names, synset names, '0'..'99' and wordfreq words, first occurrence kept, blanks dropped."""
    lemma_names = (data / "wordnet30" / "wordnet30_lemma_names.txt").read_text(encoding="utf-8").splitlines()
    with open(data / "wordnet30" / "wordnet30_synsets.tsv", encoding="utf-8", newline="") as synsets:
        synset_rows = csv.DictReader(synsets, delimiter="\t")
        synset_names = [row["synset"].split(".", 1)[0].replace("_", " ") for row in synset_rows]
    numbers = [str(number) for number in range(100)]
    with gzip.open(data / "vocab_wordlists" / "wordfreq_en_large.tsv.gz", "rt", encoding="utf-8", newline="") as words:
        wordfreq_words = [row["word"] for row in csv.DictReader(words, delimiter="\t", quoting=csv.QUOTE_NONE)]
    # MetaCLIP's synset rule turns ".22_caliber" into "", which would match every text holding two adjacent
    # spaces; curation.ops.metadata drops blank entries for that reason, and so does this list.
    candidates = [*lemma_names, *synset_names, *numbers, *wordfreq_words]
    entries = list(dict.fromkeys(entry for entry in candidates if entry.strip()))
    if len(entries) < MINIMUM_ENTRIES:
        raise SystemExit(f"only {len(entries)} metadata entries, the benchmark needs {MINIMUM_ENTRIES}")
    return entries


def load_captions(data: Path, wanted: int | None) -> tuple[pa.Array, dict]:
    """All caption columns concatenated, then cut or cycled to `wanted` rows."""
    columns = []
    for relative_path, column in CAPTION_SOURCES:
        captions = pq.read_table(data / relative_path, columns=[column]).column(column).combine_chunks()
        columns.append(captions.cast(pa.large_string()))
    available = pa.concat_arrays(columns)
    count = len(available) if wanted is None else wanted
    cycles = -(-count // len(available))
    captions = pa.concat_arrays([available] * cycles).slice(0, count) if cycles > 1 else available.slice(0, count)
    description = {
        "sources": [relative_path for relative_path, _column in CAPTION_SOURCES],
        "source_rows": len(available),
        "captions": count,
        "cycled": count > len(available),
        "null_captions": captions.null_count,
    }
    return captions, description


def pin_to_one_cpu() -> int | None:
    """One thread for Arrow, one CPU for the process (numpy's kernels used here are single-threaded)."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def run(captions_wanted: int | None, repeats: int, out: Path) -> dict:
    cpu = pin_to_one_cpu()
    data = shared_data_dir()
    entries = build_metadata(data)
    captions, caption_description = load_captions(data, captions_wanted)
    python_captions = captions.to_pylist()
    LOG.info("%d entries, %d captions (cycled: %s)", len(entries), len(captions), caption_description["cycled"])

    batch_starts = range(0, len(captions), SPARK_BATCH_ROWS)
    matcher, matcher_build_seconds = timed(lambda: Matcher.from_entries(entries))
    automaton, reference_build_seconds = timed(lambda: build_reference_automaton(entries))
    matcher_seconds, reference_seconds, from_python_seconds, batched_seconds = [], [], [], []
    for repeat in range(repeats):
        matched, seconds = timed(lambda: matcher.match(captions))
        matcher_seconds.append(seconds)
        _, seconds = timed(lambda: [matcher.match(captions.slice(start, SPARK_BATCH_ROWS)) for start in batch_starts])
        batched_seconds.append(seconds)
        expected, seconds = timed(
            lambda: [[] if caption is None else reference_match(caption, automaton) for caption in python_captions]
        )
        reference_seconds.append(seconds)
        _, seconds = timed(lambda: matcher.match(python_captions))
        from_python_seconds.append(seconds)
        LOG.info(
            "repeat %d: matcher %.3f s, in batches %.3f s, from Python strings %.3f s; reference %.3f s",
            repeat,
            matcher_seconds[-1],
            batched_seconds[-1],
            from_python_seconds[-1],
            reference_seconds[-1],
        )
        if matched.to_pylist() != expected:
            raise SystemExit("Matcher and reference disagree: the benchmark is void")

    matcher_rate = len(captions) / min(matcher_seconds)
    reference_rate = len(captions) / min(reference_seconds)
    results = {
        "entries": len(entries),
        "unmatchable_entries": len(matcher.unmatchable_entry_ids()),
        **caption_description,
        "matches": sum(map(len, expected)),
        "captions_with_a_match": sum(1 for ids in expected if ids),
        "identical_results": True,
        "repeats": repeats,
        "build_seconds": {"matcher": matcher_build_seconds, "reference_automaton": reference_build_seconds},
        "match_seconds": {
            "matcher": matcher_seconds,
            "reference": reference_seconds,
            "matcher_from_python_strings": from_python_seconds,
            f"matcher_in_{SPARK_BATCH_ROWS}_row_batches": batched_seconds,
        },
        "captions_per_second": {
            "matcher": matcher_rate,
            "reference": reference_rate,
            "matcher_from_python_strings": len(captions) / min(from_python_seconds),
            f"matcher_in_{SPARK_BATCH_ROWS}_row_batches": len(captions) / min(batched_seconds),
        },
        "speedup": matcher_rate / reference_rate,
        "environment": {
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "numpy": np.__version__,
            "pyahocorasick": importlib.metadata.version("pyahocorasick"),
            "cpu": cpu_model(),
            "pinned_cpu": cpu,
            "pyarrow_cpu_count": pa.cpu_count(),
            "platform": platform.platform(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    LOG.info(
        "Matcher %.0f captions/s, reference %.0f captions/s: %.2fx", matcher_rate, reference_rate, results["speedup"]
    )
    return results


def markdown(results: dict) -> str:
    rates, builds, environment = results["captions_per_second"], results["build_seconds"], results["environment"]
    cycled = "yes (sources repeated to reach the count)" if results["cycled"] else "no"
    batched_rate = rates[f"matcher_in_{SPARK_BATCH_ROWS}_row_batches"]
    return f"""# MetaCLIP substring matching: vectorised Matcher vs MetaCLIP's per-caption Aho-Corasick

Produced by `python bench/bench_match.py`; one CPU ({environment["cpu"]}), one thread, best of {results["repeats"]}.

| | value |
|---|---|
| metadata entries | {results["entries"]:,} ({results["unmatchable_entries"]:,} can never match) |
| captions | {results["captions"]:,} from {results["source_rows"]:,} source rows, cycled: {cycled} |
| matches | {results["matches"]:,}; captions with a match: {results["captions_with_a_match"]:,} |
| results identical | {results["identical_results"]} |
| build: Matcher / reference automaton | {builds["matcher"]:.2f} s / {builds["reference_automaton"]:.2f} s |
| reference (spacing + automaton.iter per caption) | {rates["reference"]:,.0f} captions/s |
| Matcher on an Arrow array | {rates["matcher"]:,.0f} captions/s |
| Matcher on Python strings (includes conversion to Arrow) | {rates["matcher_from_python_strings"]:,.0f} captions/s |
| Matcher in {SPARK_BATCH_ROWS:,}-row slices (Spark's default Arrow batch) | {batched_rate:,.0f} captions/s |
| speedup (Arrow input) | {results["speedup"]:.2f}x |

Python {environment["python"]}, pyarrow {environment["pyarrow"]}, numpy {environment["numpy"]},
pyahocorasick {environment["pyahocorasick"]}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=None, help="caption count (default: every source row)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each method; the best counts")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "match.json")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(arguments.captions, arguments.repeats, arguments.out)


if __name__ == "__main__":
    main()
