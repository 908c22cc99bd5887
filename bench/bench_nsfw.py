"""open_nsfw scoring throughput (the `nsfw` stage's model, curation.gpu.nsfw) on the CPU, in images per second.

    python bench/bench_nsfw.py [--device cpu] [--images 256] [--batch-size 64] [--out FILE]

Images: the real photos of the shared data folder (photos_img2dataset and photos_packages, as the tests pick them),
cycled to --images, JPEG-encoded (quality 92) at two sizes: "download" (long side 256, what the download stage
stores by default) and "original" (up to 1411 px a side). For each onnxruntime thread count (1, then onnxruntime's
default) and after an untimed warm-up, wall-clock images/s and images per CPU second of this process (on a
shared machine the second, for one thread, is the figure to trust: it does not count time other jobs took):

- end to end: `NSFWModel.score` on the encoded bytes (decode, the reference preprocessing with its JPEG round trip,
  the model), the stage's per-image cost;
- preprocess only: decoding and preprocessing alone;
- model only: `score_pixels` on preprocessed inputs, as the stage runs the model (on the CPU one image per call);
- batched calls: plain onnxruntime calls of --batch-size images, for comparison, and whether their scores equal the
  one-image-per-call scores bit for bit (the determinism question: they did on this machine, but the stage does
  not rely on it).
"""

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from benchkit import cpu_model, write_result
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(REPO_ROOT))

from curation.gpu.nsfw import load_nsfw_model, model_identity  # noqa: E402
from tests import imagekit  # noqa: E402

logger = logging.getLogger("bench_nsfw")

DOWNLOAD_SIDE = 256


def encoded_photos(count: int) -> dict[str, list[bytes]]:
    if imagekit.shared_data_dir() is None:
        raise SystemExit("shared data folder is absent: set CURATION_TEST_DATA or place it at <repo>/../shared/data")
    photos = imagekit.photos(100)
    downloaded = []
    for photo in photos:
        scale = DOWNLOAD_SIDE / max(photo.size)
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        downloaded.append(imagekit.jpeg(photo.resize(size, Image.Resampling.LANCZOS)))
    originals = [imagekit.jpeg(photo) for photo in photos]
    return {"download": [downloaded[i % len(photos)] for i in range(count)],
            "original": [originals[i % len(photos)] for i in range(count)], "distinct_photos": len(photos)}


def rate(count: int, seconds: tuple[float, float]) -> dict:
    wall, cpu = seconds
    return {"seconds": round(wall, 3), "images_per_second": round(count / wall, 1), "cpu_seconds": round(cpu, 3),
            "images_per_cpu_second": round(count / cpu, 1)}


def timed(function, *arguments):
    """(result, (wall seconds, CPU seconds of this process, all its threads))."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*arguments)
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def bench_threads(device: str, threads: int | None, images: dict, batch_size: int) -> dict:
    model = load_nsfw_model(device, threads=threads, batch_size=batch_size)
    count = len(images["download"])
    model.score(images["download"][:8])  # warm-up
    report: dict = {"threads": threads, "provider": model.provider, "images_per_call": model.record["images_per_call"]}
    for size in ("download", "original"):
        result, seconds = timed(model.score, images[size])
        assert all(failure is None for failure in result.failures)
        report[f"end_to_end_{size}"] = rate(count, seconds)
        prepared, seconds = timed(lambda data: [model.preprocess(item) for item in data], images[size])
        report[f"preprocess_only_{size}"] = rate(count, seconds)
    pixels = np.stack(prepared)
    single, seconds = timed(model.score_pixels, pixels)
    report["model_only"] = rate(count, seconds)

    def batched_calls(inputs):
        name, output = model.session.get_inputs()[0].name, model.session.get_outputs()[0].name
        return np.concatenate([model.session.run([output], {name: inputs[start:start + batch_size]})[0][:, 1]
                               for start in range(0, len(inputs), batch_size)])

    batched, seconds = timed(batched_calls, pixels)
    report[f"model_only_batched_{batch_size}"] = rate(count, seconds)
    report["batched_equals_one_per_call"] = bool(batched.astype(np.float32).tobytes() == single.tobytes())
    logger.info("threads %s: end to end %.1f images/s, %.1f per CPU second (download size), %.1f images/s (original "
                "size); model only %.1f images/s (batched %.1f); preprocess only %.1f images/s", threads,
                report["end_to_end_download"]["images_per_second"],
                report["end_to_end_download"]["images_per_cpu_second"],
                report["end_to_end_original"]["images_per_second"], report["model_only"]["images_per_second"],
                report[f"model_only_batched_{batch_size}"]["images_per_second"],
                report["preprocess_only_download"]["images_per_second"])
    return report


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "nsfw.json")
    args = parser.parse_args()

    images = encoded_photos(args.images)
    load_before = os.getloadavg()
    runs = [bench_threads(args.device, threads, images, args.batch_size) for threads in (1, None)]
    report = {
        "benchmark": "nsfw_score",
        **model_identity(),
        "device": args.device,
        "images": args.images,
        "distinct_photos": images["distinct_photos"],
        "download_side": DOWNLOAD_SIDE,
        "batch_size": args.batch_size,
        "runs": runs,
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
    }
    write_result(report, args.out)


if __name__ == "__main__":
    main()
