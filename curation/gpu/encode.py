"""The one place a CLIP model turns pixels and tokens into features (DESIGN.md section 5).

The embed stage, the decontaminate stage's evaluation images and SLANT's open_clip scorer all encode here, so that
their features agree by construction: the model runs under inference mode and, on CUDA, under autocast to its
precision (float16 by default); its output is cast to float32 and L2-normalised there, so that cosines and the
float16 rounding of stored embeddings see exact unit vectors whatever precision the model ran in. Stored embeddings
are those unit vectors rounded to float16; clip_score is the cosine of the float32 unit image and text vectors, as
DataComp computes it.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from curation.gpu.clip_model import EmbeddingModel


def unit_image_features(model: EmbeddingModel, pixels: torch.Tensor) -> torch.Tensor:
    """(n, d) float32 L2-normalised features, on the model's device, of an (n, 3, S, S) batch already normalised by
    the model's mean and std."""
    with _model_precision(model):
        features = model.model.encode_image(pixels.to(model.device, non_blocking=True))
    return F.normalize(features.float(), dim=-1)


def unit_text_features(model: EmbeddingModel, tokens: torch.Tensor) -> torch.Tensor:
    """(n, d) float32 L2-normalised features, on the model's device, of tokenised texts."""
    with _model_precision(model):
        features = model.model.encode_text(tokens.to(model.device, non_blocking=True))
    return F.normalize(features.float(), dim=-1)


def encode_images(model: EmbeddingModel, pixels: torch.Tensor) -> np.ndarray:
    """float16 (n, d) stored embeddings of preprocessed images."""
    return _stored(unit_image_features(model, pixels))


def encode(
    model: EmbeddingModel, pixels: torch.Tensor, tokens: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings and clip_score of preprocessed images and tokenised captions (see `embed_batch`)."""
    image_unit = unit_image_features(model, pixels)
    text_unit = unit_text_features(model, tokens)
    clip_score = (image_unit * text_unit).sum(dim=-1)
    return _stored(image_unit), _stored(text_unit), clip_score.cpu().numpy().astype(np.float32)


def embed_batch(
    model: EmbeddingModel, images: list[Image.Image], captions: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings float16 (n, d), text embeddings float16 (n, d), clip_score float32 (n,)) of image-caption
    pairs."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        empty = np.empty((0, model.embed_dim), dtype=np.float16)
        return empty, empty.copy(), np.empty(0, dtype=np.float32)
    pixels = torch.stack([model.preprocess(image) for image in images])
    return encode(model, pixels, model.tokenizer(captions))


@contextmanager
def _model_precision(model: EmbeddingModel) -> Iterator[None]:
    with (
        torch.inference_mode(),
        torch.autocast(model.device.type, dtype=model.autocast_dtype, enabled=model.autocast_dtype is not None),
    ):
        yield


def _stored(unit_features: torch.Tensor) -> np.ndarray:
    return unit_features.half().cpu().numpy()
