"""Spurious logo mining after SLANT ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4 "Logo bank"):
pasting logos onto probe images and classifying them zero-shot.

A logo is spurious for a target label T when pasting it onto unrelated images pushes a CLIP model's zero-shot
prediction toward T. `mine_logos` pastes each bank logo into the four corners of probe images at a fixed scale
(alpha respected), classifies the pasted images zero-shot over targets + contrast labels with each `Scorer`
(`curation.gpu.scorer`), and ranks the logos by spuriousness (`curation.ops.logo_mining`); the top ones are
re-checked on held-out probes. Pasting and classification run in batches on the scorer's device (CUDA when the
model lives there, the CPU otherwise), and a run resumes per block of logos (DESIGN.md section 5).
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from curation.gpu.scorer import Scorer
from curation.gpu.zeroshot import label_features_of, zero_shot_predict
from curation.ops.logo_mining import (
    CORNERS,
    block_identity,
    check_mining_inputs,
    mining_table,
    rank_logos,
    read_block,
    split_probes,
    spuriousness_rates,
    write_block,
)
from curation.progress import Progress

logger = logging.getLogger(__name__)

RECHECK_FILE = "recheck.parquet"


def logo_tensor(image: Image.Image) -> torch.Tensor:
    """(4, h, w) RGBA float in [0, 1]; images without alpha get alpha 1."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
    return torch.from_numpy(rgba).permute(2, 0, 1).contiguous()


def paste(pixels: torch.Tensor, logo: torch.Tensor, corner: str, scale: float = 0.2) -> torch.Tensor:
    """A copy of the (n, 3, H, W) [0, 1] batch with `logo` (4, h, w RGBA) alpha-blended into `corner`.

    The logo is resized, aspect ratio kept, so that its longer side is round(scale x min(H, W)) pixels, on the
    device of `pixels`.
    """
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}, not {corner!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}")
    if pixels.dim() != 4 or pixels.shape[1] != 3 or logo.dim() != 3 or logo.shape[0] != 4:
        raise ValueError(f"expected (n, 3, H, W) pixels and a (4, h, w) logo, got {tuple(pixels.shape)} and "
                         f"{tuple(logo.shape)}")
    height, width = pixels.shape[-2:]
    logo_height, logo_width = logo.shape[-2:]
    longer = max(1, round(scale * min(height, width)))
    ratio = longer / max(logo_height, logo_width)
    size = (max(1, round(logo_height * ratio)), max(1, round(logo_width * ratio)))
    logo = logo.to(pixels.device, pixels.dtype)
    alpha = logo[3:]
    # Resampled premultiplied, so the colour hidden under transparent pixels (often black) does not bleed into the
    # logo's edges.
    premultiplied = torch.cat([logo[:3] * alpha, alpha])
    resized = F.interpolate(premultiplied[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    rows = slice(0, size[0]) if corner.startswith("top") else slice(height - size[0], height)
    columns = slice(0, size[1]) if corner.endswith("left") else slice(width - size[1], width)
    pasted = pixels.clone()
    background = pixels[:, :, rows, columns]
    pasted[:, :, rows, columns] = resized[:3] + (1 - resized[3:]) * background
    return pasted


@dataclass
class MiningResult:
    """SLANT mining output.

    `table`: one row per (logo, target), sorted by the logo's rank then by target order: logo_id, target, rank
    (1 = most spurious logo, by its largest model-mean spuriousness over the targets; ties by logo_id),
    spuriousness (mean over models), one float column `spuriousness[<model name>]` per model, flip_rate (share of
    (probe, corner) whose clean prediction is not the target and pasted prediction is, mean over models),
    heldout_spuriousness (on the held-out probes, for the `recheck_top` best-ranked logos; null for the others or
    without held-out probes), clean_target_rate (share of clean mining probes predicted as the target, mean over
    models).
    `summary` (JSON-serialisable): models, targets, contrast, templates, logos, probes {mining, heldout}, scale,
    corners, seed, heldout_fraction, recheck_top, blocks, blocks_resumed, pastes (computed in this call, re-check
    included: logos x probes x corners x models), seconds (the whole call) and pastes_per_second.
    """

    table: pa.Table
    summary: dict


def mine_logos(
    scorers: Sequence[Scorer],
    logos: Sequence[tuple[str, Image.Image]],
    probes: Sequence[tuple[str, Image.Image]],
    targets: Sequence[str],
    contrast: Sequence[str],
    *,
    scale: float = 0.2,
    batch_size: int = 64,
    heldout_fraction: float = 0.25,
    recheck_top: int = 20,
    seed: int = 0,
    logo_block: int = 16,
    work_dir: Path | None = None,
    templates: Sequence[str] = ("{}",),
) -> MiningResult:
    """Rank `logos` by how far pasting them pushes each scorer's zero-shot predictions toward `targets` (SLANT).

    Probes are split into mining and held-out sets by u(seed, probe id) < heldout_fraction (a probe id that is not
    a 32-hex uid is hashed to one first), so the split of a probe never depends on the others. The labels are
    targets + contrast, each label's features the mean of its templates' features. Logos are processed in blocks
    of `logo_block` (sorted by id); with `work_dir`, each finished block is written atomically as
    `block-NNNNN.parquet` and a later run skips it after checking it was made with the same models, labels,
    templates, probes, scale and logos (a mismatch raises ValueError, so results of two setups never mix). The
    held-out re-check is kept there the same way (`recheck.parquet`).
    """
    started = time.perf_counter()
    names = [scorer.name for scorer in scorers]
    labels = [*targets, *contrast]
    check_mining_inputs(names, logos, probes, targets, labels, scale, batch_size, heldout_fraction, logo_block,
                        templates)
    logos = sorted(logos, key=lambda item: item[0])
    mining_probes, heldout_probes = split_probes(probes, heldout_fraction, seed)
    if not mining_probes:
        raise ValueError(f"no mining probes left of {len(probes)} after holding out {heldout_fraction:.0%}")
    if work_dir is not None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)

    with torch.inference_mode():
        run = _MiningRun(scorers, labels, templates, scale, batch_size)
        mining = run.prepare_probes(mining_probes)
        blocks = [logos[start : start + logo_block] for start in range(0, len(logos), logo_block)]
        pasted = []
        blocks_resumed = 0
        with Progress("mine_logos", len(blocks), "logo blocks") as progress:
            for index, block in enumerate(blocks):
                path = work_dir / f"block-{index:05d}.parquet" if work_dir is not None else None
                predictions, resumed = run.cached_predictions(path, block, mining)
                blocks_resumed += resumed
                pasted.append(predictions)
                logger.debug("logo block %d/%d done (%d logos)", index + 1, len(blocks), len(block))
                progress.update(note=f"{blocks_resumed} resumed" if blocks_resumed else None)
        pasted_predictions = (np.concatenate(pasted, axis=1) if pasted
                              else np.empty((len(scorers), 0, len(CORNERS), len(mining.ids)), np.int16))
        spuriousness, flip_rate, clean_rate = spuriousness_rates(pasted_predictions, mining.clean_predictions,
                                                                 len(targets))
        order = rank_logos(spuriousness.mean(axis=0))

        heldout_spuriousness = np.full((len(logos), len(targets)), np.nan)
        rechecked = order[: max(0, recheck_top)]
        if heldout_probes and len(rechecked):
            heldout = run.prepare_probes(heldout_probes)
            path = work_dir / RECHECK_FILE if work_dir is not None else None
            predictions, _ = run.cached_predictions(path, [logos[i] for i in rechecked], heldout)
            heldout_scores, _, _ = spuriousness_rates(predictions, heldout.clean_predictions, len(targets))
            heldout_spuriousness[rechecked] = heldout_scores.mean(axis=0)
        elif heldout_fraction > 0 and recheck_top > 0:
            logger.warning("no held-out probes (heldout_fraction=%s of %d probes): no re-check", heldout_fraction,
                           len(probes))

    table = mining_table(logos, targets, names, order, spuriousness, flip_rate, clean_rate, heldout_spuriousness)
    seconds = time.perf_counter() - started
    summary = {
        "models": names,
        "targets": list(targets),
        "contrast": list(contrast),
        "templates": list(templates),
        "logos": len(logos),
        "probes": {"mining": len(mining_probes), "heldout": len(heldout_probes)},
        "scale": scale,
        "corners": list(CORNERS),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "recheck_top": recheck_top,
        "blocks": len(blocks),
        "blocks_resumed": blocks_resumed,
        "pastes": run.pastes,
        "seconds": round(seconds, 3),
        "pastes_per_second": round(run.pastes / seconds, 1) if run.pastes else None,
    }
    logger.info("mined %d logos x %d mining probes x %d corners x %d models in %.1f s (%d pastes computed)",
                len(logos), len(mining_probes), len(CORNERS), len(scorers), seconds, run.pastes)
    return MiningResult(table=table, summary=summary)


@dataclass
class _ProbeSet:
    ids: list[str]
    pixels: list[torch.Tensor]  # per scorer, (probes, 3, S, S) on its device
    clean_predictions: np.ndarray  # (models, probes)


class _MiningRun:
    """What every block of one `mine_logos` call shares, and its counters."""

    def __init__(self, scorers, labels, templates, scale, batch_size):
        self.scorers = list(scorers)
        self.labels = list(labels)
        self.templates = list(templates)
        self.scale = scale
        self.batch_size = batch_size
        self.label_features = [label_features_of(scorer, self.labels, self.templates) for scorer in self.scorers]
        self.pastes = 0

    def prepare_probes(self, probes) -> _ProbeSet:
        pixels = [torch.stack([scorer.to_pixels(image) for _, image in probes]).to(scorer.device)
                  for scorer in self.scorers]
        clean = np.stack([
            torch.cat([zero_shot_predict(scorer, batch, features) for batch in scorer_pixels.split(self.batch_size)])
            .numpy()
            for scorer, scorer_pixels, features in zip(self.scorers, pixels, self.label_features, strict=True)
        ])
        return _ProbeSet([probe_id for probe_id, _ in probes], pixels, clean)

    def cached_predictions(self, path: Path | None, logos, probes: _ProbeSet) -> tuple[np.ndarray, bool]:
        """(models, logos, corners, probes) pasted predictions, read from `path` when a run already made them, and
        whether they were."""
        identity = block_identity([scorer.name for scorer in self.scorers], self.labels, self.templates, self.scale,
                                  probes.ids, [logo_id for logo_id, _ in logos])
        shape = (len(self.scorers), len(logos), len(CORNERS), len(probes.ids))
        if path is not None and path.exists():
            predictions = read_block(path, identity, shape)
            logger.info("resumed %s", path)
            return predictions, True
        started = time.perf_counter()
        predictions = _compute_block(self, logos, probes)
        self.pastes += predictions.size
        seconds = time.perf_counter() - started
        logger.info("%d pastes in %.1f s (%.0f pastes/s)", predictions.size, seconds,
                    predictions.size / seconds if seconds > 0 else 0.0)
        if path is not None:
            write_block(path, identity, predictions)
        return predictions, False


def _compute_block(run: _MiningRun, logos, probes: _ProbeSet) -> np.ndarray:
    """Pasted predictions of every (scorer, logo, corner, probe), in batches of `run.batch_size` pasted images that
    may span logos and corners, pasted on the scorer's device."""
    probe_count = len(probes.ids)
    total = len(logos) * len(CORNERS) * probe_count
    predictions = np.empty((len(run.scorers), total), dtype=np.int16)
    for model_index, scorer in enumerate(run.scorers):
        pixels = probes.pixels[model_index]
        features = run.label_features[model_index]
        logo_tensors = [logo_tensor(image).to(scorer.device) for _, image in logos]
        for start in range(0, total, run.batch_size):
            stop = min(start + run.batch_size, total)
            pieces = []
            position = start
            while position < stop:
                pair, first_probe = divmod(position, probe_count)
                last_probe = min(probe_count, first_probe + stop - position)
                logo_index, corner_index = divmod(pair, len(CORNERS))
                pieces.append(paste(pixels[first_probe:last_probe], logo_tensors[logo_index], CORNERS[corner_index],
                                    run.scale))
                position += last_probe - first_probe
            predictions[model_index, start:stop] = zero_shot_predict(scorer, torch.cat(pieces), features).numpy()
    return predictions.reshape(len(run.scorers), len(logos), len(CORNERS), probe_count)


