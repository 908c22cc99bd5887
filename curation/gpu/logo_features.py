"""The models and features SLANT's stages (`curation.spark.logos`) need from torch: scorers over the embed stage's
model or the mining models, text features of prompts, and the 10-crop check of the top mined logo.

The Spark adapters stay free of torch: they hand these functions plain values (the embed stage's recorded options,
model specs, images) and get numpy arrays, scorers and JSON-ready dicts back.
"""

import numpy as np
import torch

from curation.gpu import slant, zeroshot
from curation.gpu.clip_model import load_model
from curation.gpu.scorer import OpenClipScorer
from curation.gpu.toy_scorer import ToyLogoScorer
from curation.ops.embeddings import RANDOM_INIT, EmbedOptions
from curation.ops.logo_mining import CORNERS

# A `models` entry naming SLANT's toy scorer: deterministic, with a planted red-logo feature (tests and demos
# without pretrained weights).
TOY_MODEL = "toy"


def embed_stage_scorer(embed_options: dict, device: str = "auto") -> OpenClipScorer:
    """A scorer over the embed stage's model (same name, weights and preprocessing), from the options its record
    stores, loaded in this process."""
    options = EmbedOptions(**embed_options)
    precision = options.precision if device != "cpu" else "auto"
    return OpenClipScorer(load_model(options.model, options.weights, device, precision))


def mining_scorer(spec: str, device: str):
    """The scorer a mine_logos `models` entry names: "toy", "NAME" or "NAME:PRETRAINED" (random: random init)."""
    if spec == TOY_MODEL:
        return ToyLogoScorer()
    name, _, pretrained = spec.partition(":")
    weights = None if pretrained in ("", RANDOM_INIT) else pretrained
    return OpenClipScorer(load_model(name, weights, device))


def text_features(scorer, texts) -> np.ndarray:
    """The scorer's L2-normalised text features of `texts`, float32 on the CPU."""
    return scorer.encode_text(list(texts)).float().cpu().numpy()


def ten_crop_check(scorer, logos, probes, result: slant.MiningResult, targets: list[str], contrast: list[str],
                   scale: float) -> dict | None:
    """Target-prediction rates of plain vs 10-crop zero-shot on probes carrying the top-ranked logo (SLANT's
    mitigation); None without a mined logo or a probe."""
    if not len(result.table) or not probes:
        return None
    best = result.table.slice(0, 1).to_pylist()[0]
    labels = [*targets, *contrast]
    label_features = scorer.encode_text(labels)
    clean = torch.stack([scorer.to_pixels(image) for _, image in probes]).to(scorer.device)
    logo = slant.logo_tensor(dict(logos)[best["logo_id"]]).to(scorer.device)
    pasted = slant.paste(clean, logo, CORNERS[0], scale)
    comparison = zeroshot.compare_plain_and_ten_crop(scorer, clean, pasted, label_features,
                                                     labels.index(best["target"]))
    return {"logo_id": best["logo_id"], "target": best["target"], "corner": CORNERS[0], **comparison}
