"""dedup_image's hash groups on Spark equal the pure op's exact groups, on synthetic hashes with planted pairs."""

import numpy as np
import pytest

from curation.ops.phash_neighbors import near_duplicate_groups, near_duplicate_pairs
from curation.schema import UID
from curation.spark.image_dedup import near_duplicate_hash_groups

pytestmark = pytest.mark.spark

ROWS = 20_000
MAX_DISTANCE = 4


def planted_hashes(seed: int) -> np.ndarray:
    """Random hashes; 1,000 copies of earlier rows at distance 1..4, 100 at 5 (must not join), 50 chains of three
    (a - b - c, a to c up to 8 apart: joined only through b), 200 identical repeats, 300 rows in one dense cluster
    of hashes within distance 2 of a centre."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=ROWS, dtype=np.uint64)

    def flip(value, count):
        bits = rng.choice(64, size=count, replace=False)
        return value ^ np.uint64(sum(1 << int(bit) for bit in bits))

    row = 5_000
    for index in range(1_000):
        hashes[row] = flip(hashes[index], 1 + index % 4)
        row += 1
    for index in range(1_000, 1_100):
        hashes[row] = flip(hashes[index], 5)
        row += 1
    for index in range(1_100, 1_150):
        hashes[row] = flip(hashes[index], 4)
        hashes[row + 1] = flip(hashes[row], 4)
        row += 2
    for index in range(1_200, 1_400):
        hashes[row] = hashes[index]
        row += 1
    for _ in range(300):
        hashes[row] = flip(hashes[2_000], int(rng.integers(0, 3)))
        row += 1
    return hashes


def test_spark_hash_groups_equal_the_exact_op(spark):
    hashes = planted_hashes(11)
    uids = [f"u{index:06d}" for index in range(ROWS)]  # row order = uid order, so smallest uid = smallest row
    rows = spark.createDataFrame(
        list(zip(uids, hashes.view(np.int64).tolist(), strict=True)), f"{UID} string, image_phash long"
    ).repartition(4)
    result = near_duplicate_hash_groups(rows, MAX_DISTANCE)
    spark_groups = {row[UID]: row["group"] for row in result.groups.collect()}

    expected, _ = near_duplicate_groups(hashes, MAX_DISTANCE)
    sizes = np.bincount(expected, minlength=ROWS)
    in_groups = np.flatnonzero(sizes[expected] > 1)
    assert spark_groups == {uids[row]: uids[expected[row]] for row in in_groups}
    assert len(spark_groups) > 2_000

    # every pair of rows within the distance, counted row by row (identical hashes included)
    distinct, counts = np.unique(hashes, return_counts=True)
    low, high, _ = near_duplicate_pairs(hashes, MAX_DISTANCE)
    per_hash = dict(zip(distinct.tolist(), counts.tolist(), strict=True))
    row_pairs = sum(per_hash[a] * per_hash[b] for a, b in zip(low.tolist(), high.tolist(), strict=True))
    row_pairs += int((counts * (counts - 1) // 2).sum())
    assert result.row_pairs == row_pairs
