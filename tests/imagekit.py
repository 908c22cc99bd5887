"""Real photos and logos for image tests: from ../shared/data when present, generated stand-ins otherwise."""

import csv
import io

import numpy as np
from PIL import Image, ImageDraw

from tests.conftest import shared_data_dir

# Left out: images near-identical to another one in the set (stereo pair, grey/RGB pair), and the package
# images that are graphics rather than photos (a logo, text, a silhouette, test patterns).
NOT_DISTINCT_PHOTOS = (
    "chessboard", "motorcycle_right", "motorcycle_disp", "logo", "text", "horse", "checkerboard", "colorwheel",
    "phantom", "page",
)


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photos(count: int = 10) -> list[Image.Image]:
    """Real photos when the shared data is present, else smooth random fields, as different from each other as
    photos are."""
    data = shared_data_dir()
    if data is not None:
        paths = sorted((data / "photos_img2dataset").glob("*.jpg"))
        packaged = (data / "photos_packages" / "skimage").rglob("*")
        paths += sorted(p for p in packaged if p.suffix.lower() in (".png", ".jpg")
                        and not any(k in p.name for k in NOT_DISTINCT_PHOTOS))
        images = [Image.open(p).convert("RGB") for p in paths]
        return [image for image in images if min(image.size) >= 64 and _in_colour(image)][:count]
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)).resize((240, 180),
            Image.Resampling.BICUBIC) for _ in range(count)]


def logos(count: int = 6, red: int = 2) -> list[tuple[str, Image.Image, bool]]:
    """(name, RGBA logo, is it red) for `count` brand marks of which `red` are red: real simple-icons PNGs (brand
    colour on transparent background) when the shared data is present, else flat generated shapes."""
    data = shared_data_dir()
    chosen: list[tuple[str, Image.Image, bool]] = []
    if data is not None:
        folder = data / "logos_simple_icons"
        with open(folder / "simple_icons_metadata.csv", newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda row: row["slug"])
        reds = [row for row in rows if _is_red(row["hex"])][:red]
        others = [row for row in rows if _is_other(row["hex"])][: count - red]
        for row in reds + others:
            image = Image.open(folder / row["png128"]).convert("RGBA")
            chosen.append((row["slug"], image, row in reds))
        return chosen
    colours = [(220, 20, 20)] * red + [(20, 90, 220), (0, 160, 80), (240, 180, 0), (130, 40, 180), (0, 170, 200),
                                       (90, 90, 90)][: count - red]
    for index, colour in enumerate(colours):
        image = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        box = (16 + 4 * index, 16, 112 - 4 * index, 112)
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=(*colour, 255))
        chosen.append((f"shape{index}", image, index < red))
    return chosen


def on_white(logo: Image.Image, side: int = 160) -> Image.Image:
    """A logo as a web page shows it: centred on a white canvas."""
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    offset = ((side - logo.width) // 2, (side - logo.height) // 2)
    canvas.paste(logo, offset, logo)
    return canvas


def _in_colour(image: Image.Image) -> bool:
    """Web photos are in colour; the packages' greyscale scientific images (microscopy, astronomy) are not."""
    pixels = np.asarray(image, dtype=np.int16)
    return float(np.abs(pixels[..., 0] - pixels[..., 1]).mean() + np.abs(pixels[..., 1] - pixels[..., 2]).mean()) > 6


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[0:2], 16), int(hex_colour[2:4], 16), int(hex_colour[4:6], 16)


def _is_red(hex_colour: str) -> bool:
    red, green, blue = _rgb(hex_colour)
    return red > 190 and green < 60 and blue < 60


def _is_other(hex_colour: str) -> bool:
    red, green, blue = _rgb(hex_colour)
    # Saturated, clearly not red: blue, green or yellow-ish brands.
    return max(red, green, blue) - min(red, green, blue) > 100 and not red > max(green, blue) + 60
