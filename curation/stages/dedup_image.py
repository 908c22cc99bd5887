"""The dedup_image stage."""

from curation.schema import MAX_PHASH_DISTANCE
from curation.stage import RateAssumption, Stage, StageOptions, option, partitions_option


class DedupImageStage(Stage):
    name = "dedup_image"
    flow = 90
    summary = "exact (sha256) and perceptual-hash image duplicates"
    input_help = "stage folder whose rows carry image bytes"
    reads_images = True
    drops_depend_on = "duplicates"
    description = (
        "for rows that carry image bytes (column `jpg`, as img2dataset's parquet output writes them) or point into a "
        "download stage's tars: images that do not decode (decompression bombs refused before decoding, only web "
        "formats) are dropped; exact duplicates by sha256 of the bytes; near duplicates by a 64-bit DCT perceptual "
        "hash within Hamming distance 4, found exactly at any scale (distinct hashes share a key in one of the "
        "block-subset tables of Manku et al. 2007 in a Spark shuffle, every bucket pair verified, groups by connected "
        "components); the survivor is the largest image, ties by smallest uid; adds `image_sha256`, `image_phash`, "
        "`image_width`, `image_height`, `image_dup_group`"
    )
    drops = "`undecodable_image`, `duplicate_image_bytes`, `near_duplicate_image`"

    class Options(StageOptions):
        image_column: str = option("jpg", "column of encoded image bytes (img2dataset's parquet output calls it jpg)")
        max_distance: int = option(
            4, "perceptual hashes within this Hamming distance are near duplicates", at_least=0,
            at_most=MAX_PHASH_DISTANCE,
        )
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(300, "images/s", "JPEG decode and perceptual hash of a small image (guess)")
    adapter = "curation.spark.image_dedup:run_dedup_image"


STAGE = DedupImageStage()
