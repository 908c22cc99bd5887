"""CLIP image and text embeddings with open_clip, and the `local` engine that embeds webdataset shards (DESIGN.md
section 5).

`load_model` builds one model in the calling process (an executor builds its own; nothing pickles a model from a
driver) and records what produced the embeddings: model name, weights (pretrained tag, or checkpoint path and
sha256), preprocessing, precision and device. `embed_batch` embeds in-memory images and captions; `embed_shards`
embeds img2dataset-style tar shards into one parquet file per shard.

Embeddings are L2-normalised in float32 and stored as float16; clip_score is the cosine of the float32-normalised
image and text embeddings, as DataComp computes it. CPU runs in float32 and is the reference; CUDA runs under
autocast (float16 by default).
"""

import io
import json
import logging
import multiprocessing
import os
import pickle
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from curation.io import atomic_write_bytes, canonical_json, sha256_of_file
from curation.ops.tars import IMAGE_EXTENSIONS, image_extension, index_tar, read_member
from curation.progress import DEFAULT_POLL_SECONDS, Progress

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# Makes this project's configs (tiny-clip for fast CPU tests) resolvable by name like open_clip's built-ins.
open_clip.add_model_config(MODEL_CONFIG_DIR)

RANDOM_INIT_SEED = 0
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Key of the parquet key-value metadata holding the model record and the samples that failed to decode.
PARQUET_METADATA_KEY = b"curation.embedding"
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


@dataclass(frozen=True)
class SampleFailure:
    """A sample of a shard that could not be embedded, and why."""

    shard: str
    key: str
    uid: str | None
    reason: str


def embedding_schema(embed_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("image_embedding", pa.list_(pa.float16(), embed_dim), nullable=False),
            pa.field("text_embedding", pa.list_(pa.float16(), embed_dim), nullable=False),
            pa.field("clip_score", pa.float32(), nullable=False),
        ]
    )


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


def embed_batch(
    model: EmbeddingModel, images: list[Image.Image], captions: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings float16 (n, d), text embeddings float16 (n, d), clip_score float32 (n,)) of image-caption
    pairs."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        empty = np.empty((0, model.embed_dim), dtype=np.float16)
        return empty, empty.copy(), np.empty(0, dtype=np.float32)
    pixels = torch.stack([model.preprocess(image) for image in images])
    return encode(model, pixels, model.tokenizer(captions))


def encode(
    model: EmbeddingModel, pixels: torch.Tensor, tokens: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings and clip_score of preprocessed images and tokenised captions (see `embed_batch`)."""
    with (
        torch.inference_mode(),
        torch.autocast(model.device.type, dtype=model.autocast_dtype, enabled=model.autocast_dtype is not None),
    ):
        image_features = model.model.encode_image(pixels.to(model.device, non_blocking=True))
        text_features = model.model.encode_text(tokens.to(model.device, non_blocking=True))
    # Normalised in float32 whatever autocast produced, so the cosine and the float16 rounding see exact unit vectors.
    image_unit = F.normalize(image_features.float(), dim=-1)
    text_unit = F.normalize(text_features.float(), dim=-1)
    clip_score = (image_unit * text_unit).sum(dim=-1)
    return (
        image_unit.half().cpu().numpy(),
        text_unit.half().cpu().numpy(),
        clip_score.cpu().numpy().astype(np.float32),
    )


def embed_shards(
    model: EmbeddingModel,
    shard_paths: list[str],
    output_dir: str | os.PathLike,
    batch_size: int = 256,
    num_workers: int = 0,
    keys: Mapping[str, Collection[str]] | None = None,
) -> list[str]:
    """Embed webdataset tar shards (`jpg`/`jpeg`/`png`/`webp`, `txt`, `json` with "uid" per sample, as img2dataset
    writes them) into `output_dir`, one `<shard name>.parquet` per shard (`embedding_schema`, rows sorted by uid).

    Returns the output paths in the order of `shard_paths`. A shard whose output exists is skipped (resume), after
    checking it was made by the same model. `num_workers` DataLoader processes decode and preprocess while the
    device embeds; batches never span shards, so every shard's result is the same for any `num_workers` and
    whichever shards are resumed. Samples that cannot be embedded (undecodable image, missing caption or uid) are
    logged and listed in the output's metadata (`read_shard_failures`). `keys`, when given, maps a shard path to the
    sample keys to embed (the rows still in the corpus); other samples of that shard are left out.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    shard_paths = [str(path) for path in shard_paths]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_paths = _output_paths(shard_paths, output_dir)

    pending: list[tuple[str, Path]] = []
    for shard, output_path in zip(shard_paths, output_paths, strict=True):
        if output_path.exists():
            _check_same_model(output_path, model.record)
            logger.info("skipping %s: %s exists", shard, output_path)
        else:
            pending.append((shard, output_path))

    started = time.perf_counter()
    samples, batches = _plan_batches([shard for shard, _ in pending], batch_size, keys)
    batches_left = [0] * len(pending)
    for batch in batches:
        batches_left[samples[batch[0]].shard_index] += 1
    results = [_ShardResult() for _ in pending]
    # A shard with no samples has no batch to complete it.
    for shard_index, (shard, output_path) in enumerate(pending):
        if batches_left[shard_index] == 0:
            _write_shard(shard, output_path, results[shard_index], model)

    dataset = _ShardSamples(samples, model.preprocess, model.tokenizer)
    # The forkserver imports this module (and torch) once; each DataLoader worker forked from it starts warm.
    multiprocessing.set_forkserver_preload([__name__])
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers if batches else 0,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
        # Forked workers would inherit the caller's sockets (a Spark driver's py4j connection, which a worker
        # tears down when it exits); forkserver workers start from a clean process.
        multiprocessing_context="forkserver" if num_workers and batches else None,
    )
    _add_shared_count(1, len(samples))
    progress = Progress("embed", len(samples), "samples")
    try:
        for batch in loader:
            shard_index = batch["shard_index"]
            result = results[shard_index]
            result.failures.extend(
                SampleFailure(pending[shard_index][0], key, uid, reason) for key, uid, reason in batch["failures"]
            )
            if batch["uids"]:
                image_embedding, text_embedding, clip_score = encode(model, batch["pixels"], batch["tokens"])
                result.add(batch["uids"], image_embedding, text_embedding, clip_score)
            batches_left[shard_index] -= 1
            if batches_left[shard_index] == 0:
                _write_shard(*pending[shard_index], result, model)
                results[shard_index] = _ShardResult()  # frees the shard's embeddings
            progress.update(len(batch["uids"]) + len(batch["failures"]))
            _add_shared_count(0, len(batch["uids"]) + len(batch["failures"]))
    finally:
        dataset.close()
        progress.finish()
    if pending:
        elapsed = time.perf_counter() - started
        logger.info(
            "embedded %d samples of %d shards in %.1f s (%.0f samples/s)",
            len(samples),
            len(pending),
            elapsed,
            len(samples) / elapsed if elapsed > 0 else 0.0,
        )
    return [str(path) for path in output_paths]


def read_shard_metadata(path: str | os.PathLike) -> dict:
    """The metadata `embed_shards` stored in an output file: {"shard", "model" (the record), "failures"}."""
    metadata = pq.read_schema(path).metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise ValueError(f"{path} was not written by embed_shards (no {PARQUET_METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[PARQUET_METADATA_KEY])


def read_shard_failures(path: str | os.PathLike) -> list[SampleFailure]:
    metadata = read_shard_metadata(path)
    return [SampleFailure(shard=metadata["shard"], **failure) for failure in metadata["failures"]]


@dataclass(frozen=True)
class _SampleLocation:
    """Where one sample's files lie inside its tar: extension -> (byte offset, size)."""

    shard: str
    shard_index: int
    key: str
    members: dict[str, tuple[int, int]]


class _ShardResult:
    """One shard's embeddings, gathered batch by batch until it is written."""

    def __init__(self):
        self.uids: list[str] = []
        self.image_embeddings: list[np.ndarray] = []
        self.text_embeddings: list[np.ndarray] = []
        self.clip_scores: list[np.ndarray] = []
        self.failures: list[SampleFailure] = []

    def add(self, uids: list[str], image_embedding: np.ndarray, text_embedding: np.ndarray, clip_score: np.ndarray):
        self.uids.extend(uids)
        self.image_embeddings.append(image_embedding)
        self.text_embeddings.append(text_embedding)
        self.clip_scores.append(clip_score)


class _ShardSamples(Dataset):
    """Decodes and preprocesses samples by reading their bytes straight from the tar at indexed offsets, so any
    worker can serve any sample and batches keep a fixed composition. Each worker process opens its own handles."""

    def __init__(self, samples: list[_SampleLocation], preprocess: Callable, tokenizer: Callable):
        self.samples = samples
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._handles: dict[str, io.BufferedReader] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        uid = None
        try:
            uid = self._uid(sample)
            caption = self._read(sample, "txt").decode("utf-8")
            extension = image_extension(sample.members)
            if extension is None:
                raise ValueError(f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            with Image.open(io.BytesIO(self._read(sample, extension))) as image:
                pixels = self.preprocess(image)
        # Web images fail in many ways (truncated, unidentifiable, decompression bombs, bad modes); each becomes a
        # reported failure of this sample instead of ending the shard.
        except Exception as error:
            return {"shard_index": sample.shard_index, "key": sample.key, "uid": uid, "error": _describe(error)}
        return {
            "shard_index": sample.shard_index,
            "key": sample.key,
            "uid": uid,
            "pixels": pixels,
            "tokens": self.tokenizer([caption])[0],
            "error": None,
        }

    def close(self):
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _uid(self, sample: _SampleLocation) -> str:
        uid = json.loads(self._read(sample, "json")).get("uid")
        if not isinstance(uid, str) or not uid:
            raise ValueError("the json has no string uid")
        return uid

    def _read(self, sample: _SampleLocation, extension: str) -> bytes:
        if extension not in sample.members:
            raise ValueError(f"no {extension} file")
        handle = self._handles.get(sample.shard)
        if handle is None:
            handle = self._handles[sample.shard] = open(sample.shard, "rb")
        return read_member(handle, sample.members[extension])


def _collate(samples: list[dict]) -> dict:
    embedded = [sample for sample in samples if sample["error"] is None]
    return {
        "shard_index": samples[0]["shard_index"],
        "uids": [sample["uid"] for sample in embedded],
        "pixels": torch.stack([sample["pixels"] for sample in embedded]) if embedded else None,
        "tokens": torch.stack([sample["tokens"] for sample in embedded]) if embedded else None,
        "failures": [(sample["key"], sample["uid"], sample["error"]) for sample in samples if sample["error"]],
    }


def _plan_batches(
    shards: list[str], batch_size: int, keys: Mapping[str, Collection[str]] | None
) -> tuple[list[_SampleLocation], list[list[int]]]:
    """The samples of all shards (those in `keys` where given) in key order, and batches of their indices in shard
    order, none spanning two shards."""
    samples: list[_SampleLocation] = []
    batches: list[list[int]] = []
    for shard_index, shard in enumerate(shards):
        first = len(samples)
        wanted = set(keys[shard]) if keys is not None else None
        # In key order, not tar order: img2dataset writes a shard's samples in the order its download threads
        # finish, and a batch's composition changes its float32 results in the last bits.
        samples.extend(
            _SampleLocation(shard, shard_index, key, files)
            for key, files in sorted(index_tar(shard).items())
            if wanted is None or key in wanted
        )
        batches.extend(
            list(range(start, min(start + batch_size, len(samples))))
            for start in range(first, len(samples), batch_size)
        )
    return samples, batches


def _output_paths(shard_paths: list[str], output_dir: Path) -> list[Path]:
    outputs = [output_dir / f"{Path(shard).name.removesuffix('.tar')}.parquet" for shard in shard_paths]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two shards share a file name, so their outputs would collide; give shards distinct names")
    return outputs


def _write_shard(shard: str, output_path: Path, result: _ShardResult, model: EmbeddingModel) -> None:
    embed_dim = model.embed_dim
    uids = np.array(result.uids, dtype=object)
    order = np.argsort(uids, kind="stable")
    if result.uids:
        image_embeddings = np.concatenate(result.image_embeddings)[order]
        text_embeddings = np.concatenate(result.text_embeddings)[order]
        clip_scores = np.concatenate(result.clip_scores)[order]
    else:
        image_embeddings = text_embeddings = np.empty((0, embed_dim), dtype=np.float16)
        clip_scores = np.empty(0, dtype=np.float32)
    for failure in result.failures:
        logger.warning("%s: sample %s (uid %s) not embedded: %s", shard, failure.key, failure.uid, failure.reason)
    metadata = {
        "shard": shard,
        "model": model.record,
        "failures": [{"key": f.key, "uid": f.uid, "reason": f.reason} for f in result.failures],
    }
    schema = embedding_schema(embed_dim).with_metadata({PARQUET_METADATA_KEY: canonical_json(metadata)})
    table = pa.Table.from_arrays(
        [
            pa.array(uids[order].tolist(), type=pa.string()),
            _fixed_size_lists(image_embeddings, embed_dim),
            _fixed_size_lists(text_embeddings, embed_dim),
            pa.array(clip_scores, type=pa.float32()),
        ],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(output_path, sink.getvalue().to_pybytes())
    logger.info("wrote %s: %d embedded, %d failed", output_path, len(uids), len(result.failures))


def _fixed_size_lists(matrix: np.ndarray, embed_dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), embed_dim)


def _check_same_model(output_path: Path, record: dict) -> None:
    stored = read_shard_metadata(output_path)["model"]
    differing = [field for field in MODEL_IDENTITY_FIELDS if stored.get(field) != record.get(field)]
    if differing:
        raise ValueError(
            f"{output_path} holds embeddings of another model (differs in {', '.join(differing)}); "
            "use a fresh output folder or remove it"
        )


def _pretrained_source(model_name: str, pretrained_tag: str | None) -> str | None:
    if pretrained_tag is None:
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained_tag)
    return cfg.get("hf_hub") or cfg.get("url") or None


def _as_list(value) -> list | int:
    return list(value) if isinstance(value, tuple | list) else value


def _describe(error: Exception) -> str:
    # Messages such as Pillow's quote object reprs with memory addresses; dropped so that a failure reads the same in
    # every run and the output does not depend on the run.
    return re.sub(r" at 0x[0-9a-f]+>", ">", f"{type(error).__name__}: {error}")


def embed_shards_locally(
    model_name: str,
    pretrained: str | None,
    shard_paths: list[str],
    output_dir: str | os.PathLike,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    keys: Mapping[str, Collection[str]] | None = None,
) -> dict:
    """The `local` engine: embed `shard_paths` on this machine and return the model record.

    With several CUDA devices (and device auto or cuda) the shards are dealt round-robin to one spawned process per
    device, each building its own model; otherwise this process embeds them all. Each shard's output is the same
    either way, since batches never span shards.
    """
    devices = [device]
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    jobs = [
        (model_name, pretrained, shard_paths[offset :: len(devices)], str(output_dir), one_device, precision,
         batch_size, num_workers, keys)
        for offset, one_device in enumerate(devices)
        if shard_paths[offset :: len(devices)]
    ]
    if len(jobs) <= 1:
        return _embed_on_one_device(*jobs[0]) if jobs else load_model(model_name, pretrained, device, precision).record
    context = torch.multiprocessing.get_context("spawn")
    # Progress: the processes count samples done and planned into shared counters, which this one shows.
    counts = (context.Value("q", 0), context.Value("q", 0))
    with context.Pool(len(jobs), initializer=_share_counts, initargs=counts) as pool, \
            Progress("embed", None, "samples") as progress:
        running = pool.starmap_async(_embed_on_one_device, jobs)
        while not running.ready():
            running.wait(DEFAULT_POLL_SECONDS)
            progress.set(counts[0].value, total=counts[1].value or None, note=f"{len(jobs)} devices")
        records = running.get()
        progress.set(counts[0].value, total=counts[1].value or None)
    return records[0]


# (samples done, samples planned) shared with the process that shows the progress, in embed_shards_locally's pool.
_SHARED_COUNTS: tuple | None = None


def _share_counts(done, planned) -> None:
    global _SHARED_COUNTS
    _SHARED_COUNTS = (done, planned)


def _add_shared_count(index: int, n: int) -> None:
    if _SHARED_COUNTS is not None and n:
        with _SHARED_COUNTS[index].get_lock():
            _SHARED_COUNTS[index].value += n


def _embed_on_one_device(model_name, pretrained, shard_paths, output_dir, device, precision, batch_size, num_workers,
                         keys) -> dict:
    model = load_model(model_name, pretrained, device, precision)
    embed_shards(model, shard_paths, output_dir, batch_size, num_workers, keys)
    return model.record
