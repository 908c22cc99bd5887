"""decontaminate on Spark: copies of evaluation images planted in a corpus of real photos are dropped, the other
photos are kept; evaluation sets as a folder or a parquet file; corpus hashes from a jpg column, from dedup_image's
image_phash, or from the download tars with embeddings (download -> embed with tiny-clip at random init ->
decontaminate, against an HTTP server on 127.0.0.1)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main as cli_main
from curation.image_server import NOT_FOUND, ImageServer, Response
from curation.io import ARTIFACTS_DIR, LEDGER_DIR
from curation.ops.uid import uid_of
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.schema import Reason
from tests import imagekit

pytestmark = pytest.mark.spark

EVAL_PHOTOS = 6
TINY = {"model": "tiny-clip", "pretrained": "random", "device": "cpu", "batch_size": 8, "num_workers": 0}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _copies(photo: Image.Image) -> dict[str, bytes]:
    """What a scraped page may hold of an evaluation image: re-encoded, downscaled to 50-70 %, cropped by 2 px."""
    width, height = photo.size
    return {
        "q30": imagekit.jpeg(photo, 30),
        "half": imagekit.jpeg(photo.resize((width // 2, height // 2), Image.Resampling.BICUBIC), 85),
        "60pct": imagekit.jpeg(photo.resize((width * 6 // 10, height * 6 // 10), Image.Resampling.BILINEAR), 75),
        "70pct": imagekit.jpeg(photo.resize((width * 7 // 10, height * 7 // 10), Image.Resampling.LANCZOS), 95),
        "crop2": imagekit.jpeg(photo.crop((2, 2, width - 2, height - 2)), 90),
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared_data):
    """Evaluation photos in a folder and in a parquet file; a corpus of the other photos plus copies of the
    evaluation photos (captions say which). Needs the real photos (skipped without them): the thresholds and the
    separation of copies from other photos are measured on real pictures, not on generated stand-ins."""
    root = tmp_path_factory.mktemp("decontaminate")
    photos = imagekit.photos(16)
    evaluation, others = photos[:EVAL_PHOTOS], photos[EVAL_PHOTOS:]
    folder = root / "eval_folder"
    folder.mkdir()
    names = [f"class{i % 2}/eval{i:02d}.png" for i in range(EVAL_PHOTOS)]
    for name, photo in zip(names, evaluation, strict=True):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(_png(photo))
    (folder / "labels.csv").write_text("file,label\n")
    pq.write_table(pa.table({"label": names, "image": pa.array([_png(p) for p in evaluation], pa.binary())}),
                   root / "eval.parquet")
    corpus = {f"photo {i}": imagekit.jpeg(photo, 88) for i, photo in enumerate(others)}
    source = {}
    for i, photo in enumerate(evaluation):
        for kind, data in _copies(photo).items():
            corpus[f"copy {kind} of eval {i}"] = data
            source[f"copy {kind} of eval {i}"] = i
    return {"root": root, "folder": folder, "names": names, "corpus": corpus, "source": source}


def _uid(caption: str) -> str:
    return uid_of(f"https://img.example/{caption}".encode(), caption.encode())


def _ledger(stage_dir) -> dict[str, dict]:
    if not (stage_dir / LEDGER_DIR).exists():
        return {}
    return {row["uid"]: row for row in pq.read_table(stage_dir / LEDGER_DIR).to_pylist()}


def _kept(stage_dir) -> set[str]:
    return set(pq.read_table(stage_dir, columns=["uid"]).column("uid").to_pylist())


@pytest.fixture(scope="module")
def jpg_ingest(spark, planted):
    root = planted["root"]
    captions = sorted(planted["corpus"])
    table = pa.table({"url": [f"https://img.example/{c}" for c in captions], "caption": captions,
                      "jpg": pa.array([planted["corpus"][c] for c in captions], pa.binary())})
    pq.write_table(table, root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest", {"keep_columns": ["jpg"]})
    return root / "ingest"


def _assert_copies_dropped_and_photos_kept(stage_dir, planted, eval_label):
    ledger, kept = _ledger(stage_dir), _kept(stage_dir)
    for caption in planted["corpus"]:
        uid = _uid(caption)
        if caption in planted["source"]:
            assert uid in ledger and uid not in kept, f"{caption} was not dropped"
            assert ledger[uid]["reason"] == Reason.EVAL_CONTAMINATION and ledger[uid]["stage"] == "decontaminate"
            detail = json.loads(ledger[uid]["detail"])
            assert detail["test"] == "phash" and 0 <= detail["distance"] <= 4
            assert (detail["eval_file"], detail["eval_row"]) == eval_label(planted["source"][caption]), caption
        else:
            assert uid in kept and uid not in ledger, f"{caption} is no copy, but was dropped"
    return ledger


def test_copies_are_dropped_with_an_evaluation_folder(planted, jpg_ingest):
    output = planted["root"] / "decon_folder"
    assert cli_main(["decontaminate", "--input", str(jpg_ingest), "--output", str(output),
                     "--eval-images", str(planted["folder"])]) == 0
    _assert_copies_dropped_and_photos_kept(output, planted, lambda i: (planted["names"][i], None))
    record = read_stage_record(output)
    copies = len(planted["source"])
    assert record["stage"] == "decontaminate" and record["drops"] == {Reason.EVAL_CONTAMINATION: copies}
    assert record["rows_in"] == len(planted["corpus"]) == record["rows_out"] + copies
    summary = record["decontaminate"]
    assert summary["eval_set"]["images"] == EVAL_PHOTOS and summary["eval_set"]["ignored_files"] == 1
    assert len(summary["eval_set"]["fingerprint"]) == 64
    assert summary["hash_source"] == "column jpg" and summary["embeddings"] is None
    assert summary["drops_by_test"] == {"phash": copies, "cosine": 0} and summary["unhashed_rows"] == 0
    # Rows pass through unchanged, columns included.
    assert pq.read_schema(next(output.glob("*.parquet"))).names == pq.read_schema(
        next(jpg_ingest.glob("*.parquet"))).names


def test_copies_are_dropped_with_an_evaluation_parquet_file(spark, planted, jpg_ingest):
    output = planted["root"] / "decon_parquet"
    options = {"eval_images": str(planted["root"] / "eval.parquet"), "eval_image_column": "image"}
    record = run_one_stage(spark, "decontaminate", jpg_ingest, output, options)
    _assert_copies_dropped_and_photos_kept(output, planted, lambda i: ("eval.parquet", i))
    folder_record = read_stage_record(planted["root"] / "decon_folder")
    assert record["rows_out"] == folder_record["rows_out"]
    assert record["decontaminate"]["eval_set"]["parquet_files"] == 1


def test_precomputed_image_phash_is_used_after_dedup_image(spark, planted, jpg_ingest):
    root = planted["root"]
    run_one_stage(spark, "dedup_image", jpg_ingest, root / "dedup_image")
    record = run_one_stage(spark, "decontaminate", root / "dedup_image", root / "decon_after_dedup",
                           {"eval_images": str(planted["folder"])})
    assert record["decontaminate"]["hash_source"] == "column image_phash"
    survivors = _kept(root / "dedup_image")
    kept = _kept(root / "decon_after_dedup")
    # dedup_image left one copy per evaluation photo; decontaminate drops it; every other photo stays.
    for caption in planted["corpus"]:
        if caption in planted["source"]:
            assert _uid(caption) not in kept
        else:
            assert _uid(caption) in kept
    assert record["drops"] == {Reason.EVAL_CONTAMINATION: len(survivors - kept)} and len(survivors - kept) > 0


def test_a_larger_max_distance_is_no_excuse_for_dropping_other_photos(spark, planted, jpg_ingest):
    # Distinct real photos are >= 20 bits apart; copies were <= 4. A generous 10 still separates them.
    record = run_one_stage(spark, "decontaminate", jpg_ingest, planted["root"] / "decon_d10",
                           {"eval_images": str(planted["folder"]), "max_distance": 10})
    assert record["rows_out"] == len(planted["corpus"]) - len(planted["source"])


def test_bad_evaluation_sets_fail_before_writing(spark, planted, jpg_ingest, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(planted["corpus"]["photo 0"][:200])
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        run_one_stage(spark, "decontaminate", jpg_ingest, tmp_path / "out", {"eval_images": str(tmp_path)})
    (tmp_path / "broken.jpg").unlink()
    with pytest.raises(ValueError, match="no evaluation image"):
        run_one_stage(spark, "decontaminate", jpg_ingest, tmp_path / "out", {"eval_images": str(tmp_path)})
    with pytest.raises(ValueError, match="no embed stage upstream"):
        run_one_stage(spark, "decontaminate", jpg_ingest, tmp_path / "out",
                      {"eval_images": str(planted["folder"]), "use_embeddings": "always"})
    assert not (tmp_path / "out").exists()


def test_an_empty_corpus_gives_an_empty_stage_folder(spark, planted):
    root = planted["root"] / "empty"
    root.mkdir()
    # The one raw row has no url: ingest rejects it, so decontaminate reads an empty stage.
    pq.write_table(pa.table({"url": [""], "caption": ["no url"], "jpg": pa.array([b"x"], pa.binary())}),
                   root / "raw.parquet")
    run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest", {"keep_columns": ["jpg"]})
    record = run_one_stage(spark, "decontaminate", root / "ingest", root / "out",
                           {"eval_images": str(planted["folder"])})
    assert (record["rows_in"], record["rows_out"], record["drops"]) == (0, 0, {})
    assert record["decontaminate"]["drops_by_test"] == {"phash": 0, "cosine": 0}


# ---------------------------------------------------------------------------------------------------- embeddings


# tiny-clip at random init gives meaningless but deterministic embeddings, and every photo is close to every other
# (cosines of 0.96-0.999). Measured in this chain (eval photos embedded at full size, corpus images after download
# at 128 px): nearest-evaluation cosine of the other photos 0.9646-0.9936; of the pHash copies 0.9988-1.0000; of
# 5 % crops of the evaluation photos, which pHash misses (distance 6-18), 0.9965-0.9993. 0.995 lies in the gap
# between the other photos and the crops, with about 0.0015 on either side. With a real CLIP model the gap is wide
# and the default 0.95 is a sensible start.
MIN_COSINE = 0.995


def _crop_5_percent(photo: Image.Image) -> bytes:
    width, height = photo.size
    return imagekit.jpeg(photo.crop((width // 20, height // 20, width - width // 20, height - height // 20)), 90)


@pytest.fixture(scope="module")
def embedded(spark, planted):
    """download (from 127.0.0.1) -> embed (tiny-clip, random init) over the planted corpus plus 5 % crops of the
    evaluation photos."""
    root = planted["root"] / "chain"
    root.mkdir()
    corpus = dict(planted["corpus"])
    crops = {}
    for i, photo in enumerate(imagekit.photos(16)[:EVAL_PHOTOS]):
        corpus[f"crop 5% of eval {i}"] = _crop_5_percent(photo)
        crops[f"crop 5% of eval {i}"] = i
    captions = sorted(corpus)
    routes = {f"/{i}.jpg": Response(200, corpus[c], "image/jpeg") for i, c in enumerate(captions)}
    with ImageServer(lambda path: routes.get(path, NOT_FOUND)) as server:
        urls = [f"{server.base_url}/{i}.jpg" for i in range(len(captions))]
        pq.write_table(pa.table({"url": urls, "caption": captions}), root / "raw.parquet")
        run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest")
        run_one_stage(spark, "download", root / "ingest", root / "download", {
            "allow_hosts": [f"127.0.0.1:{server.port}"], "image_size": 128, "resize_mode": "keep_ratio", "timeout": 5,
            "thread_count": 4, "shard_rows": 32})
    assert read_stage_record(root / "download")["drops"] == {}
    run_one_stage(spark, "embed", root / "download", root / "embed", TINY)
    uid_of_caption = {c: uid_of(u.encode(), c.encode()) for u, c in zip(urls, captions, strict=True)}
    return {"root": root, "uid": uid_of_caption, "crops": crops}


def _nearest_cosines(embed_dir, eval_folder) -> dict[str, float]:
    """Each corpus row's cosine to its nearest evaluation image, computed here: the stored image embeddings against
    the evaluation photos embedded by the embed stage's own function (embed_batch) in float64."""
    from curation.gpu.clip_model import load_model
    from curation.gpu.encode import embed_batch

    embeddings = pq.read_table(embed_dir / ARTIFACTS_DIR / "embeddings")
    corpus = np.stack(embeddings.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    model = load_model("tiny-clip", None, "cpu")
    paths = sorted(eval_folder.rglob("*.png"))
    evaluation, _, _ = embed_batch(model, [Image.open(p) for p in paths], ["x"] * len(paths))
    evaluation = evaluation.astype(np.float64)
    evaluation /= np.linalg.norm(evaluation, axis=1, keepdims=True)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    return dict(zip(embeddings.column("uid").to_pylist(), (corpus @ evaluation.T).max(axis=1).tolist(), strict=True))


def test_embeddings_catch_crops_that_phash_misses(spark, planted, embedded):
    root, uid = embedded["root"], embedded["uid"]
    output = root / "decontaminate"
    record = run_one_stage(spark, "decontaminate", root / "embed", output,
                           {"eval_images": str(planted["folder"]), "min_cosine": MIN_COSINE})
    ledger, kept = _ledger(output), _kept(output)
    for caption, row_uid in uid.items():
        if caption in planted["source"]:
            detail = json.loads(ledger[row_uid]["detail"])
            assert detail["test"] == "phash", caption
            assert detail["eval_file"] == planted["names"][planted["source"][caption]]
        elif caption in embedded["crops"]:
            assert row_uid in ledger, f"{caption} was not dropped"
            detail = json.loads(ledger[row_uid]["detail"])
            assert detail["test"] == "cosine" and detail["cosine"] >= MIN_COSINE, caption
            assert detail["eval_file"] == planted["names"][embedded["crops"][caption]], caption
        else:
            assert row_uid in kept, f"{caption} is no copy, but was dropped"
    summary = record["decontaminate"]
    assert summary["hash_source"] == "download tars"
    assert summary["drops_by_test"] == {"phash": len(planted["source"]), "cosine": len(embedded["crops"])}
    # The stage's cosines are those of the embed stage's model, recomputed here independently.
    expected = _nearest_cosines(root / "embed", planted["folder"])
    for row in ledger.values():
        detail = json.loads(row["detail"])
        if detail["test"] == "cosine":
            assert detail["cosine"] == pytest.approx(expected[row["uid"]], abs=1e-4)
    embeddings = summary["embeddings"]
    assert embeddings["max_cosine_kept"] == pytest.approx(max(expected[u] for u in kept), abs=1e-4)
    assert embeddings["max_cosine_kept"] < MIN_COSINE
    embed_model = read_stage_record(root / "embed")["embed"]["model"]
    assert {k: embeddings["model"][k] for k in ("model", "pretrained_tag", "embed_dim", "image_size")} == \
        {k: embed_model[k] for k in ("model", "pretrained_tag", "embed_dim", "image_size")}
    assert embeddings["embed_stage"] == "../embed"


def test_without_embeddings_only_phash_copies_are_dropped(spark, planted, embedded):
    root = embedded["root"]
    record = run_one_stage(spark, "decontaminate", root / "embed", root / "decontaminate_phash_only",
                           {"eval_images": str(planted["folder"]), "use_embeddings": "never"})
    kept = _kept(root / "decontaminate_phash_only")
    assert record["decontaminate"]["embeddings"] is None
    assert record["drops"] == {Reason.EVAL_CONTAMINATION: len(planted["source"])}
    assert all(embedded["uid"][caption] in kept for caption in embedded["crops"])
