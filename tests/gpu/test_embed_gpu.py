"""CUDA mixed-precision embeddings against the float32 CPU reference (DESIGN.md section 5). Skipped without CUDA."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset
from PIL import Image

from curation.gpu.clip_model import load_model
from curation.gpu.encode import embed_batch
from curation.gpu.shard_embedding import embed_shards, read_shard_failures

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SAMPLES = 40


def generated_jpeg(rng: np.random.Generator) -> bytes:
    width, height = (int(side) for side in rng.integers(64, 320, size=2))
    picture = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG")
    return buffer.getvalue()


def per_row_cosine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left, right = left.astype(np.float32), right.astype(np.float32)
    return np.sum(left * right, axis=1) / (np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1))


def embeddings(path: str, column: str) -> np.ndarray:
    values = pq.read_table(path).column(column).combine_chunks()
    return np.asarray(values.flatten()).reshape(len(values), -1)


@pytest.mark.parametrize("model_name", ["tiny-clip", "ViT-B-32"])
def test_cuda_fp16_embeddings_match_cpu(model_name, tmp_path):
    rng = np.random.default_rng(11)
    shard = tmp_path / "00000.tar"
    captions = [f"photo number {row} of a {rng.choice(['cat', 'dog', 'motel sign'])}" for row in range(SAMPLES)]
    with webdataset.TarWriter(str(shard)) as writer:
        for row, caption in enumerate(captions):
            writer.write(
                {"__key__": f"{row:09d}", "jpg": generated_jpeg(rng), "txt": caption, "json": {"uid": f"u{row:04d}"}}
            )

    # The same seed gives the same random weights: load_model builds on the CPU before moving the model.
    torch.manual_seed(0)
    cpu_model = load_model(model_name, None, device="cpu")
    torch.manual_seed(0)
    cuda_model = load_model(model_name, None, device="cuda")
    assert cuda_model.record["precision"] == "fp16" and cuda_model.record["device"] == "cuda"

    (cpu_output,) = embed_shards(cpu_model, [str(shard)], tmp_path / "cpu", batch_size=16)
    (cuda_output,) = embed_shards(cuda_model, [str(shard)], tmp_path / "cuda", batch_size=16, num_workers=2)
    assert read_shard_failures(cuda_output) == []
    assert pq.read_table(cuda_output).column("uid").to_pylist() == pq.read_table(cpu_output).column("uid").to_pylist()
    for column in ("image_embedding", "text_embedding"):
        assert per_row_cosine(embeddings(cuda_output, column), embeddings(cpu_output, column)).min() > 0.99
    cpu_score = pq.read_table(cpu_output).column("clip_score").to_numpy()
    cuda_score = pq.read_table(cuda_output).column("clip_score").to_numpy()
    np.testing.assert_allclose(cuda_score, cpu_score, atol=0.02)

    images = [Image.open(io.BytesIO(generated_jpeg(rng))) for _ in range(4)]
    cpu_image, cpu_text, _ = embed_batch(cpu_model, images, captions[:4])
    cuda_image, cuda_text, _ = embed_batch(cuda_model, images, captions[:4])
    assert per_row_cosine(cuda_image, cpu_image).min() > 0.99
    assert per_row_cosine(cuda_text, cpu_text).min() > 0.99
