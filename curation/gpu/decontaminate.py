"""Decontamination by image embedding: embed the evaluation images with the embed stage's own model, and find each
corpus image's nearest evaluation image by cosine through the FAISS seam (torch, open_clip and faiss live here).

The evaluation images must land in the same space as the corpus embeddings, so they go through exactly what the
embed stage did to a downloaded image: `Image.open` on the bytes, the model's own open_clip `preprocess`, then the
same `curation.gpu.encode` (L2 normalisation in float32, rounding to float16, the stored precision). The model
is rebuilt from the embed stage's record: model name, weights (pretrained tag, checkpoint, or `random`: seeded
random init, so the same weights), device and precision. Only the device may differ: the evaluation set is embedded
on the driver, and when the embed stage ran on CUDA executors but the driver has no GPU, the driver uses the CPU in
float32 (the reference; CUDA autocast differs by float16 rounding, far below any useful threshold).

Search: an exact inner-product index (`faiss_seam.flat_index`, GPU when faiss has one) over the m unit evaluation
vectors, queried with each batch of corpus vectors for its NEAREST_CANDIDATES best candidates. faiss's float32
products are blocked by how many queries share a call, so near-ties among evaluation images (and so its single
best id) can change with the Arrow batch sizes, which follow partitioning. Each candidate's cosine is therefore
recomputed in float64 row by row and the largest wins, ties to the lowest evaluation index: a row's evaluation
image and cosine, and whether it passes `min_cosine`, never depend on which rows shared its batch. Cost: m x d
multiply-adds per corpus image (m = 1e5, d = 512: 5e7, about 10-50 ms per thousand images on a CPU core with BLAS,
far less on a GPU) plus NEAREST_CANDIDATES x d in float64; the evaluation vectors are broadcast as float16,
m x d x 2 bytes (100 MiB for 1e5 x 512), and each task adds them to its index once.
"""

import io
import logging
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from curation.gpu import faiss_seam
from curation.gpu.clip_model import EmbeddingModel, load_model
from curation.gpu.encode import encode_images
from curation.ops.decontaminate import EvalImage
from curation.ops.embeddings import EmbedOptions

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
# Candidates per query taken from faiss before the exact float64 comparison: faiss's float32 error (~1e-7) only
# reorders near-ties, and this many covers them unless the evaluation set holds that many near-copies of one image.
NEAREST_CANDIDATES = 8


def model_like_embed_stage(embed_options: dict) -> EmbeddingModel:
    """The embed stage's model, from the `options` of its record (EmbedOptions fields), built in this process."""
    options = EmbedOptions(**embed_options)
    device, precision = options.device, options.precision
    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            logger.warning("the embed stage ran on %s, but this process sees no CUDA device: the evaluation images "
                           "are embedded on the CPU in float32", device)
        device, precision = "cpu", "fp32"
    return load_model(options.model, options.weights, device, precision)


def _pixels(model: EmbeddingModel, image: EvalImage) -> torch.Tensor:
    # As the embed stage reads a sample: the bytes opened by Pillow, then the model's preprocess (RGB, resize, crop,
    # normalise). Evaluation images were checked by `hash_eval_set` already; a failure here is still named.
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            return model.preprocess(opened)
    except Exception as error:
        raise ValueError(f"evaluation image {image.label} could not be preprocessed for {model.record['model']}: "
                         f"{type(error).__name__}: {error}") from error


def embed_eval_images(model: EmbeddingModel, images: Iterable[EvalImage],
                      batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """float16 (m, d) unit image embeddings of the evaluation images, in their order."""
    chunks: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(_pixels(model, image))
        if len(batch) == batch_size:
            chunks.append(encode_images(model, torch.stack(batch)))
            batch.clear()
    if batch:
        chunks.append(encode_images(model, torch.stack(batch)))
    if not chunks:
        return np.empty((0, model.embed_dim), dtype=np.float16)
    return np.concatenate(chunks)


class EvalEmbeddingIndex:
    """The evaluation embeddings in an exact inner-product index, for nearest-evaluation-image queries."""

    def __init__(self, eval_vectors: np.ndarray, device: str = "auto"):
        self.vectors = np.ascontiguousarray(eval_vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or not len(self.vectors):
            raise ValueError(f"no evaluation embeddings to search (shape {self.vectors.shape})")
        self.index = faiss_seam.flat_index(self.vectors.shape[1], device=device)
        self.index.add(self.vectors)
        self.norms = _norms(self.vectors.astype(np.float64))

    def nearest(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index int64, cosine float32) of the nearest evaluation image of each row of `vectors` (float32): the
        largest float64 cosine among faiss's top candidates, ties to the lowest evaluation index."""
        if not len(vectors):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        _, ids = self.index.search(vectors, min(NEAREST_CANDIDATES, len(self.vectors)))
        # einsum, not matmul: BLAS blocking would make a row's products depend on the other rows of the call. One
        # candidate rank at a time, so that a batch of 10,000 rows holds (10,000, d) float64, not 8 times that.
        queries = vectors.astype(np.float64)
        query_norms = _norms(queries)
        cosines = np.empty(ids.shape, dtype=np.float64)
        for rank in range(ids.shape[1]):
            dots = np.einsum("nd,nd->n", queries, self.vectors[ids[:, rank]].astype(np.float64))
            cosines[:, rank] = dots / (query_norms * self.norms[ids[:, rank]])
        # lexsort's last key is the primary one: the largest cosine first, then the lowest evaluation index.
        best = np.lexsort((ids, -cosines))[:, 0]
        rows = np.arange(len(ids))
        return ids[rows, best].astype(np.int64), cosines[rows, best].astype(np.float32)


def _norms(vectors: np.ndarray) -> np.ndarray:
    """The float64 L2 norm of each row, row by row (einsum, no BLAS blocking)."""
    return np.sqrt(np.einsum("nd,nd->n", vectors, vectors))
