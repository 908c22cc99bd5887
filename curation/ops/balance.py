"""MetaCLIP balancing (DESIGN.md section 4; Xu et al., "Demystifying CLIP Data", Algorithm 1).

c_e = number of matched texts containing entry e; p_e = min(1, t / c_e);
P(keep text) = 1 - prod_{e in matches(text)} (1 - p_e); a text is kept iff u(seed, uid, "balance") < P.
A text without matches has P = 0. A later balance pass (after the image stages) draws with its own purpose
(`balance_purpose`).
"""

import numpy as np
import pyarrow as pa

BALANCE_PURPOSE = "balance"
METACLIP_T = 20_000


def balance_purpose(earlier_passes: int) -> str:
    """The purpose of the keep draw of a balance pass with `earlier_passes` balance stages upstream. Each pass draws
    independently: with one shared draw, the rows a first pass kept all have u < P1, so a second pass would keep
    each with probability min(1, P2 / P1) instead of P2 and leave the head entries almost untouched."""
    return BALANCE_PURPOSE if earlier_passes == 0 else f"{BALANCE_PURPOSE}:{earlier_passes + 1}"


def list_parts(entry_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets of length n + 1, flat int64 values) of a list<int> array; null lists count as empty."""
    if isinstance(entry_ids, pa.ChunkedArray):
        entry_ids = entry_ids.combine_chunks() if entry_ids.num_chunks else pa.array([], entry_ids.type)
    if entry_ids.null_count:
        entry_ids = entry_ids.fill_null(pa.scalar([], entry_ids.type))
    offsets = entry_ids.offsets.to_numpy().astype(np.int64)
    values = entry_ids.values.to_numpy(zero_copy_only=False).astype(np.int64)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def keep_probabilities(offsets: np.ndarray, values: np.ndarray, counts: np.ndarray, t: float) -> np.ndarray:
    """P(keep) per text for threshold t, given entry counts indexed by entry id."""
    entry_counts = counts[values].astype(np.float64)
    if np.any(entry_counts <= 0):
        raise ValueError("a matched entry has count 0: the counts do not cover this data")
    survive = 1.0 - np.minimum(1.0, t / entry_counts)
    return _one_minus_segment_product(offsets, survive)


def _one_minus_segment_product(offsets: np.ndarray, factors: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    result = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if factors.size:
        # reduceat on the starts of non-empty segments only: empty segments would otherwise read a neighbour.
        products = np.multiply.reduceat(factors, offsets[:-1][nonempty])
        result[nonempty] = 1.0 - products
    return result


def expected_kept_for_thresholds(
    offsets: np.ndarray, values: np.ndarray, counts: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """sum of P(keep) over the texts, for each threshold in `thresholds`."""
    return np.array([keep_probabilities(offsets, values, counts, float(t)).sum() for t in thresholds])


def tail_share(counts: np.ndarray, t: float) -> float:
    """Share of all matches that fall on tail entries: sum of c_e with c_e < t over sum of all c_e."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total > 0 else 0.0


def threshold_for_tail_share(counts: np.ndarray, share: float) -> int:
    """Smallest integer t whose tail share is >= `share` (MetaCLIP 2's way of choosing t for a pool)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"tail share must be in (0, 1], got {share}")
    positive = np.sort(np.asarray(counts, dtype=np.int64)[np.asarray(counts) > 0])
    if positive.size == 0:
        raise ValueError("no entry has a match: cannot choose t from a tail share")
    cumulative = np.cumsum(positive) / positive.sum()
    # tail_share(t) jumps at t = c + 1 to the cumulative share of all counts <= c.
    index = int(np.searchsorted(cumulative, share - 1e-12, side="left"))
    return int(positive[min(index, positive.size - 1)]) + 1


def refine_threshold_bracket(
    thresholds: np.ndarray, expected: np.ndarray, target: float, points: int
) -> tuple[np.ndarray, float | None]:
    """One step of solving E(t) = target on a monotone grid: (the next, finer grid, or the answer when found).

    E(t) is continuous and non-decreasing in t; the answer is returned once the bracket is narrower than one part
    in a million or E at a grid point is within half a text of the target.
    """
    close = np.flatnonzero(np.abs(expected - target) <= 0.5)
    if close.size:
        return thresholds, float(thresholds[close[0]])
    above = np.flatnonzero(expected >= target)
    if above.size == 0:
        return thresholds, float(thresholds[-1])
    upper = int(above[0])
    if upper == 0:
        return thresholds, float(thresholds[0])
    low, high = float(thresholds[upper - 1]), float(thresholds[upper])
    if (high - low) <= 1e-6 * high:
        fraction = (target - expected[upper - 1]) / (expected[upper] - expected[upper - 1])
        return thresholds, low + fraction * (high - low)
    return np.linspace(low, high, points), None


def initial_threshold_grid(counts: np.ndarray, points: int) -> np.ndarray:
    """A geometric grid from far below the smallest count to the largest count (where every text is kept)."""
    positive = np.asarray(counts)[np.asarray(counts) > 0]
    if positive.size == 0:
        raise ValueError("no entry has a match: cannot solve t for a target size")
    return np.geomspace(1e-3, float(positive.max()), points)


def top_entries(counts: np.ndarray, entries: list[str], limit: int = 50) -> list[dict]:
    """The `limit` entries with the largest counts (ties by entry id) as dicts for the manifest."""
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(counts.size), -counts))[:limit]
    return [{"entry_id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order if counts[i] > 0]
