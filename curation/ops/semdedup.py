"""SemDeDup inside one k-means cluster: which members are semantic near-duplicates of an earlier member.

Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic deduplication" (2023,
arXiv:2303.09540), as fixed by DESIGN.md section 4 "Image dedup ... Semantic (SemDeDup)": L2-normalised image
embeddings are clustered by spherical k-means (`curation.gpu.faiss_seam`); inside each cluster the members are
ordered by decreasing distance to the centroid (distance = 1 - cosine to the centroid; ties by uid ascending), and
member j is dropped when its cosine similarity to ANY earlier member, kept or not, exceeds 1 - eps. eps = 0.07
keeps about 63% of LAION-440M in the paper.

Because the rule looks at every earlier member and not only at the kept ones, the decision for member j depends
only on

    m_j = max_{i < j} cos(x_i, x_j)

which does not depend on eps. So the expensive part, `max_similarity_to_earlier`, runs once per cluster, and any
eps is applied afterwards by `resolve_kept` (or chosen for a target size by `eps_for_keep_fraction`) without
touching the embeddings again. For each dropped member the argmax i is kept too, so that the kept member it
resolves to (following argmax links back to a kept member; the first member is always kept) can be recorded as
its group's representative.

The pairwise similarities are computed in blocks of rows and columns, so memory is O(block_rows^2) however large
the cluster; time is O(m^2 d) per cluster of m members, as in the paper. Pure numpy: the k-means and assignment
that produce the clusters live behind the faiss seam, not here.
"""

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.ops.embeddings import float32_matrix

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_EPS",
    "SemDedupResult",
    "StreamedSimilarity",
    "eps_for_keep_fraction",
    "max_similarity_to_earlier",
    "nearest_centroid",
    "resolve_kept",
    "semdedup_cluster",
    "semdedup_order",
]

logger = logging.getLogger(__name__)

DEFAULT_EPS = 0.07
"""The paper's eps for LAION-440M: drop a member whose cosine to an earlier member exceeds 0.93 (keeps ~63%)."""

DEFAULT_BLOCK_ROWS = 2048
"""Rows (and columns) per similarity block: 2048 x 2048 float32 is 16 MiB, whatever the cluster size."""

# Embeddings are often stored in float16 and normalised before the cast, so a unit row can be off by ~1e-3;
# a raw, unnormalised CLIP embedding has a norm near 10. The check only catches the latter.
_UNIT_NORM_TOLERANCE = 1e-2
# Rows per slice when validating embeddings: 8192 x 512 float32 is 16 MiB, like one similarity block.
_VALIDATION_ROWS = 8192
# fraction * n in binary floating point can land just above an integer (0.7 * 10 = 7.000000000000001).
_FRACTION_COUNT_TOLERANCE = 1e-9
# The smallest eps whose threshold 1 - eps is a float64 below 1.
_SMALLEST_THRESHOLD_GAP = 2.0**-52


@dataclass(frozen=True)
class SemDedupResult:
    """SemDeDup of one cluster; every array is in the caller's row order and read-only.

    keep: bool (m,), whether the row survives at this eps.
    max_sim: float32 (m,), the row's largest cosine similarity to a member earlier in the SemDeDup order
        (-inf for the first member, which has none); independent of eps.
    kept_uid: object (m,) of str, the row's own uid when kept, else the uid of the kept member it resolves to
        (its most similar earlier member, followed back until a kept one).
    kept_row: int64 (m,), the row index of that kept member (the row itself when kept).
    order_rank: int64 (m,), the row's position in the SemDeDup order (0 = farthest from the centroid).
    eps: the eps the decisions used (threshold 1 - eps).
    """

    keep: np.ndarray
    max_sim: np.ndarray
    kept_uid: np.ndarray
    kept_row: np.ndarray
    order_rank: np.ndarray
    eps: float


def semdedup_order(centroid_similarity: np.ndarray, uids: Sequence[str]) -> np.ndarray:
    """The permutation (int64) that puts cluster members in SemDeDup order (DESIGN.md section 4).

    Decreasing distance to the centroid, i.e. increasing cosine similarity to it, and among equal similarities
    uid ascending, so the order (and which copy of a duplicate survives) does not depend on row order.
    """
    similarity = _validated_vector(centroid_similarity, "centroid_similarity")
    uid_array = _uid_array(uids, len(similarity))
    # lexsort sorts by its last key first.
    return np.lexsort((uid_array, similarity)).astype(np.int64, copy=False)


def max_similarity_to_earlier(
    embeddings: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """(max_sim float32 (m,), earlier int64 (m,)) for unit rows already in SemDeDup order (arXiv:2303.09540).

    For j >= 1, max_sim[j] = max_{i < j} cos(x_i, x_j) and earlier[j] is the smallest i attaining it; for j = 0,
    max_sim = -inf and earlier = -1. These do not depend on eps (DESIGN.md section 4), so they are computed once.

    Rows [s, e) at a time are multiplied by column chunks of at most `block_rows` earlier rows, masking i >= j,
    so memory is O(block_rows^2) even for a cluster of a million members. BLAS may sum a dot product in a
    different order for a different block shape, so max_sim can differ in the last float32 bit (< 1e-6) from an
    all-pairs product; decisions differ only for members that close to the threshold.
    """
    embeddings = _validated_unit_rows(embeddings)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    member_count = len(embeddings)
    max_sim = np.full(member_count, -np.inf, dtype=np.float32)
    earlier = np.full(member_count, -1, dtype=np.int64)
    # One buffer reused by every block: a fresh 16 MiB product per block would cost page faults, and briefly
    # two of them would be alive at once.
    buffer = np.empty(min(block_rows, member_count) ** 2, dtype=np.float32)
    for row_start in range(0, member_count, block_rows):
        row_end = min(row_start + block_rows, member_count)
        _compare_row_block(embeddings, row_start, row_end, block_rows, buffer,
                           max_sim[row_start:row_end], earlier[row_start:row_end])
    return max_sim, earlier


def _compare_row_block(embeddings: np.ndarray, row_start: int, row_end: int, block_rows: int, buffer: np.ndarray,
                       block_best: np.ndarray, block_earlier: np.ndarray) -> None:
    """Update block_best/block_earlier (views of rows [row_start, row_end)) with rows [0, row_end - 1) of
    `embeddings`, a column chunk of at most `block_rows` rows at a time. Shared by the in-memory and the streamed
    computation, so that both run the same BLAS shapes and give the same bits."""
    rows = embeddings[row_start:row_end]
    row_positions = np.arange(row_start, row_end)[:, None]
    # The last row of the block needs columns up to row_end - 2 only.
    for column_start in range(0, row_end - 1, block_rows):
        column_end = min(column_start + block_rows, row_end - 1)
        similarities = buffer[: len(rows) * (column_end - column_start)].reshape(len(rows), -1)
        np.matmul(rows, embeddings[column_start:column_end].T, out=similarities)
        if column_end > row_start:
            # This chunk reaches the diagonal: a row may only be compared with rows before it.
            column_positions = np.arange(column_start, column_end)[None, :]
            similarities[column_positions >= row_positions] = -np.inf
        # argmax returns the first maximum, and a later chunk must be strictly better to win, so ties go
        # to the smallest i.
        chunk_argmax = similarities.argmax(axis=1)
        chunk_max = similarities[np.arange(len(rows)), chunk_argmax]
        better = chunk_max > block_best
        block_best[better] = chunk_max[better]
        block_earlier[better] = column_start + chunk_argmax[better]


class StreamedSimilarity:
    """`max_similarity_to_earlier` of one cluster (or part) whose unit rows arrive in SemDeDup order a few at a time.

    The rows are appended to a float32 np.memmap in a file under `directory` (an executor's local dir), grown by
    doubling: it holds the earlier rows every new block is compared with, so resident heap memory is
    O(block_rows * d + block_rows^2) (the pending block's results and one product buffer) and the file, 4 * d bytes
    a row, holds the cluster. `add` and `finish` return the results of the blocks they complete, as
    (start, max_sim, earlier) for rows [start, start + len) of the cluster; they equal `max_similarity_to_earlier`
    on the whole matrix bit for bit (the same blocks, so the same BLAS shapes).
    """

    _INITIAL_CAPACITY_BLOCKS = 4

    def __init__(self, dimension: int, directory: str, block_rows: int = DEFAULT_BLOCK_ROWS):
        if dimension < 1 or block_rows < 1:
            raise ValueError(f"dimension and block_rows must be >= 1, got {dimension}, {block_rows}")
        self.dimension, self.block_rows = dimension, block_rows
        self._file = tempfile.NamedTemporaryFile(dir=directory, prefix="semdedup-", suffix=".f32")
        self._embeddings = None
        self._buffer = None
        self._filled = 0
        self._computed = 0

    def add(self, unit_rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Append the next unit rows (float32, SemDeDup order); the results of each block they complete."""
        unit_rows = _validated_unit_rows(unit_rows)
        if unit_rows.shape[1] != self.dimension:
            raise ValueError(f"rows have dimension {unit_rows.shape[1]}, expected {self.dimension}")
        self._reserve(self._filled + len(unit_rows))
        self._embeddings[self._filled : self._filled + len(unit_rows)] = unit_rows
        self._filled += len(unit_rows)
        return self._compute(self._filled - (self._filled - self._computed) % self.block_rows)

    def finish(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The results of the last, partial block: every row has been added."""
        return self._compute(self._filled)

    def close(self) -> None:
        """Drop the memmap and delete its file."""
        self._embeddings = None
        self._file.close()

    def _reserve(self, rows: int) -> None:
        capacity = 0 if self._embeddings is None else len(self._embeddings)
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity, self._INITIAL_CAPACITY_BLOCKS * self.block_rows)
        self._file.truncate(capacity * self.dimension * 4)
        # A larger map of the same file: the rows written so far stay where they are.
        self._embeddings = np.memmap(self._file.name, dtype=np.float32, mode="r+",
                                     shape=(capacity, self.dimension))

    def _compute(self, until: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Compute blocks of rows [computed, until): full blocks, and the last one partial when `until` is the
        end of the cluster. `max_similarity_to_earlier` sees the whole cluster, so its buffer is min(block, m)^2;
        only its first rows * columns values are used, the same shapes here."""
        done = []
        while self._computed < until:
            row_start = self._computed
            row_end = min(row_start + self.block_rows, until)
            if self._buffer is None:
                self._buffer = np.empty(self.block_rows**2, dtype=np.float32)
            block_best = np.full(row_end - row_start, -np.inf, dtype=np.float32)
            block_earlier = np.full(row_end - row_start, -1, dtype=np.int64)
            _compare_row_block(self._embeddings, row_start, row_end, self.block_rows, self._buffer,
                               block_best, block_earlier)
            done.append((row_start, block_best, block_earlier))
            self._computed = row_end
        return done


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """int32 (n,): for each row of `vectors` the index of the unit centroid with the largest dot product, i.e. the
    largest cosine (a row's norm does not change which centroid wins); ties go to the smallest index."""
    vectors = float32_matrix(vectors, "vectors")
    centroids = float32_matrix(centroids, "centroids", vectors.shape[1])
    return (vectors @ centroids.T).argmax(axis=1).astype(np.int32)


def resolve_kept(max_sim: np.ndarray, earlier: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool (m,), kept_index int64 (m,)) in SemDeDup order for the cosine `threshold` = 1 - eps.

    Member j is kept iff j == 0 or max_sim[j] <= threshold: it is dropped when its similarity to some earlier
    member exceeds 1 - eps (arXiv:2303.09540; DESIGN.md section 4). kept_index[j] is j for a kept member, and for
    a dropped one the kept member reached by following `earlier` links (each link points to a smaller index and
    member 0 is kept, so every chain ends). The chains are followed by pointer doubling: O(m log depth) numpy
    work instead of a Python loop over members.
    """
    max_sim = _validated_vector(max_sim, "max_sim", allow_minus_inf=True)
    earlier = np.asarray(earlier)
    if earlier.ndim != 1 or len(earlier) != len(max_sim):
        raise ValueError(f"earlier must have shape ({len(max_sim)},), got {earlier.shape}")
    if not np.issubdtype(earlier.dtype, np.integer):
        raise ValueError(f"earlier must be an integer array, got {earlier.dtype}")
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    member_count = len(max_sim)
    positions = np.arange(member_count, dtype=np.int64)
    if member_count and earlier[0] != -1:
        raise ValueError(f"earlier[0] must be -1 (the first member has no earlier one), got {earlier[0]}")
    if member_count > 1 and not ((earlier[1:] >= 0) & (earlier[1:] < positions[1:])).all():
        raise ValueError("earlier[j] must satisfy 0 <= earlier[j] < j for every j >= 1")

    # Compared in float64 so that a threshold derived from a float32 max_sim (eps_for_keep_fraction) is exact.
    keep = max_sim.astype(np.float64) <= threshold
    if member_count:
        keep[0] = True
    kept_index = np.where(keep, positions, earlier.astype(np.int64, copy=False))
    while True:
        jumped = kept_index[kept_index]
        if np.array_equal(jumped, kept_index):
            return keep, kept_index
        kept_index = jumped


def eps_for_keep_fraction(max_sims: np.ndarray, keep_fraction: float) -> float:
    """The eps whose SemDeDup keeps the fewest members that are still at least `keep_fraction` of them.

    `max_sims` are the `max_similarity_to_earlier` values of all members of all clusters (the first member of a
    cluster has -inf and is always kept). With n members and target = ceil(keep_fraction * n), the threshold is
    the target-th smallest value v and eps = 1 - v, so exactly `target` members are kept when no other member
    has max_sim equal to v. Ties: members with max_sim == v are all kept (exact duplicates often share a value),
    so the kept count can exceed the target; it is then the smallest count >= target any eps can give. Of the
    eps values giving that count, this is the largest (the threshold sits exactly on v). This mirrors how the
    paper picks eps for a target dataset size (arXiv:2303.09540, section 4; DESIGN.md section 4).

    When only first members are needed (the target is at most their number), the threshold is placed just
    below the smallest finite value. Raises ValueError when the target needs keeping members whose max_sim is
    >= 1 (copies equal to float32 precision), which no eps in (0, 2) keeps.
    """
    values = _validated_vector(max_sims, "max_sims", allow_minus_inf=True).astype(np.float64)
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    member_count = len(values)
    if member_count == 0:
        raise ValueError("max_sims is empty: there is nothing to choose eps for")
    target = min(member_count, max(1, math.ceil(keep_fraction * member_count - _FRACTION_COUNT_TOLERANCE)))
    values.sort()
    cut = float(values[target - 1])
    largest_eps = float(np.nextafter(2.0, 0.0))
    if cut == -np.inf:
        finite = values[values > -np.inf]
        if len(finite) == 0:
            # Every member is first in its cluster: every eps keeps all of them.
            return largest_eps
        # The threshold goes just below the smallest finite value; 1 - eps rounds, so step eps up until it does.
        smallest = float(finite[0])
        eps = max(1.0 - smallest, _SMALLEST_THRESHOLD_GAP)
        while 1.0 - eps >= smallest:
            eps = float(np.nextafter(eps, np.inf))
    elif cut >= 1.0:
        raise ValueError(
            f"keeping {keep_fraction} of {member_count} members needs a cosine threshold of {cut} >= 1 "
            "(exact copies), i.e. eps <= 0; every eps in (0, 2) keeps fewer"
        )
    else:
        # 1 - (1 - v) is v exactly for |v| >= 2^-29; below that, step eps down until the threshold reaches v.
        eps = 1.0 - cut
        while 1.0 - eps < cut:
            eps = float(np.nextafter(eps, -np.inf))
    eps = min(eps, largest_eps)
    kept = int((values <= 1.0 - eps).sum())
    if kept < target:
        raise ValueError(f"no eps in (0, 2) keeps {target} of {member_count} members (the best keeps {kept})")
    logger.info(
        "eps %.6g keeps %d of %d members (target %d, fraction %s)", eps, kept, member_count, target, keep_fraction
    )
    return eps


def semdedup_cluster(
    embeddings: np.ndarray,
    centroid_similarity: np.ndarray,
    uids: Sequence[str],
    eps: float,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> SemDedupResult:
    """SemDeDup of one k-means cluster (arXiv:2303.09540; DESIGN.md section 4), results in the input row order.

    `embeddings` are the members' L2-normalised float32 rows (not normalised again here: rows whose norm is off
    by more than 1e-2 raise), `centroid_similarity` their cosine to the cluster's centroid (as returned by
    `faiss_seam.assign`), `uids` their uids. A member is dropped when its cosine to any member earlier in
    `semdedup_order` exceeds 1 - eps.
    """
    embeddings = _validated_unit_rows(embeddings)
    member_count = len(embeddings)
    similarity = _validated_vector(centroid_similarity, "centroid_similarity")
    if len(similarity) != member_count:
        raise ValueError(f"centroid_similarity has {len(similarity)} values for {member_count} embeddings")
    uid_array = _uid_array(uids, member_count)
    if not 0 < eps < 2:
        raise ValueError(f"eps must be in (0, 2) (a cosine threshold 1 - eps in (-1, 1)), got {eps}")

    order = semdedup_order(similarity, uid_array)
    max_sim_ordered, earlier_ordered = max_similarity_to_earlier(embeddings[order], block_rows)
    keep_ordered, kept_index_ordered = resolve_kept(max_sim_ordered, earlier_ordered, 1.0 - eps)

    keep = np.empty(member_count, dtype=bool)
    max_sim = np.empty(member_count, dtype=np.float32)
    kept_row = np.empty(member_count, dtype=np.int64)
    order_rank = np.empty(member_count, dtype=np.int64)
    keep[order] = keep_ordered
    max_sim[order] = max_sim_ordered
    kept_row[order] = order[kept_index_ordered]
    order_rank[order] = np.arange(member_count, dtype=np.int64)
    kept_uid = uid_array[kept_row]
    for array in (keep, max_sim, kept_uid, kept_row, order_rank):
        array.flags.writeable = False
    return SemDedupResult(
        keep=keep, max_sim=max_sim, kept_uid=kept_uid, kept_row=kept_row, order_rank=order_rank, eps=float(eps)
    )


def _validated_vector(values: np.ndarray, name: str, allow_minus_inf: bool = False) -> np.ndarray:
    """`values` as a 1-D float array without NaN (+inf never; -inf only where `allow_minus_inf`)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got {values.dtype}")
    bad = np.isnan(values) | (values == np.inf)
    if not allow_minus_inf:
        bad |= values == -np.inf
    if bad.any():
        allowed = "finite or -inf" if allow_minus_inf else "finite"
        raise ValueError(f"{name} must be {allowed}; {int(bad.sum())} value(s) are not")
    return values


def _validated_unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """`embeddings` as C-contiguous float32 (m, d) finite unit rows, or a ValueError saying what is wrong."""
    embeddings = float32_matrix(embeddings, "embeddings")
    # Checked a slice at a time: a whole-array isfinite or norm would allocate temporaries as large as the input.
    for start in range(0, len(embeddings), _VALIDATION_ROWS):
        rows = embeddings[start : start + _VALIDATION_ROWS]
        if not np.isfinite(rows).all():
            raise ValueError("embeddings contain NaN or infinite values")
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        off = np.abs(norms - 1.0) > _UNIT_NORM_TOLERANCE
        if off.any():
            raise ValueError(
                f"embeddings must be L2-normalised rows (cosine = dot product); row {start + int(np.argmax(off))} "
                f"has norm {float(norms[off][0]):.4g}, off by more than {_UNIT_NORM_TOLERANCE}"
            )
    return embeddings


def _uid_array(uids: Sequence[str], expected: int) -> np.ndarray:
    """uids as a 1-D object array of str (exact Python string order; numpy "U" arrays drop trailing NULs)."""
    uid_array = np.empty(len(uids), dtype=object)
    uid_array[:] = list(uids)
    if len(uid_array) != expected:
        raise ValueError(f"uids has {len(uid_array)} values for {expected} members")
    if not all(isinstance(uid, str) for uid in uid_array):
        raise ValueError("uids must be strings")
    return uid_array
