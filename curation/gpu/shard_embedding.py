"""Embedding of img2dataset-style webdataset tar shards into one parquet file per shard (DESIGN.md section 5).

Samples are read straight from the tars at indexed offsets, decoded and preprocessed by DataLoader workers while
the device encodes (`curation.gpu.encode`); each output records the model that made it (`curation.gpu.clip_model`)
and the samples that could not be embedded, and a rerun resumes shard by shard.
"""

import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from curation.gpu.clip_model import MODEL_IDENTITY_FIELDS, EmbeddingModel
from curation.gpu.encode import encode
from curation.io import atomic_write_bytes, canonical_json
from curation.ops.tars import IMAGE_EXTENSIONS, image_extension, index_tar, read_member
from curation.progress import Progress

logger = logging.getLogger(__name__)

# Key of the parquet key-value metadata holding the model record and the samples that failed to decode.
PARQUET_METADATA_KEY = b"curation.embedding"


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


def _describe(error: Exception) -> str:
    # Messages such as Pillow's quote object reprs with memory addresses; dropped so that a failure reads the same in
    # every run and the output does not depend on the run.
    return re.sub(r" at 0x[0-9a-f]+>", ">", f"{type(error).__name__}: {error}")




# (samples done, samples planned) shared with the process that shows the progress, when this process is one of the
# local engine's per-device processes (`curation.gpu.local_engine`).
_SHARED_COUNTS: tuple | None = None


def share_counts(done, planned) -> None:
    """Count samples done and planned by `embed_shards` in this process into these shared values (a process pool's
    initializer)."""
    global _SHARED_COUNTS
    _SHARED_COUNTS = (done, planned)


def _add_shared_count(index: int, n: int) -> None:
    if _SHARED_COUNTS is not None and n:
        with _SHARED_COUNTS[index].get_lock():
            _SHARED_COUNTS[index].value += n

