"""Density-based pruning (Abbas et al. 2024, arXiv:2401.04578; DESIGN.md section 4): quotas, distances, selection."""

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from curation.ops import prune

SETTINGS = settings(derandomize=True, deadline=None, max_examples=150)


def _softmax_inputs(draw, clusters: int) -> np.ndarray:
    # Complexities on a 0.01 grid, so distinct complexities give clearly distinct probabilities.
    steps = draw(st.lists(st.integers(0, 100), min_size=clusters, max_size=clusters))
    return prune.cluster_probabilities(np.array(steps) / 100.0, tau=draw(st.sampled_from([0.05, 0.1, 1.0])))


@st.composite
def quota_problems(draw, max_clusters: int = 12, max_size: int = 40):
    clusters = draw(st.integers(1, max_clusters))
    sizes = np.array(draw(st.lists(st.integers(0, max_size), min_size=clusters, max_size=clusters)), dtype=np.int64)
    probabilities = _softmax_inputs(draw, clusters)
    n_keep = draw(st.integers(0, int(sizes.sum())))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    return probabilities, sizes, n_keep, ratio


def _check_kkt(continuous, probabilities, sizes, n_keep, lower, tolerance=1e-7):
    """The KKT conditions of the box-constrained projection: one shift lambda, clipped values on the right side."""
    target = n_keep * np.asarray(probabilities)
    low, high = np.asarray(lower, dtype=float), np.asarray(sizes, dtype=float)
    assert continuous.sum() == pytest.approx(n_keep, abs=1e-6)
    assert np.all(continuous >= low - tolerance) and np.all(continuous <= high + tolerance)
    free = (continuous > low + tolerance) & (continuous < high - tolerance)
    at_low = ~free & np.isclose(continuous, low, atol=tolerance) & (low < high)
    at_high = ~free & np.isclose(continuous, high, atol=tolerance) & (low < high) & ~at_low
    fixed = low == high
    assert np.all(free | at_low | at_high | fixed)
    # lambda must lie in [max over upper-clipped of (ub - target), min over lower-clipped of (lb - target)] and
    # equal the common shift of the free clusters.
    shift_floor = np.max(high[at_high] - target[at_high], initial=-np.inf)
    shift_ceiling = np.min(low[at_low] - target[at_low], initial=np.inf)
    if free.any():
        shifts = continuous[free] - target[free]
        assert np.ptp(shifts) < 1e-6
        shift_floor = max(shift_floor, float(shifts.max()) - 1e-6)
        shift_ceiling = min(shift_ceiling, float(shifts.min()) + 1e-6)
    assert shift_floor <= shift_ceiling + 1e-6


def _bisection_projection(probabilities, sizes, n_keep, lower):
    """An independent slow reference: lambda by 200 bisection steps."""
    target = n_keep * np.asarray(probabilities)
    low, high = np.asarray(lower, dtype=float), np.asarray(sizes, dtype=float)
    left, right = float(np.min(low - target)) - 1.0, float(np.max(high - target)) + 1.0
    for _ in range(200):
        middle = (left + right) / 2
        if np.clip(target + middle, low, high).sum() < n_keep:
            left = middle
        else:
            right = middle
    return np.clip(target + (left + right) / 2, low, high)


# ---------------------------------------------------------------- d_inter


def _circle(angles_degrees):
    radians = np.deg2rad(np.asarray(angles_degrees, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_inter_distance_on_hand_made_circle_points():
    centroids = _circle([0, 10, 30, 100])
    distance = prune.inter_cluster_distance(centroids, neighbours=1)
    expected = 1 - np.cos(np.deg2rad([10, 10, 20, 70]))
    assert distance.dtype == np.float64 and distance.shape == (4,)
    np.testing.assert_allclose(distance, expected, atol=1e-6)
    two = prune.inter_cluster_distance(centroids, neighbours=2)
    expected_two = [
        (1 - np.cos(np.deg2rad(a)) + 1 - np.cos(np.deg2rad(b))) / 2
        for a, b in [(10, 30), (10, 20), (20, 30), (70, 90)]
    ]
    np.testing.assert_allclose(two, expected_two, atol=1e-6)


def test_inter_distance_on_regular_polygon_uses_min_of_20_and_k_minus_1():
    centroids = _circle(np.arange(8) * 45)
    three = prune.inter_cluster_distance(centroids, neighbours=3)
    expected_three = (2 * (1 - math.cos(math.pi / 4)) + 1) / 3
    np.testing.assert_allclose(three, expected_three, atol=1e-6)
    # Default 20 neighbours with k = 8: all 7 others; the cosines of a regular polygon's other vertices sum to -1.
    everyone = prune.inter_cluster_distance(centroids)
    np.testing.assert_allclose(everyone, (7 + 1) / 7, atol=1e-6)


def test_inter_distance_matches_brute_force_with_more_than_20_clusters_and_small_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(45, 6)).astype(np.float32)
    unit = centroids.astype(np.float64) / np.linalg.norm(centroids.astype(np.float64), axis=1, keepdims=True)
    cosine_distance = 1 - unit @ unit.T
    np.fill_diagonal(cosine_distance, np.inf)
    expected = np.sort(cosine_distance, axis=1)[:, :20].mean(axis=1)
    np.testing.assert_allclose(prune.inter_cluster_distance(centroids), expected, atol=1e-12)
    monkeypatch.setattr(prune, "_SIMILARITY_BLOCK_ELEMENTS", 7 * 45)  # 7-row blocks, the last one short
    np.testing.assert_allclose(prune.inter_cluster_distance(centroids), expected, atol=1e-12)


def test_inter_distance_single_cluster_is_zero_and_duplicates_count_as_neighbours():
    assert prune.inter_cluster_distance(np.array([[0.6, 0.8]], dtype=np.float32)).tolist() == [0.0]
    assert prune.inter_cluster_distance(np.zeros((0, 3), dtype=np.float32)).shape == (0,)
    duplicated = _circle([0, 0, 90])
    np.testing.assert_allclose(prune.inter_cluster_distance(duplicated, neighbours=1), [0, 0, 1], atol=1e-6)


def test_inter_distance_normalises_rows_and_rejects_bad_input():
    scaled = _circle([0, 60]) * np.array([[3.0], [0.5]], dtype=np.float32)
    np.testing.assert_allclose(prune.inter_cluster_distance(scaled), [0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="norm 0"):
        prune.inter_cluster_distance(np.array([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="neighbours"):
        prune.inter_cluster_distance(_circle([0, 90]), neighbours=0)
    with pytest.raises(ValueError, match=r"\(k, d\)"):
        prune.inter_cluster_distance(np.ones(3))


# ---------------------------------------------------------------- complexity and softmax


def test_complexity_is_the_product():
    np.testing.assert_allclose(prune.cluster_complexity([0.2, 0.5, 0.0], [0.3, 0.4, 0.9]), [0.06, 0.2, 0.0])
    with pytest.raises(ValueError, match="equal length"):
        prune.cluster_complexity([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="finite"):
        prune.cluster_complexity([np.nan], [0.1])


def test_probabilities_are_a_softmax_of_complexity_over_tau():
    complexity = np.array([0.1, 0.2, 0.3])
    expected = np.exp(complexity / 0.1) / np.exp(complexity / 0.1).sum()
    np.testing.assert_allclose(prune.cluster_probabilities(complexity), expected, rtol=1e-12)
    np.testing.assert_allclose(prune.cluster_probabilities([0.4, 0.4, 0.4, 0.4], tau=0.01), [0.25] * 4)
    assert prune.cluster_probabilities([]).shape == (0,)


def test_softmax_is_stable_for_huge_complexity_over_tau():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value RuntimeWarning either
        probabilities = prune.cluster_probabilities([1e300, 1e300 - 1e285, 0.0, -1e300], tau=1e-10)
        assert np.all(np.isfinite(probabilities))
        np.testing.assert_allclose(probabilities, [1, 0, 0, 0])
        close = prune.cluster_probabilities([1000.0, 1000.0 + 0.001 * math.log(3)], tau=0.001)
        np.testing.assert_allclose(close, [0.25, 0.75], rtol=1e-9)


@pytest.mark.parametrize("tau", [0.0, -0.1, math.inf, math.nan])
def test_tau_must_be_positive_and_finite(tau):
    with pytest.raises(ValueError, match="tau"):
        prune.cluster_probabilities([0.1, 0.2], tau=tau)


# ---------------------------------------------------------------- lower bounds and the continuous solution


def test_lower_bounds_are_floor_of_ratio_share_capped_by_size():
    assert prune.lower_bounds([100, 3, 0, 7], 30).tolist() == [3, 3, 0, 3]  # floor(0.5 * 30 / 4) = 3
    assert prune.lower_bounds([100, 3, 0, 7], 30, ratio=1.0).tolist() == [7, 3, 0, 7]
    assert prune.lower_bounds([100, 3], 30, ratio=0.0).tolist() == [0, 0]
    assert prune.lower_bounds([5, 5], 0).dtype == np.int64


def test_continuous_quotas_by_hand():
    # Unconstrained target (6, 3, 1); cluster 0 holds 4, so 2 units spread equally over the others: (4, 4, 2).
    continuous = prune.continuous_quotas([0.6, 0.3, 0.1], [4, 100, 100], 10, np.zeros(3, dtype=np.int64))
    np.testing.assert_allclose(continuous, [4, 4, 2])
    # A lower bound of 2 lifts cluster 2; the shift is then paid by the free ones.
    continuous = prune.continuous_quotas([0.6, 0.3, 0.1], [100, 100, 100], 10, np.array([0, 0, 2]))
    np.testing.assert_allclose(continuous, [5.5, 2.5, 2])


@SETTINGS
@given(quota_problems())
def test_continuous_solution_satisfies_kkt_and_matches_bisection(problem):
    probabilities, sizes, n_keep, ratio = problem
    lower = prune.lower_bounds(sizes, n_keep, ratio)
    continuous = prune.continuous_quotas(probabilities, sizes, n_keep, lower)
    assert continuous.dtype == np.float64
    _check_kkt(continuous, probabilities, sizes, n_keep, lower)
    np.testing.assert_allclose(continuous, _bisection_projection(probabilities, sizes, n_keep, lower), atol=1e-7)


@SETTINGS
@given(quota_problems(max_clusters=6, max_size=8), st.data())
def test_continuous_solution_is_no_worse_than_any_feasible_move(problem, data):
    probabilities, sizes, n_keep, ratio = problem
    lower = prune.lower_bounds(sizes, n_keep, ratio)
    continuous = prune.continuous_quotas(probabilities, sizes, n_keep, lower)
    target = n_keep * probabilities
    best = np.sum((continuous - target) ** 2)
    # Moving mass t from cluster a to cluster b, as far as the bounds allow, never improves the objective.
    a, b = data.draw(st.integers(0, len(sizes) - 1)), data.draw(st.integers(0, len(sizes) - 1))
    room = min(continuous[a] - lower[a], sizes[b] - continuous[b])
    for t in np.linspace(0, max(room, 0), 5)[1:]:
        moved = continuous.copy()
        moved[a] -= t
        moved[b] += t
        assert np.sum((moved - target) ** 2) >= best - 1e-9


def test_continuous_quotas_validation():
    with pytest.raises(ValueError, match="infeasible"):
        prune.continuous_quotas([0.5, 0.5], [5, 5], 3, np.array([2, 2]))
    with pytest.raises(ValueError, match="lower <= size"):
        prune.continuous_quotas([0.5, 0.5], [5, 5], 3, np.array([6, 0]))
    with pytest.raises(ValueError, match="lower bounds must be"):
        prune.continuous_quotas([0.5, 0.5], [5, 5], 3, np.array([0.5, 0.0]))


# ---------------------------------------------------------------- integer quotas


def _check_quotas(quotas, probabilities, sizes, n_keep, ratio):
    lower = prune.lower_bounds(sizes, n_keep, ratio)
    assert quotas.dtype == np.int64 and quotas.shape == sizes.shape
    assert int(quotas.sum()) == n_keep
    assert np.all(quotas <= sizes) and np.all(quotas >= lower)
    continuous = prune.continuous_quotas(probabilities, sizes, n_keep, lower)
    assert np.all(np.abs(quotas - continuous) < 1)


@SETTINGS
@given(quota_problems(max_clusters=30, max_size=200))
def test_quotas_sum_exactly_and_respect_bounds(problem):
    probabilities, sizes, n_keep, ratio = problem
    _check_quotas(prune.water_fill_quotas(probabilities, sizes, n_keep, ratio), probabilities, sizes, n_keep, ratio)


@SETTINGS
@given(quota_problems(max_clusters=4, max_size=5))
def test_integer_quotas_are_an_exact_integer_optimum(problem):
    probabilities, sizes, n_keep, ratio = problem
    quotas = prune.water_fill_quotas(probabilities, sizes, n_keep, ratio)
    lower = prune.lower_bounds(sizes, n_keep, ratio)
    target = n_keep * probabilities
    best = min(
        np.sum((np.array(candidate) - target) ** 2)
        for candidate in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(lower, sizes, strict=True)))
        if sum(candidate) == n_keep
    )
    assert np.sum((quotas - target) ** 2) == pytest.approx(best, abs=1e-9)


@SETTINGS
@given(st.integers(1, 25), st.data())
def test_without_active_bounds_quotas_are_proportional_up_to_rounding(clusters, data):
    probabilities = _softmax_inputs(data.draw, clusters)
    sizes = np.full(clusters, 10_000, dtype=np.int64)
    n_keep = data.draw(st.integers(0, 10_000))
    quotas = prune.water_fill_quotas(probabilities, sizes, n_keep, ratio=0.0)
    assert int(quotas.sum()) == n_keep
    assert np.all(np.abs(quotas - n_keep * probabilities) < 1)


@SETTINGS
@given(quota_problems(max_clusters=15, max_size=6))
def test_more_complex_cluster_of_equal_size_never_gets_a_smaller_quota(problem):
    probabilities, sizes, n_keep, ratio = problem
    sizes = np.full_like(sizes, 6)  # one size for all, so the bounds are equal
    assume(n_keep <= sizes.sum())
    quotas = prune.water_fill_quotas(probabilities, sizes, n_keep, ratio)
    for a, b in itertools.permutations(range(len(sizes)), 2):
        if probabilities[a] > probabilities[b]:
            assert quotas[a] >= quotas[b]


def test_largest_remainder_ties_go_to_the_lower_cluster_id():
    # Target 2.5 each; one extra unit after flooring to (2, 2); equal fractions: cluster 0 wins.
    assert prune.water_fill_quotas([0.5, 0.5], [10, 10], 5, ratio=0.0).tolist() == [3, 2]
    assert prune.water_fill_quotas([0.25] * 4, [10] * 4, 6, ratio=0.0).tolist() == [2, 2, 1, 1]


def test_quotas_with_tiny_and_empty_clusters_and_extreme_budgets():
    probabilities = np.array([0.4, 0.3, 0.2, 0.1])
    sizes = np.array([0, 1, 2, 50])
    for n_keep in range(0, 54):
        quotas = prune.water_fill_quotas(probabilities, sizes, n_keep)
        _check_quotas(quotas, probabilities, sizes, n_keep, prune.DEFAULT_RATIO)
        assert quotas[0] == 0
    assert prune.water_fill_quotas(probabilities, sizes, 0).tolist() == [0, 0, 0, 0]
    assert prune.water_fill_quotas(probabilities, sizes, 53).tolist() == [0, 1, 2, 50]  # everything kept
    assert prune.water_fill_quotas(np.zeros(0), np.zeros(0, dtype=np.int64), 0).shape == (0,)


def test_single_cluster_keeps_n_keep():
    assert prune.water_fill_quotas([1.0], [7], 4).tolist() == [4]


@pytest.mark.parametrize("n_keep", [-1, 21, 2.0, True])
def test_bad_n_keep_is_rejected(n_keep):
    with pytest.raises(ValueError, match="N_keep"):
        prune.water_fill_quotas([0.5, 0.5], [10, 10], n_keep)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, math.nan])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        prune.water_fill_quotas([0.5, 0.5], [10, 10], 4, ratio=ratio)


@pytest.mark.parametrize(
    ("probabilities", "sizes", "message"),
    [
        ([0.5, 0.6], [10, 10], "sum to 1"),
        ([1.5, -0.5], [10, 10], ">= 0"),
        ([1.0], [10, 10], "shape"),
        ([0.5, 0.5], [10, -1], ">= 0"),
        ([0.5, 0.5], [10.0, 1.5], "integers"),
    ],
)
def test_bad_probabilities_or_sizes_are_rejected(probabilities, sizes, message):
    with pytest.raises(ValueError, match=message):
        prune.water_fill_quotas(probabilities, sizes, 1)


# ---------------------------------------------------------------- N_keep from a fraction or a count


def test_keep_fraction_count():
    assert prune.keep_fraction_count(10, 0.35, None) == 4  # 3.5 rounds half up, as written
    assert prune.keep_fraction_count(10, 0.34, None) == 3
    assert prune.keep_fraction_count(1000, 0.277, None) == 277
    assert prune.keep_fraction_count(7, 0.0, None) == 0
    assert prune.keep_fraction_count(7, 1.0, None) == 7
    assert prune.keep_fraction_count(7, None, 5) == 5
    for fraction, count in [(None, None), (0.5, 3)]:
        with pytest.raises(ValueError, match="exactly one"):
            prune.keep_fraction_count(7, fraction, count)
    for fraction in [-0.1, 1.1, math.nan]:
        with pytest.raises(ValueError, match="keep_fraction"):
            prune.keep_fraction_count(7, fraction, None)
    for count in [-1, 8, 2.0]:
        with pytest.raises(ValueError, match="keep_count"):
            prune.keep_fraction_count(7, None, count)
    with pytest.raises(ValueError, match="rows"):
        prune.keep_fraction_count(-1, 0.5, None)


# ---------------------------------------------------------------- member selection

DISTANCES = np.array([0.30, 0.10, 0.30, 0.50, 0.10])
UIDS = ["e", "d", "a", "c", "b"]


def test_hard_keeps_the_farthest_with_ties_by_uid():
    keep, rank = prune.select_members(DISTANCES, UIDS, 3, "hard")
    # Order: c (0.5), then the 0.3 tie a < e, then the 0.1 tie b < d.
    assert rank.tolist() == [3, 5, 2, 1, 4]
    assert keep.tolist() == [True, False, True, True, False]
    assert rank.dtype == np.int64


def test_easy_keeps_the_nearest_with_ties_by_uid():
    keep, rank = prune.select_members(DISTANCES, UIDS, 2, "easy")
    assert rank.tolist() == [4, 2, 3, 5, 1]
    assert keep.tolist() == [False, True, False, False, True]


def test_random_keeps_the_smallest_draws_with_ties_by_uid():
    draws = np.array([0.9, 0.2, 0.2, 0.05, 0.7])
    keep, rank = prune.select_members(DISTANCES, UIDS, 2, "random", draws=draws)
    assert rank.tolist() == [5, 3, 2, 1, 4]
    assert keep.tolist() == [False, False, True, True, False]


@pytest.mark.parametrize("mode", prune.SELECTION_MODES)
def test_quota_zero_and_full_and_input_order_independence(mode):
    draws = np.array([0.9, 0.2, 0.2, 0.05, 0.7]) if mode == "random" else None
    keep, rank = prune.select_members(DISTANCES, UIDS, 0, mode, draws=draws)
    assert not keep.any() and sorted(rank.tolist()) == [1, 2, 3, 4, 5]
    keep, _ = prune.select_members(DISTANCES, UIDS, 5, mode, draws=draws)
    assert keep.all()
    permutation = [3, 0, 4, 2, 1]
    _, permuted_rank = prune.select_members(
        DISTANCES[permutation], [UIDS[i] for i in permutation], 2, mode, None if draws is None else draws[permutation]
    )
    assert permuted_rank.tolist() == rank[permutation].tolist()
    empty_keep, empty_rank = prune.select_members(np.zeros(0), [], 0, mode, None if draws is None else np.zeros(0))
    assert empty_keep.shape == empty_rank.shape == (0,)


def test_select_members_validation():
    with pytest.raises(ValueError, match="mode"):
        prune.select_members(DISTANCES, UIDS, 1, "hardest")
    with pytest.raises(ValueError, match="uids"):
        prune.select_members(DISTANCES, UIDS[:4], 1, "hard")
    with pytest.raises(ValueError, match="quota"):
        prune.select_members(DISTANCES, UIDS, 6, "hard")
    with pytest.raises(ValueError, match="quota"):
        prune.select_members(DISTANCES, UIDS, -1, "easy")
    with pytest.raises(ValueError, match="needs draws"):
        prune.select_members(DISTANCES, UIDS, 1, "random")
    with pytest.raises(ValueError, match="draws must have shape"):
        prune.select_members(DISTANCES, UIDS, 1, "random", draws=np.zeros(4))
    with pytest.raises(ValueError, match="only used"):
        prune.select_members(DISTANCES, UIDS, 1, "hard", draws=np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        prune.select_members(np.array([np.nan]), ["a"], 1, "hard")


# ---------------------------------------------------------------- the whole table


def test_pruning_table_columns_are_consistent():
    centroids = _circle([0, 10, 30, 100, 200])
    sizes = np.array([40, 0, 12, 30, 25])
    d_intra = np.array([0.2, np.nan, 0.4, 0.3, 0.1])  # an empty cluster has no mean distance
    table = prune.pruning_table(sizes, d_intra, centroids, 50, neighbours=2)
    assert list(table) == [
        "cluster",
        "size",
        "d_intra",
        "d_inter",
        "complexity",
        "probability",
        "lower_bound",
        "quota",
    ]
    assert table["cluster"].tolist() == [0, 1, 2, 3, 4]
    assert table["d_intra"][1] == 0.0
    np.testing.assert_allclose(table["d_inter"], prune.inter_cluster_distance(centroids, 2))
    np.testing.assert_allclose(table["complexity"], table["d_intra"] * table["d_inter"])
    np.testing.assert_allclose(table["probability"], prune.cluster_probabilities(table["complexity"]))
    assert table["lower_bound"].tolist() == [5, 0, 5, 5, 5]
    assert int(table["quota"].sum()) == 50 and table["quota"][1] == 0
    assert table["quota"].tolist() == prune.water_fill_quotas(table["probability"], sizes, 50).tolist()


def test_pruning_table_validation():
    with pytest.raises(ValueError, match="same clusters"):
        prune.pruning_table([3, 4], [0.1], _circle([0, 90]), 2)
    with pytest.raises(ValueError, match="finite"):
        prune.pruning_table([3, 4], [0.1, np.nan], _circle([0, 90]), 2)
