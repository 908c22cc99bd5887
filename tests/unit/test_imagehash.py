import csv
import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curation.ops import imagehash
from curation.ops.imagehash import (
    MAX_DISTANCE_LIMIT,
    NO_MATCH,
    DecodedImage,
    DecodeFailure,
    PhashIndex,
    decode_image,
    hamming_distances,
    image_sha256,
    perceptual_hash,
    perceptual_hashes,
    pigeonhole_chunks,
    to_hashable,
)

NEAR_DUPLICATE_DISTANCE = 4
FLAT_HASH = 1 << 63
HASH_STRATEGY = st.integers(min_value=0, max_value=2**64 - 1)
DISTANCE_STRATEGY = st.integers(min_value=0, max_value=MAX_DISTANCE_LIMIT)
SETTINGS = settings(derandomize=True, deadline=None, max_examples=200)

# Pairs of different files that are not different pictures, so they are no negatives. Measured pHash
# distances in brackets; every other pair of the 39 real images is at distance >= 20.
NOT_DIFFERENT_PICTURES = {
    # The same synthetic checkerboard saved once as L and once as RGB (labels.csv: both `checkerboard`). [0]
    frozenset({"photos_packages/skimage/chessboard_GRAY.png", "photos_packages/skimage/chessboard_RGB.png"}),
    # A rectified stereo pair (labels.csv: `stereo_motorcycle`): one scene from two camera positions a
    # few centimetres apart, i.e. a genuine near-duplicate a dedup stage may merge. [4]
    frozenset({"photos_packages/skimage/motorcycle_left.png", "photos_packages/skimage/motorcycle_right.png"}),
    # img2dataset's blur test input is the MOTEL-sign photo 389_535.jpg saved as a PNG (labels.csv:
    # "vintage MOTEL sign"; same 389x535 size). [0]
    frozenset({"photos_img2dataset/389_535.jpg", "photos_img2dataset/blur_original.png"}),
}
SAME_CONTENT_PAIRS = [
    ("photos_packages/skimage/chessboard_GRAY.png", "photos_packages/skimage/chessboard_RGB.png"),
    ("photos_img2dataset/389_535.jpg", "photos_img2dataset/blur_original.png"),
]
# A checkerboard has (almost) no energy in the low-frequency AC block: its coefficients all sit near the
# median, so JPEG's ringing decides their bits (measured: 7 bits at quality 60, 4 at 85; resizes and PNG
# stay at 0). That is pHash's known blind spot for flat/periodic patterns, not a photo property, so only
# its lossy copies are left out of the copy test.
LOSSY_COPIES_EXEMPT = {"photos_packages/skimage/chessboard_GRAY.png", "photos_packages/skimage/chessboard_RGB.png"}

# int(str(imagehash.phash(image)), 16) from ImageHash 4.3.2 (scipy's FFT DCT), computed once.
IMAGEHASH_SCENES = {0: 0xEAF5A54A924A934B, 1: 0x801FB5ADF85256F0, 2: 0x878307ABF80356FC, 3: 0xA90255ABFEAB068B}
IMAGEHASH_PHOTOS = {
    "skimage/astronaut.png": 0xC2924C5532BDDFC8,
    "skimage/camera.png": 0xBFF1C1C0434E8CBC,
    "skimage/coffee.png": 0xBB8320376C0F3637,
    "matplotlib/grace_hopper.jpg": 0x9D8A745883D71EA5,
    "sklearn/china.jpg": 0x9DB8C2C7445DBB24,
}


def scene(variant: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A deterministic smooth RGB picture; variants 0-7 are pairwise >= 18 bits apart."""
    width, height = size
    rows, columns = np.mgrid[0:height, 0:width]
    u, v = columns / width, rows / height
    channels = [
        np.sin(2 * np.pi * ((variant + 1 + c) * u * 0.7 + (variant % 3 + 1) * (c + 1) * v * 0.5) + variant)
        for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1) * 100 + 127 + 20 * u[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decoded(data: bytes, **options) -> DecodedImage:
    result = decode_image(data, **options)
    assert isinstance(result, DecodedImage), result
    return result


def failure(data: bytes | None, **options) -> DecodeFailure:
    result = decode_image(data, **options)
    assert isinstance(result, DecodeFailure), result
    return result


def distance(a: int, b: int) -> int:
    return int(hamming_distances(np.uint64(a), np.uint64(b)))


def bytes_hash(data: bytes) -> int:
    return perceptual_hash(decoded(data).image)


# --------------------------------------------------------------------------------------------------
# Real photos (skipped without the shared data)


@pytest.fixture(scope="module")
def real_images(shared_data: Path) -> dict[str, bytes]:
    """name -> bytes for the 31 package photos and the 8 img2dataset test images, from their labels.csv."""
    images = {}
    for folder in ("photos_packages", "photos_img2dataset"):
        with open(shared_data / folder / "labels.csv", newline="") as labels:
            for row in csv.DictReader(labels):
                images[f"{folder}/{row['path']}"] = (shared_data / folder / row["path"]).read_bytes()
    assert len(images) == 31 + 8
    return images


@pytest.fixture(scope="module")
def real_hashes(real_images: dict[str, bytes]) -> dict[str, int]:
    hashes, failures = perceptual_hashes(real_images.values())
    assert failures == [None] * len(real_images)
    return dict(zip(real_images, map(int, hashes), strict=True))


def test_real_photos_hash_like_imagehash(real_images, real_hashes):
    for path, expected in IMAGEHASH_PHOTOS.items():
        assert real_hashes[f"photos_packages/{path}"] == expected, path
        assert perceptual_hash(Image.open(io.BytesIO(real_images[f"photos_packages/{path}"]))) == expected


def test_resized_and_reencoded_copies_stay_near(real_images, real_hashes):
    worst = {}
    for name, data in real_images.items():
        image = decoded(data).image
        copies = {
            f"resize {scale:.0%}": image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
            )
            for scale in (0.5, 0.75, 2.0)
        }
        copies["png"] = decoded(encode(image, "PNG", compress_level=1)).image
        if name not in LOSSY_COPIES_EXEMPT:
            for quality in (60, 85):
                copies[f"jpeg q{quality}"] = decoded(encode(image, "JPEG", quality=quality)).image
        for copy_name, copy in copies.items():
            worst[(name, copy_name)] = distance(real_hashes[name], perceptual_hash(copy))
    too_far = {key: value for key, value in worst.items() if value > NEAR_DUPLICATE_DISTANCE}
    assert not too_far
    # Measured: max 4 (brick.png at JPEG q60); most copies hash identically.
    assert max(worst.values()) <= NEAR_DUPLICATE_DISTANCE


def test_different_photos_are_far_apart(real_hashes):
    names = list(real_hashes)
    hashes = np.array([real_hashes[name] for name in names], dtype=np.uint64)
    distances = hamming_distances(hashes[:, None], hashes[None, :])
    negatives = {
        (names[i], names[j]): int(distances[i, j])
        for i, j in itertools.combinations(range(len(names)), 2)
        if frozenset({names[i], names[j]}) not in NOT_DIFFERENT_PICTURES
    }
    assert len(negatives) == 39 * 38 // 2 - len(NOT_DIFFERENT_PICTURES)
    closest = min(negatives, key=negatives.get)
    # Measured minimum: 20 (cell/hubble_deep_field, horse/china, hubble_deep_field/retina).
    assert negatives[closest] > NEAR_DUPLICATE_DISTANCE, closest
    for first, second in SAME_CONTENT_PAIRS:
        assert distance(real_hashes[first], real_hashes[second]) <= NEAR_DUPLICATE_DISTANCE


# --------------------------------------------------------------------------------------------------
# pHash definition


@pytest.mark.parametrize("variant", sorted(IMAGEHASH_SCENES))
def test_generated_scenes_hash_like_imagehash(variant):
    assert perceptual_hash(scene(variant)) == IMAGEHASH_SCENES[variant]


def test_hash_matches_a_direct_transcription_of_the_definition():
    """Steps 1-6 of the module docstring written out with explicit cosine sums."""
    image = scene(5, size=(70, 45))
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    n = np.arange(32)
    block = np.empty((8, 8))
    for row, column in itertools.product(range(8), range(8)):
        row_cosines = 2 * np.cos(np.pi * row * (2 * n + 1) / 64)
        column_cosines = 2 * np.cos(np.pi * column * (2 * n + 1) / 64)
        block[row, column] = row_cosines @ pixels @ column_cosines
    bits = (block > np.median(block)).reshape(-1)
    expected = sum(int(bit) << (63 - position) for position, bit in enumerate(bits))
    assert perceptual_hash(image) == expected


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 64), (1000, 1)])
@pytest.mark.parametrize("value", [0, 1, 128, 255])
def test_flat_images_have_a_fixed_hash(size, value):
    expected = 0 if value == 0 else FLAT_HASH
    assert perceptual_hash(Image.new("L", size, value)) == expected
    assert perceptual_hash(Image.new("RGB", size, (value,) * 3)) == expected


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"])
def test_every_mode_hashes(mode):
    image = scene(2).convert(mode)
    assert to_hashable(image).mode in ("L", "RGB")
    assert 0 <= perceptual_hash(image) < 2**64


def test_batch_equals_single_hashes_and_reports_failures():
    good = [encode(scene(variant), "PNG") for variant in range(3)]
    batch = [good[0], b"not an image", None, good[1], b"", good[2]]
    hashes, failures = perceptual_hashes(batch)
    assert hashes.dtype == np.uint64 and hashes.shape == (6,)
    assert [failure.reason if failure else None for failure in failures] == [
        None,
        "not_an_image",
        "missing",
        None,
        "empty",
        None,
    ]
    assert [int(hashes[index]) for index in (0, 3, 5)] == [IMAGEHASH_SCENES[variant] for variant in range(3)]
    assert [int(hashes[index]) for index in (1, 2, 4)] == [0, 0, 0]
    empty_hashes, empty_failures = perceptual_hashes([])
    assert empty_hashes.dtype == np.uint64 and empty_hashes.shape == (0,) and empty_failures == []


def test_image_sha256():
    assert image_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert image_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --------------------------------------------------------------------------------------------------
# Hostile and unusual images


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a valid CRC) claims width x height: a bomb header without the bomb."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    # 8-byte signature, then the IHDR chunk: length (4), b"IHDR", width (4), height (4), 5 more bytes, CRC (4).
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_decompression_bomb_is_refused_before_decoding():
    assert Image.open(io.BytesIO(png_claiming_size(20, 20))).size == (20, 20)  # the patching itself is sound
    # Over twice Pillow's limit: Pillow itself refuses to open it.
    huge = png_claiming_size(20_000, 20_000)
    assert failure(huge).reason == "decompression_bomb"
    hashes, failures = perceptual_hashes([huge])
    assert failures[0].reason == "decompression_bomb" and hashes[0] == 0
    # Between Pillow's limit and twice it, Pillow only warns; the size check refuses it, whatever
    # max_pixels the caller allows, because Pillow's limit always holds.
    large = png_claiming_size(10_000, 10_000)
    for max_pixels in (imagehash.PIL_DEFAULT_MAX_PIXELS, 10**12):
        with pytest.warns(Image.DecompressionBombWarning):
            result = failure(large, max_pixels=max_pixels)
        assert result.reason == "decompression_bomb" and "10000x10000" in result.detail


def test_max_pixels_is_inclusive():
    data = encode(scene(0, size=(100, 100)), "PNG")
    assert failure(data, max_pixels=9_999).reason == "decompression_bomb"
    assert decoded(data, max_pixels=10_000).width == 100


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_image_is_corrupt(image_format):
    noisy = Image.fromarray(np.random.default_rng(7).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    data = encode(noisy, image_format)
    assert failure(data[: len(data) // 2]).reason == "corrupt"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "missing"),
        (b"", "empty"),
        (b"hello, world", "not_an_image"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
        (bytes(range(256)) * 4, "not_an_image"),
        # A bare signature: Pillow reports a header it cannot parse as unidentified.
        (b"\x89PNG\r\n\x1a\n", "not_an_image"),
        (b"\xff\xd8\xff\xe0", "not_an_image"),
    ],
)
def test_non_images_give_a_reason(data, reason):
    assert failure(data).reason == reason


def test_formats_outside_the_web_list_are_refused():
    # Pillow would open this as EPS, and decoding EPS runs Ghostscript on the bytes.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    assert failure(eps).reason == "not_an_image"


def test_cmyk_jpeg():
    original = scene(0)
    result = decoded(encode(original.convert("CMYK"), "JPEG", quality=95))
    assert (result.format, result.source_mode, result.image.mode) == ("JPEG", "CMYK", "RGB")
    assert distance(perceptual_hash(result.image), perceptual_hash(original)) <= NEAR_DUPLICATE_DISTANCE


def test_16_bit_png_hashes_like_its_8_bit_version():
    eight_bit = np.asarray(scene(1).convert("L"))
    sixteen_bit = Image.fromarray(eight_bit.astype(np.uint16) * 257)
    result = decoded(encode(sixteen_bit, "PNG"))
    assert result.source_mode.startswith("I") and result.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(result.image), eight_bit)
    assert perceptual_hash(result.image) == perceptual_hash(Image.fromarray(eight_bit))


def test_paletted_png_with_transparency_is_flattened_on_white():
    indexes = np.asarray(scene(3).convert("L")) // 2
    indexes[:20, :30] = 0  # palette entry 0 is transparent black
    paletted = Image.fromarray(indexes.astype(np.uint8), "L").convert("P")
    paletted.putpalette([value for gray in range(256) for value in (gray, gray, gray)])
    result = decoded(encode(paletted, "PNG", transparency=0))
    assert result.source_mode == "P" and result.image.mode == "RGB"
    flattened = np.where(indexes == 0, 255, indexes).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(result.image.convert("L")), flattened)
    assert perceptual_hash(result.image) == perceptual_hash(Image.fromarray(flattened))


@pytest.mark.parametrize("image_format", ["GIF", "PNG"])
def test_animation_hashes_its_first_frame(image_format):
    frames = [scene(variant).convert("L") for variant in (0, 4, 7)]
    data = encode(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    result = decoded(data)
    np.testing.assert_array_equal(np.asarray(result.image.convert("L")), np.asarray(frames[0]))
    assert perceptual_hash(result.image) == perceptual_hash(frames[0])


@pytest.mark.parametrize(
    ("image", "image_format", "expected"),
    [
        (Image.new("RGB", (1, 1), (255, 255, 255)), "PNG", FLAT_HASH),
        (Image.new("L", (1, 1), 0), "JPEG", 0),
        (Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "PNG", FLAT_HASH),
        (Image.new("RGB", (1, 1), (200, 30, 30)).convert("P"), "GIF", FLAT_HASH),
        (Image.new("1", (1, 1), 1), "BMP", FLAT_HASH),
    ],
)
def test_one_pixel_images(image, image_format, expected):
    result = decoded(encode(image, image_format))
    assert (result.width, result.height) == (1, 1)
    assert perceptual_hash(result.image) == expected


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO"])
def test_web_formats_decode(image_format):
    result = decoded(encode(scene(6), image_format))
    assert result.format == image_format and result.image.mode in ("L", "RGB")


def test_exif_orientation_is_applied():
    upright = scene(1, size=(80, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored pixels must be turned 90 degrees clockwise to display
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    result = decoded(encode(stored, "PNG", exif=exif))
    assert (result.width, result.height) == (80, 50)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(upright))


VALID_FILES = [encode(scene(0, size=(40, 30)), image_format) for image_format in ("JPEG", "PNG", "GIF", "WEBP")]


@SETTINGS
@given(
    st.sampled_from(range(len(VALID_FILES))),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=4),
    st.integers(min_value=0),
)
def test_mutated_files_never_raise(file_index, byte_edits, cut):
    data = bytearray(VALID_FILES[file_index])
    for position, value in byte_edits:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    result = decode_image(data)
    assert isinstance(result, DecodedImage | DecodeFailure)
    if isinstance(result, DecodedImage):
        assert 0 <= perceptual_hash(result.image) < 2**64


# --------------------------------------------------------------------------------------------------
# Hamming distance


@SETTINGS
@given(st.lists(st.tuples(HASH_STRATEGY, HASH_STRATEGY), min_size=1, max_size=20))
def test_hamming_distances_count_differing_bits(pairs):
    left = np.array([a for a, _ in pairs], dtype=np.uint64)
    right = np.array([b for _, b in pairs], dtype=np.uint64)
    expected = [(a ^ b).bit_count() for a, b in pairs]
    assert hamming_distances(left, right).tolist() == expected
    assert imagehash._popcount_by_bytes(left ^ right).tolist() == expected


def test_hamming_distances_broadcast():
    hashes = np.array([0, 1, 2**64 - 1, 0xF0F0], dtype=np.uint64)
    matrix = hamming_distances(hashes[:, None], hashes[None, :])
    assert matrix.shape == (4, 4) and matrix.dtype == np.uint8
    assert matrix.tolist() == [[0, 1, 64, 8], [1, 0, 63, 9], [64, 63, 0, 56], [8, 9, 56, 0]]
    assert imagehash._popcount_by_bytes(hashes[:, None] ^ hashes[None, :]).tolist() == matrix.tolist()


# --------------------------------------------------------------------------------------------------
# Pigeonhole chunks and keys


@pytest.mark.parametrize("max_distance", range(MAX_DISTANCE_LIMIT + 1))
def test_chunks_tile_the_64_bits_evenly(max_distance):
    chunks = pigeonhole_chunks(max_distance)
    assert len(chunks) == max_distance + 1
    offsets = [offset for offset, _ in chunks]
    widths = [width for _, width in chunks]
    assert offsets == [sum(widths[:index]) for index in range(len(widths))]
    assert sum(widths) == 64 and max(widths) - min(widths) <= 1


@pytest.mark.parametrize("max_distance", [-1, MAX_DISTANCE_LIMIT + 1])
def test_out_of_range_distance_is_refused(max_distance):
    with pytest.raises(ValueError, match="max_distance"):
        pigeonhole_chunks(max_distance)


def chunk_values(pair: np.ndarray, max_distance: int) -> np.ndarray:
    """Each hash's value in each chunk of `pigeonhole_chunks`, shape (len(pair), max_distance + 1)."""
    return np.stack([(pair >> np.uint64(offset)) & np.uint64((1 << width) - 1)
                     for offset, width in pigeonhole_chunks(max_distance)], axis=1)


@SETTINGS
@given(HASH_STRATEGY, DISTANCE_STRATEGY, st.data())
def test_pigeonhole_guarantee(hash_value, max_distance, data):
    """Any two hashes within distance d agree on at least one chunk."""
    flipped_bits = data.draw(st.sets(st.integers(min_value=0, max_value=63), max_size=max_distance))
    other = hash_value ^ sum(1 << bit for bit in flipped_bits)
    pair = np.array([hash_value, other], dtype=np.uint64)
    assert hamming_distances(pair[0], pair[1]) <= max_distance
    values = chunk_values(pair, max_distance)
    assert (values[0] == values[1]).any()


@pytest.mark.parametrize("max_distance", [0, 1, 4, 10, MAX_DISTANCE_LIMIT])
def test_d_plus_one_flips_can_escape_every_chunk(max_distance):
    """The guarantee is tight: one flipped bit per chunk (distance d + 1) leaves no chunk in common."""
    one_bit_per_chunk = sum(1 << offset for offset, _ in pigeonhole_chunks(max_distance))
    pair = np.array([0, one_bit_per_chunk], dtype=np.uint64)
    assert hamming_distances(pair[0], pair[1]) == max_distance + 1
    values = chunk_values(pair, max_distance)
    assert not (values[0] == values[1]).any()


# --------------------------------------------------------------------------------------------------
# Nearest hash of a fixed list (PhashIndex)


def brute_force(queries, hashes, max_distance):
    """The reference: every pair compared; nearest, lowest index among ties; NO_MATCH beyond max_distance."""
    queries = np.asarray(queries, dtype=np.uint64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if not len(queries) or not len(hashes):
        return np.full(len(queries), NO_MATCH), np.full(len(queries), NO_MATCH)
    distances = hamming_distances(queries[:, None], hashes[None, :]).astype(np.int64)
    nearest = distances.argmin(axis=1)
    found = distances[np.arange(len(queries)), nearest]
    return np.where(found <= max_distance, nearest, NO_MATCH), np.where(found <= max_distance, found, NO_MATCH)


def both_paths(hashes, max_distance: int) -> list[PhashIndex]:
    """The index as built for these hashes, and one forced onto the chunk tables however few hashes or narrow
    chunks it has, so that every test covers both the full scan and the pigeonhole lookup."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imagehash, "_SMALL_INDEX", 0)
        patch.setattr(imagehash, "_CANDIDATE_COST", 0)
        forced = PhashIndex(hashes, max_distance)
    return [PhashIndex(hashes, max_distance), forced]


def flip(value: int, bits) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def assert_nearest(index: PhashIndex, queries, expected) -> None:
    found = index.nearest(queries)
    assert found[0].dtype == found[1].dtype == np.int64
    assert found[0].tolist() == list(expected[0]) and found[1].tolist() == list(expected[1])


@pytest.mark.parametrize("max_distance", [0, 1, 4, 7, MAX_DISTANCE_LIMIT])
def test_a_hash_matches_exactly_up_to_max_distance(max_distance):
    original = 0x9F3A_5C7E_0123_ABCD
    # Bits spread over the whole hash, so that every chunk of the pigeonhole split is hit.
    spread = [(7 * i + 3) % 64 for i in range(max_distance + 2)]
    queries = np.array([flip(original, spread[:k]) for k in range(max_distance + 2)], np.uint64)
    expected = [0] * (max_distance + 1) + [NO_MATCH], [*range(max_distance + 1), NO_MATCH]
    for index in both_paths(np.array([original], np.uint64), max_distance):
        assert_nearest(index, queries, expected)


def test_the_nearest_hash_wins_then_the_lowest_index():
    base = 0x0F0F_0F0F_F0F0_F0F0
    hashes = [flip(base, [1, 2, 3]), flip(base, [40]), flip(base, [50]), base ^ (2**64 - 1)]
    # base: hashes 1 and 2 are both 1 bit away (the lower index wins); hash 0 is 3 away.
    for index in both_paths(np.array(hashes, np.uint64), 4):
        assert_nearest(index, np.array([base, flip(base, [1, 2])], np.uint64), ([1, 0], [1, 1]))
    # Three hashes 1 bit from the probe, among far ones that share no chunk with it (so that the chunk tables
    # are used, not a full scan): the first listed wins, not the smallest value.
    far = np.random.default_rng(0).integers(2**40, 2**64 - 1, size=200, dtype=np.uint64)
    listed = np.concatenate([np.array([0b1100, 0b1010, 0b1001], np.uint64), far])
    for index in both_paths(listed, 1):
        assert_nearest(index, np.array([0b1000], np.uint64), ([0], [1]))


def test_no_queries_and_no_hashes_match_nothing():
    for index in both_paths(np.array([1, 2, 3], np.uint64), 4):
        assert_nearest(index, np.array([], np.uint64), ([], []))
    for index in both_paths([], 4):
        assert len(index) == 0
        assert_nearest(index, np.array([5, 6], np.uint64), ([NO_MATCH] * 2, [NO_MATCH] * 2))


@pytest.mark.parametrize("max_distance", [-1, MAX_DISTANCE_LIMIT + 1])
def test_an_index_refuses_an_out_of_range_distance(max_distance):
    with pytest.raises(ValueError, match=f"max_distance must be in 0..{MAX_DISTANCE_LIMIT}"):
        PhashIndex([1], max_distance)


def test_signed_int64_hashes_match_as_their_unsigned_bits():
    # dedup_image stores image_phash as the int64 view of the uint64 hash; the top bit makes it negative.
    value = np.array([0xF000_0000_0000_0001, 1 << 63], np.uint64)
    as_stored = value.view(np.int64)
    assert (as_stored < 0).all()
    for index in (*both_paths(value, 0), *both_paths(as_stored, 0), *both_paths(as_stored.tolist(), 0)):
        assert index.hashes.tolist() == value.tolist()
        assert_nearest(index, as_stored, ([0, 1], [0, 0]))
        assert_nearest(index, value, ([0, 1], [0, 0]))


@SETTINGS
@given(
    hashes=st.lists(HASH_STRATEGY, min_size=1, max_size=40),
    picks=st.lists(st.tuples(st.integers(0, 39), st.lists(st.integers(0, 63), max_size=8)), max_size=40),
    strangers=st.lists(HASH_STRATEGY, max_size=10),
    max_distance=st.integers(0, 10),
)
def test_nearest_equals_brute_force(hashes, picks, strangers, max_distance):
    # Queries near listed hashes (a few bits flipped) and unrelated ones.
    queries = np.array([flip(hashes[i % len(hashes)], bits) for i, bits in picks] + strangers, np.uint64)
    expected = brute_force(queries, hashes, max_distance)
    for index in both_paths(np.array(hashes, np.uint64), max_distance):
        assert_nearest(index, queries, expected)


@pytest.mark.parametrize("max_distance", [0, 1, 4, 8, 9, 16, MAX_DISTANCE_LIMIT])
@pytest.mark.parametrize("listed", [1, 40, 3_000])
def test_nearest_equals_brute_force_on_large_lists(max_distance, listed):
    rng = np.random.default_rng(max_distance * 1000 + listed)
    hashes = rng.integers(0, 2**64, size=listed, dtype=np.uint64)
    probes = [rng.integers(0, 2**64, size=200, dtype=np.uint64)]
    for bits in {0, 1, max(0, max_distance - 1), max_distance, max_distance + 1, max_distance + 3}:
        near = hashes[rng.integers(0, listed, size=20)]
        for i in range(len(near)):
            near[i] = flip(int(near[i]), rng.choice(64, size=bits, replace=False).tolist())
        probes.append(near)
    queries = np.concatenate(probes)
    expected = brute_force(queries, hashes, max_distance)
    assert (expected[0] >= 0).sum() >= 20, "the planted near hashes are found"
    for index in both_paths(hashes, max_distance):
        assert_nearest(index, queries, expected)


def test_a_large_list_at_small_distances_uses_the_chunk_tables_and_a_small_one_compares_all():
    large = np.random.default_rng(0).integers(0, 2**64, size=5_000, dtype=np.uint64)
    assert not PhashIndex(large, 4).brute_force and not PhashIndex(large, 0).brute_force
    assert not PhashIndex(large, 7).brute_force and PhashIndex(large, 8).brute_force
    assert PhashIndex(large[:10], 4).brute_force


def test_crowded_chunks_and_small_steps_still_give_the_exact_answer(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    hashes[:200] = hashes[0]  # many equal hashes (flat images): their chunks are crowded
    one_bit = np.uint64(1) << rng.integers(0, 64, 500).astype(np.uint64)
    queries = hashes[rng.integers(0, 300, size=500)] ^ one_bit
    queries[:50] = rng.integers(0, 2**63, size=50, dtype=np.int64).astype(np.uint64)
    expected = brute_force(queries, hashes, 4)
    # Steps of a few pairs: both the direct scan (crowded queries) and the lookups run in many small groups.
    monkeypatch.setattr(imagehash, "_PAIRS_PER_STEP", 64)
    index = PhashIndex(hashes, 4)
    assert not index.brute_force
    assert_nearest(index, queries, expected)
    assert (expected[0] == 0).sum() > 50  # the crowded hash was found, as the lowest index among its equals
