"""The embed stage's `local` engine: embed tar shards on this machine, one process per CUDA device when it has
several (DESIGN.md section 5)."""

import os
from collections.abc import Collection, Mapping

import torch

from curation.gpu.clip_model import load_model
from curation.gpu.shard_embedding import embed_shards, share_counts
from curation.progress import DEFAULT_POLL_SECONDS, Progress


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
    with context.Pool(len(jobs), initializer=share_counts, initargs=counts) as pool, \
            Progress("embed", None, "samples") as progress:
        running = pool.starmap_async(_embed_on_one_device, jobs)
        while not running.ready():
            running.wait(DEFAULT_POLL_SECONDS)
            progress.set(counts[0].value, total=counts[1].value or None, note=f"{len(jobs)} devices")
        records = running.get()
        progress.set(counts[0].value, total=counts[1].value or None)
    return records[0]


def _embed_on_one_device(model_name, pretrained, shard_paths, output_dir, device, precision, batch_size, num_workers,
                         keys) -> dict:
    model = load_model(model_name, pretrained, device, precision)
    embed_shards(model, shard_paths, output_dir, batch_size, num_workers, keys)
    return model.record
