"""download -> embed -> dedup_image end to end on Spark, against an HTTP server on 127.0.0.1 serving real photos.

The server also serves a 404, a truncated JPEG, a non-image, an opt-out header, a redirect to 127.0.0.2 (a loopback
address not on the allow-list: refused before connecting) and duplicates of a photo; every input row must end
either kept or in exactly one ledger with the right reason. No traffic leaves 127.0.0.0/8.
"""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.cli import main as cli_main
from curation.image_server import NOT_FOUND, ImageServer, Response
from curation.io import ARTIFACTS_DIR, LEDGER_DIR
from curation.manifest import verify_manifest
from curation.ops.tars import TarReader
from curation.ops.uid import uid_of
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.schema import Reason
from curation.spark.common import StageRun
from tests import imagekit

pytestmark = pytest.mark.spark

TINY = {"model": "tiny-clip", "pretrained": "random", "device": "cpu", "batch_size": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    photos = [imagekit.jpeg(photo) for photo in imagekit.photos()]
    routes = {f"/photo/{i}.jpg": Response(200, data, "image/jpeg") for i, data in enumerate(photos)}
    first = Image.open(io.BytesIO(photos[1]))
    routes["/mirror/0.jpg"] = Response(200, photos[0], "image/jpeg")
    smaller = first.resize((first.width * 3 // 4, first.height * 3 // 4))
    routes["/resized/1.jpg"] = Response(200, imagekit.jpeg(smaller, 80), "image/jpeg")
    routes["/truncated.jpg"] = Response(200, photos[2][: len(photos[2]) // 3], "image/jpeg")
    routes["/page.html"] = Response(200, b"<html><body>not an image</body></html>", "text/html")
    routes["/opt-out.jpg"] = Response(200, photos[3], "image/jpeg", (("X-Robots-Tag", "noai"),))
    # The redirect needs the port, known once the server runs: the resolver reads the routes at request time.
    with ImageServer(lambda path: routes.get(path, NOT_FOUND)) as server:
        routes["/redirect.jpg"] = Response(302, headers=(("Location", f"http://127.0.0.2:{server.port}/photo/4.jpg"),))
        expected = {f"{server.base_url}/photo/{i}.jpg": None for i in range(len(photos))}
        expected |= {
            f"{server.base_url}/mirror/0.jpg": None,
            f"{server.base_url}/resized/1.jpg": None,
            f"{server.base_url}/missing.jpg": Reason.DOWNLOAD_FAILED,
            f"{server.base_url}/truncated.jpg": Reason.IMAGE_REJECTED,
            f"{server.base_url}/page.html": Reason.IMAGE_REJECTED,
            f"{server.base_url}/opt-out.jpg": Reason.DOWNLOAD_OPT_OUT,
            f"{server.base_url}/redirect.jpg": Reason.DOWNLOAD_REFUSED,
        }
        yield server, expected


def _download_options(server, **more) -> dict:
    return {"allow_hosts": [f"127.0.0.1:{server.port}"], "image_size": 128, "resize_mode": "keep_ratio",
            "timeout": 5, "thread_count": 4, **more}


@pytest.fixture(scope="module")
def image_run(spark, served, tmp_path_factory):
    server, expected = served
    root = tmp_path_factory.mktemp("download")
    urls = sorted(expected)
    captions = [f"picture number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest")
    # Two tars, so that batches and engines are exercised across shards.
    run_one_stage(spark, "download", root / "ingest", root / "download", _download_options(server, shard_rows=9))
    run_one_stage(spark, "embed", root / "download", root / "embed", {**TINY, "num_workers": 0})
    run_one_stage(spark, "dedup_image", root / "embed", root / "dedup_image")
    uid_to_url = {uid_of(url.encode(), caption.encode()): url for url, caption in zip(urls, captions, strict=True)}
    return root, expected, uid_to_url


def _ledger(stage_dir) -> list[dict]:
    return pq.read_table(stage_dir / LEDGER_DIR).to_pylist() if (stage_dir / LEDGER_DIR).exists() else []


def _embeddings(stage_dir) -> pa.Table:
    return pq.read_table(stage_dir / ARTIFACTS_DIR / "embeddings").sort_by("uid")


def test_every_row_is_kept_or_ledgered_with_its_reason(image_run):
    root, expected, uid_to_url = image_run
    url_to_uid = {url: uid for uid, url in uid_to_url.items()}
    reasons, related = {}, {}
    for stage in ("download", "embed", "dedup_image"):
        for row in _ledger(root / stage):
            assert uid_to_url[row["uid"]] not in reasons, "a row is in two ledgers"
            reasons[uid_to_url[row["uid"]]] = row["reason"]
            related[uid_to_url[row["uid"]]] = row["related_uid"]
    kept = {uid_to_url[uid] for uid in pq.read_table(root / "dedup_image", columns=["uid"]).column("uid").to_pylist()}
    assert not kept & set(reasons)
    assert kept | set(reasons) == set(expected)
    # Each duplicate pair keeps one member (the larger stored image, else the smaller uid) and ledgers the other.
    base = next(iter(expected)).split("/photo/")[0]
    for pair, reason in (((f"{base}/photo/0.jpg", f"{base}/mirror/0.jpg"), Reason.DUPLICATE_IMAGE_BYTES),
                         ((f"{base}/photo/1.jpg", f"{base}/resized/1.jpg"), Reason.NEAR_DUPLICATE_IMAGE)):
        [loser] = [url for url in pair if url in reasons]
        [survivor] = [url for url in pair if url in kept]
        expected = {**expected, loser: reason}
        assert related[loser] == url_to_uid[survivor]
    assert {url: reasons.get(url) for url in expected} == expected


def test_failures_carry_img2dataset_status_and_message(image_run):
    root, expected, uid_to_url = image_run
    details = {uid_to_url[row["uid"]]: json.loads(row["detail"]) for row in _ledger(root / "download")}
    refused = next(detail for url, detail in details.items() if url.endswith("/redirect.jpg"))
    assert refused["status"] == "failed_to_download" and "127.0.0.2" in refused["error"]
    missing = next(detail for url, detail in details.items() if url.endswith("/missing.jpg"))
    assert "404" in missing["error"]
    record = read_stage_record(root / "download")
    assert record["rows_in"] == len(expected) == record["rows_out"] + sum(record["drops"].values())
    assert record["download"]["shards"] == 2


def test_embeddings_are_unit_float16_keyed_by_uid_with_clip_score(image_run):
    root, _, _ = image_run
    embeddings = _embeddings(root / "embed")
    rows = pq.read_table(root / "embed", columns=["uid", "clip_score"]).sort_by("uid")
    assert embeddings.column("uid").to_pylist() == rows.column("uid").to_pylist()
    image = np.stack(embeddings.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    text = np.stack(embeddings.column("text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert embeddings.schema.field("image_embedding").type == pa.list_(pa.float16(), 32)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose((image * text).sum(axis=1), rows.column("clip_score").to_numpy(), atol=5e-3)
    model = read_stage_record(root / "embed")["embed"]["model"]
    assert model["model"] == "tiny-clip" and model["embed_dim"] == 32 and model["image_size"] == [64, 64]


def _assert_within_one_ulp(a: pa.Table, b: pa.Table) -> None:
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    for column in ("image_embedding", "text_embedding"):
        left = np.stack(a.column(column).to_numpy(zero_copy_only=False))
        right = np.stack(b.column(column).to_numpy(zero_copy_only=False))
        # Adjacent float16 values of the same sign differ by one in their bit patterns.
        ulps = np.abs(left.view(np.int16).astype(np.int32) - right.view(np.int16).astype(np.int32))
        assert ulps.max() <= 1, column


def test_engines_and_worker_counts_agree_within_one_fp16_ulp(spark, image_run):
    root, _, _ = image_run
    reference = _embeddings(root / "embed")
    run_one_stage(spark, "embed", root / "download", root / "embed_workers", {**TINY, "num_workers": 2})
    run_one_stage(spark, "embed", root / "download", root / "embed_spark",
                  {**TINY, "num_workers": 0, "engine": "spark"})
    _assert_within_one_ulp(reference, _embeddings(root / "embed_workers"))
    _assert_within_one_ulp(reference, _embeddings(root / "embed_spark"))


def test_rerun_gives_byte_identical_embeddings(spark, image_run):
    root, _, _ = image_run
    run_one_stage(spark, "embed", root / "download", root / "embed_again", {**TINY, "num_workers": 0})
    for first in sorted((root / "embed" / ARTIFACTS_DIR / "embeddings").glob("*.parquet")):
        again = root / "embed_again" / ARTIFACTS_DIR / "embeddings" / first.name
        assert first.read_bytes() == again.read_bytes()


def test_download_rerun_after_a_crash_fetches_nothing_again(spark, served, image_run, tmp_path, monkeypatch):
    root, _, _ = image_run
    server, _ = served
    options = _download_options(server, shard_rows=9)

    def crash(*args, **kwargs):
        raise RuntimeError("killed after the shards were downloaded")

    with monkeypatch.context() as patch:
        patch.setattr(StageRun, "record", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run_one_stage(spark, "download", root / "ingest", tmp_path / "download", options)
    assert not (tmp_path / "download").exists()
    requests_after_crash = server.requests
    resumed = run_one_stage(spark, "download", root / "ingest", tmp_path / "download", options)
    assert server.requests == requests_after_crash
    assert resumed["download"]["shards_resumed"] == 2
    assert resumed["rows_out"] == read_stage_record(root / "download")["rows_out"]
    assert not (tmp_path / ".download.work").exists()


def test_release_carries_the_images_as_tars_twinned_with_the_parquet_shards(spark, image_run):
    root, _, _ = image_run
    run_one_stage(spark, "publish", root / "dedup_image", root / "publish", {"shard_rows": 5})
    spark.conf.set("spark.sql.shuffle.partitions", "1")
    try:
        run_one_stage(spark, "publish", root / "dedup_image", root / "publish_again", {"shard_rows": 5})
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    assert verify_manifest(root / "publish") == []
    manifest = json.loads((root / "publish" / "manifest.json").read_text())
    assert len(manifest["image_shards"]) == len(manifest["shards"]) >= 2
    for shard, tar_entry in zip(manifest["shards"], manifest["image_shards"], strict=True):
        rows = pq.read_table(root / "publish" / shard["path"])
        assert "image_shard" not in rows.column_names and "image_key" not in rows.column_names
        with tarfile.open(root / "publish" / tar_entry["path"]) as tar:
            names = tar.getnames()
            uids = rows.column("uid").to_pylist()
            assert names == [f"{uid}.{ext}" for uid in uids for ext in ("jpg", "txt", "json")]
            sample = json.loads(tar.extractfile(f"{uids[0]}.json").read())
            assert sample["uid"] == uids[0] and "clip_score" in sample
            Image.open(io.BytesIO(tar.extractfile(f"{uids[0]}.jpg").read())).verify()
        again = root / "publish_again" / tar_entry["path"]
        assert again.read_bytes() == (root / "publish" / tar_entry["path"]).read_bytes()


def test_run_config_chains_download_embed_and_dedup_image(served, image_run, tmp_path):
    root, expected, _ = image_run
    server, _ = served
    config = {
        "name": "images", "input": str(root / "raw.parquet"), "seed": 0,
        "stages": [
            "ingest",
            {"download": {"allow_hosts": [f"127.0.0.1:{server.port}"], "image_size": 128,
                          "resize_mode": "keep_ratio", "shard_rows": 9, "thread_count": 4}},
            {"embed": {"model": "tiny-clip", "pretrained": "random", "device": "cpu", "num_workers": 0}},
            "dedup_image",
            {"publish": {"shard_rows": 100}},
        ],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "run")]) == 0
    assert cli_main(["verify", str(tmp_path / "run")]) == 0
    manifest = json.loads((tmp_path / "run" / "publish" / "manifest.json").read_text())
    assert manifest["totals"]["rows_in"] == len(expected)
    assert manifest["totals"]["rows_published"] == pq.read_table(root / "dedup_image").num_rows
    assert [stage["stage"] for stage in manifest["stages"]] == ["ingest", "download", "embed", "dedup_image"]


def test_rows_can_carry_the_image_bytes_as_parquet_with_images(spark, served, image_run, tmp_path):
    root, _, _ = image_run
    server, _ = served
    options = _download_options(server, shard_rows=9, image_bytes_column="jpg")
    run_one_stage(spark, "download", root / "ingest", tmp_path / "download", options)
    rows = pq.read_table(tmp_path / "download", columns=["uid", "image_shard", "image_key", "jpg"]).to_pylist()
    assert rows and all(row["jpg"] for row in rows)
    with TarReader() as reader:
        for row in rows:
            _, data = reader.image(tmp_path / "download" / ARTIFACTS_DIR / "images" / row["image_shard"],
                                   row["image_key"])
            assert data == row["jpg"]
    run_one_stage(spark, "publish", tmp_path / "download", tmp_path / "publish", {"shard_rows": 100})
    assert verify_manifest(tmp_path / "publish") == []
    with tarfile.open(next((tmp_path / "publish" / "images").glob("*.tar"))) as tar:
        sample = json.loads(tar.extractfile(next(n for n in tar.getnames() if n.endswith(".json"))).read())
    assert "jpg" not in sample and "_shard" not in sample and sample["image_width"] > 0
