"""The sample stage: keep a seeded fraction of the rows (a smaller corpus for a trial run, or a held-out split)."""

from curation.stage import RateAssumption, RowFilterStage, StageOptions, option, partitions_option


class SampleStage(RowFilterStage):
    name = "sample"
    flow = 900
    summary = "keep a seeded fraction of the rows"
    input_help = "any stage folder"
    description = (
        "keeps each row iff u(seed, uid) < fraction, so the sample does not depend on partitions or reruns and a "
        "larger fraction keeps a superset of a smaller one's rows"
    )
    drops = "`sampled_out` (detail: the draw u and the fraction)"

    class Options(StageOptions):
        fraction: float = option(0.1, "share of the rows kept: a row is kept iff u(seed, uid) < fraction",
                                 above=0, at_most=1)
        seed: int | None = option(None, "seed of the draw u(seed, uid)", from_run=True)
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(500_000, "rows/s", "a hash per row (guess)")

    def survival(self, options: dict) -> tuple[float, str]:
        return float(options["fraction"]), "expected: fraction"

    def plan(self, context, rows):
        from functools import partial

        from curation.ops.sample import sample_rows
        from curation.spark.rowfilter import FilterPlan

        fraction, seed = float(context.options["fraction"]), int(context.options["seed"])
        return FilterPlan(keep=partial(sample_rows, fraction=fraction, seed=seed),
                          record={"sample": {"fraction": fraction, "seed": seed}})


STAGE = SampleStage()
