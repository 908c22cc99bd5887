"""Density-based pruning: per-cluster keep quotas from cluster complexity (pure numpy).

Abbas et al., "Effective pruning of web-scale datasets based on complexity of concept clusters"
(ICLR 2024, arXiv:2401.04578), as specified in DESIGN.md section 4 "Density-based pruning". After
SemDeDup the embeddings are clustered by spherical k-means into k clusters with unit centroids c_j;
then, for cluster j:

- d_intra_j = mean over its members x of (1 - cos(x, c_j)) (computed by the caller, passed in);
- d_inter_j = mean over the min(20, k - 1) nearest other centroids c_i of (1 - cos(c_j, c_i));
  with k = 1 there is no other centroid and d_inter is defined as 0;
- complexity C_j = d_inter_j * d_intra_j and probability P_j = softmax(C_j / tau), tau = 0.1;
- quotas N minimise ||N - N_keep * P||_2 subject to sum_j N_j = N_keep and lb_j <= N_j <= |cluster j|,
  lb_j = min(floor(ratio * N_keep / k), |cluster j|), ratio = 0.5 as in the paper's reference code.
  The continuous problem is solved exactly by water-filling (`continuous_quotas`), then integerised by
  largest-remainder rounding (`water_fill_quotas`) so the total is exactly N_keep;
- inside cluster j the N_j members farthest from the centroid are kept (`select_members`, mode "hard";
  "easy" and "random" are offered for ablations).

Why largest-remainder rounding of the continuous optimum is the integer optimum too: for a separable
convex objective with one sum constraint and box bounds there is an integer optimum between the floor
and the ceiling of the continuous one (proximity for the resource-allocation problem, Hochbaum 1994),
and among those vectors moving cluster j from floor to ceiling costs (1 - f_j)^2 - f_j^2 = 1 - 2 f_j,
so the N_keep - sum(floor) cheapest moves are the largest fractional parts f_j.

This module is numpy only (no torch, faiss or Spark): the callers own clustering and I/O.
"""

import logging
import math
import numbers
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_TAU",
    "INTER_NEIGHBOURS",
    "SELECTION_MODES",
    "cluster_complexity",
    "cluster_probabilities",
    "continuous_quotas",
    "inter_cluster_distance",
    "keep_fraction_count",
    "lower_bounds",
    "pruning_table",
    "select_members",
    "water_fill_quotas",
]

logger = logging.getLogger(__name__)

DEFAULT_TAU = 0.1
DEFAULT_RATIO = 0.5
INTER_NEIGHBOURS = 20
SELECTION_MODES = ("hard", "easy", "random")

# Centroid-centroid similarities are computed a block of rows at a time so memory stays O(block x k) float64
# values; 2**22 elements (32 MiB) keeps BLAS efficient without materialising the k x k matrix.
_SIMILARITY_BLOCK_ELEMENTS = 1 << 22
# A probability vector may be off 1 by accumulated rounding of a softmax over many clusters.
_PROBABILITY_SUM_TOLERANCE = 1e-6


def _is_integer(value: object) -> bool:
    # bool is an Integral, but True as a count is almost certainly a bug at the call site.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_sizes(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(sizes)
    if array.ndim != 1:
        raise ValueError(f"cluster sizes must be one-dimensional, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"cluster sizes must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if np.any(array < 0):
        raise ValueError("cluster sizes must be >= 0")
    return array


def _check_n_keep(n_keep: int, sizes: np.ndarray) -> int:
    if not _is_integer(n_keep):
        raise ValueError(f"N_keep must be an integer, got {n_keep!r}")
    total = int(sizes.sum())
    if not 0 <= n_keep <= total:
        raise ValueError(f"N_keep must be in [0, {total}] (the sum of the cluster sizes), got {n_keep}")
    return int(n_keep)


def _check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, numbers.Real) and 0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return float(ratio)


def _as_probabilities(probabilities: Sequence[float] | np.ndarray, clusters: int) -> np.ndarray:
    array = np.asarray(probabilities, dtype=np.float64)
    if array.shape != (clusters,):
        raise ValueError(f"probabilities must have shape ({clusters},) like the sizes, got {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("probabilities must be finite and >= 0")
    if clusters and abs(float(array.sum()) - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"probabilities must sum to 1, got {float(array.sum())!r}")
    return array


def inter_cluster_distance(centroids: np.ndarray, neighbours: int = INTER_NEIGHBOURS) -> np.ndarray:
    """d_inter_j = mean of (1 - cos(c_j, c_i)) over the min(neighbours, k - 1) nearest other centroids c_i.

    Abbas et al. 2024 (arXiv:2401.04578), DESIGN.md section 4: the paper uses 20 neighbours. Rows are
    L2-normalised here, so the result is a true cosine distance even for centroids that are not exactly unit.
    "Other" is by index: a duplicate centroid counts as a neighbour at distance 0. With k = 1 there is no other
    centroid and d_inter is defined as 0 (harmless: a single cluster gets probability 1 whatever its complexity).
    Returns float64 (k,).
    """
    if not _is_integer(neighbours) or neighbours < 1:
        raise ValueError(f"neighbours must be an integer >= 1, got {neighbours!r}")
    matrix = np.asarray(centroids)
    if matrix.ndim != 2:
        raise ValueError(f"centroids must be a (k, d) matrix, got shape {matrix.shape}")
    clusters = matrix.shape[0]
    if clusters == 0:
        return np.zeros(0, dtype=np.float64)
    matrix = matrix.astype(np.float64)
    if not np.all(np.isfinite(matrix)):
        raise ValueError("centroids must be finite")
    norms = np.linalg.norm(matrix, axis=1)
    if np.any(norms == 0):
        raise ValueError("a centroid has norm 0: its cosine to other centroids is undefined")
    unit = matrix / norms[:, None]
    count = min(int(neighbours), clusters - 1)
    if count == 0:
        return np.zeros(clusters, dtype=np.float64)
    distances = np.empty(clusters, dtype=np.float64)
    block_rows = max(1, _SIMILARITY_BLOCK_ELEMENTS // clusters)
    for start in range(0, clusters, block_rows):
        stop = min(start + block_rows, clusters)
        similarities = unit[start:stop] @ unit.T
        # Exclude each centroid itself by position (not by value) so that duplicates still count as neighbours.
        rows = np.arange(stop - start)
        similarities[rows, rows + start] = -np.inf
        # The `count` largest similarities are the nearest neighbours; their order does not matter for a mean.
        nearest = np.partition(similarities, clusters - count, axis=1)[:, clusters - count :]
        distances[start:stop] = (1.0 - nearest).mean(axis=1)
    return distances


def cluster_complexity(d_intra: np.ndarray, d_inter: np.ndarray) -> np.ndarray:
    """C_j = d_inter_j * d_intra_j (Abbas et al. 2024, arXiv:2401.04578; DESIGN.md section 4). float64 (k,)."""
    intra = np.asarray(d_intra, dtype=np.float64)
    inter = np.asarray(d_inter, dtype=np.float64)
    if intra.ndim != 1 or intra.shape != inter.shape:
        raise ValueError(
            f"d_intra and d_inter must be one-dimensional of equal length, got {intra.shape}, {inter.shape}"
        )
    if not (np.all(np.isfinite(intra)) and np.all(np.isfinite(inter))):
        raise ValueError("d_intra and d_inter must be finite")
    return intra * inter


def cluster_probabilities(complexity: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """P_j = softmax(C_j / tau), computed stably (Abbas et al. 2024, arXiv:2401.04578; DESIGN.md section 4).

    The maximum is subtracted before dividing by tau, so every exponent is <= 0 and exactly one is 0: nothing
    overflows and the sum is >= 1, however large C / tau is. An empty input gives an empty output.
    """
    if not (isinstance(tau, numbers.Real) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    values = np.asarray(complexity, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"complexity must be one-dimensional, got shape {values.shape}")
    if values.size == 0:
        return np.zeros(0, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("complexity must be finite")
    # A huge gap over a tiny tau overflows to -inf, whose exp is the correct limit 0: the warning is noise.
    with np.errstate(over="ignore"):
        exponents = (values - values.max()) / float(tau)
    weights = np.exp(exponents)
    return weights / weights.sum()


def lower_bounds(sizes: Sequence[int] | np.ndarray, n_keep: int, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """lb_j = min(floor(ratio * N_keep / k), |cluster j|), int64 (k,).

    The floor guarantees that every cluster keeps a share of the budget (Abbas et al. 2024, arXiv:2401.04578,
    reference code; DESIGN.md section 4); capping by the size keeps the problem feasible, and sum(lb) <= ratio *
    N_keep <= N_keep.
    """
    sizes = _as_sizes(sizes)
    n_keep = _check_n_keep(n_keep, sizes)
    ratio = _check_ratio(ratio)
    if sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    floor_share = math.floor(ratio * n_keep / sizes.size)
    return np.minimum(sizes, floor_share).astype(np.int64)


def continuous_quotas(
    probabilities: np.ndarray, sizes: Sequence[int] | np.ndarray, n_keep: int, lower: np.ndarray
) -> np.ndarray:
    """Exact minimiser of ||N - N_keep * P||_2 subject to sum N = N_keep and lower <= N <= sizes. float64 (k,).

    Abbas et al. 2024 (arXiv:2401.04578), DESIGN.md section 4. This is the Euclidean projection of
    N_keep * P onto a box-constrained simplex; its KKT conditions give N_j = clip(N_keep * P_j + lambda, lb_j,
    ub_j) for one scalar lambda. s(lambda) = sum_j clip(N_keep * P_j + lambda, lb_j, ub_j) is continuous,
    non-decreasing and piecewise linear with breakpoints lb_j - N_keep * P_j and ub_j - N_keep * P_j, running
    from sum(lb) at the smallest breakpoint to sum(ub) at the largest. The breakpoints are sorted, s is
    evaluated exactly at breakpoints by binary search (O(k log k) in all) to find the segment where s crosses
    N_keep, and lambda is solved in closed form on that linear segment (slope = number of clusters strictly
    inside their bounds there). No tolerance-driven iteration is involved; the sum equals N_keep up to
    floating-point rounding.
    """
    sizes = _as_sizes(sizes)
    n_keep = _check_n_keep(n_keep, sizes)
    clusters = sizes.size
    probabilities = _as_probabilities(probabilities, clusters)
    lower_array = np.asarray(lower)
    if lower_array.shape != (clusters,) or (clusters and lower_array.dtype.kind not in "iu"):
        raise ValueError(f"lower bounds must be ({clusters},) integers like the sizes, got {lower_array.shape}")
    lower_array = lower_array.astype(np.int64)
    if np.any(lower_array < 0) or np.any(lower_array > sizes):
        raise ValueError("lower bounds must satisfy 0 <= lower <= size")
    if int(lower_array.sum()) > n_keep:
        raise ValueError(f"the lower bounds sum to {int(lower_array.sum())} > N_keep = {n_keep}: infeasible")
    if clusters == 0:
        return np.zeros(0, dtype=np.float64)

    target = n_keep * probabilities
    low = lower_array.astype(np.float64)
    high = sizes.astype(np.float64)
    enter = low - target  # lambda at which cluster j leaves its lower bound
    leave = high - target  # lambda at which cluster j reaches its upper bound
    breakpoints = np.unique(np.concatenate([enter, leave]))  # sorted, duplicates removed

    def filled(shift: float) -> float:
        return float(np.clip(target + shift, low, high).sum())

    # Largest breakpoint index whose fill is <= N_keep; index 0 qualifies because s(min breakpoint) = sum(lb).
    below, above = 0, breakpoints.size - 1
    if filled(breakpoints[above]) <= n_keep:
        below = above
    while above - below > 1:
        middle = (below + above) // 2
        if filled(breakpoints[middle]) <= n_keep:
            below = middle
        else:
            above = middle
    start = float(breakpoints[below])
    start_fill = filled(start)
    if start_fill == n_keep or below == breakpoints.size - 1:
        shift = start
    else:
        stop = float(breakpoints[below + 1])
        # On the open segment (start, stop) exactly the clusters with enter <= start and leave >= stop move.
        slope = int(np.count_nonzero((enter <= start) & (leave >= stop) & (low < high)))
        shift = start + (n_keep - start_fill) / slope if slope else start
        shift = min(max(shift, start), stop)  # rounding must not push lambda off its segment
    return np.clip(target + shift, low, high)


def water_fill_quotas(
    probabilities: np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    n_keep: int,
    ratio: float = DEFAULT_RATIO,
) -> np.ndarray:
    """Integer quotas N_j: sum exactly N_keep, lb_j <= N_j <= |cluster j|, closest to N_keep * P. int64 (k,).

    Abbas et al. 2024 (arXiv:2401.04578), DESIGN.md section 4: exact water-filling (`continuous_quotas`) with
    lb = `lower_bounds(sizes, n_keep, ratio)`, then largest-remainder rounding: floor every quota, then give +1
    to the N_keep - sum(floor) largest fractional parts among clusters whose floor is below their size, ties
    broken by the lower cluster id. Floors of values within [lb, ub] with integer bounds stay within the bounds,
    and a +1 only goes to clusters below their size, so the bounds hold.
    """
    sizes = _as_sizes(sizes)
    n_keep = _check_n_keep(n_keep, sizes)
    lower = lower_bounds(sizes, n_keep, ratio)
    continuous = continuous_quotas(probabilities, sizes, n_keep, lower)
    # The clip only absorbs rounding noise: the continuous values already lie within the integer bounds.
    quotas = np.clip(np.floor(continuous).astype(np.int64), lower, sizes)
    fractions = continuous - quotas
    remaining = n_keep - int(quotas.sum())
    candidates = np.flatnonzero(quotas < sizes)
    # lexsort: the last key is primary, so largest fraction first, then lowest cluster id.
    ranked = candidates[np.lexsort((candidates, -fractions[candidates]))]
    if not 0 <= remaining <= ranked.size:
        raise RuntimeError(f"rounding cannot reach N_keep = {n_keep}: {remaining} units for {ranked.size} clusters")
    quotas[ranked[:remaining]] += 1
    return quotas


def keep_fraction_count(rows: int, keep_fraction: float | None, keep_count: int | None) -> int:
    """N_keep from exactly one of a fraction of `rows` (rounded half up) or an absolute count.

    The fraction is taken as written (its shortest decimal form), so 0.35 of 10 rows is 3.5 and rounds to 4
    rather than to 3 through the binary value 0.34999...; DESIGN.md section 4 (Abbas et al. 2024,
    arXiv:2401.04578, prune to a target share of the de-duplicated data).
    """
    if not _is_integer(rows) or rows < 0:
        raise ValueError(f"rows must be an integer >= 0, got {rows!r}")
    if (keep_fraction is None) == (keep_count is None):
        raise ValueError("give exactly one of keep_fraction and keep_count")
    if keep_count is not None:
        if not _is_integer(keep_count) or not 0 <= keep_count <= rows:
            raise ValueError(f"keep_count must be an integer in [0, {rows}], got {keep_count!r}")
        return int(keep_count)
    if not (isinstance(keep_fraction, numbers.Real) and 0.0 <= float(keep_fraction) <= 1.0):
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction!r}")
    exact = Decimal(repr(float(keep_fraction))) * rows
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def select_members(
    distance_to_centroid: np.ndarray,
    uids: Sequence[str],
    quota: int,
    mode: str,
    draws: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, rank) of one cluster's members: the `quota` members first in the selection order are kept.

    Abbas et al. 2024 (arXiv:2401.04578), DESIGN.md section 4: the paper keeps the hardest examples, i.e.
    "hard" orders by decreasing distance to the centroid (1 - cos). "easy" orders by increasing distance and
    "random" by increasing draw u (the caller derives u from a hash of (seed, uid), so the choice is
    reproducible and independent of row order); both exist for ablations. Ties are broken by uid ascending, so
    the result does not depend on the input order. rank is int64, 1 for the first member chosen.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    distances = np.asarray(distance_to_centroid, dtype=np.float64)
    if distances.ndim != 1:
        raise ValueError(f"distance_to_centroid must be one-dimensional, got shape {distances.shape}")
    members = distances.size
    if len(uids) != members:
        raise ValueError(f"{len(uids)} uids for {members} distances")
    if not np.all(np.isfinite(distances)):
        raise ValueError("distance_to_centroid must be finite")
    if not _is_integer(quota) or not 0 <= quota <= members:
        raise ValueError(f"quota must be an integer in [0, {members}], got {quota!r}")
    if mode == "random":
        if draws is None:
            raise ValueError('mode "random" needs draws (u per member)')
        primary = np.asarray(draws, dtype=np.float64)
        if primary.shape != (members,):
            raise ValueError(f"draws must have shape ({members},), got {primary.shape}")
        if not np.all(np.isfinite(primary)):
            raise ValueError("draws must be finite")
    else:
        if draws is not None:
            # Silently ignoring draws would hide a caller that meant "random".
            raise ValueError(f'draws are only used by mode "random", not {mode!r}')
        primary = -distances if mode == "hard" else distances
    uid_keys = np.asarray(list(uids), dtype=str) if members else np.zeros(0, dtype=str)
    order = np.lexsort((uid_keys, primary))
    rank = np.empty(members, dtype=np.int64)
    rank[order] = np.arange(1, members + 1, dtype=np.int64)
    return rank <= quota, rank


def pruning_table(
    sizes: Sequence[int] | np.ndarray,
    d_intra: np.ndarray,
    centroids: np.ndarray,
    n_keep: int,
    tau: float = DEFAULT_TAU,
    ratio: float = DEFAULT_RATIO,
    neighbours: int = INTER_NEIGHBOURS,
) -> dict[str, np.ndarray]:
    """All per-cluster quantities of density-based pruning, one column per name.

    Abbas et al. 2024 (arXiv:2401.04578), DESIGN.md section 4. Columns: cluster (id 0..k-1), size, d_intra,
    d_inter, complexity, probability, lower_bound, quota. An empty cluster has no mean distance: its d_intra may
    be NaN and counts as 0 (its quota is 0 whatever its probability, and water-filling hands its share to the
    others); NaN anywhere else is an error.
    """
    sizes = _as_sizes(sizes)
    n_keep = _check_n_keep(n_keep, sizes)
    intra = np.asarray(d_intra, dtype=np.float64)
    matrix = np.asarray(centroids)
    if intra.shape != sizes.shape or matrix.ndim != 2 or matrix.shape[0] != sizes.size:
        raise ValueError(
            f"sizes {sizes.shape}, d_intra {intra.shape} and centroids {matrix.shape} must describe the same clusters"
        )
    intra = np.where((sizes == 0) & np.isnan(intra), 0.0, intra)
    inter = inter_cluster_distance(matrix, neighbours)
    complexity = cluster_complexity(intra, inter)
    probability = cluster_probabilities(complexity, tau)
    lower = lower_bounds(sizes, n_keep, ratio)
    quota = water_fill_quotas(probability, sizes, n_keep, ratio)
    logger.info(
        "density-based pruning: %d clusters, %d rows, keep %d; lower bound %d per cluster, %d clusters at full size",
        sizes.size,
        int(sizes.sum()),
        n_keep,
        int(lower.max()) if lower.size else 0,
        int(np.count_nonzero((quota == sizes) & (sizes > 0))),
    )
    return {
        "cluster": np.arange(sizes.size, dtype=np.int64),
        "size": sizes,
        "d_intra": intra,
        "d_inter": inter,
        "complexity": complexity,
        "probability": probability,
        "lower_bound": lower,
        "quota": quota,
    }
