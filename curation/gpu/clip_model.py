"""One open_clip CLIP model built in this process, and the record of what it is (DESIGN.md section 5).

`load_model` builds the model where it will run (an executor builds its own; nothing pickles a model from a driver)
and records what produced its embeddings: model name, weights (pretrained tag, or checkpoint path and sha256),
preprocessing, precision and device. CPU runs in float32 and is the reference; CUDA runs under autocast (float16 by
default), applied where the model encodes (`curation.gpu.encode`).
"""

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import open_clip
import safetensors.torch
import torch
from PIL import Image

from curation.io import sha256_of_file

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# Makes this project's configs (tiny-clip for fast CPU tests) resolvable by name like open_clip's built-ins.
open_clip.add_model_config(MODEL_CONFIG_DIR)

RANDOM_INIT_SEED = 0
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Record fields that decide which embeddings a model produces; a resumed run must match them. Device and
# precision are left out: a CUDA run may finish what a CPU run started (same model, fp16-level differences).
MODEL_IDENTITY_FIELDS = (
    "model",
    "pretrained_tag",
    "checkpoint_sha256",
    "embed_dim",
    "image_size",
    "image_mean",
    "image_std",
    "interpolation",
    "resize_mode",
)


class CheckpointError(ValueError):
    """A checkpoint file that is not a plain state dict, or that would need arbitrary unpickling to load."""


@dataclass
class EmbeddingModel:
    """One CLIP model ready to embed, with the transforms it was trained with and the record of what it is."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    autocast_dtype: torch.dtype | None
    record: dict

    @property
    def embed_dim(self) -> int:
        return self.record["embed_dim"]


def load_model(
    model_name: str, pretrained: str | None, device: str = "auto", precision: str = "auto"
) -> EmbeddingModel:
    """Build `model_name` in this process.

    `pretrained` is an open_clip pretrained tag (downloaded and loaded by open_clip), a local checkpoint file
    (`.safetensors`, or a torch file of tensors only), or None for random initialisation (tests, benchmarks).
    `device` is auto, cuda or cpu; `precision` is auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16, the last
    two meaning autocast on CUDA.
    """
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    checkpoint_path = Path(pretrained) if pretrained is not None and Path(pretrained).is_file() else None
    pretrained_tag = pretrained if checkpoint_path is None else None
    if pretrained_tag is not None and not open_clip.is_pretrained_cfg(model_name, pretrained_tag):
        raise ValueError(
            f"pretrained={pretrained!r} is neither a checkpoint file nor an open_clip tag of {model_name}"
        )

    # Built on the CPU in float32 whatever the device: autocast supplies the mixed precision, and the fixed seed
    # then gives the same random weights in every process and on every device (random init is for tests and
    # benchmarks, whose engines must agree). pretrained_text=False keeps a Hugging Face text tower from downloading
    # base weights that a checkpoint would overwrite anyway.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained_tag, precision="fp32", device="cpu", pretrained_text=False
        )
    checkpoint_sha256 = None
    if checkpoint_path is not None:
        model.load_state_dict(read_checkpoint(checkpoint_path), strict=True)
        checkpoint_sha256 = sha256_of_file(checkpoint_path)
    model.to(torch_device).eval()

    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    record = {
        "model": model_name,
        "pretrained_tag": pretrained_tag,
        "pretrained_source": _pretrained_source(model_name, pretrained_tag),
        "checkpoint_path": str(checkpoint_path.resolve()) if checkpoint_path is not None else None,
        "checkpoint_sha256": checkpoint_sha256,
        "embed_dim": int(open_clip.get_model_config(model_name)["embed_dim"]),
        "image_size": _as_list(preprocess_cfg["size"]),
        "image_mean": _as_list(preprocess_cfg["mean"]),
        "image_std": _as_list(preprocess_cfg["std"]),
        "interpolation": preprocess_cfg["interpolation"],
        "resize_mode": preprocess_cfg["resize_mode"],
        "precision": precision,
        "device": torch_device.type,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    logger.info("loaded %s (%s) on %s in %s", model_name, pretrained or "random init", torch_device, precision)
    return EmbeddingModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        device=torch_device,
        autocast_dtype=AUTOCAST_DTYPES.get(precision),
        record=record,
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        raise ValueError(f"the CPU path is the float32 reference; precision={precision!r} is for CUDA")
    return precision


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, read without running arbitrary pickled code.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which refuses
    pickled objects other than tensors and plain containers. open_clip training checkpoints keep the weights under
    "state_dict", prefixed "module." when trained with DistributedDataParallel; both are undone here.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        loaded = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path}: refused, it holds pickled objects other than tensors ({error})") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    is_state_dict = (
        isinstance(loaded, Mapping)
        and len(loaded) > 0
        and all(isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in loaded.items())
    )
    if not is_state_dict:
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if all(name.startswith("module.") for name in loaded):
        return {name.removeprefix("module."): value for name, value in loaded.items()}
    return dict(loaded)


def _pretrained_source(model_name: str, pretrained_tag: str | None) -> str | None:
    if pretrained_tag is None:
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained_tag)
    return cfg.get("hf_hub") or cfg.get("url") or None


def _as_list(value) -> list | int:
    return list(value) if isinstance(value, tuple | list) else value

