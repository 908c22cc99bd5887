"""Logo bank and flagging on embeddings (curation.ops.logos)."""

import numpy as np
import pytest

from curation.ops.logos import bank_size, collapse_near_duplicates, logo_scores, match_logos


def _unit(matrix):
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_logo_score_is_best_logo_prompt_minus_best_contrast_prompt():
    images = _unit([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    logo_prompts = _unit([[1, 0, 0], [0, 0, 1]])
    contrast = _unit([[0, 1, 0]])
    scores = logo_scores(images, logo_prompts, contrast)
    np.testing.assert_allclose(scores, [1.0, -1.0, 0.0], atol=1e-6)


def test_bank_size_is_the_top_q_capped():
    assert bank_size(1000, 0.01, 10_000) == 10
    assert bank_size(1001, 0.01, 10_000) == 11
    assert bank_size(10**9, 0.01, 10_000) == 10_000
    assert bank_size(5, 1.0, 100) == 5
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            bank_size(10, bad, 10)


def test_near_duplicates_join_the_earliest_close_entry():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(3, 16)))
    copies = _unit(base[[0, 0, 2]] + rng.normal(scale=0.01, size=(3, 16)))
    candidates = np.vstack([base[0], copies[0], base[1], copies[1], base[2], copies[2]])
    assert collapse_near_duplicates(candidates, 0.95).tolist() == [0, 0, 2, 0, 4, 4]
    assert collapse_near_duplicates(candidates, 1.01).tolist() == list(range(6))
    assert collapse_near_duplicates(np.empty((0, 16), np.float32), 0.9).tolist() == []


def test_match_logos_takes_the_closest_logo_above_the_threshold():
    logos = _unit([[1, 0, 0], [0, 1, 0]])
    images = _unit([[1, 0.1, 0], [0.1, 1, 0], [0, 0, 1], [1, 1, 0]])
    best, similarity = match_logos(images, logos, 0.9)
    assert best.tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(similarity[:2], [0.995037] * 2, atol=1e-5)
    none, _ = match_logos(images, np.empty((0, 3), np.float32), 0.9)
    assert none.tolist() == [-1] * 4


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError):
        logo_scores(np.zeros((2, 3), np.float32), _unit([[1, 0, 0]]), _unit([[0, 1, 0]]))
    with pytest.raises(ValueError):
        logo_scores(_unit([[1, 0, 0]]), _unit([[1, 0]]), _unit([[0, 1, 0]]))
