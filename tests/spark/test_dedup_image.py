"""dedup_image on Spark: exact byte duplicates, resized and re-encoded copies, undecodable images."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main as cli_main
from curation.ops.uid import uid_of
from curation.pipeline import run_one_stage

pytestmark = pytest.mark.spark


def _encode(image: Image.Image, format_name: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _originals() -> list[Image.Image]:
    """Real photos when the shared data is present (skipping known near-identical pairs), else smooth random
    fields, which are as different from each other as photos are."""
    from tests.conftest import shared_data_dir

    data = shared_data_dir()
    if data is not None:
        folder = data / "photos_packages"
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        paths = [p for p in paths if not any(k in p.name for k in ("chessboard_GRAY", "motorcycle_right"))]
        return [Image.open(p).convert("RGB") for p in paths[:12]]
    rng = np.random.default_rng(3)
    fields = []
    for _ in range(12):
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        fields.append(Image.fromarray(coarse).resize((240, 180), Image.Resampling.BICUBIC))
    return fields


@pytest.fixture(scope="module")
def image_run(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    originals = _originals()
    rows = [(f"https://img.example/{i}.png", f"photo {i}", _encode(image)) for i, image in enumerate(originals)]
    copies = {}
    for i in range(4):
        half = originals[i].resize((originals[i].width // 2, originals[i].height // 2), Image.Resampling.BICUBIC)
        rows.append((f"https://img.example/half{i}.png", f"half {i}", _encode(half)))
        copies[f"half {i}"] = f"photo {i}"
        rows.append((f"https://img.example/q85-{i}.jpg", f"jpeg {i}", _encode(originals[i], "JPEG", quality=85)))
        copies[f"jpeg {i}"] = f"photo {i}"
    rows.append(("https://mirror.example/7.png", "same bytes as photo 7", rows[7][2]))
    rows.append(("https://img.example/broken.jpg", "truncated", _encode(originals[8], "JPEG")[:200]))
    table = pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows],
                      "jpg": pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(table, root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest", {"keep_columns": ["jpg"]})
    assert cli_main(["dedup-image", "--input", str(root / "ingest"), "--output", str(root / "dedup")]) == 0
    record = json.loads((root / "dedup" / "_stage.json").read_text())
    uid = {caption: uid_of(url.encode(), caption.encode()) for url, caption, _ in rows}
    kept = {r["uid"]: r for r in pq.read_table(root / "dedup").to_pylist()}
    ledger = {r["uid"]: r for r in pq.read_table(root / "dedup" / "_ledger").to_pylist()}
    return {"record": record, "uid": uid, "kept": kept, "ledger": ledger, "copies": copies, "rows": rows}


def test_copies_are_near_duplicates_of_their_original_and_a_largest_one_survives(image_run):
    uid, kept, ledger = image_run["uid"], image_run["kept"], image_run["ledger"]
    for i in range(4):
        family = {uid[f"photo {i}"], uid[f"half {i}"], uid[f"jpeg {i}"]}
        survivors = family & kept.keys()
        assert len(survivors) == 1, f"photo {i} and its two copies should collapse to one"
        assert uid[f"half {i}"] not in survivors, "a full-size image survives, not the half-size copy"
        (survivor,) = survivors
        for dropped in family - survivors:
            assert ledger[dropped]["reason"] == "near_duplicate_image"
            assert ledger[dropped]["related_uid"] == survivor


def test_exact_bytes_and_undecodable_images(image_run):
    uid, kept, ledger = image_run["uid"], image_run["kept"], image_run["ledger"]
    pair = {uid["photo 7"], uid["same bytes as photo 7"]}
    assert len(pair & kept.keys()) == 1
    dropped = ledger[(pair - kept.keys()).pop()]
    assert dropped["reason"] == "duplicate_image_bytes" and dropped["related_uid"] in kept
    broken = ledger[uid["truncated"]]
    assert broken["reason"] == "undecodable_image" and json.loads(broken["detail"])["reason"] == "corrupt"


def test_different_images_are_all_kept(image_run):
    uid, kept = image_run["uid"], image_run["kept"]
    # Photos 0-3 have copies (one survivor per family, tested above) and photo 7 has a byte-identical twin.
    unique_photos = [f"photo {i}" for i in range(4, 12) if i != 7]
    assert all(uid[caption] in kept for caption in unique_photos)
    record = image_run["record"]
    assert record["rows_in"] == record["rows_out"] + sum(record["drops"].values()) == len(image_run["rows"])
    assert record["drops"] == {"duplicate_image_bytes": 1, "near_duplicate_image": 8, "undecodable_image": 1}
