#!/usr/bin/env bash
# GPU benchmarks on a CUDA machine. End-to-end embedding throughput: writes SHARDS webdataset tars of synthetic JPEG pictures, then
# runs embed_shards with open_clip ViT-B-32 (random init) under fp16 autocast, reading, decoding and preprocessing in
# NUM_WORKERS DataLoader workers, and prints images/s and the GPU's mean utilisation while embed_shards ran.
#
#   bench/gpu.sh [SHARDS=16] [SAMPLES_PER_SHARD=4000]
#
# Environment: PYTHON (.venv/bin/python), BATCH_SIZE (512), NUM_WORKERS (8), GPU_INDEX (0, as nvidia-smi numbers
# the GPUs), OUT_JSON (bench/results/embed_gpu.json), DEVICE (cuda) and PRECISION (fp16). Utilisation is sampled
# with nvidia-smi about every 0.5 s in the background; only samples inside the window bench_embed.py records
# around embed_shards count, so shard writing and model loading do not dilute it.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SHARDS=${1:-16}
SAMPLES_PER_SHARD=${2:-4000}
BATCH_SIZE=${BATCH_SIZE:-512}
NUM_WORKERS=${NUM_WORKERS:-8}
GPU_INDEX=${GPU_INDEX:-0}
OUT_JSON=${OUT_JSON:-bench/results/embed_gpu.json}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-fp16}
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1

if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: run this on a CUDA machine" >&2
    exit 2
fi

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/bench_embed.XXXXXX")
SAMPLER_PID=""
cleanup() {
    if [[ -n "$SAMPLER_PID" ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT

"$PYTHON" bench/bench_embed.py make-shards "$WORK_DIR/shards" --shards "$SHARDS" --samples-per-shard "$SAMPLES_PER_SHARD"

# One "<unix seconds> <utilisation %>" line per sample.
(
    while true; do
        utilisation=$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i "$GPU_INDEX")
        echo "$(date +%s.%N) $utilisation"
        sleep 0.5
    done
) >"$WORK_DIR/utilisation.log" &
SAMPLER_PID=$!

"$PYTHON" bench/bench_embed.py shards "$WORK_DIR/shards" --device "$DEVICE" --precision "$PRECISION" \
    --batch-size "$BATCH_SIZE" --num-workers "$NUM_WORKERS" --out "$OUT_JSON"

kill "$SAMPLER_PID"
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""

# Adds the mean utilisation inside the embed_shards window to the report and prints the two figures.
"$PYTHON" - "$OUT_JSON" "$WORK_DIR/utilisation.log" <<'PY'
import json
import sys
from pathlib import Path

report_path, log_path = Path(sys.argv[1]), Path(sys.argv[2])
report = json.loads(report_path.read_text())
samples = []
for line in log_path.read_text().splitlines():
    fields = line.split()
    if len(fields) == 2 and fields[1].replace(".", "", 1).isdigit():
        samples.append((float(fields[0]), float(fields[1])))
window = [busy for at, busy in samples if report["embed_started_unix"] <= at <= report["embed_finished_unix"]]
report["gpu_utilization_samples"] = len(window)
report["gpu_utilization_mean_percent"] = round(sum(window) / len(window), 1) if window else None
report_path.write_text(json.dumps(report, indent=2) + "\n")
busy = f"{report['gpu_utilization_mean_percent']}% mean over {len(window)} samples" if window else "no samples"
print(f"{report['images']} images in {report['seconds']} s: {report['images_per_second']} images/s; GPU busy {busy}")
PY

# k-means fit and assign through the FAISS seam on the GPU (needs faiss-gpu: `make FAISS_EXTRA=gpu install`), and
# SemDeDup, on the same 1,000,000 x 512 synthetic set as the CPU figure in bench/results/semdedup.json.
if "$PYTHON" -c "import sys; from curation.gpu.faiss_seam import gpu_faiss_available as ok; sys.exit(0 if ok() else 1)"; then
    "$PYTHON" bench/bench_semdedup.py --device cuda --out "${SEMDEDUP_OUT_JSON:-bench/results/semdedup_gpu.json}"
else
    echo "faiss has no usable GPU here (install faiss-gpu): skipped the k-means/SemDeDup GPU figure" >&2
fi
