"""Deterministic generated images for the demo corpus, served over HTTP so that no image file ships with the repo.

Demo URLs look like ``http://127.0.0.1:{port}/img{row % 16}/photos/{row:08d}.jpg``; `demo_resolver` parses the
row from the path and answers with a pure function of (seed, row). Most rows get a JPEG of a synthetic scene
whose content is seeded by (seed, row): a random low-resolution colour field with a few ellipses and rectangles,
drawn small and upscaled so that the picture is smooth. Its low DCT frequencies, which is all a perceptual hash
sees, are then random per scene, so different scenes hash far apart (Hamming distance well above the
near-duplicate threshold of 4), while a resized, recompressed copy of one scene hashes within it.

A few rows are planted defects that the download and image-dedup stages must ledger, one kind per residue of
``row % PLANTED_MODULUS`` (see `PLANTED_RULES`); a single prime modulus means kinds never coincide, each takes
1/251 (0.4%) of the rows, and spreads evenly over the 16 ``img{row % 16}`` hosts.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageDraw

from curation.image_server import NOT_FOUND, ImageServer, Resolver, Response

__all__ = [
    "DEMO_IMAGE_PORT",
    "PLANTED_MODULUS",
    "PLANTED_RULES",
    "demo_image_url",
    "demo_resolver",
    "logo_image",
    "planted_kind",
    "row_response",
    "scene_image",
    "scene_jpeg",
    "scene_size",
    "serve_demo_images",
]

DEMO_IMAGE_PORT = 18765
HOST_COUNT = 16

PLANTED_MODULUS = 251
PLANTED_RULES: dict[str, int] = {
    # kind: residue of row % PLANTED_MODULUS. What the server answers:
    "missing": 17,  # 404
    "truncated": 53,  # 200 image/jpeg, the first half of a valid JPEG
    "not_image": 89,  # 200 text/html page
    "opt_out": 127,  # the row's image with "X-Robots-Tag: noai"
    "redirect_private": 163,  # 302 to 127.0.0.2, a private address the downloader must refuse to follow
    "exact_duplicate": 199,  # the very bytes of row - 1's image
    "near_duplicate": 233,  # row - 2's image resized to 75% and recompressed at another quality
    "logo": 241,  # one of LOGO_BRANDS' marks on a plain background, as web pages show brand logos
}
"""Planted kind -> residue of ``row % PLANTED_MODULUS``. The duplicates' sources (rows - 1 and - 2) are never
planted rows themselves, so they serve their plain scene, and exist because every residue is >= 2."""
_KIND_BY_RESIDUE = {residue: kind for kind, residue in PLANTED_RULES.items()}

MIN_SIDE = 96
MAX_SIDE = 320
MAX_ASPECT_RATIO = 2.0
JPEG_QUALITY = 90
NEAR_DUPLICATE_SCALE = 0.75
NEAR_DUPLICATE_QUALITY = 70
# Scenes are drawn at 1/_UPSCALE of their size and upscaled: smooth pictures, and cheap to draw.
_UPSCALE = 4
# Sizes come from their own random stream, so that a scene's content does not depend on its size.
_SIZE_STREAM = 1
# The pHash keeps the 8x8 lowest DCT frequencies; a colour field of about that many cells gives every one of
# them scene-to-scene variation, where a coarser field leaves the higher ones near zero in every scene, which
# makes their bits alike and brings different scenes closer.
GRID_MIN, GRID_MAX = 5, 9
SHAPES_MIN, SHAPES_MAX = 2, 5
# Half-extents as fractions of the side: no shape covers the whole picture, because a flat picture hashes to
# 1 << 63 like every other flat one.
SHAPE_HALF_MIN, SHAPE_HALF_MAX = 0.08, 0.3

# Brand marks for the logo bank to find: (shape, RGB colour). Flat shapes in saturated colours on a plain
# background, several red ones (the colour SLANT's toy scorer plants as spurious).
LOGO_BRANDS = (
    ("circle", (220, 20, 20)), ("square", (20, 90, 220)), ("triangle", (240, 180, 0)), ("ring", (220, 20, 20)),
    ("diamond", (0, 160, 80)), ("bar", (130, 40, 180)), ("square", (220, 20, 20)), ("circle", (0, 170, 200)),
)
_PATH = re.compile(r"/img\d+/photos/(\d+)\.jpg")
NOT_IMAGE_PAGE = b"<!doctype html>\n<html><head><title>Gallery</title></head><body><p>Image moved.</p></body></html>\n"


def demo_image_url(row: int, port: int = DEMO_IMAGE_PORT) -> str:
    return f"http://127.0.0.1:{port}/img{row % HOST_COUNT}/photos/{row:08d}.jpg"


def planted_kind(row: int) -> str | None:
    """The planted defect of ``row`` (a key of `PLANTED_RULES`), or None for an ordinary scene."""
    return _KIND_BY_RESIDUE.get(row % PLANTED_MODULUS)


def scene_size(seed: int, scene: int) -> tuple[int, int]:
    """(width, height) of a scene's image: each side in [MIN_SIDE, MAX_SIDE], aspect ratio in [0.5, 2]."""
    rng = np.random.default_rng([seed, scene, _SIZE_STREAM])
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    aspect_ratio = MAX_ASPECT_RATIO ** rng.uniform(-1.0, 1.0)
    # Clipping the height only pulls the ratio towards 1, so it stays within bounds.
    height = int(np.clip(round(width / aspect_ratio), MIN_SIDE, MAX_SIDE))
    return width, height


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = rng.integers(0, 256, size=3).tolist()
    return red, green, blue


def scene_image(seed: int, scene: int, width: int, height: int) -> Image.Image:
    """The RGB picture of ``scene``; its content depends on (seed, scene) only, ``width`` x ``height`` its size."""
    rng = np.random.default_rng([seed, scene])
    canvas_size = (max(8, width // _UPSCALE), max(8, height // _UPSCALE))
    grid_rows, grid_columns = rng.integers(GRID_MIN, GRID_MAX + 1, size=2).tolist()
    field = rng.integers(0, 256, size=(grid_rows, grid_columns, 3), dtype=np.uint8)
    canvas = Image.fromarray(field, mode="RGB").resize(canvas_size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    canvas_width, canvas_height = canvas_size
    for _ in range(int(rng.integers(SHAPES_MIN, SHAPES_MAX + 1))):
        centre_x, centre_y = rng.uniform(0.0, 1.0, size=2)
        half_width, half_height = rng.uniform(SHAPE_HALF_MIN, SHAPE_HALF_MAX, size=2)
        box = (
            (centre_x - half_width) * canvas_width,
            (centre_y - half_height) * canvas_height,
            (centre_x + half_width) * canvas_width,
            (centre_y + half_height) * canvas_height,
        )
        if rng.random() < 0.5:
            draw.ellipse(box, fill=_random_colour(rng))
        else:
            draw.rectangle(box, fill=_random_colour(rng))
    return canvas.resize((width, height), Image.Resampling.BILINEAR)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def scene_jpeg(seed: int, scene: int, width: int, height: int, quality: int = JPEG_QUALITY) -> bytes:
    return _encode_jpeg(scene_image(seed, scene, width, height), quality)


def _row_jpeg(seed: int, row: int) -> bytes:
    """The scene JPEG of ``row`` at its own size, whatever its planted kind."""
    return scene_jpeg(seed, row, *scene_size(seed, row))


def _near_duplicate_jpeg(seed: int, source_row: int) -> bytes:
    with Image.open(io.BytesIO(_row_jpeg(seed, source_row))) as source:
        width, height = source.size
        smaller = source.resize(
            (round(width * NEAR_DUPLICATE_SCALE), round(height * NEAR_DUPLICATE_SCALE)), Image.Resampling.LANCZOS
        )
    return _encode_jpeg(smaller, NEAR_DUPLICATE_QUALITY)


def logo_image(seed: int, row: int) -> Image.Image:
    """The brand mark of a logo row (brand chosen by the row's occurrence) on a white canvas whose size and the
    mark's placement vary by (seed, row), as the same logo does across pages."""
    shape, colour = LOGO_BRANDS[(row // PLANTED_MODULUS) % len(LOGO_BRANDS)]
    rng = np.random.default_rng([seed, row, _SIZE_STREAM + 1])
    side = int(rng.integers(MIN_SIDE, MAX_SIDE // 2 + 1))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    half = side * rng.uniform(0.3, 0.42)
    centre_x, centre_y = side / 2 + rng.uniform(-0.05, 0.05, size=2) * side
    box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(half / 3)))
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "bar":
        draw.rectangle((box[0], centre_y - half / 3, box[2], centre_y + half / 3), fill=colour)
    elif shape == "triangle":
        draw.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    else:
        draw.polygon([(centre_x, box[1]), (box[2], centre_y), (centre_x, box[3]), (box[0], centre_y)], fill=colour)
    return canvas


def row_response(row: int, seed: int = 0, port: int = DEMO_IMAGE_PORT) -> Response:
    """What the demo server answers for ``row``: a pure function of (seed, row) (and port, for redirects)."""
    kind = planted_kind(row)
    if kind == "missing":
        return NOT_FOUND
    if kind == "not_image":
        return Response(200, NOT_IMAGE_PAGE, "text/html; charset=utf-8")
    if kind == "redirect_private":
        return Response(302, headers=(("Location", f"http://127.0.0.2:{port}/img0/photos/{row:08d}.jpg"),))
    if kind == "exact_duplicate":
        return Response(200, _row_jpeg(seed, row - 1), "image/jpeg")
    if kind == "near_duplicate":
        return Response(200, _near_duplicate_jpeg(seed, row - 2), "image/jpeg")
    if kind == "logo":
        return Response(200, _encode_jpeg(logo_image(seed, row), JPEG_QUALITY), "image/jpeg")
    image = _row_jpeg(seed, row)
    if kind == "truncated":
        return Response(200, image[: len(image) // 2], "image/jpeg")
    if kind == "opt_out":
        return Response(200, image, "image/jpeg", (("X-Robots-Tag", "noai"),))
    return Response(200, image, "image/jpeg")


def demo_resolver(seed: int = 0, port: int = DEMO_IMAGE_PORT) -> Resolver:
    """Resolver for `ImageServer`: ``/img{n}/photos/{row}.jpg`` -> `row_response`, anything else 404."""

    def resolve(path: str) -> Response:
        match = _PATH.fullmatch(path)
        if match is None:
            return NOT_FOUND
        return row_response(int(match.group(1)), seed, port)

    return resolve


def serve_demo_images(port: int = DEMO_IMAGE_PORT, seed: int = 0) -> None:
    """Serve the demo images on 127.0.0.1:``port`` until interrupted (blocks)."""
    ImageServer(demo_resolver(seed, port), port=port).serve_forever()
