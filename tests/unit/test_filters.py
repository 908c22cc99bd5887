"""The filter stage's pure rules (curation.ops.filters): options, columns, each rule with its boundaries, ties and
missing values, the first-failing order, and every rule on real captions and real photo sizes."""

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from curation.ops.filters import (
    RULES,
    FilterOptions,
    TopCutoff,
    apply_filter,
    caption_repeat_counts,
    caption_word_counts,
    image_size_columns,
    rule_columns,
    top_cutoff,
    top_keep_count,
)
from curation.ops.uid import compute_uids, uniform
from curation.schema import Reason
from tests.imagekit import photos

# Every rule off but the one under test (max_caption_repeats is on by default).
OFF = {option: None for _, option in RULES}


def only(**options) -> FilterOptions:
    return FilterOptions(**{**OFF, **options})


def table(n: int | None = None, **columns) -> pa.Table:
    n = n if n is not None else len(next(iter(columns.values())))
    return pa.table({"uid": [f"{i:032x}" for i in range(n)], **columns})


def ledger(dropped: pa.Table) -> dict[str, tuple[str, dict]]:
    return {row["uid"]: (row["reason"], json.loads(row["detail"])) for row in dropped.to_pylist()}


def run(rows: pa.Table, options: FilterOptions, fraction_rows: int | None = None):
    """apply_filter over a whole in-memory input: the global parts computed over all of `rows`."""
    cutoff = None
    if options.clip_score_top_fraction is not None:
        cutoff = top_cutoff(rows["clip_score"], rows["uid"], options.clip_score_top_fraction, fraction_rows)
    repeats = caption_repeat_counts(rows["caption"]) if options.max_caption_repeats is not None else None
    return apply_filter(rows, options, top_cutoff=cutoff, caption_repeats=repeats)


# ---------------------------------------------------------------------------------------------------- options


def test_every_rule_off_is_an_error_naming_the_options():
    with pytest.raises(ValueError, match="every rule off.*min_clip_score.*max_caption_repeats"):
        FilterOptions(max_caption_repeats=None)
    with pytest.raises(ValueError, match="every rule off"):
        FilterOptions.from_options({**OFF, "partitions": 4})


def test_defaults_turn_on_only_the_boilerplate_rule():
    assert FilterOptions().active_rules() == [Reason.BOILERPLATE_CAPTION]
    assert FilterOptions().max_caption_repeats == 1000
    options = FilterOptions.from_options({"min_clip_score": 0.28, "max_caption_repeats": None, "partitions": 3})
    assert options.active_rules() == [Reason.LOW_CLIP_SCORE]


@pytest.mark.parametrize("option, value", [
    ("clip_score_top_fraction", 0), ("clip_score_top_fraction", 1.5), ("clip_score_top_fraction", -0.1),
    ("clip_score_top_fraction", float("nan")), ("min_clip_score", float("inf")), ("min_clip_score", "0.3"),
    ("min_image_side", 0), ("min_image_side", -5), ("min_image_side", 199.5), ("min_image_side", True),
    ("max_aspect_ratio", 0.5), ("max_aspect_ratio", 0), ("max_aspect_ratio", float("inf")),
    ("min_caption_words", 0), ("max_caption_words", 0), ("max_caption_repeats", 0), ("max_caption_repeats", 2.5),
])
def test_a_bad_option_is_an_error_naming_it(option, value):
    with pytest.raises(ValueError, match=option):
        FilterOptions(**{option: value})


def test_min_caption_words_above_max_is_an_error():
    with pytest.raises(ValueError, match="min_caption_words \\(5\\) is above max_caption_words \\(4\\)"):
        FilterOptions(min_caption_words=5, max_caption_words=4)
    assert FilterOptions(min_caption_words=4, max_caption_words=4).min_caption_words == 4


def test_options_are_normalised():
    options = FilterOptions(min_clip_score=0, min_image_side=200.0, max_aspect_ratio=3, clip_score_top_fraction=1)
    assert (options.min_clip_score, options.min_image_side, options.max_aspect_ratio) == (0.0, 200, 3.0)
    assert isinstance(options.min_image_side, int) and options.clip_score_top_fraction == 1.0


# ---------------------------------------------------------------------------------------------------- columns


def test_a_rule_without_its_columns_is_an_error_naming_the_rule_and_the_columns_present():
    with pytest.raises(ValueError, match=r"low_clip_score needs the column clip_score.*\['caption', 'uid'\]"):
        rule_columns(only(min_clip_score=0.2), ["uid", "caption"])
    with pytest.raises(ValueError, match=r"clip_score_not_top needs the column clip_score"):
        rule_columns(only(clip_score_top_fraction=0.3), ["uid", "caption"])
    with pytest.raises(ValueError, match=r"image_too_small needs the image size columns "
                                         r"image_original_width/image_original_height or image_width/image_height"):
        rule_columns(only(min_image_side=200), ["uid", "caption", "image_width"])
    with pytest.raises(ValueError, match=r"extreme_aspect_ratio needs"):
        rule_columns(only(max_aspect_ratio=3), ["uid", "image_original_width"])
    with pytest.raises(ValueError, match=r"too_few_caption_words needs the column caption"):
        rule_columns(only(min_caption_words=3), ["uid"])
    with pytest.raises(ValueError, match=r"boilerplate_caption needs the column caption"):
        rule_columns(FilterOptions(), ["uid"])
    # and apply_filter checks the same before anything else
    with pytest.raises(ValueError, match="low_clip_score"):
        apply_filter(table(caption=["a b c"]), only(min_clip_score=0.2))


def test_image_rules_prefer_the_original_size_and_fall_back_to_the_decoded_size():
    both = ["image_width", "image_height", "image_original_width", "image_original_height"]
    assert image_size_columns(both) == ("image_original_width", "image_original_height")
    assert image_size_columns(["image_width", "image_height"]) == ("image_width", "image_height")
    assert image_size_columns(["image_width", "image_original_height"]) is None
    options = only(min_image_side=200, max_aspect_ratio=3, min_caption_words=1)
    columns = rule_columns(options, ["uid", "caption", *both])
    assert columns == {Reason.IMAGE_TOO_SMALL: ("image_original_width", "image_original_height"),
                       Reason.EXTREME_ASPECT_RATIO: ("image_original_width", "image_original_height"),
                       Reason.TOO_FEW_CAPTION_WORDS: ("caption",)}
    # after a resizing download: the 256-pixel thumbnail is not what the rule is about
    rows = table(image_width=pa.array([256, 256], pa.int32()), image_height=pa.array([256, 171], pa.int32()),
                 image_original_width=pa.array([150, 1200], pa.int32()),
                 image_original_height=pa.array([900, 800], pa.int32()))
    kept, dropped = apply_filter(rows, only(min_image_side=200))
    assert kept["uid"].to_pylist() == [f"{1:032x}"]
    assert ledger(dropped)[f"{0:032x}"] == (Reason.IMAGE_TOO_SMALL,
                                            {"width": 150, "height": 900, "shorter_side": 150, "min": 200})
    # rows that carry only the decoded size (dedup_image over image bytes)
    rows = table(image_width=pa.array([150, 1200], pa.int32()), image_height=pa.array([900, 800], pa.int32()))
    assert ledger(apply_filter(rows, only(min_image_side=200))[1]) == ledger(dropped)


# ---------------------------------------------------------------------------------------------------- clip score


def test_low_clip_score_boundary_and_missing_values():
    scores = pa.array([0.21, 0.28, 0.2799, 0.35, None, float("nan")], pa.float32())
    kept, dropped = apply_filter(table(clip_score=scores), only(min_clip_score=0.28))
    # float32(0.28) = 0.2800000011920929 >= 0.28: a score equal to the threshold as written is kept
    assert kept["uid"].to_pylist() == [f"{1:032x}", f"{3:032x}"]
    assert ledger(dropped) == {
        f"{0:032x}": (Reason.LOW_CLIP_SCORE, {"clip_score": 0.21, "min": 0.28}),
        f"{2:032x}": (Reason.LOW_CLIP_SCORE, {"clip_score": 0.2799, "min": 0.28}),
        f"{4:032x}": (Reason.LOW_CLIP_SCORE, {"clip_score": None, "min": 0.28, "missing": True}),
        f"{5:032x}": (Reason.LOW_CLIP_SCORE, {"clip_score": None, "min": 0.28, "missing": True}),
    }


def test_float64_scores_are_compared_and_shown_as_they_are():
    rows = table(clip_score=pa.array([0.27999999, 0.28], pa.float64()))
    kept, dropped = apply_filter(rows, only(min_clip_score=0.28))
    assert ledger(dropped) == {f"{0:032x}": (Reason.LOW_CLIP_SCORE, {"clip_score": 0.27999999, "min": 0.28})}


def test_top_keep_count_is_a_ceiling_of_the_fraction_as_written():
    assert top_keep_count(0.3, 10) == 3  # not 4 through 0.30000000000000004
    assert top_keep_count(0.3, 11) == 4
    assert top_keep_count(0.3, 1) == 1
    assert top_keep_count(1.0, 7) == 7
    assert top_keep_count(0.3, 0) == 0
    assert top_keep_count(1e-9, 10**6) == 1


def test_clip_score_top_ties_are_broken_by_the_smaller_uid():
    # uids 0..9; scores with a tie of four at 0.5 across the cut of ceil(0.5 * 10) = 5
    scores = [0.9, 0.5, 0.1, 0.5, 0.7, 0.5, 0.2, 0.5, 0.3, 0.6]
    rows = table(clip_score=pa.array(scores, pa.float32()))
    cutoff = top_cutoff(rows["clip_score"], rows["uid"], 0.5)
    assert (cutoff.keep_count, cutoff.score, cutoff.uid) == (5, 0.5, f"{3:032x}")
    kept, dropped = apply_filter(rows, only(clip_score_top_fraction=0.5), top_cutoff=cutoff)
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [0, 1, 3, 4, 9]
    reason, detail = ledger(dropped)[f"{5:032x}"]
    assert reason == Reason.CLIP_SCORE_NOT_TOP
    assert detail == {"clip_score": 0.5, "top_fraction": 0.5, "keep_count": 5, "cutoff_score": 0.5,
                      "cutoff_uid": f"{3:032x}"}
    assert len(dropped) == 5


def test_clip_score_top_counts_every_input_row_and_never_ranks_a_missing_score():
    scores = pa.array([0.4, None, 0.3, float("nan"), 0.2, 0.1], pa.float32())
    rows = table(clip_score=scores)
    # ceil(0.5 * 6) = 3 rows: the missing scores count in N but rank last
    kept, dropped = apply_filter(rows, only(clip_score_top_fraction=0.5),
                                 top_cutoff=top_cutoff(rows["clip_score"], rows["uid"], 0.5))
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [0, 2, 4]
    # a fraction reaching past the rows with a score keeps them all, and still drops the missing ones
    cutoff = top_cutoff(rows["clip_score"], rows["uid"], 0.9)
    assert cutoff == TopCutoff(0.9, 6, 6)
    kept, dropped = apply_filter(rows, only(clip_score_top_fraction=0.9), top_cutoff=cutoff)
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [0, 2, 4, 5]
    assert ledger(dropped)[f"{1:032x}"] == (Reason.CLIP_SCORE_NOT_TOP, {
        "clip_score": None, "missing": True, "top_fraction": 0.9, "keep_count": 6, "cutoff_score": None,
        "cutoff_uid": None})


def test_clip_score_top_needs_the_whole_inputs_cutoff():
    with pytest.raises(ValueError, match="clip_score_not_top needs the TopCutoff"):
        apply_filter(table(clip_score=[0.3]), only(clip_score_top_fraction=0.3))


# ---------------------------------------------------------------------------------------------------- image size


def sizes(pairs) -> dict:
    return {"image_original_width": pa.array([w for w, _ in pairs], pa.int32()),
            "image_original_height": pa.array([h for _, h in pairs], pa.int32())}


def test_image_too_small_boundary_orientation_and_missing_sizes():
    pairs = [(200, 200), (199, 1000), (1000, 199), (200, 3000), (None, 500), (500, None)]
    kept, dropped = apply_filter(table(**sizes(pairs)), only(min_image_side=200))
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [0, 3]
    assert ledger(dropped) == {
        f"{1:032x}": (Reason.IMAGE_TOO_SMALL, {"width": 199, "height": 1000, "shorter_side": 199, "min": 200}),
        f"{2:032x}": (Reason.IMAGE_TOO_SMALL, {"width": 1000, "height": 199, "shorter_side": 199, "min": 200}),
        f"{4:032x}": (Reason.IMAGE_TOO_SMALL, {"width": None, "height": 500, "shorter_side": None, "min": 200,
                                               "missing": True}),
        f"{5:032x}": (Reason.IMAGE_TOO_SMALL, {"width": 500, "height": None, "shorter_side": None, "min": 200,
                                               "missing": True}),
    }


def test_extreme_aspect_ratio_boundary_orientation_and_degenerate_sizes():
    pairs = [(600, 200), (601, 200), (200, 601), (100, 100), (0, 100), (None, 10), (1, 3)]
    kept, dropped = apply_filter(table(**sizes(pairs)), only(max_aspect_ratio=3))
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [0, 3, 6]
    found = ledger(dropped)
    assert found[f"{1:032x}"] == (Reason.EXTREME_ASPECT_RATIO,
                                  {"width": 601, "height": 200, "aspect_ratio": 3.005, "max": 3.0})
    assert found[f"{2:032x}"][1]["aspect_ratio"] == 3.005
    assert found[f"{4:032x}"] == (Reason.EXTREME_ASPECT_RATIO,
                                  {"width": 0, "height": 100, "aspect_ratio": None, "max": 3.0})
    assert found[f"{5:032x}"][1] == {"width": None, "height": 10, "aspect_ratio": None, "max": 3.0, "missing": True}
    # a non-integral limit is compared exactly
    kept, _ = apply_filter(table(**sizes([(250, 100), (251, 100)])), only(max_aspect_ratio=2.5))
    assert kept["uid"].to_pylist() == [f"{0:032x}"]


# ---------------------------------------------------------------------------------------------------- words


def test_words_are_the_tokens_of_str_split_for_every_unicode_whitespace_character():
    characters = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"a{c}b" for c in characters]
    counts = caption_word_counts(pa.array(texts)).to_numpy()
    expected = np.array([len(text.split()) for text in texts])
    differing = [hex(ord(characters[i])) for i in np.flatnonzero(counts != expected)]
    assert not differing


def test_words_on_real_captions_including_the_edge_cases(shared_data):
    captions = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet", columns=["caption"])
    captions = captions.column("caption")
    counts = caption_word_counts(captions).to_pylist()
    assert counts == [None if c is None else len(c.split()) for c in captions.to_pylist()]
    assert caption_word_counts(pa.array(["", "   ", "\t\n", None, "one", " a  b\u3000c\xa0d "])).to_pylist() == \
        [0, 0, 0, None, 1, 4]


def test_caption_word_limits_boundaries_and_a_missing_caption():
    captions = ["two words", "now three words", "a caption of five words", "one two three four five six", None]
    options = only(min_caption_words=3, max_caption_words=5)
    kept, dropped = apply_filter(table(caption=captions), options)
    assert sorted(int(u, 16) for u in kept["uid"].to_pylist()) == [1, 2]
    assert ledger(dropped) == {
        f"{0:032x}": (Reason.TOO_FEW_CAPTION_WORDS, {"words": 2, "min": 3}),
        f"{3:032x}": (Reason.TOO_MANY_CAPTION_WORDS, {"words": 6, "max": 5}),
        f"{4:032x}": (Reason.TOO_FEW_CAPTION_WORDS, {"words": None, "min": 3, "missing": True}),
    }
    kept, dropped = apply_filter(table(caption=captions), only(max_caption_words=5))
    assert ledger(dropped)[f"{4:032x}"] == (Reason.TOO_MANY_CAPTION_WORDS, {"words": None, "max": 5, "missing": True})


# ---------------------------------------------------------------------------------------------------- boilerplate


def test_caption_repeat_counts():
    counts = caption_repeat_counts(pa.chunked_array([["x", "y", None], ["x", "x", "X"]]))
    assert counts.to_pylist() == [3, 1, None, 3, 3, 1]


def test_boilerplate_drops_every_row_of_a_caption_shared_by_more_than_the_limit():
    captions = ["stock photo"] * 4 + ["image may contain"] * 3 + ["Stock photo", "a unique one", None, None, None]
    kept, dropped = run(table(caption=captions), only(max_caption_repeats=3))
    assert kept["caption"].to_pylist() == ["image may contain"] * 3 + ["Stock photo", "a unique one", None, None,
                                                                       None]
    assert ledger(dropped) == {f"{i:032x}": (Reason.BOILERPLATE_CAPTION, {"repeats": 4, "max": 3})
                               for i in range(4)}
    with pytest.raises(ValueError, match="boilerplate_caption needs each row's caption count"):
        apply_filter(table(caption=captions), only(max_caption_repeats=3))


# ---------------------------------------------------------------------------------------------------- order


ALL_RULES = FilterOptions(min_clip_score=0.2, clip_score_top_fraction=0.5, min_image_side=200, max_aspect_ratio=3,
                          min_caption_words=2, max_caption_words=6, max_caption_repeats=2)


def test_the_first_failing_rule_in_order_gives_the_reason():
    # every row fails every rule from one position on, so its reason must be that position's rule
    good = {"clip_score": 0.9, "size": (400, 300), "caption": "a fine caption"}
    failing = [
        {"clip_score": 0.1},                                        # and everything below
        {"clip_score": 0.3},                                        # not in the top half, ...
        {"size": (150, 900)},                                       # too small and extreme
        {"size": (1300, 400)},                                      # extreme
        {"caption": "x"},                                           # one word; repeated below
        {"caption": "one two three four five six seven"},
        {"caption": "repeated caption"},
    ]
    rows = [{**good, **change} for change in failing]
    rows[0].update(size=(10, 100), caption="x")
    rows[2].update(caption="x")
    rows += [{**good, "caption": "repeated caption"}] * 2
    uids = compute_uids(pa.array([f"https://example.com/{i}" for i in range(len(rows))]),
                        pa.array([r["caption"] for r in rows]))
    data = pa.table({"uid": uids, "caption": [r["caption"] for r in rows],
                     "clip_score": pa.array([r["clip_score"] for r in rows], pa.float32()),
                     **sizes([r["size"] for r in rows])})
    # the top ceil(0.75 * 9) = 7 rows by clip_score are all but the two lowest
    kept, dropped = run(data, replace(ALL_RULES, clip_score_top_fraction=0.75))
    found = ledger(dropped)
    reasons = [found.get(uid, (None,))[0] for uid in uids.to_pylist()]
    assert reasons == [reason for reason, _ in RULES] + [Reason.BOILERPLATE_CAPTION] * 2
    assert len(kept) == 0 and len(dropped) == len(data)
    assert set(kept["uid"].to_pylist()).isdisjoint(found)


def _random_rows(draw_seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(draw_seed)
    words = ["a", "cat", "on", "the", "mat", "photo", "of"]
    captions = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(n)]
    captions = [c if rng.random() > 0.3 else "same old caption" for c in captions]
    scores = np.round(rng.uniform(0, 0.5, n), 1).astype(np.float32)  # many ties
    uids = compute_uids(pa.array([f"https://example.com/{i}" for i in range(n)]), pa.array(captions))
    return pa.table({"uid": uids, "caption": captions,
                     "clip_score": pa.array(scores, pa.float32(), mask=rng.random(n) < 0.05),
                     **sizes([(int(w), int(h)) for w, h in rng.integers(50, 800, size=(n, 2))])})


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_splitting_the_input_does_not_change_the_outcome_given_the_whole_inputs_global_parts(seed, n, cuts):
    rows = _random_rows(seed, n)
    kept, dropped = run(rows, ALL_RULES)
    cutoff = top_cutoff(rows["clip_score"], rows["uid"], ALL_RULES.clip_score_top_fraction)
    repeats = caption_repeat_counts(rows["caption"])
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    parts = [apply_filter(rows.slice(a, b - a), ALL_RULES, top_cutoff=cutoff, caption_repeats=repeats[a:b])
             for a, b in zip(bounds, bounds[1:], strict=False)]
    assert pa.concat_tables([k for k, _ in parts]).equals(kept)
    assert pa.concat_tables([d for _, d in parts]).equals(dropped)
    assert len(kept) + len(dropped) == n
    assert sorted(kept["uid"].to_pylist() + dropped["uid"].to_pylist()) == sorted(rows["uid"].to_pylist())


def test_an_empty_table_passes():
    rows = _random_rows(0, 5).slice(0, 0)
    kept, dropped = run(rows, ALL_RULES)
    assert len(kept) == 0 and len(dropped) == 0 and dropped.column_names == ["uid", "reason", "detail"]


# ---------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_rows(shared_data) -> pa.Table:
    """3,000 real captions (CC3M, COCO, web alt-text and the edge cases) with real photo sizes and a synthetic
    clip_score (no CLIP weights offline)."""
    mixed = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet", columns=["url", "caption"])
    picked = mixed.take(pa.array(np.linspace(0, len(mixed) - 1, 3000).astype(np.int64)))
    # the most repeated real captions, all their rows
    common = pc.value_counts(mixed["caption"]).to_pylist()
    common = [c["values"] for c in sorted(common, key=lambda c: -c["counts"])[:3]]
    picked = pa.concat_tables([picked, mixed.filter(pc.is_in(mixed["caption"], pa.array(common)))])
    uids = compute_uids(picked["url"].combine_chunks(), picked["caption"].combine_chunks())
    first = np.unique(uids.to_numpy(zero_copy_only=False), return_index=True)[1]
    picked, uids = picked.take(pa.array(np.sort(first))), uids.take(pa.array(np.sort(first)))
    real_sizes = [image.size for image in photos(40)]
    which = (uniform(1, uids, "test_size") * len(real_sizes)).astype(np.int64)
    score = np.round(0.1 + 0.3 * uniform(1, uids, "test_clip_score"), 2).astype(np.float32)
    return pa.table({"uid": uids, "caption": picked["caption"], "clip_score": pa.array(score, pa.float32()),
                     **sizes([real_sizes[i] for i in which])})


def _expected_detail(row: dict, reason: str, options: FilterOptions) -> dict | None:
    """An independent plain-Python reading of each rule for one row: its detail if it fails, else None."""
    w, h = row["image_original_width"], row["image_original_height"]
    words = len(row["caption"].split())
    if reason == Reason.LOW_CLIP_SCORE and row["clip_score"] < options.min_clip_score:
        return {"clip_score": round(row["clip_score"], 2), "min": options.min_clip_score}
    if reason == Reason.IMAGE_TOO_SMALL and min(w, h) < options.min_image_side:
        return {"width": w, "height": h, "shorter_side": min(w, h), "min": options.min_image_side}
    if reason == Reason.EXTREME_ASPECT_RATIO and max(w, h) / min(w, h) > options.max_aspect_ratio:
        return {"width": w, "height": h, "aspect_ratio": round(max(w, h) / min(w, h), 6),
                "max": options.max_aspect_ratio}
    if reason == Reason.TOO_FEW_CAPTION_WORDS and words < options.min_caption_words:
        return {"words": words, "min": options.min_caption_words}
    if reason == Reason.TOO_MANY_CAPTION_WORDS and words > options.max_caption_words:
        return {"words": words, "max": options.max_caption_words}
    return None


@pytest.mark.parametrize("reason, option, value", [
    (Reason.LOW_CLIP_SCORE, "min_clip_score", 0.2),
    (Reason.IMAGE_TOO_SMALL, "min_image_side", 200),
    (Reason.EXTREME_ASPECT_RATIO, "max_aspect_ratio", 3),
    (Reason.TOO_FEW_CAPTION_WORDS, "min_caption_words", 3),
    (Reason.TOO_MANY_CAPTION_WORDS, "max_caption_words", 20),
])
def test_each_row_rule_on_real_captions_and_photo_sizes(real_rows, reason, option, value):
    options = only(**{option: value})
    kept, dropped = run(real_rows, options)
    found = ledger(dropped)
    assert 0 < len(found) < len(real_rows)
    for row in real_rows.to_pylist():
        expected = _expected_detail(row, reason, options)
        if expected is None:
            assert row["uid"] not in found
        else:
            assert found[row["uid"]] == (reason, expected)
    assert len(kept) + len(dropped) == len(real_rows)


def test_real_photo_sizes_meet_the_align_rules(shared_data):
    # photos_img2dataset names its test crops WIDTH_HEIGHT: the decoded sizes say the same
    folder = shared_data / "photos_img2dataset"
    from PIL import Image

    decoded = {p.stem: Image.open(p).size for p in sorted(folder.glob("*.jpg"))}
    assert all(decoded[name] == tuple(int(v) for v in name.split("_")) for name in decoded)
    rows = table(**sizes(list(decoded.values())))
    kept, dropped = apply_filter(rows, only(min_image_side=200, max_aspect_ratio=3))
    by_name = dict(zip(rows["uid"].to_pylist(), decoded, strict=True))
    reasons = {by_name[uid]: reason for uid, (reason, _) in ledger(dropped).items()}
    # 123x456 and 456x123 fail on size first (and are 3.7:1 too); the rest are ALIGN-sized and <= 3:1
    assert reasons == {"123_456": Reason.IMAGE_TOO_SMALL, "456_123": Reason.IMAGE_TOO_SMALL}
    kept, dropped = apply_filter(rows, only(max_aspect_ratio=3))
    assert {by_name[uid]: detail["aspect_ratio"] for uid, (_, detail) in ledger(dropped).items()} == \
        {"123_456": round(456 / 123, 6), "456_123": round(456 / 123, 6)}


def test_clip_score_top_on_real_rows(real_rows):
    options = only(clip_score_top_fraction=0.3)
    kept, dropped = run(real_rows, options)
    assert len(kept) == math.ceil(0.3 * len(real_rows))
    order = sorted(real_rows.to_pylist(), key=lambda r: (-r["clip_score"], r["uid"]))
    assert set(kept["uid"].to_pylist()) == {r["uid"] for r in order[: len(kept)]}
    assert {reason for reason, _ in ledger(dropped).values()} == {Reason.CLIP_SCORE_NOT_TOP}


def test_boilerplate_on_real_captions(real_rows):
    counts = {}
    for caption in real_rows["caption"].to_pylist():
        counts[caption] = counts.get(caption, 0) + 1
    limit = 12
    boilerplate = {c for c, n in counts.items() if n > limit}
    assert "digital art selected for the #" in boilerplate
    kept, dropped = run(real_rows, only(max_caption_repeats=limit))
    found = ledger(dropped)
    for row in real_rows.to_pylist():
        if row["caption"] in boilerplate:
            assert found[row["uid"]] == (Reason.BOILERPLATE_CAPTION, {"repeats": counts[row["caption"]],
                                                                      "max": limit})
        else:
            assert row["uid"] not in found


def test_every_rule_at_once_on_real_rows(real_rows):
    # ALIGN's 3:1 would meet only the 123x456 photos, which are too small first; 208x495 is 2.38:1
    options = FilterOptions(min_clip_score=0.15, clip_score_top_fraction=0.8, min_image_side=200,
                            max_aspect_ratio=2.2, min_caption_words=3, max_caption_words=20, max_caption_repeats=12)
    kept, dropped = run(real_rows, options)
    reasons = pc.value_counts(dropped["reason"]).to_pylist()
    assert {r["values"] for r in reasons} == {reason for reason, _ in RULES}
    assert len(kept) + len(dropped) == len(real_rows)
    assert set(kept["uid"].to_pylist()).isdisjoint(dropped["uid"].to_pylist())
