"""Image blocklists: parsing the hash lists (errors name file and line). Matching (`PhashIndex`) is tested in
test_imagehash."""

import hashlib

import numpy as np
import pytest

from curation.ops.image_blocklist import (
    BlocklistError,
    format_phash,
    load_image_hash_list,
    load_phash_list,
    load_sha256_list,
    parse_phash,
    sha256_matches,
)


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
