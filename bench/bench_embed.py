"""CLIP embedding throughput (images/s) of curation.gpu.encode and curation.gpu.shard_embedding with open_clip
ViT-B-32 at random init.

    python bench/bench_embed.py batch [--device cpu] [--batch-size 64] [--batches 3] [--out FILE]
    python bench/bench_embed.py make-shards DIR [--shards 16] [--samples-per-shard 4000]
    python bench/bench_embed.py shards DIR [--device cuda] [--batch-size 512] [--num-workers 8] [--out FILE]

`batch` times `embed_batch` on synthetic 224x224 pictures held in memory (preprocessing and tokenising in this
process included) and, separately, the model alone on the preprocessed tensors; one untimed warm-up batch first.
`make-shards` writes img2dataset-style webdataset tars of synthetic JPEG pictures (smooth colour fields plus noise,
so they compress and decode like photos rather than like noise or flat colour); `shards` times `embed_shards` end
to end over them, tar reading, JPEG decoding, preprocessing in DataLoader workers and parquet writing included, and
records the wall-clock window it ran in so that bench/gpu.sh can average the GPU utilisation over just that window.
Random weights cost the same as trained ones, so no weights are downloaded.
"""

# ruff: noqa: E402  (the Hugging Face switches below must be set before open_clip loads)
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse
import io
import json
import logging
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset
from benchkit import torch_machine
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(REPO_ROOT))

from curation.gpu.clip_model import load_model
from curation.gpu.encode import embed_batch, encode
from curation.gpu.shard_embedding import embed_shards

logger = logging.getLogger("bench_embed")

MODEL_NAME = "ViT-B-32"
IMAGE_SIDE = 224
WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "street", "sign", "beach", "old", "building", "at", "night"]


def synthetic_picture(rng: np.random.Generator, side: int = IMAGE_SIDE) -> Image.Image:
    colour_field = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    noise = rng.normal(0, 8, size=(side, side, 3))
    return Image.fromarray(np.clip(np.asarray(colour_field) + noise, 0, 255).astype(np.uint8))


def synthetic_caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 14))))


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", out)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(args) -> None:
    torch.manual_seed(0)
    model = load_model(MODEL_NAME, None, device=args.device, precision=args.precision)
    rng = np.random.default_rng(0)
    batches = [
        (
            [synthetic_picture(rng) for _ in range(args.batch_size)],
            [synthetic_caption(rng) for _ in range(args.batch_size)],
        )
        for _ in range(args.batches + 1)
    ]
    embed_batch(model, *batches[0])  # warm-up: first-call allocations and kernel selection

    started = time.perf_counter()
    for images, captions in batches[1:]:
        embed_batch(model, images, captions)
    synchronize(model.device)
    embed_batch_seconds = time.perf_counter() - started

    prepared = [
        (torch.stack([model.preprocess(image) for image in images]), model.tokenizer(captions))
        for images, captions in batches[1:]
    ]
    started = time.perf_counter()
    for pixels, tokens in prepared:
        encode(model, pixels, tokens)
    synchronize(model.device)
    model_seconds = time.perf_counter() - started

    images = args.batch_size * args.batches
    report = {
        **_report_header("embed_batch", model),
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "images": images,
        "embed_batch": {
            "seconds": round(embed_batch_seconds, 3),
            "images_per_second": round(images / embed_batch_seconds, 1),
        },
        "model_only": {"seconds": round(model_seconds, 3), "images_per_second": round(images / model_seconds, 1)},
        "machine": torch_machine(model.device),
    }
    write_report(report, args.out)
    logger.info(
        "%s on %s (%s): embed_batch %.1f images/s, model alone %.1f images/s",
        MODEL_NAME,
        report["device"],
        report["precision"],
        report["embed_batch"]["images_per_second"],
        report["model_only"]["images_per_second"],
    )


def write_synthetic_shard(job: tuple[Path, int, int]) -> str:
    path, shard_index, samples = job
    rng = np.random.default_rng(shard_index)
    with webdataset.TarWriter(str(path)) as writer:
        for row in range(samples):
            buffer = io.BytesIO()
            synthetic_picture(rng).save(buffer, format="JPEG", quality=90)
            uid = f"{shard_index:06d}{row:010d}"
            writer.write(
                {"__key__": uid, "jpg": buffer.getvalue(), "txt": synthetic_caption(rng), "json": {"uid": uid}}
            )
    return str(path)


def make_shards(args) -> None:
    args.dir.mkdir(parents=True, exist_ok=True)
    jobs = [(args.dir / f"{index:05d}.tar", index, args.samples_per_shard) for index in range(args.shards)]
    started = time.perf_counter()
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.map(write_synthetic_shard, jobs)
    logger.info(
        "wrote %d shards of %d pictures to %s in %.1f s",
        args.shards,
        args.samples_per_shard,
        args.dir,
        time.perf_counter() - started,
    )


def _report_header(benchmark: str, model) -> dict:
    return {
        "benchmark": benchmark,
        "model": MODEL_NAME,
        "pretrained": None,
        "device": model.record["device"],
        "precision": model.record["precision"],
        "image_side": IMAGE_SIDE,
    }


def bench_shards(args) -> None:
    shards = sorted(str(path) for path in args.dir.glob("*.tar"))
    if not shards:
        raise SystemExit(f"no .tar shards in {args.dir}; run make-shards first")
    torch.manual_seed(0)
    model = load_model(MODEL_NAME, None, device=args.device, precision=args.precision)
    output_dir = args.dir / f"embeddings-{time.time_ns()}"

    started_unix, started = time.time(), time.perf_counter()
    outputs = embed_shards(model, shards, output_dir, batch_size=args.batch_size, num_workers=args.num_workers)
    seconds, finished_unix = time.perf_counter() - started, time.time()

    images = sum(pq.read_metadata(path).num_rows for path in outputs)
    report = {
        **_report_header("embed_shards", model),
        "shards": len(shards),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1),
        "embed_started_unix": started_unix,
        "embed_finished_unix": finished_unix,
        "machine": torch_machine(model.device),
    }
    write_report(report, args.out)
    logger.info(
        "%s on %s (%s): %d images from %d shards in %.1f s, %.1f images/s",
        MODEL_NAME,
        report["device"],
        report["precision"],
        images,
        len(shards),
        seconds,
        report["images_per_second"],
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    batch = commands.add_parser("batch", help="embed_batch on in-memory pictures")
    batch.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    batch.add_argument("--precision", default="auto")
    batch.add_argument("--batch-size", type=int, default=64)
    batch.add_argument("--batches", type=int, default=3, help="timed batches, after one warm-up batch")
    batch.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "embed_cpu.json")
    batch.set_defaults(run=bench_batch)

    make = commands.add_parser("make-shards", help="write synthetic webdataset shards")
    make.add_argument("dir", type=Path)
    make.add_argument("--shards", type=int, default=16)
    make.add_argument("--samples-per-shard", type=int, default=4000)
    make.set_defaults(run=make_shards)

    end_to_end = commands.add_parser("shards", help="embed_shards end to end over the shards in DIR")
    end_to_end.add_argument("dir", type=Path)
    end_to_end.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    end_to_end.add_argument("--precision", default="auto")
    end_to_end.add_argument("--batch-size", type=int, default=512)
    end_to_end.add_argument("--num-workers", type=int, default=8)
    end_to_end.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "embed_gpu.json")
    end_to_end.set_defaults(run=bench_shards)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
