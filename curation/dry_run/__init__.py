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

from pathlib import Path

from curation.config import RunConfig
from curation.dry_run.estimator import Estimator
from curation.dry_run.rates import IMAGE_COLUMNS_BYTES_PER_ROW, bench_rates, spark_cores
from curation.dry_run.sample import Sample, duration_text, input_lines, read_sample, size_text
from curation.dry_run.status import stage_lines
from curation.inputs import InputPlan, plan_inputs
from curation.ops.ingest import IngestOptions
from curation.run_folder import RunFolder
from curation.stages import get_stage

DEFAULT_SAMPLE_ROWS = 2000


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
        time_text = duration_text(estimate.seconds) if estimate.seconds is not None else "?"
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
            f"  parquet rows: about {size_text(final_rows * per_row)} ({per_row:,.0f} bytes per row: measured on "
            f"the sample's rows as zstd parquet" + (f", plus an assumed {IMAGE_COLUMNS_BYTES_PER_ROW} for the image "
                                                 "stages' columns)" if has_images else ")")
        )
    if estimator.image_bytes:
        lines.append(f"  images: about {size_text(estimator.image_bytes)} of tars (assumed bytes per pixel; see "
                     "notes)")
    if estimator.embedding_bytes:
        lines.append(f"  embeddings: about {size_text(estimator.embedding_bytes)} (image and text, float16)")
    lines.append(f"time (estimate): about {duration_text(total)} of stage work on {cores} "
                 f"core{'s' if cores != 1 else ''}; Spark start-up, scheduling and shuffles add to it")
    if estimator.notes:
        lines.append("notes:")
        lines.extend(f"  {note}" for note in estimator.notes)
    return lines


def dry_run(run_config: RunConfig, run_dir: Path, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> list[str]:
    """What `curation run` would do with `run_config` in `run_dir`, and an estimate of its output and time, as
    lines to print. Reads footers and a sample of the inputs; writes nothing and starts no Spark session."""
    run_dir = Path(run_dir).resolve()
    if run_dir.is_dir():
        run = RunFolder(run_dir)
        finished = len(run.complete_stage_folders())
        state = f"exists, {finished} finished stage folder{'s' if finished != 1 else ''}" + (
            ", a release" if run.has_release() else "")
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
