"""Exact Jaccard similarity of shingle sets: how near-duplicate candidates are verified.

DESIGN.md section 4 "Near-duplicate captions": candidates are verified by the exact Jaccard of their shingle sets,
because a MinHash estimate is a coin flip at the threshold. Pure numpy / pyarrow.
"""

from collections.abc import Iterable

import numpy as np

from curation.ops.shingles import ShingleKind, TextBatch, as_text_list, check_shingle_args, text_shingle_occurrences

__all__ = ["exact_jaccard", "exact_jaccard_pairs"]

_LOW_32_BITS = np.uint64((1 << 32) - 1)


def exact_jaccard(shingles_a: Iterable, shingles_b: Iterable) -> float:
    """|A & B| / |A | B| of two shingle collections (duplicates ignored).

    Two empty sets give 0.0, not 1.0: texts without shingles carry no evidence of being duplicates
    of each other, and must never be grouped by the near-duplicate stage.
    """
    set_a, set_b = set(shingles_a), set(shingles_b)
    union = len(set_a | set_b)
    return len(set_a & set_b) / union if union else 0.0


def exact_jaccard_pairs(
    texts_a: TextBatch, texts_b: TextBatch, kind: ShingleKind = "char", size: int = 5
) -> np.ndarray:
    """`exact_jaccard` of the shingle sets of texts_a[i] and texts_b[i] for every i (float64).

    Vectorised: both sides are shingled together into one id space, each text's ids are made
    distinct, and an id present on both sides of pair i is one element of the intersection.
    """
    check_shingle_args(kind, size)
    left, right = as_text_list(texts_a), as_text_list(texts_b)
    if len(left) != len(right):
        raise ValueError(f"texts_a and texts_b differ in length: {len(left)} != {len(right)}")
    pair_count = len(left)
    if pair_count == 0:
        return np.zeros(0, dtype=np.float64)
    shingles = text_shingle_occurrences(left + right, kind, size)
    text_of_occurrence = np.repeat(np.arange(2 * pair_count, dtype=np.uint64), shingles.counts)
    # Sort-based distinct: numpy's hash-based np.unique is ~100x slower on these uint64 keys.
    distinct = np.sort((text_of_occurrence << np.uint64(32)) | shingles.ids.astype(np.uint64))
    distinct = distinct[np.concatenate(([True], distinct[1:] != distinct[:-1]))]
    text_index = (distinct >> np.uint64(32)).astype(np.int64)
    set_sizes = np.bincount(text_index, minlength=2 * pair_count)
    pair_keys = ((text_index % pair_count).astype(np.uint64) << np.uint64(32)) | (distinct & _LOW_32_BITS)
    pair_keys.sort()
    shared = pair_keys[1:][pair_keys[1:] == pair_keys[:-1]]
    intersections = np.bincount((shared >> np.uint64(32)).astype(np.int64), minlength=pair_count)
    unions = set_sizes[:pair_count] + set_sizes[pair_count:] - intersections
    return np.divide(intersections, unions, out=np.zeros(pair_count, dtype=np.float64), where=unions > 0)
