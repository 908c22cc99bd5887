"""The logo bank's recall with SLANT's toy scorer: logo images mixed into a photo corpus, q fixed in advance at
their true share (real photos and real logo PNGs from ../shared/data when present, generated ones otherwise)."""

import numpy as np
import torch

from curation.gpu.toy_scorer import ToyLogoScorer
from curation.ops.logos import CONTRAST_PROMPTS, LOGO_PROMPTS, bank_size, logo_scores
from tests import imagekit


def test_bank_at_the_true_logo_share_recalls_nine_tenths_of_the_logos():
    photos = imagekit.photos(40)
    logos = [imagekit.on_white(logo) for _, logo, _ in imagekit.logos(10, red=3)]
    images = photos + logos
    is_logo = np.array([False] * len(photos) + [True] * len(logos))
    scorer = ToyLogoScorer()
    with torch.inference_mode():
        embeddings = scorer.encode_image(torch.stack([scorer.to_pixels(image) for image in images])).numpy()
        scores = logo_scores(embeddings, scorer.encode_text(list(LOGO_PROMPTS)).numpy(),
                             scorer.encode_text(list(CONTRAST_PROMPTS)).numpy())
    q = is_logo.mean()
    taken = bank_size(len(images), q, 10_000)
    bank = np.argsort(-scores, kind="stable")[:taken]
    recall = is_logo[bank].sum() / is_logo.sum()
    assert recall >= 0.9, (recall, sorted(scores[is_logo]), sorted(scores[~is_logo])[-5:])
