"""The match stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option, partitions_option, required


class MatchStage(Stage):
    name = "match"
    flow = 40
    summary = "MetaCLIP substring matching; unmatched rows to the ledger"
    input_kind = "either"
    description = "MetaCLIP v1 substring matching (case-sensitive, space-delimited), adds `entry_ids`"
    drops = "`no_metadata_match`"

    class Options(StageOptions):
        metadata: str | None = option(None, "MetaCLIP metadata.json (a JSON list of entries)", from_run=True)
        keep_unmatched: bool = option(
            False, "keep rows matching no entry (with empty entry_ids) instead of dropping them"
        )
        partitions: int | None = partitions_option()

        def check(self) -> None:
            required("match", self, "metadata", "a MetaCLIP metadata.json, in the stage or at the top level")

    assumed_rate = RateAssumption(100_000, "rows/s", "measured on the sample when possible")
    adapter = "curation.spark.stages:run_match"
    estimated_by = "match"

    def hashed_files(self, options: dict) -> dict:
        from curation.ops.metadata import load_metadata, metadata_sha256

        return {"metadata_sha256": metadata_sha256(load_metadata(options["metadata"]))}


STAGE = MatchStage()
