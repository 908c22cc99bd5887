"""The publish stage."""

from dataclasses import dataclass

from curation.config import ConfigError
from curation.stage import RateAssumption, Stage, StageOptions, option


@dataclass(frozen=True)
class PublishOptions(StageOptions):
    shard_rows: int = option(100000, "about this many rows per parquet shard (uid-range shards)")
    name: str | None = option(None, "dataset name in the manifest", from_run=True)

    def check(self) -> None:
        if self.shard_rows < 1:
            raise ConfigError(f"stage publish: option shard_rows is {self.shard_rows}; allowed: an integer >= 1")



class PublishStage(Stage):
    name = "publish"
    Options = PublishOptions
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
    assumed_rate = RateAssumption(100_000, "rows/s", "uid-range shards written with zstd (guess)")

    def run(self, context):
        from curation.spark.publish import run_publish

        return run_publish(context)


STAGE = PublishStage()
