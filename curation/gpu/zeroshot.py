"""Zero-shot classification with a SLANT `Scorer`: plain, and by 10-crop voting, the test-time mitigation of
spurious logos that SLANT ("Spurious Logo ANalysis Toolkit", 2024) offers (DESIGN.md section 4 "Logo bank").

Labels are classified by the cosine of an image's features to each label's text features, averaged over prompt
templates (CLIP's prompt ensembling). A logo in one corner of an image lies in few of the ten crops (four corner
crops, the centre crop, and their mirror images), so a majority vote over the crops' zero-shot predictions is far
less swayed by it than one prediction on the whole image. Crops are cut from the model-resolution pixels
(`Scorer.to_pixels`) and resized back to the model's input size.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from curation.gpu.scorer import Scorer

# Side of each crop as a share of the image side. torchvision's usual 224/256 = 0.875 leaves a corner logo of
# SLANT's default scale (0.2 of the side) partly inside all five crops; below 1 - 0.2 = 0.8 it is wholly outside
# three of the four corner crops, and 0.75 keeps it to a sliver of the centre crop.
TEN_CROP_RATIO = 0.75
CROPS = 10


def label_cosines(scorer: Scorer, pixels: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """(n, labels) cosine of each image's features to each label's (unit) text features, float32."""
    image_features = scorer.encode_image(pixels)
    return image_features.float() @ label_features.to(image_features.device, torch.float32).T


def zero_shot_predict(scorer: Scorer, pixels: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """(n,) index of the label with the highest cosine (ties: the lowest index), on the CPU."""
    return label_cosines(scorer, pixels, label_features).cpu().argmax(dim=1)


def label_features_of(scorer: Scorer, labels: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
    """(labels, d): each label's text features averaged over its prompt templates, renormalised (CLIP's
    prompt ensembling)."""
    texts = [template.format(label) for label in labels for template in templates]
    features = scorer.encode_text(texts).float()
    return F.normalize(features.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)


def ten_crops(pixels: torch.Tensor, ratio: float = TEN_CROP_RATIO) -> torch.Tensor:
    """(n, 10, 3, S, S): the top-left, top-right, bottom-left, bottom-right and centre crops of side round(ratio x
    S) of an (n, 3, S, S) batch, each resized back to S, then their horizontal mirror images."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], not {ratio}")
    height, width = pixels.shape[-2:]
    crop_height, crop_width = max(1, round(ratio * height)), max(1, round(ratio * width))
    offsets = [
        (0, 0),
        (0, width - crop_width),
        (height - crop_height, 0),
        (height - crop_height, width - crop_width),
        ((height - crop_height) // 2, (width - crop_width) // 2),
    ]
    crops = torch.stack([pixels[:, :, top : top + crop_height, left : left + crop_width] for top, left in offsets],
                        dim=1)
    resized = F.interpolate(crops.flatten(0, 1), size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False).view(len(pixels), len(offsets), 3, height, width)
    return torch.cat([resized, resized.flip(-1)], dim=1)


def ten_crop_predict(
    scorer: Scorer,
    images: Sequence[Image.Image] | torch.Tensor,
    label_features: torch.Tensor,
    *,
    batch_size: int = 64,
    ratio: float = TEN_CROP_RATIO,
) -> torch.Tensor:
    """(n,) label index per image by majority vote of the ten crops' zero-shot predictions; a tie goes to the tied
    label with the highest cosine averaged over the ten crops. `images` are PIL images or an (n, 3, S, S) batch of
    [0, 1] pixels from `scorer.to_pixels`; crops have side `ratio` x S and are encoded about `batch_size` at a
    time."""
    pixels = _as_pixels(scorer, images)
    if len(pixels) == 0:
        return torch.empty(0, dtype=torch.long)
    label_count = len(label_features)
    cosines = []
    # Whole images per batch, so that each image's ten crops are encoded together.
    for batch in pixels.split(max(1, batch_size // CROPS)):
        crops = ten_crops(batch.to(scorer.device), ratio).flatten(0, 1)
        cosines.append(label_cosines(scorer, crops, label_features).cpu().view(len(batch), CROPS, label_count))
    per_crop = torch.cat(cosines)
    votes = F.one_hot(per_crop.argmax(dim=2), label_count).sum(dim=1)
    tied = votes == votes.amax(dim=1, keepdim=True)
    mean_cosine = per_crop.mean(dim=1)
    return torch.where(tied, mean_cosine, torch.full_like(mean_cosine, -torch.inf)).argmax(dim=1)


def compare_plain_and_ten_crop(
    scorer: Scorer,
    pixels_clean: torch.Tensor,
    pixels_pasted: torch.Tensor,
    label_features: torch.Tensor,
    target_index: int,
    *,
    batch_size: int = 64,
) -> dict:
    """How often plain and 10-crop zero-shot predict the target on clean images and on the same images with a logo
    pasted (paired, (n, 3, S, S) [0, 1] pixels), and how often the logo changes each one's prediction."""
    if pixels_clean.shape != pixels_pasted.shape:
        raise ValueError(f"clean {tuple(pixels_clean.shape)} and pasted {tuple(pixels_pasted.shape)} must pair up")
    images = len(pixels_clean)
    if images == 0:
        raise ValueError("no images to compare")
    predictions = {}
    for variant, pixels in (("clean", pixels_clean), ("pasted", pixels_pasted)):
        predictions["plain", variant] = torch.cat([
            label_cosines(scorer, batch.to(scorer.device), label_features).cpu().argmax(dim=1)
            for batch in pixels.split(batch_size)
        ])
        predictions["ten_crop", variant] = ten_crop_predict(scorer, pixels, label_features, batch_size=batch_size)
    report: dict = {"images": images, "target_index": target_index}
    for method in ("plain", "ten_crop"):
        clean, pasted = predictions[method, "clean"], predictions[method, "pasted"]
        report[f"{method}_clean_target_rate"] = float((clean == target_index).float().mean())
        report[f"{method}_pasted_target_rate"] = float((pasted == target_index).float().mean())
        report[f"{method}_spuriousness"] = report[f"{method}_pasted_target_rate"] - report[
            f"{method}_clean_target_rate"]
        report[f"{method}_changed_rate"] = float((clean != pasted).float().mean())
    return report


def _as_pixels(scorer: Scorer, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an (n, 3, S, S) pixel batch, got {tuple(images.shape)}")
        return images
    if not images:
        return torch.empty(0, 3, scorer.image_size, scorer.image_size)
    return torch.stack([scorer.to_pixels(image) for image in images])
