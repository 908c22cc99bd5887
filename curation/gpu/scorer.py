"""What SLANT's logo mining needs from an image-text model (`Scorer`), and that over an open_clip model
(`OpenClipScorer`).

A scorer takes unnormalised [0, 1] pixels, so that logos can be pasted onto them, and gives L2-normalised image and
text features. `OpenClipScorer` normalises the pixels by the model's mean and std on the device, then encodes
through `curation.gpu.encode` like the embed stage.
"""

from typing import Protocol

import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize

from curation.gpu.clip_model import EmbeddingModel
from curation.gpu.encode import unit_image_features, unit_text_features


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

