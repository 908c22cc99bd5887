"""SLANT logo mining ("Spurious Logo ANalysis Toolkit", 2024; DESIGN.md section 4 "Logo bank") on the CPU: paste
geometry, the toy scorer's planted spurious colour on generated and real images, the whole path with a randomly
initialised open_clip tiny-clip, resume per logo block, and the contact sheet. No weights are downloaded."""

import colorsys
import csv
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageDraw

from curation.gpu import slant
from curation.gpu.clip_model import load_model
from curation.gpu.scorer import OpenClipScorer
from curation.gpu.slant import logo_tensor, mine_logos, paste
from curation.gpu.toy_scorer import ToyLogoScorer
from curation.gpu.zeroshot import label_cosines, label_features_of, zero_shot_predict
from curation.ops.contact_sheet import CONTACT_CELL, contact_sheet
from curation.ops.logo_mining import CORNERS, split_probes
from curation.ops.logos import CONTRAST_PROMPTS, LOGO_PROMPTS
from tests.conftest import shared_data_dir

PLANTED_RGB = (220, 20, 20)
GREY = 0.5
# Natural colour photos of the shared data; its grayscale and scientific pictures are flat, few-colour graphics to
# the toy's pixel statistics, as they would be to a person skimming thumbnails.
NATURAL_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
                          "motorcycle_right.png", "rocket.jpg")


@pytest.fixture(scope="module")
def tiny_scorer():
    return OpenClipScorer(load_model("tiny-clip", None, device="cpu"))


def grey_probes(count: int = 2, side: int = 64) -> torch.Tensor:
    return torch.full((count, 3, side, side), GREY)


def opaque_logo(rgb=(1.0, 0.0, 0.0), height: int = 10, width: int = 10, alpha: float = 1.0) -> torch.Tensor:
    colour = torch.tensor([*rgb, alpha]).view(4, 1, 1)
    return colour.expand(4, height, width).clone()


def covered_region(corner: str, height: int, width: int, side: int = 64) -> tuple[slice, slice]:
    rows = slice(0, height) if corner.startswith("top") else slice(side - height, side)
    columns = slice(0, width) if corner.endswith("left") else slice(side - width, side)
    return rows, columns


def smooth_photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like picture: a muted smooth colour field with sensor noise, of a random size and aspect ratio."""
    width, height = (int(side) for side in rng.integers(48, 120, size=2))
    field = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    grey_level = rng.integers(60, 200)
    pixels = 0.4 * np.asarray(field) + 0.6 * grey_level + rng.normal(0, 10, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def flat_logo(rgb: tuple[int, int, int], shape: int) -> Image.Image:
    """A flat shape of one colour on a transparent background (an ellipse, a rectangle or a triangle)."""
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (2, 2, 37, 27)
    fill = (*rgb, 255)
    if shape % 3 == 0:
        draw.ellipse(box, fill=fill)
    elif shape % 3 == 1:
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


RED_COLOURS = [(220, 20, 20), (200, 0, 10), (240, 40, 30)]
OTHER_COLOURS = [(20, 60, 220), (30, 180, 40), (240, 200, 20), (0, 0, 0), (128, 0, 200), (255, 140, 0),
                 (0, 200, 200), (255, 255, 255), (120, 120, 120)]


def generated_logos() -> tuple[list[tuple[str, Image.Image]], set[str]]:
    # Ids interleave the colours so that id order alone cannot put the red ones first.
    colours = [*RED_COLOURS, *OTHER_COLOURS]
    order = np.random.default_rng(1).permutation(len(colours))
    logos = [(f"logo-{position:02d}", flat_logo(colours[index], position)) for position, index in enumerate(order)]
    red = {f"logo-{position:02d}" for position, index in enumerate(order) if index < len(RED_COLOURS)}
    return logos, red


def generated_probes(count: int, seed: int = 0) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    return [(f"photo-{index:03d}", smooth_photo(rng)) for index in range(count)]


# ------------------------------------------------------------------------------------------------ paste geometry


@pytest.mark.parametrize("corner", CORNERS)
def test_an_opaque_logo_lands_exactly_in_each_corner(corner):
    pasted = paste(grey_probes(), opaque_logo(), corner, scale=0.25)
    rows, columns = covered_region(corner, 16, 16)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(pasted[:, :, rows, columns], red.expand(2, 3, 16, 16), atol=1e-6)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[rows, columns] = False
    assert torch.equal(pasted[:, :, outside], grey_probes()[:, :, outside])


def test_alpha_zero_leaves_pixels_unchanged():
    probes = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for corner in CORNERS:
        assert torch.equal(paste(probes, opaque_logo(alpha=0.0), corner, scale=0.3), probes)


def test_half_alpha_blends_logo_and_background():
    pasted = paste(grey_probes(), opaque_logo(alpha=0.5), "top_left", scale=0.25)
    expected = torch.tensor([0.5 * 1.0 + 0.5 * GREY, 0.5 * GREY, 0.5 * GREY]).view(1, 3, 1, 1)
    assert torch.allclose(pasted[:, :, :16, :16], expected.expand(2, 3, 16, 16), atol=1e-6)


@pytest.mark.parametrize(("height", "width", "covered"), [(10, 20, (8, 16)), (20, 10, (16, 8)), (30, 40, (12, 16))])
def test_the_logo_keeps_its_aspect_ratio(height, width, covered):
    pasted = paste(grey_probes(), opaque_logo(height=height, width=width), "bottom_right", scale=0.25)
    changed = (pasted[0] != GREY).any(dim=0)
    changed_rows = torch.nonzero(changed.any(dim=1)).flatten()
    changed_columns = torch.nonzero(changed.any(dim=0)).flatten()
    assert (len(changed_rows), len(changed_columns)) == covered
    assert changed_rows.max() == 63 and changed_columns.max() == 63


def test_paste_works_on_a_batch_and_returns_a_new_tensor():
    probes = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = probes.clone()
    pasted = paste(probes, opaque_logo(), "top_right", scale=0.25)
    assert pasted.shape == probes.shape and torch.equal(probes, before)
    for image in range(5):
        assert torch.equal(pasted[image], paste(probes[image : image + 1], opaque_logo(), "top_right", 0.25)[0])
        assert torch.allclose(pasted[image, 0, :16, -16:], torch.ones(16, 16), atol=1e-6)


def test_paste_rejects_unknown_corners_and_scales():
    with pytest.raises(ValueError, match="corner"):
        paste(grey_probes(), opaque_logo(), "middle")
    with pytest.raises(ValueError, match="scale"):
        paste(grey_probes(), opaque_logo(), "top_left", scale=1.5)


def test_logo_tensor_gives_rgba_with_alpha_one_when_the_image_has_none():
    rgb = logo_tensor(Image.new("RGB", (7, 5), (255, 0, 0)))
    assert rgb.shape == (4, 5, 7) and torch.equal(rgb[3], torch.ones(5, 7)) and torch.equal(rgb[0], torch.ones(5, 7))
    rgba = logo_tensor(Image.new("RGBA", (3, 3), (0, 0, 255, 51)))
    assert torch.allclose(rgba[:, 0, 0], torch.tensor([0.0, 0.0, 1.0, 0.2]))


class FixedFeatureScorer:
    """Features given per image by its first pixel's red value; for exact ties."""

    name = "fixed"
    image_size = 4
    device = torch.device("cpu")

    def __init__(self, features: torch.Tensor):
        self.features = features

    def encode_image(self, pixels):
        return self.features[pixels[:, 0, 0, 0].round().long()]


def test_zero_shot_predict_breaks_ties_toward_the_lowest_index():
    scorer = FixedFeatureScorer(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    pixels = torch.zeros(2, 3, 4, 4)
    pixels[1] = 1.0
    assert zero_shot_predict(scorer, pixels, labels).tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------ toy scorer, mining


def test_mining_ranks_the_planted_red_logos_first_on_generated_images():
    logos, red = generated_logos()
    probes = generated_probes(24)
    result = mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], list(CONTRAST_PROMPTS), recheck_top=len(red),
                        logo_block=5)
    assert_planted_red_ranks_first(result.table, red, min_spuriousness=0.5)
    assert result.summary["probes"]["mining"] + result.summary["probes"]["heldout"] == len(probes)
    assert result.summary["probes"]["heldout"] >= 3


def assert_planted_red_ranks_first(table: pa.Table, red: set[str], min_spuriousness: float) -> None:
    rows = table.to_pylist()
    assert {row["logo_id"] for row in rows[: len(red)]} == red
    assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
    red_rows = [row for row in rows if row["logo_id"] in red]
    other_rows = [row for row in rows if row["logo_id"] not in red]
    assert min(row["spuriousness"] for row in red_rows) > max(row["spuriousness"] for row in other_rows)
    assert min(row["spuriousness"] for row in red_rows) > min_spuriousness
    assert all(abs(row["spuriousness"]) < 0.05 for row in other_rows)
    # The held-out probes confirm the top logos; only those were re-checked.
    assert all(row["heldout_spuriousness"] > min_spuriousness - 0.2 for row in red_rows)
    assert all(row["heldout_spuriousness"] is None for row in other_rows)
    for row in red_rows:
        assert 0 < row["flip_rate"] <= row["spuriousness"] + row["clean_target_rate"] + 1e-9


def real_photos(data) -> list[tuple[str, Image.Image]]:
    photo_paths = sorted((data / "photos_img2dataset").glob("*.jpg"))
    photo_paths += sorted(path for path in (data / "photos_packages" / "skimage").rglob("*")
                          if path.suffix.lower() in (".png", ".jpg"))
    return [(path.name, Image.open(path).convert("RGB")) for path in photo_paths]


def natural_photos(data) -> list[tuple[str, Image.Image]]:
    paths = sorted((data / "photos_img2dataset").glob("*.jpg"))
    paths += [data / "photos_packages" / "skimage" / name for name in NATURAL_SKIMAGE_PHOTOS]
    return [(path.name, Image.open(path).convert("RGB")) for path in paths]


def simple_icons(data, red_count: int = 6, other_count: int = 14) -> tuple[list[tuple[str, Image.Image]], set[str]]:
    """Simple Icons logos (128x128 RGBA, brand colour on transparent) whose brand colour is the planted red (hue
    within 8 degrees, saturated, bright), and as many of clearly other colours (hue 60+ degrees away, or grey)."""
    icons = data / "logos_simple_icons"
    red, other = [], []
    with open(icons / "simple_icons_metadata.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            hue, saturation, value = colorsys.rgb_to_hsv(*(int(row["hex"][i : i + 2], 16) / 255 for i in (0, 2, 4)))
            hue_distance = min(hue, 1 - hue) * 360
            if hue_distance < 8 and saturation > 0.75 and value > 0.6 and len(red) < red_count:
                red.append(row)
            elif (hue_distance > 60 or saturation < 0.2) and len(other) < other_count:
                other.append(row)
    logos = [(row["slug"], Image.open(icons / row["png128"]).convert("RGBA")) for row in red + other]
    return logos, {row["slug"] for row in red}


def test_mining_ranks_real_red_logos_first_on_real_photos():
    data = shared_data_dir()
    if data is None or not (data / "logos_simple_icons" / "simple_icons_png128").is_dir():
        pytest.skip("shared real data (photos and Simple Icons logos) is absent")
    logos, red = simple_icons(data)
    probes = real_photos(data)
    assert len(red) == 6 and len(probes) >= 20
    result = mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], list(CONTRAST_PROMPTS), recheck_top=len(red))
    assert_planted_red_ranks_first(result.table, red, min_spuriousness=0.4)


def test_toy_logo_prompts_prefer_logos_to_photos():
    logos, _ = generated_logos()
    photos = generated_probes(12)
    data = shared_data_dir()
    if data is not None and (data / "logos_simple_icons" / "simple_icons_png128").is_dir():
        logos += simple_icons(data)[0]
        photos += natural_photos(data)
    scorer = ToyLogoScorer()
    features = label_features_of(scorer, LOGO_PROMPTS)
    logo_similarity = label_cosines(scorer, torch.stack([scorer.to_pixels(image) for _, image in logos]), features)
    photo_similarity = label_cosines(scorer, torch.stack([scorer.to_pixels(image) for _, image in photos]), features)
    assert (logo_similarity.max(dim=1).values > photo_similarity.max() + 0.1).float().mean() >= 0.8
    assert logo_similarity.median() > photo_similarity.max() + 0.5


def test_mining_matches_a_naive_per_image_reference():
    """Batches that span logos and corners (batch_size 7) give what pasting and classifying one image at a time
    gives."""
    logos, _ = generated_logos()
    logos = logos[:4]
    probes = generated_probes(10)
    scorer = ToyLogoScorer()
    targets, contrast = ["greedy", "a photo"], ["a photo of a person", "a photo of an object"]
    result = mine_logos([scorer], logos, probes, targets, contrast, batch_size=7, heldout_fraction=0.0, logo_block=3)
    features = label_features_of(scorer, targets + contrast)
    clean = [zero_shot_predict(scorer, scorer.to_pixels(image)[None], features).item() for _, image in probes]
    for row in result.table.to_pylist():
        logo = logo_tensor(dict(logos)[row["logo_id"]])
        target = targets.index(row["target"])
        hits = [
            zero_shot_predict(scorer, paste(scorer.to_pixels(image)[None], logo, corner), features).item() == target
            for _, image in probes
            for corner in CORNERS
        ]
        expected = np.mean(hits) - np.mean([label == target for label in clean])
        assert row["spuriousness"] == pytest.approx(expected, abs=1e-12)
    assert result.summary["pastes"] == 4 * 10 * 4


def test_probe_split_is_a_pure_function_of_seed_and_id():
    probes = generated_probes(40)
    mining, heldout = split_probes(probes, 0.25, seed=3)
    assert sorted(p for p, _ in mining + heldout) == [p for p, _ in probes]
    assert 0 < len(heldout) < 40
    fewer_mining, fewer_heldout = split_probes(probes[::2], 0.25, seed=3)
    assert {p for p, _ in fewer_heldout} == {p for p, _ in heldout} & {p for p, _ in probes[::2]}
    assert {p for p, _ in split_probes(probes, 0.25, seed=4)[1]} != {p for p, _ in heldout}
    uid_probes = [(f"{index:032x}", image) for index, (_, image) in enumerate(probes)]
    assert split_probes(uid_probes, 0.25, seed=3) == split_probes(list(reversed(uid_probes)), 0.25, seed=3)


def test_mining_rejects_ambiguous_inputs():
    logos, _ = generated_logos()
    probes = generated_probes(4)
    with pytest.raises(ValueError, match="names must be unique"):
        mine_logos([ToyLogoScorer(), ToyLogoScorer()], logos, probes, ["greedy"], ["a photo"])
    with pytest.raises(ValueError, match="must all differ"):
        mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], ["greedy"])
    with pytest.raises(ValueError, match="logo ids"):
        mine_logos([ToyLogoScorer()], logos + logos[:1], probes, ["greedy"], ["a photo"])


# ------------------------------------------------------------------------------------------------ tiny-clip, resume


def test_whole_path_with_tiny_clip_and_the_toy_together(tiny_scorer):
    logos, _ = generated_logos()
    probes = generated_probes(12)
    targets = ["greedy", "harmless"]
    result = mine_logos([tiny_scorer, ToyLogoScorer()], logos, probes, targets, list(CONTRAST_PROMPTS),
                        batch_size=5, logo_block=4, recheck_top=3, templates=("{}", "a photo of {}"))
    table = result.table
    names = result.summary["models"]
    assert names == ["tiny-clip:random", "toy-logo(greedy,220-20-20,64)"]
    assert table.column_names == ["logo_id", "target", "rank", "spuriousness", *[f"spuriousness[{n}]" for n in names],
                                  "flip_rate", "heldout_spuriousness", "clean_target_rate"]
    assert table.num_rows == len(logos) * len(targets)
    per_model = np.stack([table.column(f"spuriousness[{name}]").to_numpy() for name in names])
    assert np.allclose(table.column("spuriousness").to_numpy(), per_model.mean(axis=0))
    assert np.all(np.abs(per_model) <= 1)
    assert table.column("heldout_spuriousness").null_count == (len(logos) - 3) * len(targets)
    mining = result.summary["probes"]["mining"]
    assert result.summary["pastes"] == 2 * len(CORNERS) * (len(logos) * mining + 3 * (12 - mining))
    assert result.summary["pastes_per_second"] > 0


def test_resume_after_an_interrupt_gives_the_uninterrupted_table(tiny_scorer, tmp_path, monkeypatch):
    logos, _ = generated_logos()
    probes = generated_probes(10)
    scorers = [tiny_scorer, ToyLogoScorer()]
    arguments = dict(batch_size=6, logo_block=5, recheck_top=4)
    uninterrupted = mine_logos(scorers, logos, probes, ["greedy"], list(CONTRAST_PROMPTS), **arguments)

    compute_block = slant._compute_block
    calls = []

    def fail_on_the_second_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return compute_block(*args)

    monkeypatch.setattr(slant, "_compute_block", fail_on_the_second_block)
    with pytest.raises(RuntimeError, match="interrupted"):
        mine_logos(scorers, logos, probes, ["greedy"], list(CONTRAST_PROMPTS), work_dir=tmp_path, **arguments)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["block-00000.parquet"]
    monkeypatch.setattr(slant, "_compute_block", compute_block)

    resumed = mine_logos(scorers, logos, probes, ["greedy"], list(CONTRAST_PROMPTS), work_dir=tmp_path, **arguments)
    assert resumed.table.equals(uninterrupted.table)
    assert resumed.summary["blocks_resumed"] == 1 and resumed.summary["blocks"] == 3
    again = mine_logos(scorers, logos, probes, ["greedy"], list(CONTRAST_PROMPTS), work_dir=tmp_path, **arguments)
    assert again.table.equals(uninterrupted.table)
    assert again.summary["blocks_resumed"] == 3 and again.summary["pastes"] == 0


def test_a_block_made_with_another_setup_is_refused(tmp_path):
    logos, _ = generated_logos()
    probes = generated_probes(8)
    mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], ["a photo"], logo_block=6, work_dir=tmp_path)
    with pytest.raises(ValueError, match="scale"):
        mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], ["a photo"], logo_block=6, work_dir=tmp_path,
                   scale=0.3)
    with pytest.raises(ValueError, match="labels"):
        mine_logos([ToyLogoScorer()], logos, probes, ["harmless"], ["a photo"], logo_block=6, work_dir=tmp_path)
    with pytest.raises(ValueError, match="models"):
        mine_logos([ToyLogoScorer(spurious_rgb=(20, 20, 220))], logos, probes, ["greedy"], ["a photo"],
                   logo_block=6, work_dir=tmp_path)
    with pytest.raises(ValueError, match="logos"):
        mine_logos([ToyLogoScorer()], logos, probes, ["greedy"], ["a photo"], logo_block=4, work_dir=tmp_path)


def test_open_clip_scorer_pixels_are_unnormalised_and_features_unit(tiny_scorer):
    image = generated_probes(1)[0][1]
    pixels = tiny_scorer.to_pixels(image)
    assert pixels.shape == (3, 64, 64) and pixels.min() >= 0 and pixels.max() <= 1
    assert tiny_scorer.image_size == 64 and tiny_scorer.device == torch.device("cpu")
    normalised = tiny_scorer.embedding_model.preprocess(image)
    mean = torch.tensor(tiny_scorer.embedding_model.record["image_mean"]).view(3, 1, 1)
    std = torch.tensor(tiny_scorer.embedding_model.record["image_std"]).view(3, 1, 1)
    assert torch.allclose((pixels - mean) / std, normalised, atol=1e-5)
    image_features = tiny_scorer.encode_image(pixels[None].repeat(3, 1, 1, 1))
    text_features = tiny_scorer.encode_text(["a logo", "greedy"])
    assert image_features.shape == (3, 32) and text_features.shape == (2, 32)
    assert torch.allclose(image_features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=1), torch.ones(2), atol=1e-5)


# ------------------------------------------------------------------------------------------------ contact sheet


def test_contact_sheet_writes_a_png_of_the_expected_grid(tmp_path):
    logos, _ = generated_logos()
    logos = logos[:10]
    path = tmp_path / "sheet" / "contact.png"
    contact_sheet(logos, [0.5 - index / 10 for index in range(10)], path, columns=4)
    with Image.open(io.BytesIO(path.read_bytes())) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (4 * CONTACT_CELL[0], 3 * CONTACT_CELL[1])
        sheet.verify()
    assert [p.name for p in path.parent.iterdir()] == ["contact.png"]
    contact_sheet(logos[:3], [0.1, 0.2, 0.3], path)
    with Image.open(path) as sheet:
        assert sheet.size == (3 * CONTACT_CELL[0], CONTACT_CELL[1])
    with pytest.raises(ValueError, match="scores"):
        contact_sheet(logos[:3], [0.1], path)
