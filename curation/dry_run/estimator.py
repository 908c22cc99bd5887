"""The dry run's estimate: rows, bytes and seconds stage by stage; each stage's declaration calls back into the
`Estimator` method that fits it (`Stage.estimate`)."""

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import RunConfig, StageConfig
from curation.dry_run.rates import (
    BYTES_PER_PIXEL,
    DECODE_IMAGES_PER_CORE,
    EMBED_GPU,
    VIT_B_32,
    assumed_rates,
    model_config,
    vision_cost,
)
from curation.dry_run.sample import Sample, duration_text, size_text
from curation.inputs import InputPlan
from curation.ops import balance as balance_ops
from curation.ops.uid import uniform
from curation.schema import CAPTION, ENTRY_IDS, KEEP_PROBABILITY, UID
from curation.stages import get_stage


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
            f"{per_pixel} bytes per pixel: about {size_text(side * side * per_pixel)} per image (kept twice: in the "
            "download stage's tars and in the release's)"
        )
        return estimate

    def embed(self, stage: StageConfig, rows: float) -> StageEstimate:
        model = stage.options["model"]
        config = model_config(model)
        embed_dim = (config or {}).get("embed_dim")
        if embed_dim:
            self.embedding_bytes = rows * 2 * embed_dim * 2  # image and text embeddings, float16
        cpu_rate, cpu_basis = self.rate(stage.name)
        cost = vision_cost(config) if config else None
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
        self.notes.append(f"embed (device auto): on CPU about {duration_text(cpu_seconds)} ({cpu_basis}{scaled}); "
                          f"with one GPU about {duration_text(gpu_seconds)} ({gpu_basis}{gpu_scaled})")
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
        basis = (f"{basis}, plus a k-means fit of about {duration_text(fit)} ({fit_basis}, scaled to sample_size, k, "
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
