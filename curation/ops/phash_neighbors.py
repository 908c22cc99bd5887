"""Every pair of 64-bit perceptual hashes within Hamming distance d, exactly, at any number of hashes.

The block-subset scheme of Manku, Jain & Das Sarma ("Detecting near-duplicates for web crawling", WWW 2007):
split the 64 bits into m >= d + 1 contiguous blocks. Two hashes within distance d differ in at most d blocks, so
they agree on at least s = m - d blocks, hence on all blocks of at least one of the C(m, d) s-subsets of blocks.
One table per s-subset: a hash's key in a table is its bits in that subset's blocks (p bits, the others zeroed).
Hashes sharing a key in some table are candidates; a popcount of their xor verifies them. The answer never
depends on m: m only trades tables (keys per hash, i.e. shuffle) against chance candidates per hash
(C(m, d) * n / 2**p for n distinct hashes); m = d + 1 is the plain pigeonhole on d + 1 chunks (p = 64 / (d + 1)
bits per key), whose buckets hold ~n / 2**p hashes and grow linearly with n.

Identical hashes are distance 0 and always one group: callers collapse them first and search only distinct
values (`near_duplicate_groups` does). Each verified pair is reported once, by the first table (in lexicographic
order of subsets) that holds it: the table of the s smallest blocks the two hashes agree on. A bucket (hashes
sharing one key of one table) of b members costs b(b - 1) / 2 comparisons, done in steps of about
`PAIRS_PER_STEP` pairs so memory stays bounded (a member whose own partners exceed a step is compared alone,
O(b) memory); a bucket of 1e6 distinct hashes is 5e11 comparisons, hours of CPU: only inputs dense in hash space
(millions of distinct hashes within d of each other) make such buckets, and random hashes never do.

This is the pure layer (numpy only); curation/spark/image_dedup.py shuffles `table_keys` and verifies buckets
with `bucket_links`.
"""

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from curation.ops.imagehash import HASH_BITS, MAX_DISTANCE_LIMIT, contiguous_blocks, hamming_distances

__all__ = [
    "CANDIDATES_PER_KEY",
    "MAX_TABLES",
    "PAIRS_PER_STEP",
    "NeighbourCounters",
    "NeighbourPlan",
    "bucket_links",
    "bucket_pairs",
    "near_duplicate_groups",
    "near_duplicate_pairs",
    "plan_tables",
    "table_keys",
]

logger = logging.getLogger(__name__)

CANDIDATES_PER_KEY = 64
"""How many chance candidates cost as much as one key: `plan_tables` minimises tables + candidates / 64 per hash.
A key is a row through a Spark shuffle and a collect_list (estimated ~1-3 us of executor time: serialise, write,
fetch, aggregate, hand to Python through Arrow); a candidate is one side of a pair compared inside its bucket by a
vectorised xor + popcount + first-table check (measured 76 ns per pair, i.e. ~38 ns per candidate, on a 2-core
machine at load 16; well under that unloaded). One key ~ 30-80 candidates; 64 sits there. The answer never
depends on it, only the shuffle / CPU balance; for d = 4 it gives 5 tables up to ~5e5 distinct hashes, 15 up to
~9e7, 35 up to ~9e9."""
MAX_TABLES = 256
"""At most this many tables (keys per distinct hash). For large d no m is cheap (d = 8 at 1e9 hashes: 165 tables
still leave ~2.5e6 chance candidates per hash; d = 31 allows only m = 32, two-bit blocks, nearly all pairs):
within the cap the cheapest m is taken and the cost grows with n."""
PAIRS_PER_STEP = 1 << 21
"""Pairs compared per step of `bucket_pairs`: 2M pairs are ~100 MiB of index, hash and xor arrays."""


def _bit_mask(offset: int, width: int) -> int:
    return ((1 << width) - 1) << offset


@dataclass(frozen=True)
class NeighbourPlan:
    """The tables for `distinct_count` distinct hashes at `max_distance`: `blocks` as (offset, width), one table
    per s-subset of block indexes (`subsets`, lexicographic, s = len(blocks) - max_distance); `key_masks[t]` has
    the bits of table t's blocks, `block_masks[t]` bit j set for each block j of table t."""

    max_distance: int
    distinct_count: int
    blocks: tuple[tuple[int, int], ...]
    subsets: tuple[tuple[int, ...], ...]
    key_masks: np.ndarray = field(repr=False)
    block_masks: np.ndarray = field(repr=False)

    @property
    def table_count(self) -> int:
        return len(self.subsets)

    @property
    def key_bits(self) -> int:
        """p: the fewest bits a table's key has (the s narrowest blocks)."""
        return sum(sorted(width for _, width in self.blocks)[: len(self.blocks) - self.max_distance])

    @property
    def expected_candidates(self) -> float:
        """Chance candidates per distinct hash for uniformly random hashes: tables * n / 2**p (an upper bound)."""
        return _expected_candidates(len(self.blocks), self.max_distance, self.distinct_count)


def _expected_candidates(block_count: int, max_distance: int, distinct_count: int) -> float:
    widths = sorted(width for _, width in contiguous_blocks(block_count))
    key_bits = sum(widths[: block_count - max_distance])
    return math.comb(block_count, max_distance) * distinct_count / 2.0**key_bits


def plan_tables(distinct_count: int, max_distance: int) -> NeighbourPlan:
    """The number of blocks m >= d + 1 with the least expected work per distinct hash, C(m, d) keys plus chance
    candidates / `CANDIDATES_PER_KEY`, among those with at most `MAX_TABLES` tables (C(m, d) grows with m: more
    tables, longer keys, fewer candidates)."""
    if not 0 <= max_distance <= MAX_DISTANCE_LIMIT:
        raise ValueError(f"max_distance must be in 0..{MAX_DISTANCE_LIMIT}, got {max_distance}")
    costs = {}
    for block_count in range(max_distance + 1, HASH_BITS + 1):
        tables = math.comb(block_count, max_distance)
        if tables > MAX_TABLES:
            break
        candidates = _expected_candidates(block_count, max_distance, distinct_count)
        costs[block_count] = tables + candidates / CANDIDATES_PER_KEY
    chosen = min(costs, key=costs.get)
    if costs[chosen] > 2 * MAX_TABLES:
        logger.info("phash neighbours: %d distinct hashes at distance %d: %d blocks, %d tables, %.3g chance "
                    "candidates per hash (no plan within %d tables is cheap)", distinct_count, max_distance,
                    chosen, math.comb(chosen, max_distance),
                    _expected_candidates(chosen, max_distance, distinct_count), MAX_TABLES)
    blocks = tuple(contiguous_blocks(chosen))
    subsets = tuple(combinations(range(chosen), chosen - max_distance))
    key_masks = np.array([sum(_bit_mask(*blocks[j]) for j in subset) for subset in subsets], dtype=np.uint64)
    block_masks = np.array([sum(1 << j for j in subset) for subset in subsets], dtype=np.uint64)
    return NeighbourPlan(max_distance, distinct_count, blocks, subsets, key_masks, block_masks)


def table_keys(plan: NeighbourPlan, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table int32, key int64), both of length len(hashes) * tables, hash-major: entry i * tables + t is hash i's
    key in table t, its bits outside table t's blocks zeroed (read as int64, a Spark long)."""
    values = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    keys = (values[:, None] & plan.key_masks[None, :]).reshape(-1).view(np.int64)
    tables = np.tile(np.arange(plan.table_count, dtype=np.int32), len(values))
    return tables, keys


def _first_tables(plan: NeighbourPlan, differing: np.ndarray) -> np.ndarray:
    """Block mask of the first table holding each pair whose xor is `differing` (the s smallest equal blocks)."""
    equal = np.zeros(len(differing), dtype=np.uint64)
    for index, (offset, width) in enumerate(plan.blocks):
        same = (differing & np.uint64(_bit_mask(offset, width))) == 0
        equal |= same.astype(np.uint64) << np.uint64(index)
    first = np.zeros_like(equal)
    for _ in range(len(plan.blocks) - plan.max_distance):
        lowest = equal & (np.uint64(0) - equal)
        first |= lowest
        equal ^= lowest
    return first


def bucket_pairs(plan: NeighbourPlan, members: np.ndarray, offsets: np.ndarray, tables: np.ndarray,
                 pairs_per_step: int = PAIRS_PER_STEP) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The verified pairs of some buckets, step by step: yields (left, right, compared) with left < right int64
    positions into `members` of pairs within max_distance that this bucket's table is the first to hold, and the
    number of pairs compared in the step.

    Bucket k is ``members[offsets[k]:offsets[k + 1]]`` (uint64 hashes, distinct within a bucket) of table
    ``tables[k]``. Every pair of a bucket is compared; a step covers about `pairs_per_step` pairs (one member's
    partners at least), so memory is O(pairs_per_step + largest bucket) whatever the buckets."""
    members = np.asarray(members, dtype=np.uint64)
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    position_table = np.repeat(np.asarray(tables, dtype=np.int64), sizes)
    partners = np.repeat(offsets[1:], sizes) - np.arange(len(members)) - 1
    active = np.flatnonzero(partners > 0)
    if not len(active):
        return
    step = (np.cumsum(partners[active]) - 1) // pairs_per_step
    for rows in np.split(active, np.flatnonzero(np.diff(step)) + 1):
        counts = partners[rows]
        total = int(counts.sum())
        left = np.repeat(rows, counts)
        right = left + 1 + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        differing = members[left] ^ members[right]
        within = np.flatnonzero(hamming_distances(differing, np.uint64(0)) <= plan.max_distance)
        left, right, differing = left[within], right[within], differing[within]
        first = _first_tables(plan, differing) == plan.block_masks[position_table[left]]
        yield left[first], right[first], total


def _roots(labels: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    roots = labels[nodes]
    while True:
        parents = labels[roots]
        if np.array_equal(parents, roots):
            return roots
        roots = parents


def _union(labels: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Join the sets of each (left, right) in a union-find forest where every node points at a smaller or equal
    node (labels[x] <= x); roots hook to the smallest root they meet, touched nodes are repointed at their root."""
    while len(left):
        root_left, root_right = _roots(labels, left), _roots(labels, right)
        apart = root_left != root_right
        if not apart.any():
            break
        low, high = np.minimum(root_left[apart], root_right[apart]), np.maximum(root_left[apart], root_right[apart])
        np.minimum.at(labels, high, low)
        left, right = left[apart], right[apart]
        labels[left], labels[right] = _roots(labels, left), _roots(labels, right)


def _flatten(labels: np.ndarray) -> np.ndarray:
    return _roots(labels, np.arange(len(labels)))


def bucket_links(plan: NeighbourPlan, members: np.ndarray, offsets: np.ndarray, tables: np.ndarray,
                 weights: np.ndarray | None = None,
                 pairs_per_step: int = PAIRS_PER_STEP) -> tuple[np.ndarray, np.ndarray, int, int]:
    """What the buckets say about groups, in O(members) edges: (linked, root, weighted_pairs, compared).

    (linked[i], root[i]) are uint64 hash pairs that join exactly the hashes that the buckets' verified pairs
    join: a star per connected component of the verified pairs (each member to the component's first member,
    unless it is the same hash value), not the pairs themselves, which a dense cluster makes quadratic. A star
    link need not be within max_distance itself; connected components over the links equal those over the
    verified pairs. `weighted_pairs` sums weights[left] * weights[right] over the verified pairs (their count
    when weights is None: rows per hash make it the number of row pairs); `compared` counts the pairs compared."""
    members = np.asarray(members, dtype=np.uint64)
    labels = np.arange(len(members), dtype=np.int64)
    weighted_pairs, compared = 0, 0
    for left, right, step_compared in bucket_pairs(plan, members, offsets, tables, pairs_per_step):
        compared += step_compared
        if weights is None:
            weighted_pairs += len(left)
        else:
            weighted_pairs += int(np.dot(weights[left].astype(np.int64), weights[right].astype(np.int64)))
        _union(labels, left, right)
    roots = _flatten(labels)
    # One hash may sit in buckets of several tables of the batch: it needs no link to itself.
    linked = np.flatnonzero(members != members[roots])
    return members[linked], members[roots[linked]], weighted_pairs, compared


@dataclass
class NeighbourCounters:
    """What `near_duplicate_groups` / `near_duplicate_pairs` did: input rows, distinct hashes, tables, chance
    candidates per hash the plan expected, pairs compared, verified pairs of distinct hashes (each once)."""

    rows: int = 0
    distinct: int = 0
    tables: int = 0
    expected_candidates: float = 0.0
    compared: int = 0
    edges: int = 0


def _table_buckets(plan: NeighbourPlan, distinct: np.ndarray, table: int) -> tuple[np.ndarray, np.ndarray]:
    """(indexes into distinct of the members of table's buckets of two or more, bucket offsets)."""
    keys = distinct & plan.key_masks[table]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    shared = sizes > 1
    member_index = order[np.repeat(shared, sizes)]
    offsets = np.r_[0, np.cumsum(sizes[shared])]
    return member_index, offsets


def _verified_edges(hashes, max_distance: int):
    """(distinct uint64 hashes, inverse per row, plan, counters, iterator of (i, j) index pairs into distinct)."""
    values = np.asarray(hashes).reshape(-1)
    if values.dtype == np.int64:
        values = values.view(np.uint64)
    distinct, inverse = np.unique(values.astype(np.uint64, copy=False), return_inverse=True)
    plan = plan_tables(len(distinct), max_distance)
    counters = NeighbourCounters(len(values), len(distinct), plan.table_count, plan.expected_candidates)

    def edges():
        for table in range(plan.table_count):
            member_index, offsets = _table_buckets(plan, distinct, table)
            table_ids = np.full(len(offsets) - 1, table)
            for left, right, compared in bucket_pairs(plan, distinct[member_index], offsets, table_ids):
                counters.compared += compared
                counters.edges += len(left)
                yield member_index[left], member_index[right]

    return distinct, inverse.reshape(-1), plan, counters, edges()


def near_duplicate_pairs(hashes, max_distance: int) -> tuple[np.ndarray, np.ndarray, NeighbourCounters]:
    """Every pair of distinct hash values within max_distance, once: (low, high) uint64 with low < high, and the
    counters. Memory grows with the number of pairs (quadratic for a dense cluster): groups want
    `near_duplicate_groups`. `hashes` are uint64, or int64 read as their bits."""
    distinct, _, _, counters, edges = _verified_edges(hashes, max_distance)
    found = list(edges)
    if not found:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, counters
    low = distinct[np.concatenate([i for i, _ in found])]
    high = distinct[np.concatenate([j for _, j in found])]
    return np.minimum(low, high), np.maximum(low, high), counters


def near_duplicate_groups(hashes, max_distance: int) -> tuple[np.ndarray, NeighbourCounters]:
    """Group of each input row: the smallest row index of its connected component, where rows are linked when
    their hashes are within max_distance (identical hashes always share a group; a row alone is its own group).
    int64 of len(hashes), and the counters. Memory is O(rows + tables' bucket arrays + one step), whatever the
    number of pairs."""
    distinct, inverse, _, counters, edges = _verified_edges(hashes, max_distance)
    labels = np.arange(len(distinct), dtype=np.int64)
    for left, right in edges:
        _union(labels, left, right)
    roots = _flatten(labels)
    first_row = np.full(len(distinct), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_row, inverse, np.arange(len(inverse), dtype=np.int64))
    group_first = np.full(len(distinct), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(group_first, roots, first_row)
    return group_first[roots[inverse]], counters
