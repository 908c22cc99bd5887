"""The logo_bank stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option


class LogoBankStage(Stage):
    name = "logo_bank"
    flow = 170
    summary = "SLANT logo bank: the top q of the corpus by logo score"
    input_help = "stage folder downstream of embed"
    passes_all_rows = True
    description = (
        "SLANT's logo bank: every image's logo score = best cosine to the logo prompts minus best cosine to the "
        "contrast prompts (text embeddings of the embed stage's own model); the bank is the top q of the corpus (above"
        " an optional floor, capped by `max_bank_size`), near-duplicate logos collapsed by embedding similarity with "
        "their frequency kept; adds `logo_score`; artifacts `logo_bank.parquet` (logo_uid, score, frequency, cluster, "
        "members, embedding) and `bank/<uid>.jpg` (the images, copied out of the tars)"
    )
    drops = "-"

    class Options(StageOptions):
        q: float = option(
            0.01, "the bank is the top q of the corpus by logo score (logo prompts minus contrast prompts)"
        )
        floor: float | None = option(None, "only images with a logo score at least this enter the bank")
        max_bank_size: int = option(10000, "at most this many images are taken into the bank")
        duplicate_similarity: float = option(
            0.95, "bank images within this cosine collapse into one logo (frequency kept)"
        )
        logo_prompts: list[str] = option(
            ["a logo", "a brand logo", "logo of a company"], "prompts an image is a logo by"
        )
        contrast_prompts: list[str] = option(
            ["a photo", "a photo of a person", "a photo of an object"], "prompts an image is not a logo by"
        )

    assumed_rate = RateAssumption(200_000, "rows/s", "prompt scores from the stored embeddings (guess)")
    adapter = "curation.spark.logos:run_logo_bank"


STAGE = LogoBankStage()
