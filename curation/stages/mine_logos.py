"""The mine_logos stage."""

from pathlib import Path

from curation.io import sha256_of_file
from curation.stage import RateAssumption, Stage, StageOptions, folder_fingerprint, option


class MineLogosStage(Stage):
    name = "mine_logos"
    flow = 180
    summary = "SLANT mining: rank bank logos by spuriousness per target"
    input_help = "stage folder downstream of embed"
    passes_all_rows = True
    description = (
        "SLANT mining: each bank logo pasted (alpha respected, 20% of the shorter side) into each corner of each probe"
        " image (a corpus sample or a folder), zero-shot over targets + contrast labels, spuriousness(logo, T) = P(T "
        '| pasted) - P(T | clean) averaged over probes and corners, per model and averaged over models; ranked, top '
        "logos re-checked on held-out probes, flip rate recorded; resumable per logo block; the record compares plain "
        "and 10-crop zero-shot on the top logo (`curation.gpu.zeroshot`); artifacts `mining.parquet`, "
        "`contact_sheet.png`; rows pass through"
    )
    drops = "-"

    class Options(StageOptions):
        targets: list[str] = option(["greedy", "harmless"], "labels a logo may spuriously push predictions toward")
        contrast: list[str] = option(
            ["a person", "an animal", "an object", "a landscape", "food", "a vehicle"],
            "the other zero-shot labels",
        )
        models: list[str] = option(
            [],
            "open_clip models NAME or NAME:PRETRAINED (or `toy`)",
            default_text="the embed stage's model",
        )
        probe_count: int = option(64, "probe images: this many corpus images with the smallest u(seed, uid)")
        probe_folder: str | None = option(None, "probe images from this folder instead of the corpus")
        max_logos: int = option(256, "mine the bank's best-scored logos up to this many")
        scale: float = option(0.2, "pasted logo size as a share of the probe's shorter side")
        batch_size: int = option(64, "pasted images per forward pass")
        heldout_fraction: float = option(0.25, "share of probes kept aside to re-check the top logos")
        recheck_top: int = option(20, "logos re-checked on the held-out probes")
        logo_block: int = option(16, "logos per resumable block")
        device: str = option("auto", "auto, cuda, cuda:N or cpu")
        seed: int | None = option(None, "seed of the probe draw and split", from_run=True)

    assumed_rate = RateAssumption(
        20,
        "pastes/s",
        "pasting logos into probes and embedding them (bench/results/slant.json when present)",
        per="per model",
    )
    adapter = "curation.spark.logos:run_mine_logos"
    estimated_by = "mine_logos"

    def hashed_files(self, options: dict) -> dict:
        # Changing a probe image or a checkpoint must redo the mining, not skip it.
        checkpoints = [Path(spec.partition(":")[2]) for spec in options["models"]]
        hashes = {"checkpoint_sha256": {str(path): sha256_of_file(path) for path in checkpoints if path.is_file()}}
        if options["probe_folder"]:
            hashes["probe_fingerprint"] = folder_fingerprint(options["probe_folder"])
        return hashes


STAGE = MineLogosStage()
