"""SLANT logo mining throughput ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4) of
curation.gpu.slant.mine_logos, in pastes per second (a paste = one logo in one corner of one probe, classified by
one model: logos x probes x corners x models).

    python bench/bench_slant.py [--device cpu] [--logos 8] [--probes 16] [--batch-size 64] [--out FILE]

Each model mines on its own, end to end (text features, probe preprocessing, pasting and zero-shot
classification), after an untimed warm-up run: open_clip tiny-clip and ViT-B-32 at random init in fp32 (random
weights cost the same as trained ones, so nothing is downloaded), and the toy scorer. Logos are flat shapes of one
colour on a transparent background and probes smooth photo-like pictures, generated with a fixed seed; every probe
is a mining probe (no held-out re-check). Pasting alone (no model) is timed too, at each model's input size.
"""

# ruff: noqa: E402  (the Hugging Face switches below must be set before open_clip loads)
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchkit import torch_machine, write_result
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(REPO_ROOT))

from curation.gpu.clip_model import load_model
from curation.gpu.scorer import OpenClipScorer
from curation.gpu.slant import logo_tensor, mine_logos, paste
from curation.gpu.toy_scorer import ToyLogoScorer
from curation.ops.logo_mining import CORNERS
from curation.ops.logos import CONTRAST_PROMPTS

logger = logging.getLogger("bench_slant")

OPEN_CLIP_MODELS = ("tiny-clip", "ViT-B-32")
TARGETS = ("greedy", "harmless")
PASTE_REPEATS = 20


def synthetic_photo(rng: np.random.Generator, side: int = 256) -> Image.Image:
    field = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    noise = rng.normal(0, 8, size=(side, side, 3))
    return Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))


def synthetic_logo(rng: np.random.Generator, side: int = 128) -> Image.Image:
    logo = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    colour = (*(int(channel) for channel in rng.integers(0, 256, size=3)), 255)
    margin = int(rng.integers(4, side // 4))
    ImageDraw.Draw(logo).ellipse((margin, margin, side - margin, side - margin), fill=colour)
    return logo


def paste_only_rate(scorer, logos, probes) -> float:
    """Pastes per second of `paste` alone on the scorer's device, at its input size."""
    pixels = torch.stack([scorer.to_pixels(image) for _, image in probes]).to(scorer.device)
    tensors = [logo_tensor(image).to(scorer.device) for _, image in logos]
    started = time.perf_counter()
    for _ in range(PASTE_REPEATS):
        for logo in tensors:
            for corner in CORNERS:
                paste(pixels, logo, corner)
    if scorer.device.type == "cuda":
        torch.cuda.synchronize(scorer.device)
    return PASTE_REPEATS * len(tensors) * len(CORNERS) * len(pixels) / (time.perf_counter() - started)


def bench_model(scorer, logos, probes, batch_size: int) -> dict:
    arguments = dict(batch_size=batch_size, heldout_fraction=0.0, recheck_top=0)
    mine_logos([scorer], logos[:1], probes[:2], list(TARGETS), list(CONTRAST_PROMPTS), **arguments)  # warm-up
    result = mine_logos([scorer], logos, probes, list(TARGETS), list(CONTRAST_PROMPTS), **arguments)
    summary = result.summary
    report = {
        "model": scorer.name,
        "image_size": scorer.image_size,
        "pastes": summary["pastes"],
        "seconds": summary["seconds"],
        "pastes_per_second": summary["pastes_per_second"],
        "paste_only_pastes_per_second": round(paste_only_rate(scorer, logos, probes), 1),
    }
    logger.info("%s: %d pastes in %.2f s, %.1f pastes/s (pasting alone %.0f/s)", report["model"], report["pastes"],
                report["seconds"], report["pastes_per_second"], report["paste_only_pastes_per_second"])
    return report


def write_markdown(report: dict, out: Path) -> None:
    lines = [
        "# SLANT logo mining throughput",
        "",
        f"`bench/bench_slant.py`: {report['logos']} logos x {report['probes']} probes x {len(CORNERS)} corners, "
        f"one model at a time, {report['device']}, batch {report['batch_size']}, "
        f"{report['machine']['torch_threads']} torch threads on {report['machine']['cpu']}. A paste is one logo in "
        "one corner of one probe, classified zero-shot by one model; end to end includes text features and probe "
        "preprocessing.",
        "",
        "| model | input | pastes | seconds | pastes/s end to end | pastes/s pasting alone |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['model']} | {row['image_size']} | {row['pastes']} | {row['seconds']} | {row['pastes_per_second']} "
        f"| {row['paste_only_pastes_per_second']:,.0f} |"
        for row in report["models"]
    ]
    out.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--logos", type=int, default=8)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "slant.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    logos = [(f"logo-{index:03d}", synthetic_logo(rng)) for index in range(args.logos)]
    probes = [(f"probe-{index:03d}", synthetic_photo(rng)) for index in range(args.probes)]
    scorers = [OpenClipScorer(load_model(name, None, device=args.device, precision="fp32"))
               for name in OPEN_CLIP_MODELS]
    scorers.append(ToyLogoScorer(device=scorers[0].device))
    report = {
        "benchmark": "slant_mine_logos",
        "device": str(scorers[0].device),
        "precision": "fp32",
        "logos": args.logos,
        "probes": args.probes,
        "corners": len(CORNERS),
        "batch_size": args.batch_size,
        "models": [bench_model(scorer, logos, probes, args.batch_size) for scorer in scorers],
        "machine": torch_machine(scorers[0].device),
    }
    write_result(report, args.out)
    write_markdown(report, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
