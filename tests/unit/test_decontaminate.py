"""decontaminate's pure layer (evaluation sets, pHash matching of real photos) and its embedding layer (tiny-clip,
random init). The index itself (`PhashIndex`) is tested in test_imagehash."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.ops.decontaminate import (
    DecontaminateOptions,
    EvalSetError,
    hash_eval_set,
    iter_eval_images,
    match_detail,
)
from curation.ops.imagehash import NO_MATCH, PhashIndex, decode_image, perceptual_hash
from tests import imagekit

# ---------------------------------------------------------------------------------------------------- eval sets


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos():
    return imagekit.photos(8)


def _phash(data: bytes) -> int:
    return perceptual_hash(decode_image(data).image)


def test_a_folder_of_images_is_read_in_order_and_other_files_are_ignored(photos, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "second.png").write_bytes(_png(photos[1]))
    (tmp_path / "a.JPG").write_bytes(imagekit.jpeg(photos[0]))
    (tmp_path / "labels.csv").write_text("file,label\n")
    (tmp_path / ".hidden.png").write_bytes(b"not read")
    (tmp_path / "_meta.png").write_bytes(b"not read")
    eval_set = hash_eval_set(tmp_path)
    assert eval_set.files == ["a.JPG", "b/second.png"] and eval_set.rows == [None, None]
    assert eval_set.hashes.tolist() == [_phash(imagekit.jpeg(photos[0])), _phash(_png(photos[1]))]
    assert eval_set.summary() == {"source": str(tmp_path), "images": 2, "fingerprint": eval_set.fingerprint,
                                  "image_files": 2, "parquet_files": 0, "ignored_files": 1}


def test_a_parquet_file_gives_one_image_per_row_from_a_binary_or_struct_column(photos, tmp_path):
    images = [_png(p) for p in photos[:3]]
    pq.write_table(pa.table({"label": ["x", "y", "z"], "jpg": pa.array(images, pa.binary())}), tmp_path / "e.parquet")
    by_binary = hash_eval_set(tmp_path / "e.parquet")
    assert by_binary.files == ["e.parquet"] * 3 and by_binary.rows == [0, 1, 2]
    assert by_binary.hashes.tolist() == [_phash(data) for data in images]
    # Hugging Face `datasets` stores an Image feature as struct<bytes, path>.
    struct = pa.array([{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.table({"image": struct}), tmp_path / "hf" / "train-00000.parquet")
    by_struct = hash_eval_set(tmp_path / "hf", column="image")
    assert by_struct.files == ["train-00000.parquet"] * 3
    assert by_struct.hashes.tolist() == by_binary.hashes.tolist()
    # Same images, other files or rows: the same hashes, another fingerprint.
    assert by_struct.fingerprint != by_binary.fingerprint


def test_the_fingerprint_follows_the_content(photos, tmp_path):
    (tmp_path / "one.png").write_bytes(_png(photos[0]))
    first = hash_eval_set(tmp_path).fingerprint
    assert hash_eval_set(tmp_path).fingerprint == first
    (tmp_path / "one.png").write_bytes(_png(photos[1]))
    assert hash_eval_set(tmp_path).fingerprint != first


def test_an_undecodable_evaluation_image_is_an_error_naming_it(photos, tmp_path):
    (tmp_path / "good.png").write_bytes(_png(photos[0]))
    (tmp_path / "broken.jpg").write_bytes(imagekit.jpeg(photos[1])[:300])
    with pytest.raises(EvalSetError, match=r"broken\.jpg.*corrupt"):
        hash_eval_set(tmp_path)
    table = pa.table({"jpg": pa.array([_png(photos[0]), None], pa.binary())})
    pq.write_table(table, tmp_path / "set.parquet")
    with pytest.raises(EvalSetError, match=r"set\.parquet\[row 1\].*missing"):
        hash_eval_set(tmp_path / "set.parquet")


@pytest.mark.parametrize("case", ["empty folder", "only text", "missing", "no column", "wrong type", "not parquet"])
def test_unusable_evaluation_sets_are_errors(case, tmp_path):
    source = tmp_path / "eval"
    source.mkdir()
    expected = "no evaluation image"
    if case == "only text":
        (source / "README.txt").write_text("hello")
    elif case == "missing":
        source = tmp_path / "absent"
        expected = "does not exist"
    elif case == "no column":
        pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary())}), source / "s.parquet")
        expected = "no image column 'jpg'"
    elif case == "wrong type":
        pq.write_table(pa.table({"jpg": ["a string"]}), source / "s.parquet")
        expected = "not encoded image bytes"
    elif case == "not parquet":
        (source / "s.parquet").write_bytes(b"this is no parquet file")
        expected = "not a readable parquet file"
    with pytest.raises(EvalSetError, match=expected):
        hash_eval_set(source)


def test_iter_eval_images_yields_the_bytes_and_labels(photos, tmp_path):
    pq.write_table(pa.table({"jpg": pa.array([_png(photos[0])], pa.binary())}), tmp_path / "s.parquet")
    (image,) = iter_eval_images(tmp_path)
    assert (image.file, image.row, image.label) == ("s.parquet", 0, "s.parquet[row 0]")
    assert image.data == _png(photos[0])


def test_ledger_details_name_the_image_and_the_test():
    files, rows = ["cat.png", "set.parquet"], [None, 12]
    assert json.loads(match_detail(files, rows, 0, "phash", 3)) == {
        "test": "phash", "eval_file": "cat.png", "eval_row": None, "eval_index": 0, "distance": 3}
    assert json.loads(match_detail(files, rows, 1, "cosine", np.float32(0.97123456))) == {
        "test": "cosine", "eval_file": "set.parquet", "eval_row": 12, "eval_index": 1, "cosine": 0.971235}


def test_options_are_checked():
    options = DecontaminateOptions.from_options({"eval_images": "/x", "max_distance": "3", "min_cosine": "0.9",
                                                 "use_embeddings": "never", "partitions": None})
    assert (options.max_distance, options.min_cosine, options.use_embeddings) == (3, 0.9, "never")
    for bad in ({"eval_images": None}, {"eval_images": "/x", "use_embeddings": "sometimes"},
                {"eval_images": "/x", "min_cosine": 1.5}):
        with pytest.raises(ValueError):
            DecontaminateOptions.from_options(bad)
    with pytest.raises(ValueError, match="max_distance"):
        DecontaminateOptions(eval_images="x", max_distance=-1)


# ---------------------------------------------------------------------------------------------------- real photos


def _copies(photo: Image.Image) -> dict[str, bytes]:
    """Re-encoded, downscaled and slightly cropped copies, as a scraped web page would hold an evaluation image."""
    width, height = photo.size
    return {
        "jpeg q30": imagekit.jpeg(photo, 30),
        "jpeg q95": imagekit.jpeg(photo, 95),
        "50% bicubic": imagekit.jpeg(photo.resize((width // 2, height // 2), Image.Resampling.BICUBIC), 85),
        "60% bilinear": imagekit.jpeg(photo.resize((width * 6 // 10, height * 6 // 10), Image.Resampling.BILINEAR),
                                      75),
        "70% lanczos": imagekit.jpeg(photo.resize((width * 7 // 10, height * 7 // 10), Image.Resampling.LANCZOS),
                                     90),
        "2 px crop": imagekit.jpeg(photo.crop((2, 2, width - 2, height - 2)), 90),
    }


def test_copies_of_real_evaluation_photos_match_and_other_photos_do_not(tmp_path, shared_data):
    photos = imagekit.photos(16)
    evaluation, others = photos[: len(photos) // 2], photos[len(photos) // 2 :]
    for i, photo in enumerate(evaluation):
        (tmp_path / f"eval{i:02d}.png").write_bytes(_png(photo))
    eval_set = hash_eval_set(tmp_path)
    index = PhashIndex(eval_set.hashes, 4)
    for i, photo in enumerate(evaluation):
        copies = _copies(photo)
        found, distance = index.nearest(np.array([_phash(data) for data in copies.values()], np.uint64))
        assert found.tolist() == [i] * len(copies), dict(zip(copies, distance.tolist(), strict=True))
    found, _ = index.nearest(np.array([_phash(imagekit.jpeg(photo, 80)) for photo in others], np.uint64))
    assert found.tolist() == [NO_MATCH] * len(others)


# ---------------------------------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def tiny_model():
    from curation.gpu.decontaminate import model_like_embed_stage

    return model_like_embed_stage({"model": "tiny-clip", "pretrained": "random", "device": "cpu"})


def test_evaluation_images_embed_exactly_as_the_embed_stage_embeds(tiny_model, photos, tmp_path):
    from curation.gpu.decontaminate import embed_eval_images
    from curation.gpu.encode import embed_batch

    for i, photo in enumerate(photos[:5]):
        (tmp_path / f"{i}.jpg").write_bytes(imagekit.jpeg(photo))
    vectors = embed_eval_images(tiny_model, iter_eval_images(tmp_path), batch_size=2)
    assert vectors.dtype == np.float16 and vectors.shape == (5, tiny_model.embed_dim)
    stage_vectors, _, _ = embed_batch(tiny_model, [Image.open(tmp_path / f"{i}.jpg") for i in range(5)], ["x"] * 5)
    # The batch composition may move the last float32 bit, hence one float16 step at most.
    np.testing.assert_allclose(vectors.astype(np.float32), stage_vectors.astype(np.float32), atol=1e-3)


def test_the_nearest_evaluation_embedding_by_cosine_does_not_depend_on_the_batch():
    from curation.gpu.decontaminate import EvalEmbeddingIndex

    rng = np.random.default_rng(1)
    eval_vectors = rng.normal(size=(50, 32)).astype(np.float32)
    queries = np.concatenate([eval_vectors[:10] + rng.normal(scale=0.05, size=(10, 32)),
                              rng.normal(size=(30, 32))]).astype(np.float32)
    index = EvalEmbeddingIndex(eval_vectors, "cpu")
    nearest, cosine = index.nearest(queries)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    expected = unit(queries.astype(np.float64)) @ unit(eval_vectors.astype(np.float64)).T
    assert nearest[:10].tolist() == list(range(10))
    np.testing.assert_array_equal(nearest, expected.argmax(axis=1))
    np.testing.assert_allclose(cosine, expected.max(axis=1), atol=1e-6)
    for row in (0, 17, 39):
        alone = index.nearest(queries[row : row + 1])
        assert alone[0][0] == nearest[row] and alone[1][0] == cosine[row]
    assert index.nearest(np.empty((0, 32), np.float32))[0].shape == (0,)


def test_ties_and_near_ties_between_evaluation_images_resolve_the_same_in_any_batch():
    from curation.gpu.decontaminate import EvalEmbeddingIndex

    rng = np.random.default_rng(7)
    eval_vectors = rng.normal(size=(20, 64)).astype(np.float32)
    eval_vectors[11] = eval_vectors[4]  # an exact tie: the lowest index, 4, must win
    eval_vectors[15] = eval_vectors[6]
    eval_vectors[15, 0] = np.nextafter(eval_vectors[6, 0], np.float32(np.inf))  # a near-tie below float32 products
    tie_query = (eval_vectors[4] + rng.normal(scale=0.01, size=64)).astype(np.float32)
    near_query = (eval_vectors[6] + rng.normal(scale=0.01, size=64)).astype(np.float32)
    index = EvalEmbeddingIndex(eval_vectors, "cpu")

    def exact(query: np.ndarray, ids: list[int]) -> dict[int, float]:
        query64, others = query.astype(np.float64), eval_vectors[ids].astype(np.float64)
        return dict(zip(ids, (others @ query64 / np.linalg.norm(others, axis=1) / np.linalg.norm(query64)).tolist(),
                        strict=True))

    near = exact(near_query, [6, 15])
    expected = {"tie": (4, np.float32(exact(tie_query, [4])[4])),
                "near": (max(near, key=lambda i: (near[i], -i)), np.float32(max(near.values())))}
    for name, query in (("tie", tie_query), ("near", near_query)):
        ids, cosines = index.nearest(query[None])
        assert (ids[0], cosines[0]) == expected[name], name
        for others in (1, 7, 300):
            batch = rng.normal(size=(others + 1, 64)).astype(np.float32)
            for position in (0, others // 2, others):
                batch[position] = query
                ids, cosines = index.nearest(batch)
                assert ids.dtype == np.int64 and cosines.dtype == np.float32
                assert (ids[position], cosines[position]) == expected[name], (name, others, position)
                batch[position] = rng.normal(size=64)


def test_an_embed_stage_run_on_cuda_is_rebuilt_on_the_cpu_of_a_driver_without_one(caplog):
    import torch

    from curation.gpu.decontaminate import model_like_embed_stage

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the recorded device is used as it is")
    model = model_like_embed_stage({"model": "tiny-clip", "pretrained": "random", "device": "cuda",
                                    "precision": "fp16"})
    assert model.device.type == "cpu" and model.record["precision"] == "fp32"
    assert "no CUDA device" in caplog.text
