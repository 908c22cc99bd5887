"""Spurious logo mining after SLANT ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4 "Logo bank").

A logo is spurious for a target label T when pasting it onto unrelated images pushes a CLIP model's zero-shot
prediction toward T. `mine_logos` pastes each bank logo into the four corners of probe images at a fixed scale
(alpha respected), classifies the pasted images zero-shot over targets + contrast labels and scores

    spuriousness(logo, T) = P(predict T | logo pasted) - P(predict T | clean image),

averaged over probes and corners, per model, then averaged over models. Logos are ranked by the largest model-mean
spuriousness over the targets; the top ones are re-checked on held-out probes. Pasting and classification run in
batches on the scorer's device (CUDA when the model lives there, the CPU otherwise), and a run resumes per block of
logos (DESIGN.md section 5).

A `Scorer` is what the mining needs from a model: unnormalised [0, 1] pixels to paste onto, and L2-normalised image
and text features. `OpenClipScorer` wraps an open_clip model from `curation.gpu.clip_model`; `ToyLogoScorer` is a
deterministic toy with a planted spurious colour, for tests and demos without pretrained weights.
"""

import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torchvision.transforms import Compose, Normalize

from curation.gpu.clip_model import EmbeddingModel
from curation.gpu.encode import unit_image_features, unit_text_features
from curation.io import atomic_write_bytes, canonical_json
from curation.ops.uid import uniform
from curation.progress import Progress

logger = logging.getLogger(__name__)

LOGO_PROMPTS = ("a logo", "a brand logo", "logo of a company")
CONTRAST_PROMPTS = ("a photo", "a photo of a person", "a photo of an object")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

HELDOUT_PURPOSE = "slant_heldout"
# Key of the parquet key-value metadata recording what a block of pasted predictions was made with.
BLOCK_METADATA_KEY = b"curation.slant_block"
BLOCK_FORMAT_VERSION = 1
RECHECK_FILE = "recheck.parquet"
_UID_PATTERN = re.compile(r"[0-9a-f]{32}")

CONTACT_THUMBNAIL = 96
CONTACT_PADDING = 4
CONTACT_CAPTION_HEIGHT = 28
# (width, height) of one contact-sheet cell: the thumbnail with padding, and two caption lines under it.
CONTACT_CELL = (
    CONTACT_THUMBNAIL + 2 * CONTACT_PADDING,
    CONTACT_THUMBNAIL + 2 * CONTACT_PADDING + CONTACT_CAPTION_HEIGHT,
)
CONTACT_BACKGROUND = (235, 235, 235)


class Scorer(Protocol):
    """A zero-shot image-text model as SLANT mining uses it."""

    name: str
    image_size: int
    device: torch.device

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """RGB float (3, image_size, image_size) in [0, 1]: the model's resize and crop, without normalisation."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, d) L2-normalised features of an (n, 3, image_size, image_size) batch of [0, 1] pixels."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(n, d) L2-normalised features of texts."""
        ...


class OpenClipScorer:
    """A `Scorer` over an open_clip model loaded by `curation.gpu.clip_model.load_model`.

    `to_pixels` runs the model's own preprocessing minus its Normalize step, which `encode_image` applies on the
    device (after any pasting) before encoding as the embed stage does.
    """

    def __init__(self, model: EmbeddingModel):
        record = model.record
        size = record["image_size"]
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"{record['model']}: SLANT pastes onto square probes, but the model takes {size}")
        if not isinstance(model.preprocess, Compose):
            raise TypeError(f"{record['model']}: expected open_clip's Compose preprocessing, got {model.preprocess}")
        self.embedding_model = model
        self.image_size = int(height)
        self.device = model.device
        self.name = f"{record['model']}:{_weights_label(record)}"
        self._resize_and_crop = Compose(
            [step for step in model.preprocess.transforms if not isinstance(step, Normalize)]
        )
        self._mean = torch.tensor(record["image_mean"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(record["image_std"], dtype=torch.float32, device=self.device).view(3, 1, 1)

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        return self._resize_and_crop(image)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        normalised = (pixels.to(self.device, torch.float32, non_blocking=True) - self._mean) / self._std
        return unit_image_features(self.embedding_model, normalised)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return unit_text_features(self.embedding_model, self.embedding_model.tokenizer(list(texts)))


def _weights_label(record: dict) -> str:
    if record.get("pretrained_tag"):
        return record["pretrained_tag"]
    if record.get("checkpoint_sha256"):
        return f"checkpoint-{record['checkpoint_sha256'][:12]}"
    return "random"


class ToyLogoScorer:
    """A deterministic toy CLIP with a planted spurious logo feature, for tests and demos (no pretrained weights).

    Image features, from pixel statistics only:
    - logo-ness: share of flat pixels (small local gradient) times "few colours" (few occupied bins of a 4-level
      per channel colour quantisation); high for flat few-colour graphics and logos on a transparent (shown as
      white) background, near 0 for photos;
    - 12 hue bins, the first centred on the planted colour's hue: per cell of a 4 x 4 grid, the share of pixels in
      the bin weighted by their chroma (saturation x value, ramped from 0.25 to 0.75), then the maximum over
      cells, less a floor; a corner logo fills much of one cell, so its colour registers even though it covers a
      few percent of the image;
    - photo content: mean colour, contrast, edge energy and vertical brightness gradient of the central half of
      the image, where a photo's subject usually is.
    Text features: LOGO_PROMPTS point along logo-ness; a text naming `target` (as a whole word) points mostly along
    the planted colour's hue bin and partly along its own content direction; any other text points along a
    content direction drawn from a hash of the text. Pasting a logo of the planted colour therefore pushes
    predictions toward `target`; a corner logo of another colour changes no prediction at all, since it touches
    neither the planted bin nor the centre. `device` is where features are computed (any torch device).
    """

    HUE_BINS = 12
    GRID_CELLS = 4
    LOGO_WEIGHT = 12.0
    HUE_WEIGHT = 16.0
    # Colour shares below this, per grid cell, read as noise: a sliver of a logo at a crop's edge does not count.
    HUE_SHARE_FLOOR = 0.08
    CONTENT_FEATURES = 6
    TARGET_COLOUR_SHARE = 0.8
    # A step between neighbouring pixels below ~2.5/255: graphics are flat to the quantum, photos carry noise.
    FLAT_STEP = 0.01
    COLOUR_LEVELS = 4
    OCCUPIED_COLOUR_SHARE = 0.01

    def __init__(
        self,
        target: str = "greedy",
        spurious_rgb: tuple[int, int, int] = (220, 20, 20),
        image_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        if image_size < 2 * self.GRID_CELLS:
            raise ValueError(f"image_size must be at least {2 * self.GRID_CELLS}, not {image_size}")
        self.target = target
        self.spurious_rgb = tuple(int(channel) for channel in spurious_rgb)
        self.image_size = int(image_size)
        self.device = torch.device(device)
        red, green, blue = self.spurious_rgb
        self.name = f"toy-logo({target},{red}-{green}-{blue},{image_size})"
        planted = torch.tensor([self.spurious_rgb], dtype=torch.float32).view(1, 3, 1, 1) / 255
        self._planted_hue = float(_hue_degrees(planted).item())
        self._target_pattern = re.compile(rf"\b{re.escape(target)}\b")
        self._dimension = 1 + self.HUE_BINS + self.CONTENT_FEATURES

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        fitted = ImageOps.fit(_on_white(image), (self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, torch.float32)
        features = torch.cat(
            [
                self.LOGO_WEIGHT * self._logo_ness(pixels)[:, None],
                self.HUE_WEIGHT * self._hue_shares(pixels),
                self._content(pixels),
            ],
            dim=1,
        )
        return F.normalize(features, dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            direction = torch.zeros(self._dimension)
            if text in LOGO_PROMPTS:
                direction[0] = 1.0
            elif self._target_pattern.search(text):
                direction[1] = self.TARGET_COLOUR_SHARE
                direction[1 + self.HUE_BINS :] = math.sqrt(1 - self.TARGET_COLOUR_SHARE**2) * _content_direction(
                    text, self.CONTENT_FEATURES
                )
            else:
                direction[1 + self.HUE_BINS :] = _content_direction(text, self.CONTENT_FEATURES)
            rows.append(direction)
        return F.normalize(torch.stack(rows), dim=1).to(self.device)

    def _logo_ness(self, pixels: torch.Tensor) -> torch.Tensor:
        across = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(dim=1)
        down = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(dim=1)
        flat_share = ((across < self.FLAT_STEP).flatten(1).float().mean(1)
                      + (down < self.FLAT_STEP).flatten(1).float().mean(1)) / 2
        levels = (pixels * self.COLOUR_LEVELS).long().clamp(max=self.COLOUR_LEVELS - 1)
        codes = (levels[:, 0] * self.COLOUR_LEVELS + levels[:, 1]) * self.COLOUR_LEVELS + levels[:, 2]
        colours = self.COLOUR_LEVELS**3
        offsets = torch.arange(len(pixels), device=pixels.device)[:, None] * colours
        counts = torch.bincount((codes.flatten(1) + offsets).flatten(), minlength=len(pixels) * colours)
        shares = counts.view(len(pixels), colours).float() / (codes.shape[1] * codes.shape[2])
        occupied = (shares > self.OCCUPIED_COLOUR_SHARE).float().sum(1)
        # A logo, its background and the blends along its antialiased edges fill up to ~4 colour bins; photos
        # fill a dozen or more.
        few_colours = ((10 - occupied) / 6).clamp(0, 1)
        # Ramped so that photos, whose product stays under ~0.15, score exactly 0.
        return ((flat_share * few_colours - 0.2) / 0.4).clamp(0, 1)

    def _hue_shares(self, pixels: torch.Tensor) -> torch.Tensor:
        chroma = pixels.amax(dim=1) - pixels.amin(dim=1)
        weight = ((chroma - 0.25) / 0.5).clamp(0, 1)
        bin_width = 360 / self.HUE_BINS
        relative = torch.remainder(_hue_degrees(pixels) - self._planted_hue + bin_width / 2, 360)
        bins = (relative // bin_width).long().clamp(max=self.HUE_BINS - 1)
        weighted = torch.zeros(len(pixels), self.HUE_BINS, *bins.shape[1:], device=pixels.device)
        weighted.scatter_(1, bins[:, None], weight[:, None])
        per_cell = F.adaptive_avg_pool2d(weighted, self.GRID_CELLS).flatten(2).amax(2)
        return (per_cell - self.HUE_SHARE_FLOOR).clamp(min=0)

    def _content(self, pixels: torch.Tensor) -> torch.Tensor:
        side = pixels.shape[-1]
        centre = pixels[..., side // 4 : side - side // 4, side // 4 : side - side // 4]
        luma = centre.mean(dim=1)
        half = luma.shape[1] // 2
        edges = (centre[..., :, 1:] - centre[..., :, :-1]).abs().mean((1, 2, 3)) + (
            centre[..., 1:, :] - centre[..., :-1, :]
        ).abs().mean((1, 2, 3))
        return torch.stack(
            [
                2 * (centre[:, 0].mean((1, 2)) - 0.5),
                2 * (centre[:, 1].mean((1, 2)) - 0.5),
                2 * (centre[:, 2].mean((1, 2)) - 0.5),
                4 * luma.std((1, 2)) - 0.5,
                8 * edges - 0.5,
                2 * (luma[:, :half].mean((1, 2)) - luma[:, half:].mean((1, 2))),
            ],
            dim=1,
        )


def _hue_degrees(pixels: torch.Tensor) -> torch.Tensor:
    """HSV hue in [0, 360) of (n, 3, h, w) RGB pixels; 0 where the pixel is grey."""
    red, green, blue = pixels.unbind(1)
    top, _ = pixels.max(dim=1)
    chroma = top - pixels.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        top == red,
        torch.remainder((green - blue) / safe, 6),
        torch.where(top == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    return torch.where(chroma > 0, hue * 60, torch.zeros_like(hue))


def _content_direction(text: str, dimension: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    direction = np.random.default_rng(seed).standard_normal(dimension)
    return torch.from_numpy(direction / np.linalg.norm(direction)).float()


def _on_white(image: Image.Image) -> Image.Image:
    """RGB of `image`, any transparency composited onto white, as a web page shows a transparent logo."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


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


def label_cosines(scorer: Scorer, pixels: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """(n, labels) cosine of each image's features to each label's (unit) text features, float32."""
    image_features = scorer.encode_image(pixels)
    return image_features.float() @ label_features.to(image_features.device, torch.float32).T


def zero_shot_predict(scorer: Scorer, pixels: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """(n,) index of the label with the highest cosine (ties: the lowest index), on the CPU."""
    return label_cosines(scorer, pixels, label_features).cpu().argmax(dim=1)


def label_features_of(scorer: Scorer, labels: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
    """(labels, d): each label's text features averaged over its prompt templates, renormalised (CLIP's
    prompt ensembling)."""
    texts = [template.format(label) for label in labels for template in templates]
    features = scorer.encode_text(texts).float()
    return F.normalize(features.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)


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
    _check_mining_inputs(names, logos, probes, targets, labels, scale, batch_size, heldout_fraction, logo_block,
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
        spuriousness, flip_rate, clean_rate = _rates(pasted_predictions, mining.clean_predictions, len(targets))
        order = _rank(spuriousness.mean(axis=0))

        heldout_spuriousness = np.full((len(logos), len(targets)), np.nan)
        rechecked = order[: max(0, recheck_top)]
        if heldout_probes and len(rechecked):
            heldout = run.prepare_probes(heldout_probes)
            path = work_dir / RECHECK_FILE if work_dir is not None else None
            predictions, _ = run.cached_predictions(path, [logos[i] for i in rechecked], heldout)
            heldout_scores, _, _ = _rates(predictions, heldout.clean_predictions, len(targets))
            heldout_spuriousness[rechecked] = heldout_scores.mean(axis=0)
        elif heldout_fraction > 0 and recheck_top > 0:
            logger.warning("no held-out probes (heldout_fraction=%s of %d probes): no re-check", heldout_fraction,
                           len(probes))

    table = _mining_table(logos, targets, names, order, spuriousness, flip_rate, clean_rate, heldout_spuriousness)
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


def split_probes(
    probes: Sequence[tuple[str, Image.Image]], heldout_fraction: float, seed: int
) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, Image.Image]]]:
    """(mining, held-out) probes, each sorted by id; a probe is held out iff u(seed, id) < heldout_fraction."""
    ordered = sorted(probes, key=lambda item: item[0])
    if not ordered:
        return [], []
    hex_ids = [
        probe_id if _UID_PATTERN.fullmatch(probe_id) else hashlib.sha256(probe_id.encode()).hexdigest()[:32]
        for probe_id, _ in ordered
    ]
    held_out = uniform(seed, hex_ids, HELDOUT_PURPOSE) < heldout_fraction
    return ([probe for probe, out in zip(ordered, held_out, strict=True) if not out],
            [probe for probe, out in zip(ordered, held_out, strict=True) if out])


def _check_mining_inputs(names, logos, probes, targets, labels, scale, batch_size, heldout_fraction, logo_block,
                         templates) -> None:
    if not names:
        raise ValueError("at least one scorer is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names must be unique (they name the per-model columns): {names}")
    for kind, items in (("logo", logos), ("probe", probes)):
        ids = [item_id for item_id, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{kind} ids must be unique")
    if not targets:
        raise ValueError("at least one target label is needed")
    if len(set(labels)) != len(labels):
        raise ValueError(f"targets and contrast labels must all differ: {labels}")
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"every template must hold '{{}}': {list(templates)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}")
    if batch_size < 1 or logo_block < 1:
        raise ValueError(f"batch_size and logo_block must be positive, not {batch_size} and {logo_block}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), not {heldout_fraction}")


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

    def identity(self, logos, probes: _ProbeSet) -> dict:
        # Batch size and device are left out, as in embed's resume check: they change no prediction beyond float
        # rounding, so a CUDA run may finish what a CPU run started.
        return {
            "version": BLOCK_FORMAT_VERSION,
            "models": [scorer.name for scorer in self.scorers],
            "labels": self.labels,
            "templates": self.templates,
            "scale": self.scale,
            "corners": list(CORNERS),
            "probes": probes.ids,
            "logos": [logo_id for logo_id, _ in logos],
        }

    def cached_predictions(self, path: Path | None, logos, probes: _ProbeSet) -> tuple[np.ndarray, bool]:
        """(models, logos, corners, probes) pasted predictions, read from `path` when a run already made them, and
        whether they were."""
        identity = self.identity(logos, probes)
        shape = (len(self.scorers), len(logos), len(CORNERS), len(probes.ids))
        if path is not None and path.exists():
            predictions = _read_block(path, identity, shape)
            logger.info("resumed %s", path)
            return predictions, True
        started = time.perf_counter()
        predictions = _compute_block(self, logos, probes)
        self.pastes += predictions.size
        seconds = time.perf_counter() - started
        logger.info("%d pastes in %.1f s (%.0f pastes/s)", predictions.size, seconds,
                    predictions.size / seconds if seconds > 0 else 0.0)
        if path is not None:
            _write_block(path, identity, predictions)
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


def _write_block(path: Path, identity: dict, predictions: np.ndarray) -> None:
    """One row per (model, logo, corner, probe) in array order, the label index predicted on the pasted image."""
    models, logos, corners, probes = (np.array(identity[key], dtype=object) for key in
                                      ("models", "logos", "corners", "probes"))
    grid = np.meshgrid(np.arange(len(models)), np.arange(len(logos)), np.arange(len(corners)),
                       np.arange(len(probes)), indexing="ij")
    table = pa.table({
        "model": pa.array(models[grid[0].ravel()].tolist(), pa.string()),
        "logo_id": pa.array(logos[grid[1].ravel()].tolist(), pa.string()),
        "corner": pa.array(corners[grid[2].ravel()].tolist(), pa.string()),
        "probe_id": pa.array(probes[grid[3].ravel()].tolist(), pa.string()),
        "predicted": pa.array(predictions.ravel(), pa.int16()),
    }).replace_schema_metadata({BLOCK_METADATA_KEY: canonical_json(identity)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_block(path: Path, identity: dict, shape: tuple[int, ...]) -> np.ndarray:
    metadata = pq.read_schema(path).metadata or {}
    if BLOCK_METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a SLANT block (no {BLOCK_METADATA_KEY.decode()} metadata)")
    stored = json.loads(metadata[BLOCK_METADATA_KEY])
    differing = sorted(key for key in identity.keys() | stored.keys() if stored.get(key) != identity.get(key))
    if differing:
        raise ValueError(f"{path} was made with other {', '.join(differing)}; use a fresh work_dir or remove it")
    predictions = pq.read_table(path, columns=["predicted"]).column("predicted").to_numpy()
    if predictions.size != math.prod(shape):
        raise ValueError(f"{path} holds {predictions.size} predictions, expected {math.prod(shape)}")
    return predictions.astype(np.int16).reshape(shape)


def _rates(pasted: np.ndarray, clean: np.ndarray, targets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (model, logo, target): spuriousness and flip rate; per (model, target): clean target rate.

    `pasted` is (models, logos, corners, probes) of predicted label indices, `clean` (models, probes); the targets
    are labels 0 .. targets - 1.
    """
    models, logos = pasted.shape[:2]
    spuriousness = np.zeros((models, logos, targets))
    flip_rate = np.zeros_like(spuriousness)
    clean_rate = np.zeros((models, targets))
    for target in range(targets):
        clean_hit = clean == target
        pasted_hit = pasted == target
        clean_rate[:, target] = clean_hit.mean(axis=1)
        spuriousness[:, :, target] = pasted_hit.mean(axis=(2, 3)) - clean_rate[:, None, target]
        flip_rate[:, :, target] = (pasted_hit & ~clean_hit[:, None, None, :]).mean(axis=(2, 3))
    return spuriousness, flip_rate, clean_rate


def _rank(model_mean_spuriousness: np.ndarray) -> np.ndarray:
    """Logo indices, most spurious first: by the largest spuriousness over the targets. The logos are in id order,
    so the stable sort breaks ties by logo id."""
    return np.argsort(-model_mean_spuriousness.max(axis=1, initial=-np.inf), kind="stable")


def _mining_table(logos, targets, names, order, spuriousness, flip_rate, clean_rate, heldout_spuriousness) -> pa.Table:
    logo_rows = np.repeat(order, len(targets))
    target_columns = np.tile(np.arange(len(targets)), len(order))
    heldout = heldout_spuriousness[logo_rows, target_columns]
    columns = {
        "logo_id": pa.array([logos[i][0] for i in logo_rows.tolist()], pa.string()),
        "target": pa.array([targets[t] for t in target_columns.tolist()], pa.string()),
        "rank": pa.array(np.repeat(np.arange(1, len(order) + 1), len(targets)), pa.int32()),
        "spuriousness": pa.array(spuriousness.mean(axis=0)[logo_rows, target_columns], pa.float64()),
        **{
            f"spuriousness[{name}]": pa.array(spuriousness[model][logo_rows, target_columns], pa.float64())
            for model, name in enumerate(names)
        },
        "flip_rate": pa.array(flip_rate.mean(axis=0)[logo_rows, target_columns], pa.float64()),
        "heldout_spuriousness": pa.array(heldout, pa.float64(), mask=np.isnan(heldout)),
        "clean_target_rate": pa.array(clean_rate.mean(axis=0)[target_columns], pa.float64()),
    }
    return pa.table(columns)


def contact_sheet(
    logos: Sequence[tuple[str, Image.Image]], scores: Sequence[float], path: Path, columns: int = 8
) -> None:
    """Write a PNG grid of `logos` (on light grey, so that white logos show), each with its id and score below
    (SLANT's visual check of mined logos), atomically at `path`. Cells are CONTACT_CELL pixels; the grid has
    min(columns, len(logos)) columns."""
    if len(logos) != len(scores):
        raise ValueError(f"{len(logos)} logos but {len(scores)} scores")
    if not logos or columns < 1:
        raise ValueError("a contact sheet needs at least one logo and one column")
    grid_columns = min(columns, len(logos))
    grid_rows = math.ceil(len(logos) / grid_columns)
    cell_width, cell_height = CONTACT_CELL
    sheet = Image.new("RGB", (grid_columns * cell_width, grid_rows * cell_height), CONTACT_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, ((logo_id, image), score) in enumerate(zip(logos, scores, strict=True)):
        left = (index % grid_columns) * cell_width
        top = (index // grid_columns) * cell_height
        thumbnail = image.convert("RGBA")
        thumbnail.thumbnail((CONTACT_THUMBNAIL, CONTACT_THUMBNAIL), Image.Resampling.LANCZOS)
        offset = (left + CONTACT_PADDING + (CONTACT_THUMBNAIL - thumbnail.width) // 2,
                  top + CONTACT_PADDING + (CONTACT_THUMBNAIL - thumbnail.height) // 2)
        sheet.paste(thumbnail, offset, thumbnail)
        caption_top = top + 2 * CONTACT_PADDING + CONTACT_THUMBNAIL
        draw.text((left + CONTACT_PADDING, caption_top), str(logo_id)[:16], fill=(0, 0, 0))
        draw.text((left + CONTACT_PADDING, caption_top + CONTACT_CAPTION_HEIGHT // 2), f"{score:+.3f}",
                  fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
