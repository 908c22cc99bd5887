import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ops import balance
from curation.ops.metaclip import Matcher
from curation.ops.uid import uniform


def _parts(lists):
    return balance.list_parts(pa.array(lists, pa.list_(pa.int32())))


def test_keep_probability_is_one_minus_product_of_one_minus_p():
    counts = np.array([10, 100, 1_000, 0])
    offsets, values = _parts([[0], [1], [1, 2], [], [0, 1, 2]])
    probabilities = balance.keep_probabilities(offsets, values, counts, t=50)
    expected = [1.0, 0.5, 1 - (1 - 0.5) * (1 - 0.05), 0.0, 1.0]
    assert probabilities == pytest.approx(expected)


def test_null_entry_lists_count_as_no_match():
    offsets, values = balance.list_parts(pa.array([None, [0]], pa.list_(pa.int32())))
    assert balance.keep_probabilities(offsets, values, np.array([4]), 2).tolist() == [0.0, 0.5]


def test_a_matched_entry_without_a_count_is_an_error():
    offsets, values = _parts([[1]])
    with pytest.raises(ValueError, match="count 0"):
        balance.keep_probabilities(offsets, values, np.array([5, 0]), 1)


def test_tail_share_and_threshold_for_tail_share():
    counts = np.array([1, 1, 2, 6, 10, 0])
    assert balance.tail_share(counts, 2) == pytest.approx(2 / 20)
    assert balance.tail_share(counts, 3) == pytest.approx(4 / 20)
    t = balance.threshold_for_tail_share(counts, 0.2)
    assert t == 3 and balance.tail_share(counts, t) >= 0.2 and balance.tail_share(counts, t - 1) < 0.2
    assert balance.threshold_for_tail_share(counts, 1.0) == 11
    with pytest.raises(ValueError):
        balance.threshold_for_tail_share(counts, 0)


def test_grid_refinement_solves_expected_kept_for_a_target():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, size=500).astype(np.int64)
    lists = [sorted(set(rng.integers(0, 500, size=rng.integers(1, 4)).tolist())) for _ in range(5_000)]
    offsets, values = _parts(lists)
    counts = np.bincount(values, minlength=500)
    grid = balance.initial_threshold_grid(counts, 64)
    for _ in range(12):
        expected = balance.expected_kept_for_thresholds(offsets, values, counts, grid)
        grid, answer = balance.refine_threshold_bracket(grid, expected, 1_234, 64)
        if answer is not None:
            break
    assert answer is not None
    assert balance.keep_probabilities(offsets, values, counts, answer).sum() == pytest.approx(1_234, abs=0.5)


def test_top_entries_orders_by_count_then_id():
    top = balance.top_entries(np.array([3, 7, 7, 0]), ["a", "b", "c", "d"], 3)
    assert [e["entry"] for e in top] == ["b", "c", "a"]


def test_balancing_on_real_captions_is_within_four_standard_deviations(shared_data):
    """MetaCLIP balancing on real alt-text: the kept count and each entry's kept count match their expectations."""
    table = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet")
    words = (shared_data / "wordnet30" / "wordnet30_lemma_names.txt").read_text().split("\n")
    entries = sorted({w for w in words if w})
    matched = Matcher.from_entries(entries).match(table["caption"])
    has_match = pa.compute.greater(pa.compute.list_value_length(matched), 0)
    uids = table["uid"].filter(has_match)
    offsets, values = balance.list_parts(matched.filter(has_match))
    counts = np.bincount(values, minlength=len(entries))
    t = 50.0
    probability = balance.keep_probabilities(offsets, values, counts, t)
    kept = uniform(3, uids, balance.BALANCE_PURPOSE) < probability

    expected, deviation = probability.sum(), np.sqrt((probability * (1 - probability)).sum())
    assert abs(kept.sum() - expected) <= 4 * deviation

    row_of_value = np.repeat(np.arange(len(probability)), np.diff(offsets))
    kept_per_entry = np.bincount(values, weights=kept[row_of_value], minlength=len(entries))
    expected_per_entry = np.bincount(values, weights=probability[row_of_value], minlength=len(entries))
    variance_per_entry = np.bincount(
        values, weights=(probability * (1 - probability))[row_of_value], minlength=len(entries)
    )
    tail = (counts > 0) & (counts < t)
    assert np.array_equal(kept_per_entry[tail], counts[tail]), "p_e = 1 for a tail entry: all its texts are kept"
    # The 4-sigma rule needs the normal approximation: entries whose kept count has a variance of at least 4.
    # Below that the count is a sum of a few skewed Bernoullis and 4-sigma excursions are common (measured with
    # numpy's RNG over 300 seeds: 0.6 false alarms per run with every head entry, 0.02 with variance >= 4).
    head = (counts >= t) & (variance_per_entry >= 4)
    assert head.sum() > 400, "the real captions should have hundreds of head entries above t"
    deviation_per_entry = np.abs(kept_per_entry - expected_per_entry)[head]
    assert np.all(deviation_per_entry <= 4 * np.sqrt(variance_per_entry[head]))
    assert balance.tail_share(kept_per_entry, t) > balance.tail_share(counts, t), "balancing should flatten the head"
