"""The flag_logos stage."""

from curation.stage import RateAssumption, RowFilterStage, StageOptions, option


class FlagLogosStage(RowFilterStage):
    name = "flag_logos"
    flow = 190
    summary = "tag or drop images carrying a mined spurious logo"
    input_help = "stage folder downstream of embed"
    drops_depend_on = "mined logos (policy drop)"
    description = (
        "images within a cosine threshold of a mined spurious logo (top-ranked with spuriousness >= a minimum) gain "
        "`spurious_logo` (the logo uid) and its similarity (`tag`), or are dropped (`drop`)"
    )
    drops = "`spurious_logo` (policy drop)"

    class Options(StageOptions):
        threshold: float = option(0.9, "an image within this cosine of a mined spurious logo carries it")
        top: int = option(10, "logos ranked up to this are candidates")
        min_spuriousness: float = option(0.05, "and must score at least this")
        policy: str = option(
            "tag",
            "tag (add spurious_logo) or drop (ledger reason spurious_logo)",
            choices=("tag", "drop"),
        )

    assumed_rate = RateAssumption(200_000, "rows/s", "cosine to the mined logos (guess)")
    planner = "curation.spark.logos:flag_logos_plan"

    def survival(self, options: dict) -> tuple[float, str]:
        if options["policy"] == "tag":
            return 1.0, "exact: policy tag drops nothing"
        return super().survival(options)


STAGE = FlagLogosStage()
