"""The filter stage."""

from curation.stage import RateAssumption, RowFilterStage, StageOptions, option, partitions_option


class FilterStage(RowFilterStage):
    name = "filter"
    flow = 120
    summary = (
        "attribute filters (CLIP score, image size, aspect ratio, caption words, boilerplate captions); each rule its "
        "own reason"
    )
    input_help = "stage folder to filter"
    drops_depend_on = "rules and the data"
    description = (
        "attribute rules over columns earlier stages wrote, each with its own reason, first failing rule wins: "
        "`clip_score` at least a minimum (LAION: 0.28 for ViT-B/32); the top fraction of the whole input by "
        "`clip_score`, ties by uid (DataComp's CLIP-score filter); ALIGN's image rules on the original size (shorter "
        "side, aspect ratio) and caption rules (word count); ALIGN's boilerplate rule: rows whose exact caption is "
        "shared by more than N rows of the whole input (default 1,000)"
    )
    drops = (
        "`low_clip_score`, `clip_score_not_top`, `image_too_small`, `extreme_aspect_ratio`, `too_few_caption_words`, "
        "`too_many_caption_words`, `boilerplate_caption` (detail: the value and the threshold)"
    )

    class Options(StageOptions):
        min_clip_score: float | None = option(
            None, "drop rows with clip_score below this (low_clip_score; LAION used 0.28 with ViT-B/32)"
        )
        clip_score_top_fraction: float | None = option(
            None,
            "keep only this top fraction of rows by clip_score, ties by uid (clip_score_not_top; DataComp's "
            "CLIP-score filter, e.g. 0.3)",
        )
        min_image_side: int | None = option(
            None, "drop images whose original shorter side is below this many pixels (image_too_small; ALIGN: 200)"
        )
        max_aspect_ratio: float | None = option(
            None, "drop images whose original long/short side ratio exceeds this (extreme_aspect_ratio; ALIGN: 3)"
        )
        min_caption_words: int | None = option(
            None, "drop captions with fewer words (too_few_caption_words; ALIGN: 3)"
        )
        max_caption_words: int | None = option(
            None, "drop captions with more words (too_many_caption_words; ALIGN: 20)"
        )
        max_caption_repeats: int | None = option(
            1000,
            "drop every row whose exact caption is shared by more than this many rows of the stage's whole input "
            "(boilerplate_caption; ALIGN's boilerplate rule); null (0 on the command line) turns it off",
            off_by_null_or_zero=True,
        )
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(200_000, "rows/s", "column rules (guess)")
    planner = "curation.spark.filters:filter_plan"


STAGE = FilterStage()
