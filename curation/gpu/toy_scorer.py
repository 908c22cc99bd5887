"""SLANT's toy scorer: a deterministic `Scorer` with a planted spurious logo feature, for tests and demos without
pretrained weights."""

import hashlib
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from curation.ops.logos import LOGO_PROMPTS


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
