"""The count stage."""

from curation.stage import RateAssumption, Stage


class CountStage(Stage):
    name = "count"
    flow = 50
    summary = "entry counts c_e over matched rows (artifact; rows pass through)"
    input_help = "matched stage folder"
    passes_all_rows = True
    description = (
        "entry counts c_e over matched rows, a global reduce; artifact `_artifacts/entry_counts.parquet` (entry_id, "
        "entry, count); rows pass through"
    )
    drops = "-"

    assumed_rate = RateAssumption(500_000, "rows/s", "an explode and group-by (bench/results/spine.json when present)")
    adapter = "curation.spark.stages:run_count"


STAGE = CountStage()
