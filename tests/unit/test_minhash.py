import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops import minhash
from curation.ops.jaccard import exact_jaccard, exact_jaccard_pairs
from curation.ops.lsh import anchor_edges, band_hashes, candidate_probability, choose_bands
from curation.ops.minhash import EMPTY_HASH_VALUE, MinHasher
from curation.ops.shingles import parse_shingle_spec, shingle_texts
from curation.ops.survivors import KeepPolicy, parse_policy, select_survivors

EDGE_TEXTS = [
    "A dog on a beach",
    "a  DOG\ton a\nbeach ",
    "",
    None,
    "   \t\n ",
    "dog",
    "hi",
    "ab cd",
    "héllo wörld ÄÖÜ",
    "İstanbul ΣΟΦΊΑ straße",
    "東京の夜景 写真",
    "🐶🐱 emoji 🐶🐱 dog",
    "\xa0dog\xa0cat\u2003bird",
    "aaaaaaaaaaaaaaaaaaaa",
    "the the the the the the",
    "x" * 3000,
]


def datasketch_signatures(shingle_lists, num_perm=128, seed=1, scheme="affine32"):
    encoded = [
        [shingle if isinstance(shingle, bytes) else shingle.encode("utf-8") for shingle in shingles]
        for shingles in shingle_lists
    ]
    sketches = MinHash.bulk(encoded, num_perm=num_perm, seed=seed, scheme=scheme)
    return np.array([sketch.hashvalues for sketch in sketches], dtype=np.uint64).reshape(len(encoded), num_perm)


@pytest.fixture(scope="module")
def cc3m_captions(shared_data):
    return pq.read_table(shared_data / "captions_cc3m" / "cc3m_validation.parquet", columns=["caption"]).column(
        "caption"
    )


# ------------------------------------------------------------------------------------------------
# Shingles


@pytest.mark.parametrize(
    ("spec", "expected"), [("char:5", ("char", 5)), ("word:3", ("word", 3)), (" char:1 ", ("char", 1))]
)
def test_parse_shingle_spec(spec, expected):
    assert parse_shingle_spec(spec) == expected


@pytest.mark.parametrize("spec", ["char", "char:0", "char:-1", "byte:5", "word:x", "word:3.5", ":5", ""])
def test_parse_shingle_spec_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="bad shingle spec"):
        parse_shingle_spec(spec)


def test_char_shingles_normalise_case_and_whitespace():
    assert shingle_texts(["  Hot \t DOG\n"], "char", 5) == [["hot d", "ot do", "t dog"]]


def test_word_shingles_join_words_with_one_space():
    assert shingle_texts(["A dog  on a\tbeach"], "word", 2) == [["a dog", "dog on", "on a", "a beach"]]


def test_shingles_are_distinct_in_first_appearance_order():
    assert shingle_texts(["abab ab"], "char", 2) == [["ab", "ba", "b ", " a"]]


def test_short_text_is_one_shingle_and_empty_text_has_none():
    assert shingle_texts(["Dog", "hot dog", "", None, " \n "], "char", 5) == [
        ["dog"],
        ["hot d", "ot do", "t dog"],
        [],
        [],
        [],
    ]
    assert shingle_texts(["hot  Dog"], "word", 3) == [["hot dog"]]


def test_shingle_texts_accepts_arrow_arrays():
    texts = ["a dog", None, "Cat"]
    expected = shingle_texts(texts, "char", 3)
    assert shingle_texts(pa.array(texts), "char", 3) == expected
    assert shingle_texts(pa.chunked_array([texts[:1], texts[1:]], type=pa.large_string()), "char", 3) == expected


def test_shingle_texts_rejects_bad_kind_or_size():
    with pytest.raises(ValueError, match="kind"):
        shingle_texts(["x"], "byte", 5)
    with pytest.raises(ValueError, match="size"):
        shingle_texts(["x"], "char", 0)


# ------------------------------------------------------------------------------------------------
# MinHash signatures equal datasketch's


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize(
    ("kind", "size"), [("char", 5), ("char", 1), ("char", 3), ("word", 1), ("word", 2), ("word", 4)]
)
def test_signatures_equal_datasketch_on_edge_texts(kind, size, scheme):
    hasher = MinHasher(num_perm=64, seed=7, kind=kind, size=size, scheme=scheme)
    expected = datasketch_signatures(shingle_texts(EDGE_TEXTS, kind, size), num_perm=64, seed=7, scheme=scheme)
    np.testing.assert_array_equal(hasher.signatures(EDGE_TEXTS), expected)
    np.testing.assert_array_equal(hasher.signatures(pa.array(EDGE_TEXTS, type=pa.large_string())), expected)


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_equal_datasketch_on_real_captions(shared_data, scheme):
    mixed = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet", columns=["caption"])
    captions = mixed.column("caption")
    # Ordinary captions from each source plus all 393 edge-case captions (unicode, emoji, CJK,
    # whitespace runs, empty, a 10,000-character caption).
    texts = pa.concat_arrays(
        [captions.slice(start, 300).combine_chunks() for start in (0, 15_833, 40_847)]
        + [captions.slice(50_847).combine_chunks()]
    )
    for kind, size in [("char", 5), ("word", 3)]:
        hasher = MinHasher(kind=kind, size=size, scheme=scheme)
        expected = datasketch_signatures(shingle_texts(texts, kind, size), scheme=scheme)
        np.testing.assert_array_equal(hasher.signatures(texts), expected)


def test_default_matches_plain_datasketch_minhash():
    # datasketch >= 2.0: MinHash(num_perm, seed) uses the affine32 scheme, which is our default.
    sketch = MinHash(num_perm=128, seed=1)
    sketch.update_batch([shingle.encode("utf-8") for shingle in shingle_texts(["a dog on a beach"])[0]])
    np.testing.assert_array_equal(MinHasher().signatures(["a dog on a beach"])[0], sketch.hashvalues)


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_from_shingle_lists_equal_datasketch(scheme):
    shingle_lists = [["a", "b", "c"], [], None, ["ü", "a", "a"], ["東京", "x" * 100]]
    expected = datasketch_signatures([shingles or [] for shingles in shingle_lists], scheme=scheme)
    hasher = MinHasher(scheme=scheme)
    np.testing.assert_array_equal(hasher.signatures(shingle_lists), expected)
    np.testing.assert_array_equal(hasher.signatures([set(s) if s else s for s in shingle_lists]), expected)
    np.testing.assert_array_equal(hasher.signatures(pa.array(shingle_lists, type=pa.list_(pa.string()))), expected)
    as_bytes = [
        [shingle.encode("utf-8") for shingle in shingles] if shingles else shingles for shingles in shingle_lists
    ]
    np.testing.assert_array_equal(hasher.signatures(as_bytes), expected)


def test_text_and_shingle_list_inputs_agree(cc3m_captions):
    texts = cc3m_captions.slice(0, 500)
    hasher = MinHasher(kind="word", size=2)
    np.testing.assert_array_equal(hasher.signatures(texts), hasher.signatures(shingle_texts(texts, "word", 2)))


def test_texts_without_shingles_get_the_empty_signature():
    signatures = MinHasher(num_perm=16).signatures(["", None, " \t\n", "dog"])
    assert signatures.dtype == np.uint64 and signatures.shape == (4, 16)
    assert (signatures[:3] == EMPTY_HASH_VALUE).all()
    assert not (signatures[3] == EMPTY_HASH_VALUE).all()
    assert MinHasher(num_perm=16).signatures([]).shape == (0, 16)
    assert MinHasher(num_perm=16).signatures(pa.array([], type=pa.string())).shape == (0, 16)
    assert (MinHasher(num_perm=16).signatures([[], None]) == EMPTY_HASH_VALUE).all()


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_block_boundaries_and_long_texts_do_not_change_signatures(monkeypatch, cc3m_captions, scheme):
    texts = cc3m_captions.slice(0, 400).to_pylist() + ["a very long caption " * 400, "", "dog"]
    hasher = MinHasher(scheme=scheme)
    expected = hasher.signatures(texts)
    # Tiny blocks, tables and chunks: every text straddles some boundary, and the long caption takes
    # the chunked long-text path.
    monkeypatch.setattr(minhash, "_TEXTS_PER_HASH_BLOCK", 37)
    monkeypatch.setattr(minhash, "_OCCURRENCES_PER_TABLE", 500)
    monkeypatch.setattr(minhash, "_CHUNK_BYTES", 64 * 1024)
    np.testing.assert_array_equal(hasher.signatures(texts), expected)
    shingle_lists = shingle_texts(texts)
    np.testing.assert_array_equal(hasher.signatures(shingle_lists), expected)
    np.testing.assert_array_equal(hasher.signatures(pa.array(shingle_lists)), expected)


def test_signatures_reject_unsupported_input():
    with pytest.raises(TypeError):
        MinHasher().signatures(pa.array([1, 2]))
    with pytest.raises(TypeError, match="texts must be str"):
        MinHasher().signatures([b"bytes are not a text"])
    with pytest.raises(ValueError, match="scheme"):
        MinHasher(scheme="affine64")
    with pytest.raises(ValueError, match="num_perm"):
        MinHasher(num_perm=0)


def test_legacy_permutation_matches_big_integer_arithmetic_at_the_edges():
    prime, low32 = (1 << 61) - 1, (1 << 32) - 1
    # With h = 1, x = a + b can be steered onto the cases where the shortcut needs its correction.
    targets = [
        0,
        1,
        prime - 1,
        prime,
        prime + 1,
        2 * prime - 1,
        2 * prime,
        2 * prime + 1,
        3 * prime,
        1 << 63,
        (1 << 64) - 2,
        (1 << 64) - 1,
        7 * prime + 6,
        8 * prime - 1,
        8 * prime + 7,
    ]
    b = np.array([t // 2 for t in targets], dtype=np.uint64)
    a = np.array([t - t // 2 for t in targets], dtype=np.uint64)
    hashes = np.array([1, 0, 3, (1 << 32) - 1], dtype=np.uint64)
    got = minhash._legacy_permute(hashes, a, b)
    for row, h in enumerate(hashes.tolist()):
        for column, (a_k, b_k) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            assert int(got[row, column]) == ((a_k * h + b_k) % (1 << 64)) % prime & low32


@settings(derandomize=True, deadline=None, max_examples=100)
@given(
    texts=st.lists(st.one_of(st.none(), st.text(max_size=40)), max_size=6),
    shingling=st.sampled_from([("char", 5), ("char", 2), ("word", 1), ("word", 3)]),
    scheme=st.sampled_from(["affine32", "legacy"]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_signatures_equal_datasketch_property(texts, shingling, scheme, seed):
    kind, size = shingling
    hasher = MinHasher(num_perm=32, seed=seed, kind=kind, size=size, scheme=scheme)
    expected = datasketch_signatures(shingle_texts(texts, kind, size), num_perm=32, seed=seed, scheme=scheme)
    np.testing.assert_array_equal(hasher.signatures(texts), expected)


# ------------------------------------------------------------------------------------------------
# LSH banding


def test_choose_bands_for_the_default_threshold():
    bands, rows = choose_bands(128, 0.8)
    assert (bands, rows) == (17, 7)
    assert candidate_probability(0.8, bands, rows) == pytest.approx(0.98171, abs=1e-5)


@pytest.mark.parametrize("num_perm", [64, 128, 256])
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
def test_choose_bands_meets_the_probability_floor_with_least_false_positive_area(num_perm, threshold):
    bands, rows = choose_bands(num_perm, threshold)
    assert bands * rows <= num_perm
    assert candidate_probability(threshold, bands, rows) >= 0.98
    # Brute force over every feasible banding, the area by a fine trapezoid rule.
    grid = np.linspace(0.0, threshold, 4001)

    def area(b, r):
        return np.trapezoid(candidate_probability(grid, b, r), grid)

    feasible = [
        (b, r)
        for r in range(1, num_perm + 1)
        for b in range(1, num_perm // r + 1)
        if candidate_probability(threshold, b, r) >= 0.98
    ]
    assert area(bands, rows) <= min(area(b, r) for b, r in feasible) + 1e-9


def test_choose_bands_raises_when_the_floor_is_unreachable():
    with pytest.raises(ValueError, match="no LSH banding"):
        choose_bands(4, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        choose_bands(128, 1.0)
    with pytest.raises(ValueError, match="probability"):
        choose_bands(128, 0.8, min_candidate_probability=1.0)


def test_band_hashes_shape_and_equality_semantics():
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**32, size=(5, 128), dtype=np.uint64)
    signatures[1] = signatures[0]
    signatures[2] = signatures[0]
    signatures[2, 9] += 1  # band 1 (columns 7..13) differs, the rest equal
    keys = band_hashes(signatures, 17, 7)
    assert keys.shape == (5, 17) and keys.dtype == np.uint64
    np.testing.assert_array_equal(keys[0], keys[1])
    assert (keys[0] == keys[2]).tolist() == [band != 1 for band in range(17)]
    # Equal values in different bands still give different keys (each band has its own salt).
    same_values = np.zeros((1, 14), dtype=np.uint64)
    first, second = band_hashes(same_values, 2, 7)[0]
    assert first != second
    # Columns past bands * rows are ignored.
    np.testing.assert_array_equal(band_hashes(signatures[:, :119], 17, 7), keys)


def test_band_hashes_are_fixed_across_processes():
    signature = np.arange(128, dtype=np.uint64)[None, :] * np.uint64(2654435761)
    here = band_hashes(signature, 4, 5)[0].tolist()
    code = (
        "import numpy as np; from curation.ops.lsh import band_hashes; "
        "print(band_hashes(np.arange(128, dtype=np.uint64)[None, :] * np.uint64(2654435761), 4, 5)[0].tolist())"
    )
    repo_root = Path(__file__).resolve().parents[2]
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    ).stdout
    assert there.strip() == str(here)
    # Pinned values: a change here changes every stored band key, i.e. invalidates LSH artifacts.
    assert here[0] == int(band_hashes(signature, 1, 5)[0, 0])
    assert here == [12661614404035920013, 12337356817831640290, 10274553868844753794, 16869796044703006047]


def test_band_hashes_reject_too_many_bands():
    with pytest.raises(ValueError, match="cannot cut"):
        band_hashes(np.zeros((2, 10), dtype=np.uint64), 3, 4)


# ------------------------------------------------------------------------------------------------
# Exact Jaccard


def test_exact_jaccard():
    assert exact_jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert exact_jaccard(["a", "a", "b"], ["b", "a"]) == 1.0
    assert exact_jaccard([], ["a"]) == 0.0
    assert exact_jaccard([], []) == 0.0


@pytest.mark.parametrize(("kind", "size"), [("char", 5), ("word", 2), ("char", 1)])
def test_exact_jaccard_pairs_equals_the_set_definition(cc3m_captions, kind, size):
    captions = cc3m_captions.slice(0, 600).to_pylist()
    rng = np.random.default_rng(1)
    left = captions[:300] + EDGE_TEXTS
    right = [captions[i] for i in rng.integers(0, 600, 300)] + EDGE_TEXTS[::-1]
    # Near-duplicates too, so that high similarities are exercised.
    left += captions[300:400]
    right += [caption.upper() + " ." if caption else caption for caption in captions[300:400]]
    expected = [
        exact_jaccard(a, b)
        for a, b in zip(shingle_texts(left, kind, size), shingle_texts(right, kind, size), strict=True)
    ]
    got = exact_jaccard_pairs(left, right, kind, size)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact_jaccard_pairs(pa.array(left), pa.array(right), kind, size), expected, atol=1e-12)


def test_exact_jaccard_pairs_edge_cases():
    assert exact_jaccard_pairs([], [], "char", 5).shape == (0,)
    np.testing.assert_array_equal(exact_jaccard_pairs(["", "Dog", "a dog"], [None, "dog", "a dog"]), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="differ in length"):
        exact_jaccard_pairs(["a"], [], "char", 5)


# ------------------------------------------------------------------------------------------------
# Bucket capping


@pytest.mark.parametrize("member_count", [0, 1, 2, 3, 4, 5, 10])
def test_anchor_edges_small_buckets(member_count):
    members = np.array([f"{i:032x}" for i in range(member_count)])
    left, right = anchor_edges(members, max_anchors=3)
    pairs = list(zip(left.tolist(), right.tolist(), strict=True))
    expected_count = sum(min(i, 3) for i in range(member_count))
    assert len(pairs) == expected_count == len(set(pairs))
    assert all(a < b and a in members[:3] for a, b in pairs)
    if member_count <= 4:  # up to A + 1 members: every pair
        assert len(pairs) == member_count * (member_count - 1) // 2


def test_anchor_edges_are_linear_in_a_huge_template_bucket():
    members = np.arange(100_000)
    left, right = anchor_edges(members, max_anchors=3)
    assert len(left) == 3 + 3 * (100_000 - 3)  # A(A-1)/2 + (n-A)A
    assert set(left.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(np.bincount(right)[3:], 3)


def test_anchor_edges_validate_input():
    with pytest.raises(ValueError, match="sorted"):
        anchor_edges(np.array(["b", "a"]))
    with pytest.raises(ValueError, match="sorted"):
        anchor_edges(["a", "a"])
    with pytest.raises(ValueError, match="max_anchors"):
        anchor_edges(["a"], max_anchors=0)


# ------------------------------------------------------------------------------------------------
# Keep policies


@pytest.mark.parametrize(
    ("spec", "policy", "text"),
    [
        ("cap:10", KeepPolicy(10), "cap:10"),
        ("keep_one", KeepPolicy(1), "keep_one"),
        ("cap:1", KeepPolicy(1), "keep_one"),
        ("tag", KeepPolicy(None), "tag"),
    ],
)
def test_parse_policy(spec, policy, text):
    assert parse_policy(spec) == policy
    assert str(parse_policy(spec)) == text


@pytest.mark.parametrize("spec", ["cap:0", "cap:", "cap:-1", "cap:x", "keep", "drop", ""])
def test_parse_policy_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="bad keep policy"):
        parse_policy(spec)


def test_select_survivors_per_policy():
    groups = np.array([7, 7, 7, 3, 3, 9])
    keys = np.array([0.9, 0.1, 0.5, 0.4, 0.2, 0.3])
    assert select_survivors(groups, keys, "cap:2").tolist() == [False, True, True, True, True, True]
    assert select_survivors(groups, keys, "keep_one").tolist() == [False, True, False, False, True, True]
    assert select_survivors(groups, keys, parse_policy("cap:10")).all()
    assert select_survivors(groups, keys, "tag").all()
    assert select_survivors(np.array([], dtype=np.int64), np.array([]), "keep_one").shape == (0,)


def test_select_survivors_ignores_row_order_and_accepts_string_groups():
    rng = np.random.default_rng(3)
    groups = np.array([f"g{i}" for i in rng.integers(0, 50, 2000)])
    keys = rng.random(2000)
    keep = select_survivors(groups, keys, "cap:3")
    permutation = rng.permutation(2000)
    np.testing.assert_array_equal(select_survivors(groups[permutation], keys[permutation], "cap:3"), keep[permutation])
    for group in np.unique(groups):
        members = groups == group
        assert keep[members].sum() == min(3, members.sum())
        assert keys[members & keep].max() < keys[members & ~keep].min(initial=2.0)


def test_select_survivors_validate_input():
    with pytest.raises(ValueError, match="one length"):
        select_survivors(np.array([1, 2]), np.array([0.5]), "tag")
    with pytest.raises(ValueError, match="NaN"):
        select_survivors(np.array([1, 2]), np.array([0.5, np.nan]), "keep_one")
