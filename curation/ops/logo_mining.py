"""The torch-free half of SLANT logo mining ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4 "Logo
bank"), on predicted label indices: the split of probes into mining and held-out sets, spuriousness and its ranking,
the mining table, and the persisted blocks of pasted predictions a run resumes from.

    spuriousness(logo, T) = P(predict T | logo pasted) - P(predict T | clean image),

averaged over probes and corners, per model, then over models; logos rank by their largest model-mean spuriousness
over the targets. The pasting and zero-shot predictions themselves are `curation.gpu.slant`.
"""

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.io import atomic_write_bytes, canonical_json
from curation.ops.uid import uniform

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

HELDOUT_PURPOSE = "slant_heldout"
# Key of the parquet key-value metadata recording what a block of pasted predictions was made with.
BLOCK_METADATA_KEY = b"curation.slant_block"
BLOCK_FORMAT_VERSION = 1
_UID_PATTERN = re.compile(r"[0-9a-f]{32}")


def split_probes(
    probes: Sequence[tuple[str, Image.Image]], heldout_fraction: float, seed: int
) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, Image.Image]]]:
    """(mining, held-out) probes, each sorted by id; a probe is held out iff u(seed, id) < heldout_fraction."""
    ordered = sorted(probes, key=lambda item: item[0])
    if not ordered:
        return [], []
    hex_ids = [
        probe_id if _UID_PATTERN.fullmatch(probe_id) else hashlib.sha256(probe_id.encode()).hexdigest()[:32]
        for probe_id, _ in ordered
    ]
    held_out = uniform(seed, hex_ids, HELDOUT_PURPOSE) < heldout_fraction
    return ([probe for probe, out in zip(ordered, held_out, strict=True) if not out],
            [probe for probe, out in zip(ordered, held_out, strict=True) if out])


def check_mining_inputs(names, logos, probes, targets, labels, scale, batch_size, heldout_fraction, logo_block,
                        templates) -> None:
    """ValueError for the first unusable argument of a mining run (`curation.gpu.slant.mine_logos`)."""
    if not names:
        raise ValueError("at least one scorer is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names must be unique (they name the per-model columns): {names}")
    for kind, items in (("logo", logos), ("probe", probes)):
        ids = [item_id for item_id, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{kind} ids must be unique")
    if not targets:
        raise ValueError("at least one target label is needed")
    if len(set(labels)) != len(labels):
        raise ValueError(f"targets and contrast labels must all differ: {labels}")
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"every template must hold '{{}}': {list(templates)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}")
    if batch_size < 1 or logo_block < 1:
        raise ValueError(f"batch_size and logo_block must be positive, not {batch_size} and {logo_block}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), not {heldout_fraction}")


def block_identity(models: list[str], labels: list[str], templates: list[str], scale: float, probe_ids: list[str],
                   logo_ids: list[str]) -> dict:
    """What a block of pasted predictions was made with; a resumed run must match all of it."""
    # Batch size and device are left out, as in embed's resume check: they change no prediction beyond float
    # rounding, so a CUDA run may finish what a CPU run started.
    return {
        "version": BLOCK_FORMAT_VERSION,
        "models": models,
        "labels": labels,
        "templates": templates,
        "scale": scale,
        "corners": list(CORNERS),
        "probes": probe_ids,
        "logos": logo_ids,
    }


def write_block(path: Path, identity: dict, predictions: np.ndarray) -> None:
    """One row per (model, logo, corner, probe) in array order, the label index predicted on the pasted image."""
    models, logos, corners, probes = (np.array(identity[key], dtype=object) for key in
                                      ("models", "logos", "corners", "probes"))
    grid = np.meshgrid(np.arange(len(models)), np.arange(len(logos)), np.arange(len(corners)),
                       np.arange(len(probes)), indexing="ij")
    table = pa.table({
        "model": pa.array(models[grid[0].ravel()].tolist(), pa.string()),
        "logo_id": pa.array(logos[grid[1].ravel()].tolist(), pa.string()),
        "corner": pa.array(corners[grid[2].ravel()].tolist(), pa.string()),
        "probe_id": pa.array(probes[grid[3].ravel()].tolist(), pa.string()),
        "predicted": pa.array(predictions.ravel(), pa.int16()),
    }).replace_schema_metadata({BLOCK_METADATA_KEY: canonical_json(identity)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_block(path: Path, identity: dict, shape: tuple[int, ...]) -> np.ndarray:
    metadata = pq.read_schema(path).metadata or {}
    if BLOCK_METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a SLANT block (no {BLOCK_METADATA_KEY.decode()} metadata)")
    stored = json.loads(metadata[BLOCK_METADATA_KEY])
    differing = sorted(key for key in identity.keys() | stored.keys() if stored.get(key) != identity.get(key))
    if differing:
        raise ValueError(f"{path} was made with other {', '.join(differing)}; use a fresh work_dir or remove it")
    predictions = pq.read_table(path, columns=["predicted"]).column("predicted").to_numpy()
    if predictions.size != math.prod(shape):
        raise ValueError(f"{path} holds {predictions.size} predictions, expected {math.prod(shape)}")
    return predictions.astype(np.int16).reshape(shape)


def spuriousness_rates(
    pasted: np.ndarray, clean: np.ndarray, targets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (model, logo, target): spuriousness and flip rate; per (model, target): clean target rate.

    `pasted` is (models, logos, corners, probes) of predicted label indices, `clean` (models, probes); the targets
    are labels 0 .. targets - 1.
    """
    models, logos = pasted.shape[:2]
    spuriousness = np.zeros((models, logos, targets))
    flip_rate = np.zeros_like(spuriousness)
    clean_rate = np.zeros((models, targets))
    for target in range(targets):
        clean_hit = clean == target
        pasted_hit = pasted == target
        clean_rate[:, target] = clean_hit.mean(axis=1)
        spuriousness[:, :, target] = pasted_hit.mean(axis=(2, 3)) - clean_rate[:, None, target]
        flip_rate[:, :, target] = (pasted_hit & ~clean_hit[:, None, None, :]).mean(axis=(2, 3))
    return spuriousness, flip_rate, clean_rate


def rank_logos(model_mean_spuriousness: np.ndarray) -> np.ndarray:
    """Logo indices, most spurious first: by the largest spuriousness over the targets. The logos are in id order,
    so the stable sort breaks ties by logo id."""
    return np.argsort(-model_mean_spuriousness.max(axis=1, initial=-np.inf), kind="stable")


def mining_table(logos, targets, names, order, spuriousness, flip_rate, clean_rate, heldout_spuriousness) -> pa.Table:
    logo_rows = np.repeat(order, len(targets))
    target_columns = np.tile(np.arange(len(targets)), len(order))
    heldout = heldout_spuriousness[logo_rows, target_columns]
    columns = {
        "logo_id": pa.array([logos[i][0] for i in logo_rows.tolist()], pa.string()),
        "target": pa.array([targets[t] for t in target_columns.tolist()], pa.string()),
        "rank": pa.array(np.repeat(np.arange(1, len(order) + 1), len(targets)), pa.int32()),
        "spuriousness": pa.array(spuriousness.mean(axis=0)[logo_rows, target_columns], pa.float64()),
        **{
            f"spuriousness[{name}]": pa.array(spuriousness[model][logo_rows, target_columns], pa.float64())
            for model, name in enumerate(names)
        },
        "flip_rate": pa.array(flip_rate.mean(axis=0)[logo_rows, target_columns], pa.float64()),
        "heldout_spuriousness": pa.array(heldout, pa.float64(), mask=np.isnan(heldout)),
        "clean_target_rate": pa.array(clean_rate.mean(axis=0)[target_columns], pa.float64()),
    }
    return pa.table(columns)


