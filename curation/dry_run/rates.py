"""Where the dry run's rates come from: the benchmarks' results (`bench/results/*.json`, each in its own layout), the
stages' declared assumptions, the Spark master's cores, and a vision model's relative cost."""

import importlib.util
import json
import os
import re
from pathlib import Path

from curation.config import RunConfig
from curation.stage import RateAssumption
from curation.stages import all_stages

BENCH_RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


# Rates per CPU core, used unless a bench/results file measured the stage: each stage declares its own
# (`Stage.assumed_rate`); the GPU embedding rate is not a stage's.
EMBED_GPU = "embed_gpu"
EMBED_GPU_RATE = RateAssumption(1_500, "images/s", "ViT-B-32 fp16 on one datacenter GPU, decoding-bound (guess; "
                                "bench/results/embed_gpu.json when present)", per="per GPU")


def assumed_rates() -> dict[str, RateAssumption]:
    return {**{stage.name: stage.assumed_rate for stage in all_stages()}, EMBED_GPU: EMBED_GPU_RATE}


# Bytes per pixel of a stored image after img2dataset's encoding (guesses for photos at the default quality).
BYTES_PER_PIXEL = {"jpg": 0.4, "webp": 0.25, "png": 2.0}
# Columns the image stages add to every row (image_*, sha256s, scores, groups): about this many bytes compressed.
IMAGE_COLUMNS_BYTES_PER_ROW = 200
DECODE_IMAGES_PER_CORE = 300  # an embed on CPU cannot go faster than decoding and resizing its images
VIT_B_32 = {"layers": 12, "width": 768, "image_size": 224, "patch_size": 32}


def _read_json(name: str) -> dict | None:
    path = BENCH_RESULTS_DIR / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _bench_cores(report: dict) -> int:
    machine = report.get("machine") or {}
    return int(report.get("cores") or machine.get("torch_threads") or machine.get("cpu_count") or 1)


def bench_rates() -> dict[str, tuple[float, str]]:
    """Per-core rates (and where each came from) that bench/results/*.json measured."""
    rates: dict[str, tuple[float, str]] = {}
    spine = _read_json("spine.json")
    if spine:
        cores = _bench_cores(spine)
        for name, result in (spine.get("stages") or {}).items():
            if result.get("rows_per_second"):
                rates[name] = (result["rows_per_second"] / cores,
                               f"bench/results/spine.json: {result['rows_per_second']:,.0f} rows/s on {cores} cores")
    dedup_text = _read_json("dedup_text.json")
    if dedup_text and dedup_text.get("rows_per_second"):
        cores = _bench_cores(dedup_text)
        rates["dedup_text"] = (dedup_text["rows_per_second"] / cores, f"bench/results/dedup_text.json: "
                               f"{dedup_text['rows_per_second']:,.0f} rows/s on {cores} cores")
    semdedup = _read_json("semdedup.json")
    if semdedup:
        if (semdedup.get("semdedup") or {}).get("rows_per_second"):
            rates["semdedup"] = (semdedup["semdedup"]["rows_per_second"] / 2,
                                 "bench/results/semdedup.json (CPU, assumed 2 cores)")
        if (semdedup.get("assign") or {}).get("rows_per_second"):
            rates["assign"] = (semdedup["assign"]["rows_per_second"] / 2,
                               "bench/results/semdedup.json (CPU, assumed 2 cores)")
        fit = semdedup.get("kmeans_fit") or {}
        if fit.get("seconds") and fit.get("sample_rows"):
            # seconds per (sample row x centroid x iteration), on the benchmark's threads
            work = fit["sample_rows"] * semdedup.get("k", 1000) * fit.get("iterations", 20)
            rates["kmeans_fit"] = (fit["seconds"] / work, "bench/results/semdedup.json's k-means fit")
    for path in sorted(BENCH_RESULTS_DIR.glob("embed*.json")) if BENCH_RESULTS_DIR.is_dir() else []:
        report = _read_json(path.name) or {}
        per_second = report.get("images_per_second") or (report.get("embed_batch") or {}).get("images_per_second")
        if not per_second or report.get("model") != "ViT-B-32":
            continue
        if str(report.get("device", "")).startswith("cuda"):
            rates[EMBED_GPU] = (per_second, f"bench/results/{path.name}: {per_second:,.0f} images/s on one GPU")
        else:
            cores = _bench_cores(report)
            rates["embed"] = (per_second / cores,
                              f"bench/results/{path.name}: {per_second:,.1f} images/s on {cores} CPU threads")
    nsfw = _read_json("nsfw.json")
    cpu_runs = [run for run in (nsfw or {}).get("runs") or [] if run.get("provider") == "CPUExecutionProvider"]
    per_cpu_second = [run["end_to_end_download"]["images_per_cpu_second"] for run in cpu_runs
                      if (run.get("end_to_end_download") or {}).get("images_per_cpu_second")]
    if per_cpu_second:
        rates["nsfw"] = (max(per_cpu_second), f"bench/results/nsfw.json: {max(per_cpu_second):,.0f} images per "
                         "CPU-second, decode to score")
    slant = _read_json("slant.json")
    if slant:
        for model in slant.get("models") or []:
            if model.get("pastes_per_second"):
                rates[f"mine_logos:{model['model']}"] = (model["pastes_per_second"],
                                                         f"bench/results/slant.json ({model['model']})")
    return rates


def spark_cores(run_config: RunConfig) -> tuple[int, str]:
    master = run_config.spark_master or os.environ.get("CURATION_SPARK_MASTER") or "local[*]"
    found = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip())
    machine = os.cpu_count() or 1
    if found is None:
        return machine, f"master {master}: cores unknown, counted as this machine's {machine}"
    if found.group(1) in (None, "*"):
        return (1, f"master {master}: 1 core") if found.group(1) is None else (
            machine, f"master {master}: {machine} cores")
    return int(found.group(1)), f"master {master}: {found.group(1)} cores"


def model_config(model: str) -> dict | None:
    """open_clip's model config (or ours, for tiny-clip), read as JSON without importing open_clip or torch."""
    candidates = [Path(__file__).resolve().parents[1] / "gpu" / "model_configs" / f"{model}.json"]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{model}.json")
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def vision_cost(config: dict) -> float | None:
    vision = config.get("vision_cfg") or {}
    if not all(isinstance(vision.get(key), int) for key in ("layers", "width", "image_size", "patch_size")):
        return None
    return vision["layers"] * vision["width"] ** 2 * (vision["image_size"] / vision["patch_size"]) ** 2
