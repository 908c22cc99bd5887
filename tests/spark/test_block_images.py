"""block_images on Spark over the demo run's stage folders: keys computed from the download tars, keys taken from
dedup_image's columns (through the CLI), keys from an image-bytes column, a listed sha256 of the original file
(image_source_sha256); the ledger says which list and which digest matched."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main as cli_main
from curation.io import LEDGER_DIR
from curation.ops import tars as tar_ops
from curation.ops.image_blocklist import BlocklistError, format_phash
from curation.ops.imagehash import decode_image, hamming_distances, image_sha256, perceptual_hash
from curation.pipeline import run_one_stage
from curation.run_folder import downloaded_images_dir, read_stage_record, resolve_data_dir
from curation.schema import Reason
from tests import imagekit

pytestmark = pytest.mark.spark

MAX_DISTANCE = 4


def _stage(run_dir, name):
    (folder,) = (run_dir / "stages").glob(f"*_{name}")
    return folder


def _options(**given) -> dict:
    return {"max_distance": MAX_DISTANCE, **given}


def _keys_from_tars(stage_dir) -> dict[str, tuple[str, int]]:
    """uid -> (sha256, unsigned phash) of every row's image, read from the download tars (the test's reference)."""
    rows = pq.read_table(resolve_data_dir(stage_dir), columns=["uid", "image_shard", "image_key"]).to_pylist()
    images_dir = downloaded_images_dir(stage_dir)
    keys = {}
    with tar_ops.TarReader() as reader:
        for row in rows:
            _, data = reader.image(os.path.join(images_dir, row["image_shard"]), row["image_key"])
            keys[row["uid"]] = (image_sha256(data), perceptual_hash(decode_image(data).image))
    return keys


def _flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


@pytest.fixture(scope="module")
def lists(demo_run, tmp_path_factory):
    """Two blocked sha256s, a blocked phash 3 bits from one image, a phash 6 bits from another (and more than
    MAX_DISTANCE from every image of the run); the expected blocked uids of the download stage."""
    root = tmp_path_factory.mktemp("block_lists")
    keys = _keys_from_tars(_stage(demo_run, "download"))
    uids = sorted(keys)
    hashes = np.array([phash for _, phash in keys.values()], dtype=np.uint64)
    blocked_sha256 = [keys[uids[0]][0], keys[uids[1]][0]]
    near = _flip(keys[uids[2]][1], [0, 17, 40])
    far = next(candidate for uid in uids[3:] for candidate in [_flip(keys[uid][1], [1, 9, 22, 33, 50, 63])]
               if hamming_distances(hashes, np.uint64(candidate)).min() > MAX_DISTANCE)
    (root / "sha256.txt").write_text(f"# two images\n{blocked_sha256[0].upper()}\n{blocked_sha256[1]}  note\n")
    (root / "phash.txt").write_text(f"{format_phash(near)}\n0x{format_phash(far)}\n")
    expected = {}
    for uid, (digest, phash) in keys.items():
        if digest in blocked_sha256:
            expected[uid] = {"list": "sha256", "matched": "image_sha256", "sha256": digest}
        else:
            distance = int(hamming_distances(np.uint64(phash), np.uint64(near)))
            if distance <= MAX_DISTANCE:
                expected[uid] = {"list": "phash", "blocked_phash": format_phash(near),
                                 "image_phash": format_phash(phash), "distance": distance}
    assert uids[2] in expected and expected[uids[2]]["distance"] == 3
    return {"root": root, "keys": keys, "expected": expected}


def _ledger(stage_dir) -> dict[str, dict]:
    rows = pq.read_table(stage_dir / LEDGER_DIR).to_pylist() if (stage_dir / LEDGER_DIR).is_dir() else []
    assert all(row["stage"] == "block_images" and row["reason"] == Reason.BLOCKED_IMAGE for row in rows)
    return {row["uid"]: json.loads(row["detail"]) for row in rows}


def test_images_read_from_the_download_tars_are_blocked_by_sha256_and_by_phash_distance(spark, demo_run, lists,
                                                                                           tmp_path):
    source = _stage(demo_run, "download")
    root = lists["root"]
    record = run_one_stage(spark, "block_images", source, tmp_path / "blocked",
                           _options(sha256_file=str(root / "sha256.txt"), phash_file=str(root / "phash.txt"),
                                    partitions=2))
    assert _ledger(tmp_path / "blocked") == lists["expected"]
    assert record["drops"] == {Reason.BLOCKED_IMAGE: len(lists["expected"])}
    summary = record["block_images"]
    assert summary["key_sources"] == {"sha256": "download tars", "source_sha256": "column image_source_sha256",
                                      "phash": "download tars"}
    assert summary["sha256_entries"] == 2 and summary["phash_entries"] == 2 and summary["unhashed"] == 0
    assert sum(summary["matched_by"].values()) == len(lists["expected"])
    kept = pq.read_table(tmp_path / "blocked")
    assert kept.num_rows == record["rows_out"] == read_stage_record(source)["rows_out"] - len(lists["expected"])
    assert kept.schema.names == pq.read_table(resolve_data_dir(source)).schema.names, "rows pass through unchanged"
    assert not set(kept.column("uid").to_pylist()) & lists["expected"].keys()


def test_dedup_image_columns_are_used_through_the_cli_and_agree_with_the_tars(demo_run, lists, tmp_path):
    source = _stage(demo_run, "dedup_image")
    root = lists["root"]
    assert cli_main(["block-images", "--input", str(source), "--output", str(tmp_path / "blocked"),
                     "--sha256-file", str(root / "sha256.txt"), "--phash-file", str(root / "phash.txt"),
                     "--max-distance", str(MAX_DISTANCE), "--partitions", "2"]) == 0
    record = read_stage_record(tmp_path / "blocked")
    assert record["block_images"]["key_sources"] == {"sha256": "column image_sha256",
                                                     "source_sha256": "column image_source_sha256",
                                                     "phash": "column image_phash"}
    assert record["config"]["sha256_file"] == str(root / "sha256.txt")
    present = set(pq.read_table(resolve_data_dir(source), columns=["uid"]).column("uid").to_pylist())
    assert _ledger(tmp_path / "blocked") == {uid: d for uid, d in lists["expected"].items() if uid in present}


def test_distance_zero_blocks_only_exact_hashes_and_an_empty_list_blocks_nothing(spark, demo_run, lists, tmp_path):
    source = _stage(demo_run, "dedup_image")
    record = run_one_stage(spark, "block_images", source, tmp_path / "exact",
                           _options(phash_file=str(lists["root"] / "phash.txt"), max_distance=0))
    assert record["drops"] == {}
    (tmp_path / "empty.txt").write_text("# nothing blocked yet\n")
    record = run_one_stage(spark, "block_images", source, tmp_path / "none",
                           _options(sha256_file=str(tmp_path / "empty.txt")))
    assert record["drops"] == {} and record["rows_out"] == record["rows_in"]


def test_an_image_bytes_column_is_hashed_and_an_undecodable_image_is_counted_not_blocked(spark, tmp_path):
    photos = [imagekit.jpeg(photo) for photo in imagekit.photos(4)]
    photos.append(imagekit.jpeg(Image.new("RGB", (64, 48), (200, 30, 30)))[:100])  # truncated: no decode
    pq.write_table(pa.table({"url": [f"https://img.example/{i}.jpg" for i in range(len(photos))],
                             "caption": [f"photo {i}" for i in range(len(photos))],
                             "jpg": pa.array(photos, pa.binary())}), tmp_path / "raw.parquet")
    run_one_stage(spark, "ingest", [str(tmp_path / "raw.parquet")], tmp_path / "ingest", {"keep_columns": ["jpg"]})
    (tmp_path / "phash.txt").write_text(format_phash(perceptual_hash(decode_image(photos[1]).image) ^ 0b11) + "\n")
    (tmp_path / "sha256.txt").write_text(image_sha256(photos[4]) + "\n")
    record = run_one_stage(spark, "block_images", tmp_path / "ingest", tmp_path / "blocked",
                           _options(sha256_file=str(tmp_path / "sha256.txt"), phash_file=str(tmp_path / "phash.txt")))
    assert record["block_images"]["key_sources"] == {"sha256": "column jpg", "source_sha256": None,
                                                     "phash": "column jpg"}
    assert record["block_images"]["unhashed"] == 1, "the truncated image has a sha256 but no perceptual hash"
    details = sorted(_ledger(tmp_path / "blocked").values(), key=lambda d: d["list"])
    assert [d["list"] for d in details] == ["phash", "sha256"]
    assert details[0]["distance"] == 2 and details[1]["sha256"] == image_sha256(photos[4])
    assert record["rows_out"] == 3


def test_a_listed_sha256_of_the_original_file_blocks_its_row(spark, tmp_path):
    """Data owners hash the file they published, not the re-encoded copy stored: the list holds row 1's
    image_source_sha256 (the download stage's digest of the bytes as served) and row 2's stored digest."""
    photos = [imagekit.jpeg(photo) for photo in imagekit.photos(4)]
    originals = [imagekit.jpeg(photo, quality=95) for photo in imagekit.photos(4)]
    assert not {image_sha256(o) for o in originals} & {image_sha256(p) for p in photos}
    pq.write_table(pa.table({"url": [f"https://img.example/{i}.jpg" for i in range(len(photos))],
                             "caption": [f"photo {i}" for i in range(len(photos))],
                             "jpg": pa.array(photos, pa.binary()),
                             "image_source_sha256": [image_sha256(o) for o in originals]}), tmp_path / "raw.parquet")
    run_one_stage(spark, "ingest", [str(tmp_path / "raw.parquet")], tmp_path / "ingest",
                  {"keep_columns": ["jpg", "image_source_sha256"]})
    (tmp_path / "sha256.txt").write_text(f"{image_sha256(originals[1]).upper()}  owner's original\n"
                                         f"{image_sha256(photos[2])}\n")
    record = run_one_stage(spark, "block_images", tmp_path / "ingest", tmp_path / "blocked",
                           _options(sha256_file=str(tmp_path / "sha256.txt")))
    assert record["block_images"]["key_sources"] == {"sha256": "column jpg",
                                                     "source_sha256": "column image_source_sha256", "phash": None}
    details = sorted(_ledger(tmp_path / "blocked").values(), key=lambda d: d["matched"])
    assert details == [{"list": "sha256", "matched": "image_sha256", "sha256": image_sha256(photos[2])},
                       {"list": "sha256", "matched": "image_source_sha256", "sha256": image_sha256(originals[1])}]
    assert record["rows_out"] == 2 and record["block_images"]["matched_by"] == {"sha256": 2, "phash": 0}


def test_lists_are_required_and_checked(spark, demo_run, tmp_path):
    source = _stage(demo_run, "dedup_image")
    with pytest.raises(ValueError, match="needs sha256_file or phash_file"):
        run_one_stage(spark, "block_images", source, tmp_path / "x", _options())
    (tmp_path / "bad.txt").write_text("# ok\n" + "ab" * 32 + "\nnot-a-hash\n")
    with pytest.raises(BlocklistError, match=r"bad\.txt:3: 'not-a-hash' is not a sha256"):
        run_one_stage(spark, "block_images", source, tmp_path / "x", _options(sha256_file=str(tmp_path / "bad.txt")))
    assert cli_main(["block-images", "--input", str(source), "--output", str(tmp_path / "x"),
                     "--phash-file", str(tmp_path / "bad.txt")]) == 2
    assert not (tmp_path / "x").exists()
