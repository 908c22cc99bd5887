"""The logo bank and logo flagging of SLANT ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4), on
embeddings: pure numpy.

- Logo score of an image: its best cosine to the logo prompts ("a logo", "a brand logo", "logo of a company")
  minus its best cosine to the contrast prompts ("a photo", ...), so that images that merely match every prompt
  do not rank as logos.
- Bank: the top q of the corpus by logo score (above an optional floor), capped, with near-duplicate logos (the
  same brand mark on many pages) collapsed into one bank entry that keeps how often it occurred.
- Flagging: a corpus image within a cosine threshold of a mined spurious logo carries that logo.
"""

import math

import numpy as np

# SLANT's prompts an image is a logo by, and those it is contrasted with.
LOGO_PROMPTS = ("a logo", "a brand logo", "logo of a company")
CONTRAST_PROMPTS = ("a photo", "a photo of a person", "a photo of an object")

# Embeddings are L2-normalised, so these products are cosines; blocks keep memory at O(block x bank).
_BLOCK_ROWS = 4096


def _cosines(images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """images @ prompts.T in float64 without BLAS: each value is a fixed-order sum over one row, so it has the same
    bits whatever other rows share the call (Spark's batches follow the partitioning, and published scores and
    threshold decisions must not)."""
    return np.einsum("ij,kj->ik", images.astype(np.float64), prompts.astype(np.float64), optimize=False)


def _as_unit_matrix(matrix: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {matrix.shape}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(matrix).all():
        raise ValueError(f"{name} has zero or non-finite rows")
    return matrix / norms


def logo_scores(image_embeddings: np.ndarray, logo_prompts: np.ndarray, contrast_prompts: np.ndarray) -> np.ndarray:
    """max over logo prompts of cos(image, prompt) minus max over contrast prompts, per image (float32)."""
    images = _as_unit_matrix(image_embeddings, "image_embeddings")
    logos = _as_unit_matrix(logo_prompts, "logo_prompts")
    contrast = _as_unit_matrix(contrast_prompts, "contrast_prompts")
    if not (images.shape[1] == logos.shape[1] == contrast.shape[1]):
        raise ValueError("image and prompt embeddings have different dimensions")
    return (_cosines(images, logos).max(axis=1) - _cosines(images, contrast).max(axis=1)).astype(np.float32)


def bank_size(rows: int, q: float, max_bank_size: int) -> int:
    """How many of `rows` images the bank takes: ceil(q * rows), at most `max_bank_size`."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if max_bank_size < 1:
        raise ValueError(f"max_bank_size must be positive, got {max_bank_size}")
    return min(math.ceil(q * rows), max_bank_size, rows)


def collapse_near_duplicates(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """For candidates in bank order (best score first), the index of the bank entry each one belongs to: itself
    when no earlier entry is within cosine `threshold`, else the earliest such entry (greedy, so an entry is always
    the best-scored member of its group)."""
    candidates = _as_unit_matrix(embeddings, "embeddings") if len(embeddings) else np.empty((0, 1), np.float32)
    representative = np.empty(len(candidates), dtype=np.int64)
    entries: list[int] = []
    for index in range(len(candidates)):
        if entries:
            similarity = candidates[entries] @ candidates[index]
            close = np.flatnonzero(similarity >= threshold)
            if close.size:
                representative[index] = entries[int(close[0])]
                continue
        entries.append(index)
        representative[index] = index
    return representative


def match_logos(image_embeddings: np.ndarray, logo_embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray,
                                                                                                          np.ndarray]:
    """(index of the most similar logo or -1 when none reaches `threshold`, that cosine) per image."""
    images = _as_unit_matrix(image_embeddings, "image_embeddings")
    if len(logo_embeddings) == 0:
        return np.full(len(images), -1, dtype=np.int64), np.zeros(len(images), dtype=np.float32)
    logos = _as_unit_matrix(logo_embeddings, "logo_embeddings")
    best = np.empty(len(images), dtype=np.int64)
    similarity = np.empty(len(images), dtype=np.float32)
    for start in range(0, len(images), _BLOCK_ROWS):
        block = _cosines(images[start : start + _BLOCK_ROWS], logos)
        best[start : start + len(block)] = block.argmax(axis=1)
        similarity[start : start + len(block)] = block.max(axis=1)
    return np.where(similarity >= threshold, best, -1), similarity
