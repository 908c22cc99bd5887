"""The embed stage."""

from dataclasses import asdict
from pathlib import Path

from curation.io import sha256_of_file
from curation.stage import RateAssumption, Stage, StageOptions, check_with, option


class EmbedStage(Stage):
    name = "embed"
    flow = 80
    summary = "open_clip image and text embeddings and clip_score per sample"
    input_help = "stage folder of downloaded rows"
    reads_images = True
    description = (
        "open_clip image and text embeddings of every downloaded sample: `_artifacts/embeddings/NNNNN.parquet` per tar"
        " (uid, image_embedding, text_embedding as L2-normalised float16 fixed-size lists, clip_score), rows gain "
        "`clip_score` (cosine of image and text embedding, as DataComp). CPU in float32; CUDA batched under fp16 "
        "autocast with decoding in DataLoader worker processes. Engines `local` (this machine; one process per GPU) "
        "and `spark` (one Spark task per tar, GPU from `TaskContext.resources()`); both give the same embeddings "
        "within one fp16 ulp. The model name, weights (tag, or checkpoint path and sha256), preprocessing and dims are"
        " in the stage record; checkpoints load without arbitrary unpickling"
    )
    drops = "`embed_failed` (detail: the reason)"

    class Options(StageOptions):
        model: str = option(
            "ViT-B-32", "open_clip model name (or a model config added to open_clip, such as tiny-clip)"
        )
        pretrained: str = option(
            "openai", "open_clip pretrained tag, a local checkpoint path, or `random` (random init)"
        )
        device: str = option("auto", "auto (CUDA when present), cuda or cpu")
        precision: str = option(
            "auto", "auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16",
            choices=("auto", "fp32", "fp16", "bf16"),
        )
        batch_size: int = option(256, "images per forward pass; batches never span two tars")
        num_workers: int = option(2, "DataLoader processes decoding images while the model embeds")
        engine: str = option(
            "local", "local (this machine, one process per GPU) or spark (one Spark task per tar)",
            choices=("local", "spark"),
        )

        def check(self) -> None:
            from curation.ops import embeddings as embedding_ops

            check_with("embed", lambda: embedding_ops.EmbedOptions.from_options(asdict(self)))

    assumed_rate = RateAssumption(
        6,
        "images/s",
        "ViT-B-32 fp32 on one CPU core (bench/results/embed_cpu.json when present), scaled by the model's size",
    )
    adapter = "curation.spark.embed:run_embed"
    estimated_by = "embed"

    def hashed_files(self, options: dict) -> dict:
        checkpoint = Path(options["pretrained"])
        return {"checkpoint_sha256": sha256_of_file(checkpoint)} if checkpoint.is_file() else {}


STAGE = EmbedStage()
