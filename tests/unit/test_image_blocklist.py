"""Image blocklists: parsing the hash lists (errors name file and line) and nearest-hash matching."""

import hashlib

import numpy as np
import pytest

from curation.ops.image_blocklist import (
    BlocklistError,
    PhashIndex,
    format_phash,
    load_image_hash_list,
    load_phash_list,
    load_sha256_list,
    parse_phash,
    sha256_matches,
)
from curation.ops.imagehash import hamming_distances


def _write(tmp_path, text: str):
    path = tmp_path / "list.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_sha256_list_accepts_either_case_comments_and_sha256sum_lines(tmp_path):
    a, b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    path = _write(tmp_path, f"# blocked images\n\n{a.upper()}\n  {b}  photo.jpg\n{a}\n")
    assert load_sha256_list(path) == frozenset({a, b})


@pytest.mark.parametrize("entry", ["abc", "g" * 64, "a" * 63, "a" * 65, "0x" + "a" * 64])
def test_a_malformed_sha256_names_file_and_line(tmp_path, entry):
    path = _write(tmp_path, f"# header\n{'a' * 64}\n{entry}\n")
    with pytest.raises(BlocklistError, match=r"list\.txt:3: .* is not a sha256 digest"):
        load_sha256_list(path)


def test_an_unreadable_list_is_a_clear_error(tmp_path):
    with pytest.raises(BlocklistError, match="cannot read image blocklist"):
        load_sha256_list(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BlocklistError, match="cannot read image blocklist"):
        load_phash_list(tmp_path / "bad.txt")


def test_phash_list_is_sorted_distinct_uint64(tmp_path):
    path = _write(tmp_path, "ffffffffffffffff\n0x0000000000000001\n8000000000000000 flat image\nFFFFFFFFFFFFFFFF\n")
    hashes = load_phash_list(path)
    assert hashes.dtype == np.uint64
    assert hashes.tolist() == [1, 1 << 63, (1 << 64) - 1]
    assert load_phash_list(_write(tmp_path, "# nothing\n")).tolist() == []


@pytest.mark.parametrize("entry", ["123", "f" * 17, "xyz0000000000000", "-0000000000000001"])
def test_a_malformed_phash_names_file_and_line(tmp_path, entry):
    with pytest.raises(BlocklistError, match=r"list\.txt:2: .* is not a perceptual hash"):
        load_phash_list(_write(tmp_path, f"{'0' * 16}\n{entry}\n"))


def test_a_mixed_list_tells_the_kinds_apart_by_length(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    sha256, phash = load_image_hash_list(_write(tmp_path, f"{digest.upper()}\n00000000000000ff\n"))
    assert sha256 == frozenset({digest}) and phash.tolist() == [255]
    with pytest.raises(BlocklistError, match=r"list\.txt:2: '1234' is neither a sha256"):
        load_image_hash_list(_write(tmp_path, f"{digest}\n1234\n"))


def test_phash_text_round_trips_including_spark_signed_longs():
    for value in (0, 1, 1 << 63, (1 << 64) - 1, 0x0123456789ABCDEF):
        assert parse_phash(format_phash(value)) == value
        signed = int(np.uint64(value).view(np.int64))
        assert format_phash(signed) == format_phash(value)
    assert format_phash(-1) == "f" * 16


def test_sha256_matches_ignores_case_and_missing_images():
    blocked = frozenset({"ab" * 32})
    assert sha256_matches(["AB" * 32, None, "cd" * 32], blocked).tolist() == [True, False, False]
    assert sha256_matches(["ab" * 32], frozenset()).tolist() == [False]


def _reference(hashes: np.ndarray, blocked: np.ndarray, max_distance: int):
    distance = np.full(len(hashes), -1)
    nearest = np.zeros(len(hashes), dtype=np.uint64)
    for i, value in enumerate(hashes):
        if len(blocked) == 0:
            continue
        distances = hamming_distances(np.full(len(blocked), value, dtype=np.uint64), blocked).astype(int)
        best = min(range(len(blocked)), key=lambda j: (distances[j], int(blocked[j])))
        if distances[best] <= max_distance:
            distance[i], nearest[i] = distances[best], blocked[best]
    return distance, nearest


def _flip(values: np.ndarray, bits: int, rng) -> np.ndarray:
    out = values.copy()
    for i in range(len(out)):
        for bit in rng.choice(64, size=bits, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(int(bit))
    return out


@pytest.mark.parametrize("max_distance", [0, 1, 4, 8, 9, 16, 31])
@pytest.mark.parametrize("listed", [0, 1, 40, 3_000])
def test_nearest_equals_comparing_with_every_listed_hash(max_distance, listed):
    rng = np.random.default_rng(max_distance * 1000 + listed)
    blocked = rng.integers(0, 2**64, size=listed, dtype=np.uint64)
    probes = [rng.integers(0, 2**64, size=200, dtype=np.uint64)]
    if listed:
        for bits in {0, 1, max(0, max_distance - 1), max_distance, max_distance + 1, max_distance + 3}:
            probes.append(_flip(blocked[rng.integers(0, listed, size=20)], min(bits, 64), rng))
    hashes = np.concatenate(probes)
    index = PhashIndex(blocked, max_distance)
    distance, nearest = index.nearest(hashes)
    expected_distance, expected_nearest = _reference(hashes, np.unique(blocked), max_distance)
    assert distance.tolist() == expected_distance.tolist()
    assert nearest.tolist() == expected_nearest.tolist()
    if listed:
        assert (distance >= 0).sum() >= 20, "the planted near hashes are found"


def test_a_large_list_at_small_distances_uses_the_chunk_index_and_a_small_one_compares_all():
    rng = np.random.default_rng(0)
    large = rng.integers(0, 2**64, size=5_000, dtype=np.uint64)
    assert not PhashIndex(large, 4).brute_force and not PhashIndex(large, 0).brute_force
    assert PhashIndex(large, 16).brute_force
    assert PhashIndex(large[:10], 4).brute_force


def test_ties_go_to_the_smallest_listed_hash_and_signed_input_is_read_as_bits():
    probe = np.array([0b1000], dtype=np.uint64)
    blocked = np.array([0b1100, 0b1010, 0b1001] + list(range(1 << 20, (1 << 20) + 200)), dtype=np.uint64)
    for index in (PhashIndex(blocked, 1), PhashIndex(blocked[:3], 1)):
        distance, nearest = index.nearest(probe)
        assert distance.tolist() == [1] and nearest.tolist() == [0b1001]
    top = np.array([1 << 63], dtype=np.uint64)
    distance, nearest = PhashIndex(top, 0).nearest(top.view(np.int64))
    assert distance.tolist() == [0] and nearest.tolist() == [1 << 63]


def test_max_distance_is_checked():
    with pytest.raises(ValueError, match="max_distance must be in 0..31"):
        PhashIndex([1], 32)
    with pytest.raises(ValueError, match="max_distance must be in 0..31"):
        PhashIndex([1], -1)


def test_an_empty_list_or_no_hashes_match_nothing():
    distance, nearest = PhashIndex([], 4).nearest(np.array([1, 2], dtype=np.uint64))
    assert distance.tolist() == [-1, -1] and nearest.tolist() == [0, 0]
    distance, _ = PhashIndex([1], 4).nearest(np.zeros(0, dtype=np.uint64))
    assert len(distance) == 0
