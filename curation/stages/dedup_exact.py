"""The dedup_exact stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option, partitions_option


class DedupExactStage(Stage):
    name = "dedup_exact"
    flow = 20
    summary = "one row per normalised url (optionally per caption)"
    input_kind = "either"
    drops_depend_on = "duplicates"
    description = (
        "one row per normalised url (scheme and host lowercased, fragment and default port dropped, path and query "
        "kept); optionally one row per exact caption; the survivor is the smallest uid"
    )
    drops = "`duplicate_url`, `duplicate_caption` (related_uid: the survivor)"

    class Options(StageOptions):
        by_caption: bool = option(False, "also keep one row per exact caption (duplicate_caption)")
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(50_000, "rows/s", "a Spark shuffle on the normalised url (guess)")
    adapter = "curation.spark.dedup:run_dedup_exact"


STAGE = DedupExactStage()
