"""LSH banding of MinHash signatures: the (bands, rows) choice, one key per band, and the candidate pairs of one
bucket.

DESIGN.md section 4 "Near-duplicate captions": LSH bands chosen so that a pair at the threshold is a candidate with
probability >= 0.98. Pure numpy; the Spark adapter (`curation.spark.dedup`) shuffles rows on their band keys and
pairs each bucket's members with `anchor_edges`.
"""

from collections.abc import Callable, Sequence

import numpy as np
from numpy.polynomial.legendre import leggauss

__all__ = ["anchor_edges", "band_hashes", "candidate_probability", "choose_bands"]


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(a pair with Jaccard `similarity` shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def _false_positive_areas(threshold: float, max_degree: int) -> Callable[[int, int], float]:
    """A function (b, r) -> integral of the candidate probability over [0, threshold], for b * r <= max_degree.

    The probability is a polynomial of degree b * r in s, so Gauss-Legendre quadrature with
    max_degree // 2 + 1 nodes integrates it exactly (up to rounding): no tolerance to tune.
    """
    nodes, weights = leggauss(max_degree // 2 + 1)
    similarities = (nodes + 1.0) * (threshold / 2.0)
    weights = weights * (threshold / 2.0)
    return lambda bands, rows: float(np.dot(weights, candidate_probability(similarities, bands, rows)))


def choose_bands(num_perm: int, threshold: float, min_candidate_probability: float = 0.98) -> tuple[int, int]:
    """LSH (bands, rows) with bands * rows <= num_perm for near-duplicates at Jaccard >= `threshold`.

    Banding as in Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, section 3.4: two texts
    are candidates when all r values of at least one of b bands agree. Among all (b, r) whose
    candidate probability at the threshold, 1 - (1 - t^r)^b, is at least `min_candidate_probability`
    (DESIGN.md: 0.98), return the one with the smallest false-positive area, the integral of that
    probability over similarities [0, threshold] (the same objective as datasketch's
    ``_optimal_param``, but under a recall floor instead of a weighted sum). For a fixed r the
    probability grows with b everywhere, so only the smallest feasible b per r is a contender. Ties
    go to fewer permutations used. Pairs above the threshold are candidates with at least that
    probability too, since it rises with similarity. Raises ValueError when no (b, r) reaches the
    floor (too few permutations for a low threshold and a high floor).

    >>> choose_bands(128, 0.8)
    (17, 7)
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 < min_candidate_probability < 1.0:
        raise ValueError(f"min_candidate_probability must be in (0, 1), got {min_candidate_probability}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    false_positive_area = _false_positive_areas(threshold, num_perm)
    contenders = []
    for rows in range(1, num_perm + 1):
        most_bands = num_perm // rows
        if candidate_probability(threshold, most_bands, rows) < min_candidate_probability:
            continue
        # Smallest feasible b by bisection: the probability rises with b, and a closed form through
        # logarithms breaks down where t^r underflows.
        low, high = 1, most_bands
        while low < high:
            middle = (low + high) // 2
            if candidate_probability(threshold, middle, rows) >= min_candidate_probability:
                high = middle
            else:
                low = middle + 1
        contenders.append((false_positive_area(low, rows), low * rows, rows, low))
    if not contenders:
        raise ValueError(
            f"no LSH banding of {num_perm} permutations makes a pair at Jaccard {threshold} a candidate with "
            f"probability >= {min_candidate_probability}; use more permutations or a lower probability"
        )
    _, _, rows, bands = min(contenders)
    return bands, rows


_FMIX64_C1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX64_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _fmix64(values: np.ndarray) -> np.ndarray:
    shift = np.uint64(33)
    values = values ^ (values >> shift)
    values = values * _FMIX64_C1
    values = values ^ (values >> shift)
    values = values * _FMIX64_C2
    return values ^ (values >> shift)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per LSH band, shape (n, bands), dtype uint64.

    Band k covers signature columns [k * rows, (k + 1) * rows); columns past bands * rows are unused.
    The key starts from a per-band salt and folds in each value with MurmurHash3's 64-bit finalizer
    (h = fmix64(h ^ v)), all in uint64 arithmetic, so it is the same on every process and platform
    and never depends on byte order. Equal bands give equal keys; different bands collide with
    probability ~2^-64, and a collision only adds a candidate that exact Jaccard then rejects.
    """
    signatures = np.asarray(signatures)
    if signatures.ndim != 2 or bands < 1 or rows < 1 or bands * rows > signatures.shape[1]:
        raise ValueError(f"cannot cut {bands} bands of {rows} rows from signatures of shape {signatures.shape}")
    values = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    salts = _fmix64(np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN_GAMMA)
    keys = np.broadcast_to(salts, (len(signatures), bands)).copy()
    for row in range(rows):
        keys = _fmix64(keys ^ values[:, :, row])
    return keys


def anchor_edges(
    bucket_member_uids_sorted: Sequence | np.ndarray, max_anchors: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of one LSH bucket: every member paired with each of the first `max_anchors` members.

    Returns (left, right) arrays of uids with left < right, one candidate pair per position:
    member i (i >= 1) is paired with members 0 .. min(i, A) - 1. A bucket of n members yields
    A(A - 1)/2 + (n - A)A pairs for n >= A (all n(n - 1)/2 pairs when n <= A + 1), so a 100,000-member
    template bucket ("stock photo of ...") costs O(A n) verifications instead of O(n^2).

    Recall cost: two non-anchor members are only connected through an anchor, i.e. when both
    verify as near-duplicates of some anchor (then connected components joins them). If neither
    is similar enough to any anchor, their pair is missed in this band, though it may still be
    found in another band where they share a bucket with fewer or more similar members. Members
    must be sorted by uid so the anchors, and hence the result, do not depend on partitioning.
    """
    if max_anchors < 1:
        raise ValueError(f"max_anchors must be >= 1, got {max_anchors}")
    members = np.asarray(bucket_member_uids_sorted)
    if len(members) > 1 and not np.all(members[1:] > members[:-1]):
        raise ValueError("bucket members must be sorted by uid, without repeats")
    member_count = len(members)
    anchor_count = np.minimum(np.arange(member_count), max_anchors)
    right = np.repeat(np.arange(member_count), anchor_count)
    first_pair_of_member = np.cumsum(anchor_count) - anchor_count
    left = np.arange(len(right)) - np.repeat(first_pair_of_member, anchor_count)
    return members[left], members[right]
