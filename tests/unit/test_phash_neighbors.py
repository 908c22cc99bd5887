"""Exact near-duplicate pairs and groups of 64-bit hashes (curation/ops/phash_neighbors.py) against brute force."""

import math

import numpy as np
import pytest

from curation.ops import phash_neighbors
from curation.ops.imagehash import MAX_DISTANCE_LIMIT, contiguous_blocks, hamming_distances
from curation.ops.phash_neighbors import (
    CANDIDATES_PER_KEY,
    MAX_TABLES,
    bucket_links,
    bucket_pairs,
    near_duplicate_groups,
    near_duplicate_pairs,
    plan_tables,
    table_keys,
)

DISTANCES = [0, 1, 2, 4, 8, MAX_DISTANCE_LIMIT]


def flipped(rng, values: np.ndarray, most: int) -> np.ndarray:
    """Each value with 0..most random bits flipped."""
    out = values.copy()
    for index in range(len(out)):
        bits = rng.choice(64, size=int(rng.integers(0, most + 1)), replace=False)
        out[index] ^= np.uint64(sum(1 << int(bit) for bit in bits))
    return out


def random_and_clustered(seed: int, max_distance: int) -> np.ndarray:
    """Random hashes, copies within and just beyond max_distance, a dense cluster around one centre, repeats."""
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    near = flipped(rng, random[:120], max_distance + 1)
    cluster = flipped(rng, np.full(80, random[0]), 2)
    return np.concatenate([random, near, cluster, random[:30], near[:10]])


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    distinct = np.unique(hashes)
    within = np.triu(hamming_distances(distinct[:, None], distinct[None, :]) <= max_distance, 1)
    left, right = np.nonzero(within)
    return set(zip(distinct[left].tolist(), distinct[right].tolist(), strict=True))


def brute_force_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Smallest row index of each row's component, by repeated relaxation over the full distance matrix."""
    linked = hamming_distances(hashes[:, None], hashes[None, :]) <= max_distance
    labels = np.arange(len(hashes))
    while True:
        relaxed = np.where(linked, labels[None, :], len(hashes)).min(axis=1)
        if np.array_equal(relaxed, labels):
            return labels
        labels = relaxed


@pytest.mark.parametrize("max_distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pairs_are_exactly_the_brute_force_ones_each_once(seed, max_distance):
    hashes = random_and_clustered(seed, max_distance)
    low, high, counters = near_duplicate_pairs(hashes, max_distance)
    found = list(zip(low.tolist(), high.tolist(), strict=True))
    assert len(found) == len(set(found)), "a pair was emitted by more than one table"
    assert set(found) == brute_force_pairs(hashes, max_distance)
    assert counters.edges == len(found) and counters.distinct == len(np.unique(hashes))
    assert counters.rows == len(hashes) and counters.compared >= counters.edges


@pytest.mark.parametrize("max_distance", DISTANCES)
def test_groups_are_the_brute_force_components(max_distance):
    hashes = random_and_clustered(7, max_distance)
    groups, counters = near_duplicate_groups(hashes, max_distance)
    assert groups.dtype == np.int64
    np.testing.assert_array_equal(groups, brute_force_groups(hashes, max_distance))
    assert counters.tables == plan_tables(counters.distinct, max_distance).table_count


def test_identical_hashes_collapse_to_one_distinct_value_and_one_group():
    hashes = np.array([5, 9, 5, 5, 1 << 63, 9], dtype=np.uint64)
    groups, counters = near_duplicate_groups(hashes, 0)
    assert groups.tolist() == [0, 1, 0, 0, 4, 1]
    assert counters.distinct == 3 and counters.edges == 0 and counters.compared == 0


def test_signed_longs_are_read_as_their_bits():
    hashes = np.array([-1, -2, 3], dtype=np.int64)  # -1 and -2 differ in one bit
    low, high, _ = near_duplicate_pairs(hashes, 1)
    assert list(zip(low.tolist(), high.tolist(), strict=True)) == [(2**64 - 2, 2**64 - 1)]


def test_a_row_alone_is_its_own_group():
    groups, _ = near_duplicate_groups(np.array([0, 2**64 - 1, 0b111], dtype=np.uint64), 2)
    assert groups.tolist() == [0, 1, 2]


def plan_cost(block_count: int, max_distance: int, distinct_count: int) -> float:
    return (math.comb(block_count, max_distance)
            + phash_neighbors._expected_candidates(block_count, max_distance, distinct_count) / CANDIDATES_PER_KEY)


@pytest.mark.parametrize("max_distance", range(MAX_DISTANCE_LIMIT + 1))
def test_plans_cover_every_subset_and_take_the_cheapest_within_the_table_cap(max_distance):
    for distinct_count in (10, 10**6, 10**9):
        plan = plan_tables(distinct_count, max_distance)
        block_count = len(plan.blocks)
        assert block_count >= max_distance + 1 and plan.table_count <= MAX_TABLES
        assert plan.table_count == math.comb(block_count, max_distance)
        assert all(len(subset) == block_count - max_distance for subset in plan.subsets)
        assert list(plan.subsets) == sorted(plan.subsets)
        allowed = [m for m in range(max_distance + 1, 65) if math.comb(m, max_distance) <= MAX_TABLES]
        cheapest = min(plan_cost(m, max_distance, distinct_count) for m in allowed)
        assert plan_cost(block_count, max_distance, distinct_count) == cheapest


def test_plan_grows_tables_with_the_number_of_hashes_at_distance_4():
    assert [plan_tables(n, 4).table_count for n in (10**4, 10**5, 10**6, 10**7, 10**9)] == [5, 5, 15, 15, 35]
    assert plan_tables(10**9, 4).expected_candidates < 300
    assert plan_tables(35_000, 4).table_count == 5  # the demo's scale: the plain pigeonhole on 5 chunks


def test_blocks_tile_the_64_bits():
    for block_count in (1, 5, 7, 64):
        blocks = contiguous_blocks(block_count)
        assert [offset for offset, _ in blocks] == list(np.cumsum([0] + [w for _, w in blocks])[:-1])
        assert sum(width for _, width in blocks) == 64
    with pytest.raises(ValueError, match="block_count"):
        contiguous_blocks(65)
    with pytest.raises(ValueError, match="max_distance"):
        plan_tables(10, MAX_DISTANCE_LIMIT + 1)


def test_table_keys_keep_only_the_tables_blocks():
    plan = plan_tables(10**6, 4)
    hashes = np.array([2**64 - 1, 0], dtype=np.uint64)
    tables, keys = table_keys(plan, hashes)
    assert tables.tolist() == list(range(plan.table_count)) * 2
    assert keys[: plan.table_count].view(np.uint64).tolist() == plan.key_masks.tolist()
    assert (keys[plan.table_count :] == 0).all()


def components(pairs) -> set[frozenset]:
    """Connected components (as sets of nodes, two or more) of an iterable of (a, b)."""
    parent = {}

    def root(node):
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    for a, b in pairs:
        parent[max(root(a), root(b))] = min(root(a), root(b))
    groups = {}
    for node in parent:
        groups.setdefault(root(node), set()).add(node)
    return {frozenset(group) for group in groups.values() if len(group) > 1}


def test_a_huge_bucket_is_compared_in_bounded_steps():
    """A bucket of hashes all within distance 2 of one centre: every pair is compared, no step exceeds the step
    size plus one member's partners, and the links join exactly what the verified pairs join, in fewer edges."""
    rng = np.random.default_rng(3)
    members = np.unique(flipped(rng, np.zeros(3000, dtype=np.uint64), 2))
    plan = plan_tables(len(members), 4)
    offsets = np.array([0, len(members)])
    table = np.array([0])
    all_pairs = len(members) * (len(members) - 1) // 2
    steps = list(bucket_pairs(plan, members, offsets, table, pairs_per_step=10_000))
    assert max(compared for _, _, compared in steps) <= 10_000 + len(members)
    assert sum(compared for _, _, compared in steps) == all_pairs
    verified = [(int(members[a]), int(members[b]))
                for left, right, _ in steps for a, b in zip(left, right, strict=True)]
    linked, root, weighted_pairs, compared = bucket_links(plan, members, offsets, table, pairs_per_step=10_000)
    assert weighted_pairs == len(verified) > len(members) and compared == all_pairs
    assert len(linked) < len(members)
    assert components(zip(linked.tolist(), root.tolist(), strict=True)) == components(verified)


def test_bucket_links_weight_pairs_by_rows_per_hash():
    plan = plan_tables(3, 1)  # two 32-bit blocks: table 1 keys on the high block, where these three agree
    members = np.array([0b00, 0b01, 0b11], dtype=np.uint64)  # 0-1 and 1-3 within distance 1, 0-3 not
    linked, root, weighted_pairs, _ = bucket_links(plan, members, np.array([0, 3]), np.array([1]),
                                                   weights=np.array([2, 3, 5]))
    assert weighted_pairs == 2 * 3 + 3 * 5
    assert sorted(zip(linked.tolist(), root.tolist(), strict=True)) == [(1, 0), (3, 0)]
    # in table 0's bucket (low block) the same pairs are not the first table's: nothing is reported
    assert bucket_links(plan, members, np.array([0, 3]), np.array([0]))[2] == 0


def test_a_hash_in_buckets_of_two_tables_gets_no_link_to_itself():
    plan = plan_tables(3, 1)
    # 0b01 is in table 1's bucket with 0b00 and 0b11 (high blocks equal), and again on its own in another bucket
    members = np.array([0b00, 0b01, 0b11, 0b01, 0b01 | 1 << 40], dtype=np.uint64)
    linked, root, weighted_pairs, _ = bucket_links(plan, members, np.array([0, 3, 5]), np.array([1, 0]))
    assert weighted_pairs == 3  # 0-1, 1-3 in table 1; 1 and 1 | 1 << 40 agree on the low block: table 0
    assert (linked != root).all()
    assert components(zip(linked.tolist(), root.tolist(), strict=True)) == {frozenset({0, 1, 3, 1 | 1 << 40})}
