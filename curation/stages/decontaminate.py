"""The decontaminate stage."""

from curation.schema import MAX_PHASH_DISTANCE
from curation.stage import (
    RateAssumption,
    RowFilterStage,
    StageOptions,
    folder_fingerprint,
    option,
    partitions_option,
    required,
)


class DecontaminateStage(RowFilterStage):
    name = "decontaminate"
    flow = 110
    summary = "drop near duplicates of evaluation images"
    input_help = "stage folder downstream of download"
    reads_images = True
    drops_depend_on = "evaluation set"
    description = (
        "drops images that are near duplicates of an evaluation set's images (a folder of images or a parquet of image"
        " bytes), so zero-shot evaluations stay honest: perceptual hash within a distance, and, when an embed stage is"
        " upstream, image-embedding cosine at or above a threshold with the embed stage's own model (exact search "
        "through the FAISS seam)"
    )
    drops = "`eval_contamination` (detail: the evaluation image, distance or cosine)"

    class Options(StageOptions):
        eval_images: str | None = option(
            None,
            "evaluation images: a folder of image files or a parquet file with an image column (required)",
        )
        eval_image_column: str = option("jpg", "the image-bytes column when eval_images is a parquet file")
        max_distance: int = option(
            4,
            "images within this perceptual-hash Hamming distance of an evaluation image are dropped "
            "(eval_contamination)",
            at_least=0,
            at_most=MAX_PHASH_DISTANCE,
        )
        min_cosine: float = option(
            0.95,
            "with embeddings upstream, images whose image-embedding cosine to an evaluation image is at least this "
            "are dropped too",
        )
        use_embeddings: str = option(
            "auto", "auto (when an embed stage is upstream), always or never", choices=("auto", "always", "never")
        )
        image_column: str = option(
            "jpg", "column of encoded image bytes, if the rows carry them (else the download tars)"
        )
        partitions: int | None = partitions_option()

        def check(self) -> None:
            required("decontaminate", self, "eval_images", "a folder of images or a parquet file")

    assumed_rate = RateAssumption(300, "images/s", "image hashing against the evaluation set (guess)")
    planner = "curation.spark.decontaminate:decontaminate_plan"

    def hashed_files(self, options: dict) -> dict:
        return {"eval_images_fingerprint": folder_fingerprint(options["eval_images"])}


STAGE = DecontaminateStage()
