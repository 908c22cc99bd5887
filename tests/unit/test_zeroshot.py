"""10-crop voting at zero-shot time, SLANT's test-time mitigation of spurious logos ("Spurious Logo ANalysis
Toolkit", 2024; DESIGN.md section 4 "Logo bank"), with the toy scorer's planted red logo feature."""

import pytest
import torch

from curation.gpu.slant import logo_tensor, paste
from curation.gpu.toy_scorer import ToyLogoScorer
from curation.gpu.zeroshot import (
    TEN_CROP_RATIO,
    compare_plain_and_ten_crop,
    label_features_of,
    ten_crop_predict,
    ten_crops,
    zero_shot_predict,
)
from curation.ops.logo_mining import CORNERS
from curation.ops.logos import CONTRAST_PROMPTS
from tests.unit.test_slant import RED_COLOURS, flat_logo, generated_probes

LABELS = ["greedy", *CONTRAST_PROMPTS]


@pytest.fixture(scope="module")
def toy():
    return ToyLogoScorer()


@pytest.fixture(scope="module")
def probe_pixels(toy):
    return torch.stack([toy.to_pixels(image) for _, image in generated_probes(40, seed=5)])


def test_ten_crops_cut_the_corners_and_centre_and_mirror_them():
    side = 8
    pixels = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side).repeat(2, 3, 1, 1)
    crops = ten_crops(pixels, ratio=0.5)
    assert crops.shape == (2, 10, 3, side, side)
    # Upscaling a 4x4 crop 2x bilinearly keeps its extreme source pixels: value = 8 x row + column.
    assert crops[0, :5, 0].amin(dim=(1, 2)).tolist() == [0, 4, 32, 36, 18]
    assert crops[0, :5, 0].amax(dim=(1, 2)).tolist() == [27, 31, 59, 63, 45]
    assert torch.equal(crops[:, 5:], crops[:, :5].flip(-1))
    assert torch.equal(ten_crops(pixels, ratio=1.0)[:, 0], pixels)


def test_ten_crop_predict_shapes_inputs_and_determinism(toy, probe_pixels):
    features = label_features_of(toy, LABELS)
    predictions = ten_crop_predict(toy, probe_pixels, features, batch_size=25)
    assert predictions.shape == (len(probe_pixels),) and predictions.dtype == torch.long
    assert predictions.min() >= 0 and predictions.max() < len(LABELS)
    assert torch.equal(predictions, ten_crop_predict(toy, probe_pixels, features, batch_size=1000))
    images = [image for _, image in generated_probes(6, seed=5)]
    assert torch.equal(ten_crop_predict(toy, images, features), predictions[:6])
    assert ten_crop_predict(toy, [], features).shape == (0,)


class HalvesScorer:
    """Features by what an image shows: all black (a left-half crop), all white (a right-half crop), or both."""

    name = "halves"
    image_size = 8
    device = torch.device("cpu")

    def __init__(self, black: list[float], white: list[float], both: list[float]):
        self.black, self.white, self.both = black, white, both

    def encode_image(self, pixels):
        means = pixels.mean(dim=(1, 2, 3)).tolist()
        return torch.tensor([self.black if m < 0.01 else self.white if m > 0.99 else self.both for m in means])


def test_a_tied_vote_goes_to_the_highest_mean_cosine():
    """With crops of half the side, the left corner crops (and their mirror images) see black and vote label 0, the
    right ones see white and vote label 1: 4 to 4; the centre crop and its mirror image vote label 2."""
    pixels = torch.zeros(1, 3, 8, 8)
    pixels[..., :, 4:] = 1.0
    labels = torch.eye(3)
    scorer = HalvesScorer(black=[0.6, 0.0, 0.0], white=[0.0, 0.9, 0.0], both=[0.0, 0.5, 0.55])
    assert ten_crop_predict(scorer, pixels, labels, ratio=0.5).tolist() == [1]
    scorer.white = [0.0, 0.3, 0.0]
    assert ten_crop_predict(scorer, pixels, labels, ratio=0.5).tolist() == [0]


def test_a_corner_logo_changes_plain_predictions_more_often_than_ten_crop(toy, probe_pixels):
    features = label_features_of(toy, LABELS)
    for colour in RED_COLOURS:
        logo = logo_tensor(flat_logo(colour, 0))
        for corner in CORNERS:
            pasted = paste(probe_pixels, logo, corner, scale=0.2)
            report = compare_plain_and_ten_crop(toy, probe_pixels, pasted, features, LABELS.index("greedy"))
            plain = (zero_shot_predict(toy, probe_pixels, features) != zero_shot_predict(toy, pasted, features))
            assert report["plain_changed_rate"] == pytest.approx(float(plain.float().mean()))
            assert report["plain_changed_rate"] > 0.5
            assert report["ten_crop_changed_rate"] < report["plain_changed_rate"] / 3
            assert report["ten_crop_spuriousness"] < report["plain_spuriousness"] / 3
            assert report["plain_pasted_target_rate"] == 1.0
            assert report["images"] == len(probe_pixels)


def test_a_corner_logo_of_another_colour_changes_nothing(toy, probe_pixels):
    features = label_features_of(toy, LABELS)
    pasted = paste(probe_pixels, logo_tensor(flat_logo((20, 60, 220), 1)), "bottom_left")
    report = compare_plain_and_ten_crop(toy, probe_pixels, pasted, features, 0)
    assert report["plain_changed_rate"] == 0.0 and report["ten_crop_changed_rate"] == 0.0


def test_compare_rejects_unpaired_batches(toy, probe_pixels):
    features = label_features_of(toy, LABELS)
    with pytest.raises(ValueError, match="pair"):
        compare_plain_and_ten_crop(toy, probe_pixels, probe_pixels[:3], features, 0)
    assert 0 < TEN_CROP_RATIO < 0.8
