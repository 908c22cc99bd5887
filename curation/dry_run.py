"""`curation run CONFIG --output RUN_DIR --dry-run`: what a run would do, and about how much it would make and take.

Nothing is written and no Spark session is started. The dry run prints

1. the stages in order, each with its folder, the options that differ from the defaults, and whether the folder in
   RUN_DIR is up to date (the test `curation run` itself uses: `curation.pipeline.is_up_to_date`);
2. the inputs from their parquet footers (shards, rows, bytes, columns) and the ingest options;
3. an estimate of the rows after each stage, the output size and the time, from a sample of rows read from the
   first row groups of evenly spaced shards. The pure CPU parts run on the sample and are timed: ingest's
   `normalise_rows`, MetaCLIP matching (`Matcher`) and balancing (`keep_probabilities` with the sample's entry
   counts scaled to the rows that reach the balance stage). Every other stage's rate and survival is an assumption
   taken from `bench/results/*.json` where a benchmark measured it, else from the stage's declared `assumed_rate`
   (`curation.stages`); each line says which.

The estimates are rough by nature: duplicates grow with the corpus (a 2,000-row sample shows almost none), Spark
adds start-up and scheduling time, and downloads depend on the network. They are meant to tell minutes from days
and megabytes from terabytes before a run is started.
"""

import importlib.util
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import RunConfig, StageConfig
from curation.inputs import InputPlan, _filesystem_and_path, plan_inputs
from curation.io import RELEASE_DIR, StageFolderError, is_complete, read_stage_record
from curation.ops import balance as balance_ops
from curation.ops.ingest import IngestOptions, normalise_rows
from curation.ops.uid import uniform
from curation.pipeline import current_input_fingerprint, is_up_to_date, stage_folder
from curation.schema import CAPTION, ENTRY_IDS, KEEP_PROBABILITY, UID
from curation.stage import RateAssumption
from curation.stages import all_stages, get_stage, hashed_config

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 2000
SAMPLE_FILES = 8  # the sample is spread over at most this many evenly spaced shards
BENCH_RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"


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


# ------------------------------------------------------------------------------------------------- stages


def _non_default_options(stage: StageConfig) -> dict:
    defaults = {spec.name: spec.default for spec in get_stage(stage.name).specs()}
    return {key: value for key, value in stage.options.items() if value != defaults[key]}


def _stage_status(stage: StageConfig, config: dict, folder: Path, input_location) -> str:
    """Why the stage would run, or that it is up to date (the check `run_pipeline` makes)."""
    if not is_complete(folder):
        return "will run: no finished stage folder"
    try:
        if is_up_to_date(stage, config, folder, input_location):
            return "up to date (skipped)"
    except (StageFolderError, OSError, ValueError) as error:
        return f"will run: its input cannot be fingerprinted ({error})"
    record = read_stage_record(folder)
    stored = record.get("config") or {}
    if stored != config:
        return f"will run: config changed ({_config_change(stored, config)})"
    if record["input"].get("fingerprint") != current_input_fingerprint(stage, input_location):
        return "will run: its input changed"
    return "will run"


def _config_change(stored: dict, config: dict) -> str:
    changed = sorted(key for key in set(stored) & set(config) if stored[key] != config[key])
    added = sorted(set(config) - set(stored))
    removed = sorted(set(stored) - set(config))
    parts = [f"{key}: {json.dumps(stored[key])} -> {json.dumps(config[key])}" for key in changed]
    parts += [f"new option {key}" for key in added] + [f"option {key} gone" for key in removed]
    return "; ".join(parts)


def stage_lines(run_config: RunConfig, run_dir: Path) -> list[str]:
    lines = [f"stages ({len(run_config.stages)}):"]
    input_location = run_config.inputs
    upstream_runs = False
    first_to_run = None
    for position, stage in enumerate(run_config.stages, start=1):
        folder = stage_folder(run_dir, position, stage)
        try:
            config = hashed_config(stage)
        except (OSError, ValueError) as error:
            config, status = None, f"will fail: {error}"
        if config is not None:
            if upstream_runs:
                status = "will run: an upstream stage runs" if is_complete(folder) else (
                    "will run: no finished stage folder")
            else:
                status = _stage_status(stage, config, folder, input_location)
        if not status.startswith("up to date"):
            upstream_runs = True
            first_to_run = first_to_run or (position, stage.name)
        label = os.path.relpath(folder, run_dir)
        lines.append(f"  {position:>2} {stage.name:<13} {label:<24} {status}")
        options = _non_default_options(stage)
        if options:
            lines.append(f"     {'':<13} options: {_options_text(options)}")
        input_location = folder
    if first_to_run is None:
        lines.append("  every stage is up to date: `curation run` would skip them all")
    else:
        lines.append(f"  a run starts at stage {first_to_run[0]} ({first_to_run[1]}) and redoes every stage after it")
    return lines


def _options_text(options: dict) -> str:
    return ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in options.items())


# ------------------------------------------------------------------------------------------------- inputs


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} PB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def input_lines(plan: InputPlan, options: IngestOptions) -> list[str]:
    total_bytes = sum(f.size for f in plan.files)
    lines = [f"inputs: {len(plan.files):,} shard{'s' if len(plan.files) != 1 else ''}, {plan.rows:,} rows, "
             f"{_size(total_bytes)} (parquet footers)"]
    shown = plan.files if len(plan.files) <= 10 else plan.files[:5]
    for input_file in shown:
        lines.append(f"  {input_file.path}: {input_file.rows:,} rows in {len(input_file.row_group_rows)} row "
                     f"group{'s' if len(input_file.row_group_rows) != 1 else ''}, {_size(input_file.size)}; url "
                     f"{input_file.url_column!r}, text {input_file.text_column!r}")
    if len(shown) < len(plan.files):
        lines.append(f"  ... and {len(plan.files) - len(shown):,} more shards")
    for skipped in plan.skipped:
        lines.append(f"  skipped (unreadable): {skipped['path']}: {skipped['error']}")
    lines.append(
        f"  ingest options: url_column={options.url_column or 'detected'}, "
        f"text_column={options.text_column or 'detected'}, max_caption_chars={options.max_caption_chars}, "
        f"keep_columns={list(options.keep_columns)}, "
        f"blocked domains {len(options.blocked_domains):,}, blocked urls {len(options.blocked_urls):,}"
    )
    return lines


# ------------------------------------------------------------------------------------------------- the sample


@dataclass
class Sample:
    """The sample's rows after ingest's pure part, and what the dry run measured on it."""

    raw_rows: int = 0
    raw_bytes: int = 0
    read_seconds: float = 0.0
    normalise_seconds: float = 0.0
    kept: pa.Table | None = None
    drops: dict[str, int] = field(default_factory=dict)
    files: int = 0

    @property
    def kept_rows(self) -> int:
        return 0 if self.kept is None else self.kept.num_rows


def _sample_files(plan: InputPlan) -> list:
    """At most SAMPLE_FILES shards, evenly spaced over the plan (deterministic)."""
    files = plan.files
    if len(files) <= SAMPLE_FILES:
        return list(files)
    return [files[round(i * (len(files) - 1) / (SAMPLE_FILES - 1))] for i in range(SAMPLE_FILES)]


def _first_rows(path: str, rows: int, columns: list[str]) -> pa.Table:
    """The first `rows` rows of a shard (from its first row groups), only `columns`."""
    filesystem, fs_path = _filesystem_and_path(path)
    with filesystem.open_input_file(fs_path) as handle:
        parquet = pq.ParquetFile(handle)
        batches, taken = [], 0
        for batch in parquet.iter_batches(batch_size=min(rows, 65_536), columns=columns):
            batches.append(batch.slice(0, rows - taken))
            taken += min(len(batch), rows - taken)
            if taken >= rows:
                break
        schema = parquet.schema_arrow
        return pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in columns]))


def read_sample(plan: InputPlan, options: IngestOptions, sample_rows: int) -> Sample:
    sample = Sample()
    chosen = _sample_files(plan)
    if sample_rows <= 0 or not chosen:
        return sample
    quota = math.ceil(sample_rows / len(chosen))
    kept_tables = []
    for input_file in chosen:
        want = min(quota, sample_rows - sample.raw_rows, input_file.rows)
        if want <= 0:
            continue
        columns = list(dict.fromkeys([input_file.url_column, input_file.text_column, *options.keep_columns]))
        started = time.perf_counter()
        table = _first_rows(input_file.path, want, columns)
        sample.read_seconds += time.perf_counter() - started
        file_options = replace(options, url_column=input_file.url_column, text_column=input_file.text_column)
        if not sample.files:
            normalise_rows(table.slice(0, 16), file_options, input_file.path)  # warm-up: first-call costs aside
        started = time.perf_counter()
        kept, rejected = normalise_rows(table, file_options, input_file.path)
        sample.normalise_seconds += time.perf_counter() - started
        sample.raw_rows += table.num_rows
        sample.raw_bytes += table.nbytes
        sample.files += 1
        kept_tables.append(kept.drop_columns(["_source_row"]))
        for reason, count in zip(*np.unique(rejected.column("reason").to_numpy(zero_copy_only=False),
                                            return_counts=True), strict=True):
            sample.drops[str(reason)] = sample.drops.get(str(reason), 0) + int(count)
    if kept_tables:
        sample.kept = pa.concat_tables(kept_tables, promote_options="permissive")
    return sample


# ------------------------------------------------------------------------------------------------- rates


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


def _model_config(model: str) -> dict | None:
    """open_clip's model config (or ours, for tiny-clip), read as JSON without importing open_clip or torch."""
    candidates = [Path(__file__).resolve().parent / "gpu" / "model_configs" / f"{model}.json"]
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


def _vision_cost(config: dict) -> float | None:
    vision = config.get("vision_cfg") or {}
    if not all(isinstance(vision.get(key), int) for key in ("layers", "width", "image_size", "patch_size")):
        return None
    return vision["layers"] * vision["width"] ** 2 * (vision["image_size"] / vision["patch_size"]) ** 2


# ------------------------------------------------------------------------------------------------- the estimate


@dataclass
class StageEstimate:
    stage: str
    rows_in: float
    rows_out: float
    rows_basis: str
    seconds: float | None
    time_basis: str


@dataclass
class Estimator:
    run_config: RunConfig
    plan: InputPlan
    sample: Sample
    cores: int
    rates: dict[str, tuple[float, str]]
    notes: list[str] = field(default_factory=list)
    bytes_per_row: float | None = None
    image_bytes: float = 0.0
    embedding_bytes: float = 0.0
    table: pa.Table | None = None  # the sample's rows as they stand after the stages estimated so far
    entries: list[str] | None = None
    balance_passes: int = 0

    def rate(self, stage: str) -> tuple[float, str]:
        if stage in self.rates:
            return self.rates[stage]
        assumption = assumed_rates()[stage]
        rate = f"{assumption.rate:,.0f} {assumption.unit} {assumption.per}"
        return assumption.rate, f"assumed {rate}: {assumption.basis}"

    def timed(self, stage: str, rows: float) -> tuple[float, str]:
        per_core, basis = self.rate(stage)
        return rows / (per_core * self.cores), basis

    def run(self) -> list[StageEstimate]:
        estimates = []
        rows = float(self.plan.rows)
        for stage in self.run_config.stages:
            estimate = get_stage(stage.name).estimate(self, stage, rows)
            estimates.append(estimate)
            rows = estimate.rows_out
        return estimates

    # --- the stages measured on the sample

    def ingest(self, stage: StageConfig, rows: float) -> StageEstimate:
        sample = self.sample
        if not sample.raw_rows:
            return StageEstimate(stage.name, rows, rows, "no sample", None, "no sample")
        kept = sample.kept_rows / sample.raw_rows
        uids = sample.kept.column(UID)
        repeats = sample.kept_rows - len(pc.unique(uids))
        self.table = sample.kept
        seconds_per_row = (sample.read_seconds + sample.normalise_seconds) / sample.raw_rows
        per_core = 1 / seconds_per_row if seconds_per_row > 0 else float("inf")
        # Repeated (url, caption) pairs (duplicate_pair) are dropped over the whole input: a sample's share of them
        # says little about the corpus's, so it is reported and the estimate stays an upper bound.
        rows_out = rows * kept
        basis = f"measured: normalise_rows keeps {kept:.1%} of the sample; an upper bound (repeated pairs aside)"
        if repeats:
            self.notes.append(f"ingest: {repeats:,} of the sample's rows repeat an earlier (url, caption) pair; "
                              "ingest drops such repeats (duplicate_pair) over the whole input, not estimated here")
        seconds = rows / (per_core * self.cores)
        return StageEstimate(stage.name, rows, rows_out, basis, seconds,
                             f"measured: read + normalise_rows {per_core:,.0f} rows/s on one core")

    def match(self, stage: StageConfig, rows: float) -> StageEstimate:
        from curation.ops.metaclip import Matcher
        from curation.ops.metadata import load_metadata

        if self.table is None or not self.table.num_rows:
            return self.generic(stage, rows)
        started = time.perf_counter()
        try:
            entries = load_metadata(stage.options["metadata"])
        except (OSError, ValueError) as error:
            self.notes.append(f"match: the metadata cannot be loaded, so matching is not estimated: {error}")
            self.table = None
            return self.generic(stage, rows)
        matcher = Matcher.from_entries(entries)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        entry_ids = matcher.match(self.table.column(CAPTION))
        match_seconds = max(time.perf_counter() - started, 1e-6)
        self.entries = entries
        lengths = pc.list_value_length(entry_ids).to_numpy(zero_copy_only=False)
        matched = float((lengths > 0).mean())
        table = self.table.append_column(ENTRY_IDS, entry_ids)
        self.table = table if stage.options["keep_unmatched"] else table.filter(pa.array(lengths > 0))
        survival = 1.0 if stage.options["keep_unmatched"] else matched
        per_core = len(lengths) / match_seconds
        self.notes.append(
            f"match: {len(entries):,} metadata entries, Matcher built in {build_seconds:.2f} s (once per Spark "
            f"executor process); {matched:.1%} of the sample's captions match, {lengths.mean():.1f} entries per "
            "caption on average"
        )
        seconds = rows / (per_core * self.cores) + build_seconds
        basis = f"measured: {matched:.1%} of the sample's captions match" + (
            " (keep_unmatched: all kept)" if stage.options["keep_unmatched"] else "")
        return StageEstimate(stage.name, rows, rows * survival, basis, seconds,
                             f"measured: {per_core:,.0f} captions/s on one core, plus building the Matcher")

    def balance(self, stage: StageConfig, rows: float) -> StageEstimate:
        if self.table is None or ENTRY_IDS not in self.table.column_names or not self.table.num_rows:
            return StageEstimate(stage.name, rows, rows, "not estimated: no match stage before it in the sample",
                                 *self.timed(stage.name, rows))
        options = stage.options
        started = time.perf_counter()
        offsets, values = balance_ops.list_parts(self.table.column(ENTRY_IDS))
        sample_counts = np.bincount(values, minlength=len(self.entries or [])).astype(np.float64)
        scale = rows / self.table.num_rows
        counts = sample_counts * scale  # c_e over the balance stage's input, estimated from the sample
        if options["target_size"]:
            threshold, source = self._threshold_for_target(offsets, values, counts, float(options["target_size"]),
                                                           scale), "target_size"
        elif options["tail_share"]:
            threshold = float(balance_ops.threshold_for_tail_share(counts, float(options["tail_share"])))
            source = "tail_share"
        else:
            threshold = float(options["t"] if options["t"] is not None else balance_ops.METACLIP_T)
            source = "t"
        probability = balance_ops.keep_probabilities(offsets, values, np.maximum(counts, 1e-9), threshold)
        purpose = balance_ops.balance_purpose(self.balance_passes)
        self.balance_passes += 1
        keep = uniform(int(options["seed"]), self.table.column(UID), purpose) < probability
        seconds_taken = max(time.perf_counter() - started, 1e-6)
        per_core = self.table.num_rows / seconds_taken
        table = self.table.drop_columns([c for c in (KEEP_PROBABILITY,) if c in self.table.column_names])
        self.table = table.filter(pa.array(keep)).append_column(KEEP_PROBABILITY, pa.array(probability[keep]))
        survival = float(probability.mean())
        self.notes.append(
            f"balance: t = {threshold:.6g} (from {source}); the sample's entry counts are scaled by {scale:,.1f} to "
            f"the {rows:,.0f} rows expected at the stage, which overstates rare entries, so the kept share "
            f"({survival:.1%}) leans low for large corpora"
        )
        return StageEstimate(stage.name, rows, rows * survival, f"measured: mean P(keep) {survival:.1%} at t = "
                             f"{threshold:.6g}", rows / (per_core * self.cores),
                             f"measured: {per_core:,.0f} rows/s on one core")

    @staticmethod
    def _threshold_for_target(offsets, values, counts, target: float, scale: float) -> float:
        thresholds = balance_ops.initial_threshold_grid(counts, 64)
        for _ in range(12):
            expected = balance_ops.expected_kept_for_thresholds(offsets, values, np.maximum(counts, 1e-9),
                                                                thresholds) * scale
            thresholds, answer = balance_ops.refine_threshold_bracket(thresholds, expected, target, 64)
            if answer is not None:
                return answer
        return float(thresholds[len(thresholds) // 2])

    # --- the stages estimated from benchmarks and assumptions

    def generic(self, stage: StageConfig, rows: float) -> StageEstimate:
        survival, rows_basis = get_stage(stage.name).survival(stage.options)
        rows_out = min(rows, float(stage.options["keep_count"])) if survival < 0 else rows * survival
        seconds, time_basis = self.timed(stage.name, rows)
        return StageEstimate(stage.name, rows, rows_out, rows_basis, seconds, time_basis)

    def download(self, stage: StageConfig, rows: float) -> StageEstimate:
        estimate = self.generic(stage, rows)
        side = int(stage.options["image_size"])
        per_pixel = BYTES_PER_PIXEL.get(stage.options["encode_format"], 0.4)
        self.image_bytes = estimate.rows_out * side * side * per_pixel
        self.notes.append(
            f"download: images at most {side}x{side} {stage.options['encode_format']}, assumed "
            f"{per_pixel} bytes per pixel: about {_size(side * side * per_pixel)} per image (kept twice: in the "
            "download stage's tars and in the release's)"
        )
        return estimate

    def embed(self, stage: StageConfig, rows: float) -> StageEstimate:
        model = stage.options["model"]
        config = _model_config(model)
        embed_dim = (config or {}).get("embed_dim")
        if embed_dim:
            self.embedding_bytes = rows * 2 * embed_dim * 2  # image and text embeddings, float16
        cpu_rate, cpu_basis = self.rate(stage.name)
        cost = _vision_cost(config) if config else None
        scale = 1.0
        if cost and model != "ViT-B-32":
            reference = VIT_B_32["layers"] * VIT_B_32["width"] ** 2 * (
                VIT_B_32["image_size"] / VIT_B_32["patch_size"]) ** 2
            scale = reference / cost
        cpu_rate = min(cpu_rate * scale, DECODE_IMAGES_PER_CORE)
        scaled = f", scaled x{scale:.3g} for {model}'s vision tower (capped at decoding)" if scale != 1.0 else ""
        if config is None:
            scaled = f" (ViT-B-32's rate; {model}'s config was not found)"
        gpu_rate, gpu_basis = self.rate(EMBED_GPU)
        gpu_rate = gpu_rate * min(scale, 1.0) if scale < 1.0 else gpu_rate
        device = stage.options["device"]
        cpu_seconds = rows / (cpu_rate * self.cores)
        gpu_seconds = rows / gpu_rate
        if device == "cpu":
            return StageEstimate(stage.name, rows, rows, "assumed: keeps every row", cpu_seconds,
                                 f"{cpu_basis}{scaled}; on CPU")
        gpu_scaled = f", scaled x{min(scale, 1.0):.3g} for {model}'s vision tower" if scale < 1.0 else ""
        if device == "cuda":
            return StageEstimate(stage.name, rows, rows, "assumed: keeps every row", gpu_seconds,
                                 f"{gpu_basis}{gpu_scaled}; one GPU")
        self.notes.append(f"embed (device auto): on CPU about {_duration(cpu_seconds)} ({cpu_basis}{scaled}); with "
                          f"one GPU about {_duration(gpu_seconds)} ({gpu_basis}{gpu_scaled})")
        return StageEstimate(stage.name, rows, rows, "assumed: keeps every row", gpu_seconds,
                             "with one GPU (device auto; see the note for CPU)")

    def _kmeans_seconds(self, stage: StageConfig, rows: float) -> tuple[float, str]:
        per_core, basis = self.rates.get("assign") or self.rate(stage.name)
        options = stage.options
        fit_rows = min(float(options["sample_size"]), rows)
        # The benchmark's fit: 14.5 s for 100,000 rows, k = 1,000, 20 iterations on 2 threads; it scales with each.
        per_unit, fit_basis = self.rates.get("kmeans_fit", (14.5 / (100_000 * 1000 * 20), "assumed"))
        work = fit_rows * int(options["k"]) * int(options["iterations"])
        fit = per_unit * work * 2 / max(int(options["threads"]), 1)
        basis = (f"{basis}, plus a k-means fit of about {_duration(fit)} ({fit_basis}, scaled to sample_size, k, "
                 "iterations and threads)")
        return rows / (per_core * self.cores) + fit, basis

    def cluster(self, stage: StageConfig, rows: float) -> StageEstimate:
        seconds, basis = self._kmeans_seconds(stage, rows)
        return StageEstimate(stage.name, rows, rows, "exact: drops nothing", seconds, basis)

    def prune(self, stage: StageConfig, rows: float) -> StageEstimate:
        estimate = self.generic(stage, rows)
        estimate.seconds, estimate.time_basis = self._kmeans_seconds(stage, rows)
        return estimate

    def mine_logos(self, stage: StageConfig, rows: float) -> StageEstimate:
        options = stage.options
        models = options["models"] or ["embed model"]
        pastes = int(options["probe_count"]) * int(options["max_logos"]) * 4
        seconds, bases = 0.0, []
        for model in models:
            key = next((k for k in self.rates if k.startswith("mine_logos:") and model.split(":")[0]
                        in k.split(":", 1)[1]), None)
            rate, basis = self.rates[key] if key else self.rate(stage.name)
            seconds += pastes / rate
            bases.append(f"{model}: {basis}")
        return StageEstimate(stage.name, rows, rows, "exact: drops nothing", seconds,
                             f"{pastes:,} pastes per model ({'; '.join(bases)})")

    def measure_bytes_per_row(self) -> None:
        if self.table is None or not self.table.num_rows:
            return
        sink = pa.BufferOutputStream()
        pq.write_table(self.table, sink, compression="zstd")
        self.bytes_per_row = sink.getvalue().size / self.table.num_rows


# ------------------------------------------------------------------------------------------------- the dry run


def estimate_lines(run_config: RunConfig, plan: InputPlan, sample: Sample, sample_rows: int) -> list[str]:
    cores, cores_basis = spark_cores(run_config)
    estimator = Estimator(run_config, plan, sample, cores, bench_rates())
    estimates = estimator.run()
    estimator.measure_bytes_per_row()

    drops = ", ".join(f"{reason} {count}" for reason, count in sorted(sample.drops.items())) or "none"
    lines = [f"sample: {sample.raw_rows:,} rows (asked {sample_rows:,}) from the first row groups of {sample.files} "
             f"shard{'s' if sample.files != 1 else ''}; normalise_rows kept {sample.kept_rows:,}, dropped: {drops}"]
    lines.append(f"estimate (ESTIMATES, not measurements of the run; {cores_basis}):")
    lines.append(f"  {'stage':<13} {'rows in':>13} {'rows out':>13} {'time':>10}  basis")
    total = 0.0
    for estimate in estimates:
        time_text = _duration(estimate.seconds) if estimate.seconds is not None else "?"
        total += estimate.seconds or 0.0
        lines.append(f"  {estimate.stage:<13} {estimate.rows_in:>13,.0f} {estimate.rows_out:>13,.0f} "
                     f"{time_text:>10}  rows: {estimate.rows_basis}")
        lines.append(f"  {'':<13} {'':>13} {'':>13} {'':>10}  time: {estimate.time_basis}")
    final_rows = estimates[-1].rows_out if estimates else 0.0
    lines.append(f"output (estimate): about {final_rows:,.0f} rows")
    if estimator.bytes_per_row is not None:
        per_row = estimator.bytes_per_row
        has_images = any(get_stage(stage.name).reads_images for stage in run_config.stages)
        if has_images:
            per_row += IMAGE_COLUMNS_BYTES_PER_ROW
        lines.append(
            f"  parquet rows: about {_size(final_rows * per_row)} ({per_row:,.0f} bytes per row: measured on the "
            f"sample's rows as zstd parquet" + (f", plus an assumed {IMAGE_COLUMNS_BYTES_PER_ROW} for the image "
                                                 "stages' columns)" if has_images else ")")
        )
    if estimator.image_bytes:
        lines.append(f"  images: about {_size(estimator.image_bytes)} of tars (assumed bytes per pixel; see notes)")
    if estimator.embedding_bytes:
        lines.append(f"  embeddings: about {_size(estimator.embedding_bytes)} (image and text, float16)")
    lines.append(f"time (estimate): about {_duration(total)} of stage work on {cores} core{'s' if cores != 1 else ''}"
                 "; Spark start-up, scheduling and shuffles add to it")
    if estimator.notes:
        lines.append("notes:")
        lines.extend(f"  {note}" for note in estimator.notes)
    return lines


def dry_run(run_config: RunConfig, run_dir: Path, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> list[str]:
    """What `curation run` would do with `run_config` in `run_dir`, and an estimate of its output and time, as
    lines to print. Reads footers and a sample of the inputs; writes nothing and starts no Spark session."""
    run_dir = Path(run_dir).resolve()
    if run_dir.is_dir():
        finished = sum(1 for p in (run_dir / "stages").glob("*") if is_complete(p)) if (
            run_dir / "stages").is_dir() else 0
        state = f"exists, {finished} finished stage folder{'s' if finished != 1 else ''}" + (
            ", a release" if is_complete(run_dir / RELEASE_DIR) else "")
    else:
        state = "does not exist yet"
    lines = [f"dry run of {run_config.name!r}: nothing is run or written, and no Spark session is started",
             f"run folder: {run_dir} ({state})"]
    lines.extend(stage_lines(run_config, run_dir))
    ingest_stage = run_config.stages[0]
    options = IngestOptions.from_options(ingest_stage.options)
    plan = plan_inputs(run_config.inputs, options, ingest_stage.options["skip_bad_files"])
    lines.extend(input_lines(plan, options))
    sample = read_sample(plan, options, sample_rows)
    lines.extend(estimate_lines(run_config, plan, sample, sample_rows))
    return lines
