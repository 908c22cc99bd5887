import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops.uid import compute_uids, uid_of, uniform


def test_uid_is_first_16_bytes_of_sha256_of_url_nul_caption():
    expected = hashlib.sha256(b"http://a.b/c.jpg\x00a dog").hexdigest()[:32]
    assert uid_of(b"http://a.b/c.jpg", b"a dog") == expected
    assert compute_uids(pa.array(["http://a.b/c.jpg"]), pa.array(["a dog"])).to_pylist() == [expected]


def test_uids_of_real_shared_data_match_its_uid_column(shared_data):
    table = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet")
    assert compute_uids(table["url"].combine_chunks(), table["caption"].combine_chunks()).to_pylist() == table[
        "uid"
    ].to_pylist()


def test_uid_of_invalid_utf8_is_over_raw_bytes():
    raw = b"caf\xe9"
    uids = compute_uids(pa.array([b"http://x.y/"], pa.binary()), pa.array([raw], pa.binary()))
    assert uids[0].as_py() == uid_of(b"http://x.y/", raw)


def test_uniform_is_a_pure_function_of_seed_uid_and_purpose():
    uids = [uid_of(f"http://x/{i}".encode(), b"c") for i in range(20_000)]
    first = uniform(7, uids, "balance")
    assert np.array_equal(first, uniform(7, list(reversed(uids)), "balance")[::-1])
    assert np.array_equal(first[:100], uniform(7, uids[:100], "balance"))
    assert not np.array_equal(first, uniform(8, uids, "balance"))
    assert not np.array_equal(first, uniform(7, uids, "dedup"))
    assert first.min() >= 0.0 and first.max() < 1.0
    # Uniform: each decile holds 10% of the draws within 5 standard deviations.
    counts = np.histogram(first, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 2_000) < 5 * np.sqrt(2_000 * 0.9))


def test_uniform_rejects_malformed_uids():
    with pytest.raises(ValueError):
        uniform(0, ["abc"], "x")


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_uid_hex_shape_for_any_bytes(url, caption):
    uid = uid_of(url, caption)
    assert len(uid) == 32 and int(uid, 16) >= 0
    assert uniform(0, [uid], "p")[0] < 1.0
