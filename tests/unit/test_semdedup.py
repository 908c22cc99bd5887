"""SemDeDup inside one cluster (arXiv:2303.09540; DESIGN.md section 4) against a naive all-pairs reference."""

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops.embeddings import pack, unpack
from curation.ops.semdedup import (
    DEFAULT_EPS,
    StreamedSimilarity,
    eps_for_keep_fraction,
    max_similarity_to_earlier,
    nearest_centroid,
    resolve_kept,
    semdedup_cluster,
    semdedup_order,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=100)
# BLAS may sum a dot product in another order for another block shape: the last float32 bit can differ.
FLOAT32_BLOCKING_TOLERANCE = 1e-6


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def centroid_similarity(embeddings: np.ndarray) -> np.ndarray:
    """Cosine of each row to the normalised mean, as spherical k-means' centroid of a single cluster would be."""
    centroid = embeddings.astype(np.float64).mean(axis=0)
    return (embeddings @ (centroid / np.linalg.norm(centroid)).astype(np.float32)).astype(np.float32)


def random_with_near_copies(members: int, dimension: int, seed: int, copy_share: float = 0.2) -> np.ndarray:
    """Random unit rows, about `copy_share` of them noisy copies of other rows (cosine ~0.99 or more)."""
    rng = np.random.default_rng(seed)
    copies = int(members * copy_share) if members > 2 else 0
    base = rng.standard_normal((members - copies, dimension))
    sources = rng.integers(0, len(base), size=copies)
    noise_norms = rng.uniform(0.0, 0.15, size=(copies, 1))
    noise = rng.standard_normal((copies, dimension)) * noise_norms / math.sqrt(dimension)
    rows = np.concatenate([base, base[sources] / np.linalg.norm(base[sources], axis=1, keepdims=True) + noise])
    return unit_rows(rows[rng.permutation(members)])


def uids_for(count: int, seed: int = 0) -> list[str]:
    # Shuffled so that uid order is not row order.
    return [f"uid-{value:05d}" for value in np.random.default_rng(seed).permutation(count)]


def eps_clear_of(max_sims: np.ndarray, eps: float) -> float:
    """`eps`, nudged until no max_sim lies within 10x the blocking tolerance of the threshold 1 - eps."""
    while (np.abs(max_sims[np.isfinite(max_sims)] - (1 - eps)) < 10 * FLOAT32_BLOCKING_TOLERANCE).any():
        eps += 1e-4
    return eps


def naive_semdedup(embeddings: np.ndarray, similarity: np.ndarray, uids: list[str], eps: float) -> dict:
    """The rule read literally: full m x m similarity, members visited in order by a Python loop."""
    order = sorted(range(len(uids)), key=lambda row: (float(similarity[row]), uids[row]))
    ordered = embeddings[order]
    pairwise = ordered @ ordered.T
    threshold = 1.0 - eps
    keep, max_sim, kept_position = [], [], []
    for j in range(len(order)):
        if j == 0:
            keep.append(True)
            max_sim.append(-np.inf)
            kept_position.append(0)
            continue
        earlier_similarities = pairwise[j, :j]
        most_similar = int(np.argmax(earlier_similarities))
        dropped = any(earlier_similarities[i] > threshold for i in range(j))
        keep.append(not dropped)
        max_sim.append(float(earlier_similarities[most_similar]))
        kept_position.append(j if not dropped else kept_position[most_similar])
    result = {"keep": np.empty(len(order), bool), "max_sim": np.empty(len(order)), "kept_uid": [None] * len(order)}
    for position, row in enumerate(order):
        result["keep"][row] = keep[position]
        result["max_sim"][row] = max_sim[position]
        result["kept_uid"][row] = uids[order[kept_position[position]]]
    return result


# --------------------------------------------------------------------------------------------------
# The rule


def test_chain_drops_both_later_members_and_resolves_them_to_the_first():
    # a, b, c 15 degrees apart: a~b and b~c (cos 0.966 > 0.93) but a!~c (cos 0.866). c is dropped although
    # its only similar earlier member, b, was itself dropped: the rule compares with kept AND dropped members.
    eps = DEFAULT_EPS
    angles = {"a": 0.0, "b": math.radians(15), "c": math.radians(30)}
    centroid_sims = {"a": 0.1, "b": 0.2, "c": 0.3}  # a is farthest from the centroid, so it comes first
    rows = ["c", "a", "b"]  # not in SemDeDup order, to check results come back in row order
    embeddings = np.array([[math.cos(angles[r]), math.sin(angles[r])] for r in rows], dtype=np.float32)
    assert math.cos(angles["b"]) > 1 - eps and math.cos(angles["c"]) < 1 - eps

    result = semdedup_cluster(embeddings, np.array([centroid_sims[r] for r in rows]), rows, eps)

    assert result.keep.tolist() == [False, True, False]
    assert result.kept_uid.tolist() == ["a", "a", "a"]
    assert result.kept_row.tolist() == [1, 1, 1]
    assert result.order_rank.tolist() == [2, 0, 1]
    assert result.max_sim[1] == -np.inf
    assert result.max_sim[0] == pytest.approx(math.cos(math.radians(15)), abs=1e-6)
    assert result.max_sim[2] == pytest.approx(math.cos(math.radians(15)), abs=1e-6)


def test_max_similarity_to_earlier_picks_the_smallest_index_among_ties():
    embeddings = unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    max_sim, earlier = max_similarity_to_earlier(embeddings, block_rows=1)
    assert max_sim.dtype == np.float32 and earlier.dtype == np.int64
    assert max_sim.tolist() == [-np.inf, 1.0, 1.0, 0.0]
    assert earlier.tolist() == [-1, 0, 0, 0]


@pytest.mark.parametrize("members", [1, 2, 5, 300])
@pytest.mark.parametrize("block_rows", [1, 3, 7, 2048])
def test_blocked_computation_agrees_with_the_naive_reference(members, block_rows):
    embeddings = random_with_near_copies(members, 16, seed=members)
    similarity = centroid_similarity(embeddings)
    uids = uids_for(members, seed=members)
    reference_max_sim = naive_semdedup(embeddings, similarity, uids, DEFAULT_EPS)["max_sim"]
    for requested_eps in (0.01, DEFAULT_EPS, 0.3):
        # Decisions can only differ for a max_sim within the blocking tolerance of the threshold, where they
        # legitimately hang on the last float bit: move eps off such values, then they must be identical.
        eps = eps_clear_of(reference_max_sim, requested_eps)
        expected = naive_semdedup(embeddings, similarity, uids, eps)

        result = semdedup_cluster(embeddings, similarity, uids, eps, block_rows=block_rows)

        np.testing.assert_array_equal(result.keep, expected["keep"])
        assert result.kept_uid.tolist() == expected["kept_uid"]
        np.testing.assert_allclose(result.max_sim, expected["max_sim"], rtol=0, atol=FLOAT32_BLOCKING_TOLERANCE)
    if members == 300:
        assert 0 < (~result.keep).sum() < members  # the data exercises both outcomes


def test_planted_duplicate_groups_keep_exactly_one_member_each():
    rng = np.random.default_rng(7)
    base = unit_rows(rng.standard_normal((200, 64)))
    rows, groups = [base], [np.arange(200)]
    for source in range(0, 200, 3):
        copies = int(rng.integers(1, 5))
        rows.append(unit_rows(base[source] + 0.05 / math.sqrt(64) * rng.standard_normal((copies, 64))))
        groups.append(np.full(copies, source))
    embeddings, group = np.concatenate(rows), np.concatenate(groups)
    planted = np.isin(group, np.arange(0, 200, 3))
    assert min(float(embeddings[i] @ base[group[i]]) for i in range(200, len(embeddings))) > 0.995
    uids = [f"row-{row:04d}" for row in range(len(embeddings))]

    result = semdedup_cluster(embeddings, centroid_similarity(embeddings), uids, eps=0.01)

    assert result.keep[~planted].all()  # no unplanted row is anyone's near-duplicate
    for source in range(0, 200, 3):
        members = np.flatnonzero(group == source)
        assert result.keep[members].sum() == 1
        kept_member = members[result.keep[members]][0]
        assert set(result.kept_uid[members]) == {uids[kept_member]}
        assert set(result.kept_row[members]) == {kept_member}
        # The survivor is the group member farthest from the centroid.
        assert result.order_rank[kept_member] == result.order_rank[members].min()


def test_exact_copies_keep_the_smallest_uid_whatever_the_row_order():
    rng = np.random.default_rng(3)
    embeddings = unit_rows(rng.standard_normal((6, 8)))
    embeddings[[1, 3, 4]] = embeddings[0]  # equal rows have equal centroid similarity: uid breaks the tie
    uids = ["f", "d", "e", "b", "c", "a"]
    similarity = centroid_similarity(embeddings)
    for permutation in (np.arange(6), rng.permutation(6), rng.permutation(6)):
        result = semdedup_cluster(
            embeddings[permutation], similarity[permutation], [uids[p] for p in permutation], DEFAULT_EPS
        )
        kept_by_uid = dict(zip([uids[p] for p in permutation], result.kept_uid.tolist(), strict=True))
        assert kept_by_uid == {"f": "b", "d": "b", "b": "b", "c": "b", "e": "e", "a": "a"}


def test_semdedup_order_is_increasing_centroid_similarity_then_uid():
    similarity = np.array([0.5, 0.2, 0.5, 0.2, 0.9, 0.5], dtype=np.float32)
    uids = ["m", "z", "c", "a", "b", "k"]
    order = semdedup_order(similarity, uids)
    assert order.dtype == np.int64
    assert [uids[row] for row in order] == ["a", "z", "c", "k", "m", "b"]


def test_max_sim_does_not_depend_on_eps_and_resolve_kept_reproduces_each_eps():
    embeddings = random_with_near_copies(120, 8, seed=11)
    similarity = centroid_similarity(embeddings)
    uids = uids_for(120)
    results = [semdedup_cluster(embeddings, similarity, uids, eps) for eps in (0.005, 0.05, 0.2, 0.6)]
    for result in results[1:]:
        np.testing.assert_array_equal(result.max_sim, results[0].max_sim)
    order = semdedup_order(similarity, uids)
    max_sim, earlier = max_similarity_to_earlier(embeddings[order])
    for result in results:
        keep, kept_index = resolve_kept(max_sim, earlier, 1 - result.eps)
        np.testing.assert_array_equal(keep, result.keep[order])
        np.testing.assert_array_equal(order[kept_index], result.kept_row[order])


def test_resolve_kept_follows_links_through_dropped_members():
    max_sim = np.array([-np.inf, 0.99, 0.98, 0.1, 0.97, 0.95], dtype=np.float32)
    earlier = np.array([-1, 0, 1, 0, 2, 3])
    keep, kept_index = resolve_kept(max_sim, earlier, threshold=0.96)
    assert keep.tolist() == [True, False, False, True, False, True]
    assert kept_index.tolist() == [0, 0, 0, 3, 0, 5]
    # A threshold of 1 or more keeps everyone; the first member is kept at any threshold.
    assert resolve_kept(max_sim, earlier, 1.0)[0].all()
    assert resolve_kept(max_sim, earlier, -2.0)[0].tolist() == [True] + [False] * 5


def test_empty_cluster():
    result = semdedup_cluster(np.empty((0, 4), dtype=np.float32), np.empty(0, dtype=np.float32), [], DEFAULT_EPS)
    assert len(result.keep) == len(result.kept_uid) == len(result.order_rank) == 0


def test_result_arrays_are_read_only():
    embeddings = random_with_near_copies(10, 4, seed=1)
    result = semdedup_cluster(embeddings, centroid_similarity(embeddings), uids_for(10), DEFAULT_EPS)
    with pytest.raises(ValueError):
        result.keep[0] = False


# --------------------------------------------------------------------------------------------------
# Properties


@st.composite
def clusters(draw):
    members = draw(st.integers(1, 40))
    dimension = draw(st.integers(3, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    copy_share = draw(st.sampled_from([0.0, 0.2, 0.5]))
    embeddings = random_with_near_copies(members, dimension, seed, copy_share)
    return embeddings, centroid_similarity(embeddings), uids_for(members, seed)


@SETTINGS
@given(clusters(), st.floats(0.001, 1.5), st.floats(0.001, 1.5), st.sampled_from([1, 4, 2048]))
def test_a_smaller_eps_keeps_a_superset(cluster, eps_a, eps_b, block_rows):
    embeddings, similarity, uids = cluster
    stricter, looser = sorted((eps_a, eps_b))
    kept_stricter = semdedup_cluster(embeddings, similarity, uids, stricter, block_rows).keep
    kept_looser = semdedup_cluster(embeddings, similarity, uids, looser, block_rows).keep
    assert (kept_stricter | ~kept_looser).all()  # kept at the larger eps implies kept at the smaller


@SETTINGS
@given(clusters(), st.permutations(range(40)))
def test_results_follow_the_rows_whatever_their_order(cluster, permutation):
    embeddings, similarity, uids = cluster
    permutation = np.array([p for p in permutation if p < len(uids)])
    original = semdedup_cluster(embeddings, similarity, uids, 0.1)
    permuted = semdedup_cluster(embeddings[permutation], similarity[permutation], [uids[p] for p in permutation], 0.1)
    np.testing.assert_array_equal(permuted.keep, original.keep[permutation])
    np.testing.assert_array_equal(permuted.kept_uid, original.kept_uid[permutation])
    np.testing.assert_array_equal(permuted.order_rank, original.order_rank[permutation])


@SETTINGS
@given(st.lists(clusters(), min_size=1, max_size=4), st.floats(0.01, 1.0))
def test_eps_for_keep_fraction_keeps_the_fewest_members_at_or_above_the_target(cluster_list, keep_fraction):
    max_sims = np.concatenate([semdedup_cluster(e, s, u, DEFAULT_EPS).max_sim for e, s, u in cluster_list])
    target = math.ceil(keep_fraction * len(max_sims) - 1e-9)
    achievable = sorted({int((max_sims <= value).sum()) for value in max_sims})
    fewest_enough = min(count for count in achievable if count >= target)
    if np.sort(max_sims)[target - 1] >= 1.0:  # exact copies would have to be kept: no eps in (0, 2) does that
        with pytest.raises(ValueError, match="eps <= 0"):
            eps_for_keep_fraction(max_sims, keep_fraction)
        return
    eps = eps_for_keep_fraction(max_sims, keep_fraction)
    assert 0 < eps < 2
    kept = [semdedup_cluster(e, s, u, eps).keep for e, s, u in cluster_list]
    assert sum(int(k.sum()) for k in kept) == fewest_enough


def test_eps_for_keep_fraction_examples():
    values = np.array([-np.inf, 0.1, 0.5, 0.5, 0.9], dtype=np.float32)
    assert eps_for_keep_fraction(values, 1.0) == pytest.approx(0.1)
    kept_at = lambda eps: int((values.astype(np.float64) <= 1 - eps).sum())  # noqa: E731
    assert kept_at(eps_for_keep_fraction(values, 1.0)) == 5
    assert kept_at(eps_for_keep_fraction(values, 0.6)) == 4  # target 3, but the two 0.5s stand or fall together
    assert kept_at(eps_for_keep_fraction(values, 0.4)) == 2
    assert kept_at(eps_for_keep_fraction(values, 0.2)) == 1  # only the first member: just below 0.1
    # 0.7 * 10 is 7.000000000000001 in binary floating point; the target is still 7.
    ten = np.concatenate([[-np.inf], np.linspace(0.0, 0.8, 9)]).astype(np.float32)
    assert int((ten.astype(np.float64) <= 1 - eps_for_keep_fraction(ten, 0.7)).sum()) == 7
    # Every member first in its cluster (singletons): any eps keeps them all.
    assert 0 < eps_for_keep_fraction(np.full(3, -np.inf, dtype=np.float32), 0.5) < 2


def test_eps_for_keep_fraction_tiny_values_round_trip():
    # 1 - (1 - v) is not v in float64 for |v| < 2^-29: the threshold must still land on v.
    values = np.array([-np.inf, 1e-12, 3e-12, 0.5], dtype=np.float32)
    eps = eps_for_keep_fraction(values, 0.5)
    assert int((values.astype(np.float64) <= 1 - eps).sum()) == 2


# --------------------------------------------------------------------------------------------------
# Validation


def valid_cluster(members: int = 4, dimension: int = 3):
    embeddings = random_with_near_copies(members, dimension, seed=0, copy_share=0.0)
    return embeddings, centroid_similarity(embeddings), uids_for(members)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e, s, u, eps: (e.astype(np.float64), s, u, eps), "must be float32"),
        (lambda e, s, u, eps: (e[:, 0].copy(), s, u, eps), r"shape \(n, d\)"),
        (lambda e, s, u, eps: (e[:, :0].copy(), s, u, eps), r"shape \(n, d\)"),
        (lambda e, s, u, eps: (e * 10, s, u, eps), "L2-normalised"),
        (
            lambda e, s, u, eps: (np.where(np.arange(len(e))[:, None] == 1, np.nan, e).astype(np.float32), s, u, eps),
            "NaN or infinite",
        ),
        (lambda e, s, u, eps: (e.tolist(), s, u, eps), "numpy array"),
        (lambda e, s, u, eps: (e, s[:-1], u, eps), "centroid_similarity has 3 values for 4"),
        (lambda e, s, u, eps: (e, s[:, None], u, eps), "must be 1-D"),
        (lambda e, s, u, eps: (e, np.where(np.arange(len(s)) == 0, np.nan, s), u, eps), "must be finite"),
        (lambda e, s, u, eps: (e, s.astype(np.int64), u, eps), "float array"),
        (lambda e, s, u, eps: (e, s, u[:-1], eps), "uids has 3 values for 4"),
        (lambda e, s, u, eps: (e, s, [1, 2, 3, 4], eps), "must be strings"),
        (lambda e, s, u, eps: (e, s, u, 0.0), r"eps must be in \(0, 2\)"),
        (lambda e, s, u, eps: (e, s, u, 2.0), r"eps must be in \(0, 2\)"),
        (lambda e, s, u, eps: (e, s, u, -0.1), r"eps must be in \(0, 2\)"),
        (lambda e, s, u, eps: (e, s, u, float("nan")), r"eps must be in \(0, 2\)"),
    ],
)
def test_semdedup_cluster_rejects_bad_input(change, message):
    embeddings, similarity, uids, eps = change(*valid_cluster(), DEFAULT_EPS)
    with pytest.raises(ValueError, match=message):
        semdedup_cluster(embeddings, similarity, uids, eps)


def test_other_functions_reject_bad_input():
    embeddings = valid_cluster()[0]
    with pytest.raises(ValueError, match="block_rows must be >= 1"):
        max_similarity_to_earlier(embeddings, block_rows=0)
    with pytest.raises(ValueError, match="must be float32"):
        max_similarity_to_earlier(embeddings.astype(np.float16))
    max_sim = np.array([-np.inf, 0.5, 0.5], dtype=np.float32)
    with pytest.raises(ValueError, match=r"earlier must have shape \(3,\)"):
        resolve_kept(max_sim, np.array([-1, 0]), 0.9)
    with pytest.raises(ValueError, match="earlier\\[0\\] must be -1"):
        resolve_kept(max_sim, np.array([0, 0, 1]), 0.9)
    with pytest.raises(ValueError, match="0 <= earlier"):
        resolve_kept(max_sim, np.array([-1, 0, 2]), 0.9)
    with pytest.raises(ValueError, match="integer array"):
        resolve_kept(max_sim, np.array([-1.0, 0.0, 1.0]), 0.9)
    with pytest.raises(ValueError, match="NaN"):
        resolve_kept(max_sim, np.array([-1, 0, 1]), float("nan"))
    with pytest.raises(ValueError, match="finite or -inf"):
        resolve_kept(np.array([-np.inf, np.nan, 0.5]), np.array([-1, 0, 1]), 0.9)
    for fraction in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
            eps_for_keep_fraction(max_sim, fraction)
    with pytest.raises(ValueError, match="empty"):
        eps_for_keep_fraction(np.empty(0, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match="eps <= 0"):
        eps_for_keep_fraction(np.array([-np.inf, 0.5, 1.0], dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="uids has 2 values for 3"):
        semdedup_order(np.zeros(3, dtype=np.float32), ["a", "b"])


def test_pack_makes_large_binary_and_unpack_reads_it_and_binary():
    matrix = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float16)
    packed = pack(matrix)
    assert packed.type == pa.large_binary()
    assert np.array_equal(unpack(packed), matrix.astype(np.float32))
    assert np.array_equal(unpack(packed.slice(2, 2), 3), matrix[2:4].astype(np.float32))
    as_binary = packed.cast(pa.binary())
    assert np.array_equal(unpack(as_binary.slice(1)), matrix[1:].astype(np.float32))
    assert np.array_equal(unpack(pa.chunked_array([packed.slice(0, 2), packed.slice(2)])), matrix.astype(np.float32))
    assert unpack(pa.chunked_array([], pa.large_binary()), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="dimensions"):
        unpack(packed, 4)
    with pytest.raises(ValueError, match="binary"):
        unpack(pa.array(["a"]))


def test_pack_offsets_are_64_bit_so_an_array_may_pass_2_gib():
    # int32 offsets stop at 2 GiB (2.1M rows at d = 512); a real array that size is too large for a unit test.
    offsets = np.frombuffer(pack(np.zeros((3, 512), np.float16)).buffers()[1], dtype=np.int64)
    assert offsets.tolist() == [0, 1024, 2048, 3072]


@pytest.mark.parametrize(("members", "block_rows", "chunks"),
                         [(1, 4, [1]), (2, 4, [1, 1]), (37, 8, [5, 3, 20, 9]), (64, 16, [16, 48]), (70, 2048, [70]),
                          (300, 64, [1, 127, 1, 171])])
def test_streamed_similarity_equals_the_in_memory_computation_bit_for_bit(tmp_path, members, block_rows, chunks):
    embeddings = random_with_near_copies(members, 24, seed=members)
    expected_sim, expected_earlier = max_similarity_to_earlier(embeddings, block_rows)
    stream = StreamedSimilarity(24, str(tmp_path), block_rows)
    results, start = [], 0
    for size in chunks:
        results += stream.add(embeddings[start : start + size])
        start += size
    results += stream.finish()
    stream.close()
    assert list(tmp_path.iterdir()) == []
    assert [r[0] for r in results] == list(range(0, members, block_rows))
    streamed_sim = np.concatenate([r[1] for r in results])
    assert streamed_sim.tobytes() == expected_sim.tobytes()
    assert np.array_equal(np.concatenate([r[2] for r in results]), expected_earlier)


def test_nearest_centroid_ties_go_to_the_smallest_index():
    centroids = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    vectors = np.array([[2, 0.5], [0.1, 3], [1, 1]], np.float32)
    assert nearest_centroid(vectors, centroids).tolist() == [0, 1, 0]
