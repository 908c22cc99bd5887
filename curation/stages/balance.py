"""The balance stage."""

from curation.stage import RateAssumption, Stage, StageOptions, exactly_one, option, partitions_option


class BalanceStage(Stage):
    name = "balance"
    flow = 60
    summary = "MetaCLIP balancing: keep with 1 - prod(1 - min(1, t/c_e))"
    input_help = "matched (or counted) stage folder"
    description = (
        "keeps a row iff u(seed, uid) < 1 - prod(1 - min(1, t / c_e)); adds `keep_probability`; artifact "
        "`_artifacts/balanced_counts.parquet`"
    )
    drops = "`balance_not_drawn` (detail: p_keep)"

    class Options(StageOptions):
        t: float | None = option(
            None, "MetaCLIP threshold t", above=0,
            default_text="20000 (MetaCLIP's), unless target_size or tail_share is given",
        )
        target_size: int | None = option(None, "solve t so that the expected number of kept rows is this", at_least=1)
        tail_share: float | None = option(
            None, "choose the smallest t whose tail share (matches on entries with c_e < t) >= this", above=0,
            at_most=1,
        )
        seed: int | None = option(None, "seed of the keep draw u(seed, uid)", from_run=True)
        partitions: int | None = partitions_option()

        def check(self) -> None:
            exactly_one("balance", self, ("t", "target_size", "tail_share"), required=False)

    assumed_rate = RateAssumption(100_000, "rows/s", "measured on the sample when possible")
    adapter = "curation.spark.stages:run_balance"
    estimated_by = "balance"


STAGE = BalanceStage()
