"""The block_images stage."""

from curation.config import ConfigError
from curation.schema import MAX_PHASH_DISTANCE
from curation.stage import RateAssumption, RowFilterStage, StageOptions, option, partitions_option


class BlockImagesStage(RowFilterStage):
    name = "block_images"
    # 2: a listed sha256 also matches image_source_sha256, and the ledger detail says which digest matched.
    version = 2
    flow = 100
    summary = "drop images on a sha256 or perceptual-hash blocklist"
    input_help = "stage folder downstream of download"
    reads_images = True
    drops_depend_on = "blocklist"
    description = (
        "an image blocklist after download: exact sha256, matched against both the stored image and the original as "
        "served (`image_source_sha256`, so lists of the original files' hashes work), and 64-bit perceptual hashes "
        "within a Hamming distance (so resized and re-encoded copies are caught)"
    )
    drops = "`blocked_image` (detail: which list, distance)"

    class Options(StageOptions):
        sha256_file: str | None = option(
            None, "text file of image sha256 digests (hex), one a line: exact matches are blocked", hashed_file=True
        )
        phash_file: str | None = option(
            None, "text file of 64-bit perceptual hashes (16 hex digits), one a line", hashed_file=True
        )
        max_distance: int = option(
            4, "images within this Hamming distance of a blocked perceptual hash are blocked", at_least=0,
            at_most=MAX_PHASH_DISTANCE,
        )
        image_column: str = option(
            "jpg", "column of encoded image bytes, if the rows carry them (else the download tars)"
        )
        partitions: int | None = partitions_option()

        def check(self) -> None:
            if not self.sha256_file and not self.phash_file:
                raise ConfigError("stage block_images needs sha256_file or phash_file (or both): text files of image "
                                  "hashes")

    assumed_rate = RateAssumption(300, "images/s", "image hashing against the blocklist (guess)")
    planner = "curation.spark.blocklist:block_images_plan"


STAGE = BlockImagesStage()
