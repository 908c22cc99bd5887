"""The publish stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option


class PublishStage(Stage):
    name = "publish"
    release = True
    flow = 1000
    summary = "uid-range parquet shards, the run's ledger and manifest.json"
    input_help = "last stage folder of the chain"
    passes_all_rows = True
    description = (
        "uid-range parquet shards, with downloaded images their twin webdataset tars, the run's whole ledger, "
        "`manifest.json`"
    )
    drops = "-"

    class Options(StageOptions):
        shard_rows: int = option(100000, "about this many rows per parquet shard (uid-range shards)", at_least=1)
        name: str | None = option(None, "dataset name in the manifest", from_run=True)

    assumed_rate = RateAssumption(100_000, "rows/s", "uid-range shards written with zstd (guess)")
    adapter = "curation.spark.publish:run_publish"


STAGE = PublishStage()
