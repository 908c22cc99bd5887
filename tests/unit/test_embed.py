"""The local embedding engine on the CPU, with the tiny-clip config at random init (no weights are downloaded)."""

import csv
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import webdataset
from PIL import Image

from curation.gpu.clip_model import CheckpointError, load_model
from curation.gpu.encode import embed_batch
from curation.gpu.shard_embedding import embed_shards, embedding_schema, read_shard_failures, read_shard_metadata

EMBED_DIM = 32  # tiny-clip.json
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return load_model("tiny-clip", None, device="cpu")


def generated_image(rng: np.random.Generator, mode: str) -> Image.Image:
    """A smooth random picture (a few colour blobs upscaled, plus noise), of a random size and aspect ratio."""
    width, height = (int(side) for side in rng.integers(40, 160, size=2))
    blobs = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize((width, height))
    noise = rng.normal(0, 12, size=(height, width, 3))
    picture = Image.fromarray(np.clip(np.asarray(blobs) + noise, 0, 255).astype(np.uint8))
    return picture.convert(mode)


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> str:
    """A tar as img2dataset writes it: per sample <key>.jpg|png, <key>.txt, <key>.json with the uid."""
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def sample(key: str, image_extension: str, image_bytes: bytes, caption: str, uid: str | None) -> dict:
    return {"__key__": key, image_extension: image_bytes, "txt": caption, "json": {"uid": uid} if uid else {}}


@pytest.fixture(scope="module")
def generated_shards(tmp_path_factory) -> dict:
    """Two shards of generated pictures, uids in no particular order. The second also holds a jpg that is not an
    image and a sample without a uid, which must be reported rather than lost."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    images: dict[str, tuple[Image.Image, str]] = {}
    shards = []
    for shard_index, (count, extension, mode) in enumerate([(9, "jpg", "RGB"), (7, "png", "RGBA")]):
        samples = []
        for row in range(count):
            uid = f"{rng.integers(1 << 62):016x}"
            image = generated_image(rng, mode if row % 3 else "L")
            caption = f"picture {row} of shard {shard_index}: {' '.join(rng.choice(['red', 'blue', 'cat'], 3))}"
            images[uid] = (image, caption)
            image_format = "JPEG" if extension == "jpg" else "PNG"
            samples.append(
                sample(f"{shard_index:05d}{row:04d}", extension, encoded(image, image_format), caption, uid)
            )
        if shard_index == 1:
            samples.insert(2, sample("000019998", "jpg", b"\xff\xd8 this is not a jpeg", "broken", "corrupt-uid"))
            samples.append(sample("000019999", "jpg", encoded(generated_image(rng, "RGB"), "JPEG"), "no uid", None))
        shards.append(write_shard(folder / f"{shard_index:05d}.tar", samples))
    return {"paths": shards, "images": images}


def read_outputs(paths: list[str]) -> list[pa.Table]:
    return [pq.read_table(path) for path in paths]


def embeddings(table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column).combine_chunks()
    return np.asarray(values.flatten()).reshape(len(values), -1)


def assert_identical(first: list[pa.Table], second: list[pa.Table]) -> None:
    for left, right in zip(first, second, strict=True):
        assert left.column("uid").to_pylist() == right.column("uid").to_pylist()
        for column in ("image_embedding", "text_embedding"):
            # Bit patterns, so that "identical" means identical float16 values.
            assert np.array_equal(embeddings(left, column).view(np.uint16), embeddings(right, column).view(np.uint16))
        assert np.array_equal(left.column("clip_score").to_numpy(), right.column("clip_score").to_numpy())


def test_results_do_not_depend_on_the_number_of_workers(tiny_model, generated_shards, tmp_path):
    in_process = embed_shards(tiny_model, generated_shards["paths"], tmp_path / "w0", batch_size=BATCH_SIZE)
    two_workers = embed_shards(
        tiny_model, generated_shards["paths"], tmp_path / "w2", batch_size=BATCH_SIZE, num_workers=2
    )
    assert [Path(path).name for path in in_process] == ["00000.parquet", "00001.parquet"]
    assert_identical(read_outputs(in_process), read_outputs(two_workers))
    assert read_shard_failures(in_process[1]) == read_shard_failures(two_workers[1])


def test_outputs_hold_unit_embeddings_sorted_by_uid(tiny_model, generated_shards, tmp_path):
    outputs = embed_shards(tiny_model, generated_shards["paths"], tmp_path, batch_size=BATCH_SIZE)
    tables = read_outputs(outputs)
    assert [table.num_rows for table in tables] == [9, 7]
    expected_uids = set(generated_shards["images"])
    for table in tables:
        assert table.schema.remove_metadata() == embedding_schema(EMBED_DIM)
        uids = table.column("uid").to_pylist()
        assert uids == sorted(uids) and set(uids) <= expected_uids
        image = embeddings(table, "image_embedding").astype(np.float32)
        text = embeddings(table, "text_embedding").astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=2e-3)
        clip_score = table.column("clip_score").to_numpy()
        assert clip_score.dtype == np.float32 and np.all(np.abs(clip_score) <= 1.0)
        # clip_score is the float32 cosine, so it agrees with the stored float16 vectors to their precision.
        np.testing.assert_allclose(clip_score, np.sum(image * text, axis=1), atol=2e-3)
    metadata = read_shard_metadata(outputs[0])
    assert metadata["shard"] == generated_shards["paths"][0]
    assert metadata["model"] == tiny_model.record


def test_shard_outputs_match_embed_batch(tiny_model, generated_shards, tmp_path):
    (output,) = embed_shards(tiny_model, generated_shards["paths"][:1], tmp_path, batch_size=BATCH_SIZE)
    table = pq.read_table(output)
    uids = table.column("uid").to_pylist()
    # The shard holds JPEG-compressed copies of the pictures; embed the very same decoded bytes.
    decoded = [Image.open(io.BytesIO(encoded(generated_shards["images"][uid][0], "JPEG"))) for uid in uids]
    captions = [generated_shards["images"][uid][1] for uid in uids]
    image, text, clip_score = embed_batch(tiny_model, decoded, captions)
    assert image.dtype == text.dtype == np.float16 and clip_score.dtype == np.float32
    # Batches of another size may round differently in the last float16 bit.
    np.testing.assert_allclose(image, embeddings(table, "image_embedding"), atol=1e-3)
    np.testing.assert_allclose(text, embeddings(table, "text_embedding"), atol=1e-3)
    np.testing.assert_allclose(clip_score, table.column("clip_score").to_numpy(), atol=1e-3)


def test_undecodable_samples_are_reported_with_uid_and_reason(tiny_model, generated_shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="curation.gpu.shard_embedding"):
        outputs = embed_shards(tiny_model, generated_shards["paths"], tmp_path, batch_size=BATCH_SIZE)
    assert read_shard_failures(outputs[0]) == []
    failures = {failure.key: failure for failure in read_shard_failures(outputs[1])}
    assert set(failures) == {"000019998", "000019999"}
    assert failures["000019998"].uid == "corrupt-uid"
    assert "UnidentifiedImageError" in failures["000019998"].reason
    assert failures["000019999"].uid is None and "uid" in failures["000019999"].reason
    assert all(failure.shard == generated_shards["paths"][1] for failure in failures.values())
    assert "corrupt-uid" in caplog.text and "UnidentifiedImageError" in caplog.text
    assert "corrupt-uid" not in pq.read_table(outputs[1]).column("uid").to_pylist()


def test_rerun_skips_shards_already_written(tiny_model, generated_shards, tmp_path, caplog):
    first = embed_shards(tiny_model, generated_shards["paths"], tmp_path, batch_size=BATCH_SIZE)
    kept_mtime = Path(first[0]).stat().st_mtime_ns
    expected = read_outputs(first)
    Path(first[1]).unlink()
    with caplog.at_level(logging.INFO, logger="curation.gpu.shard_embedding"):
        second = embed_shards(tiny_model, generated_shards["paths"], tmp_path, batch_size=BATCH_SIZE)
    assert second == first
    assert Path(first[0]).stat().st_mtime_ns == kept_mtime
    assert f"skipping {generated_shards['paths'][0]}" in caplog.text
    assert_identical(read_outputs(second), expected)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary files left


def test_resume_refuses_outputs_of_another_model(tiny_model, generated_shards, tmp_path):
    embed_shards(tiny_model, generated_shards["paths"][:1], tmp_path / "out", batch_size=BATCH_SIZE)
    checkpoint = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(tiny_model.model.state_dict(), checkpoint)
    other = load_model("tiny-clip", str(checkpoint), device="cpu")
    with pytest.raises(ValueError, match="another model.*checkpoint_sha256"):
        embed_shards(other, generated_shards["paths"][:1], tmp_path / "out", batch_size=BATCH_SIZE)


def test_empty_shard_gives_empty_output(tiny_model, tmp_path):
    (output,) = embed_shards(tiny_model, [write_shard(tmp_path / "empty.tar", [])], tmp_path / "out")
    table = pq.read_table(output)
    assert table.num_rows == 0 and table.schema.remove_metadata() == embedding_schema(EMBED_DIM)


def test_shards_with_the_same_name_are_refused(tiny_model, generated_shards, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    copy = write_shard(tmp_path / "elsewhere" / "00000.tar", [])
    with pytest.raises(ValueError, match="share a file name"):
        embed_shards(tiny_model, [generated_shards["paths"][0], copy], tmp_path / "out")


def test_real_photos_embed_identically_with_workers(tiny_model, shared_data, tmp_path):
    photos = shared_data / "photos_img2dataset"
    with open(photos / "labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    samples = [
        sample(
            f"{row:09d}",
            Path(label["path"]).suffix[1:],
            (photos / label["path"]).read_bytes(),
            label["description_written_by_data_hunter"],
            f"photo-{row:02d}",
        )
        for row, label in enumerate(labels)
    ]
    shard = write_shard(tmp_path / "photos.tar", samples)
    (in_process,) = embed_shards(tiny_model, [shard], tmp_path / "w0", batch_size=BATCH_SIZE)
    (two_workers,) = embed_shards(tiny_model, [shard], tmp_path / "w2", batch_size=BATCH_SIZE, num_workers=2)
    assert_identical(read_outputs([in_process]), read_outputs([two_workers]))
    assert read_shard_failures(in_process) == []
    table = pq.read_table(in_process)
    assert table.num_rows == len(labels) == 8
    np.testing.assert_allclose(
        np.linalg.norm(embeddings(table, "image_embedding").astype(np.float32), axis=1), 1.0, atol=2e-3
    )


def reference_embeddings(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = [generated_image(rng, "RGB") for _ in range(3)]
    return embed_batch(model, images, ["a red square", "a blue cat", ""])


def test_checkpoints_load_from_safetensors_and_torch_files(tiny_model, tmp_path):
    state_dict = tiny_model.model.state_dict()
    safetensors_file = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(state_dict, safetensors_file)
    torch_file = tmp_path / "tiny.pt"
    torch.save(state_dict, torch_file)
    # An open_clip training checkpoint: weights under "state_dict", DistributedDataParallel prefix, optimiser state.
    training_file = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, training_file)

    expected = reference_embeddings(tiny_model)
    for checkpoint in (safetensors_file, torch_file, training_file):
        loaded = load_model("tiny-clip", str(checkpoint), device="cpu")
        assert loaded.record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert loaded.record["pretrained_tag"] is None
        for got, want in zip(reference_embeddings(loaded), expected, strict=True):
            assert np.array_equal(got, want)


def test_pickled_objects_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload_file = tmp_path / "payload.pt"
    torch.save(Payload(), payload_file)
    with pytest.raises(CheckpointError, match="refused"):
        load_model("tiny-clip", str(payload_file), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"step": 1}, {}], ids=["list", "no-tensors", "empty"])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, content):
    checkpoint = tmp_path / "not_a_state_dict.pt"
    torch.save(content, checkpoint)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model("tiny-clip", str(checkpoint), device="cpu")


def test_unknown_pretrained_is_refused_without_download(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint file nor an open_clip tag"):
        load_model("tiny-clip", str(tmp_path / "missing.pt"), device="cpu")


def test_cpu_runs_in_float32_only():
    with pytest.raises(ValueError, match="float32 reference"):
        load_model("tiny-clip", None, device="cpu", precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_device_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load_model("tiny-clip", None, device="cuda")
