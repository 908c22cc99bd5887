import io
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from curation.demo_images import (
    DEMO_IMAGE_PORT,
    PLANTED_MODULUS,
    PLANTED_RULES,
    demo_image_url,
    demo_resolver,
    planted_kind,
    row_response,
    scene_jpeg,
    scene_size,
)
from curation.image_server import ImageServer
from curation.ops.imagehash import DecodedImage, DecodeFailure, decode_image, hamming_distances, perceptual_hashes

NEAR_DUPLICATE_DISTANCE = 4
DISTINCT_SCENE_ROWS = 3_000


def _first_row(kind: str) -> int:
    return PLANTED_RULES[kind]


def _decoded(body: bytes) -> DecodedImage:
    decoded = decode_image(body)
    assert isinstance(decoded, DecodedImage), decoded
    return decoded


def _decoded_failure_reason(body: bytes) -> str:
    failure = decode_image(body)
    assert isinstance(failure, DecodeFailure)
    return failure.reason


def _path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


def test_url_format_and_resolver_parse_it_back():
    assert demo_image_url(17) == f"http://127.0.0.1:{DEMO_IMAGE_PORT}/img1/photos/00000017.jpg"
    assert demo_image_url(17, port=8000) == "http://127.0.0.1:8000/img1/photos/00000017.jpg"
    resolve = demo_resolver()
    # The fragment a demo URL may carry never reaches the server.
    assert resolve(_path(demo_image_url(5) + "#from-9")) == row_response(5)


@pytest.mark.parametrize(
    "path", ["/", "/img0/photos/abc.jpg", "/img0/photos/00000001.png", "/img0/photos/00000001.jpg/x", "/photos/1.jpg"]
)
def test_unparseable_paths_are_404(path):
    assert demo_resolver()(path).status == 404


def test_responses_are_deterministic_and_seeded():
    rows = range(8)
    first = [row_response(row, seed=0).body for row in rows]
    assert first == [row_response(row, seed=0).body for row in rows]
    assert all(a != b for a, b in zip(first, (row_response(row, seed=1).body for row in rows), strict=True))
    assert scene_jpeg(0, 3, 120, 100) == scene_jpeg(0, 3, 120, 100)


def test_ordinary_rows_are_jpegs_of_their_scene_size():
    for row in (row for row in range(40) if planted_kind(row) is None):
        response = row_response(row)
        assert (response.status, response.content_type, response.headers) == (200, "image/jpeg", ())
        decoded = _decoded(response.body)
        assert (decoded.format, (decoded.width, decoded.height)) == ("JPEG", scene_size(0, row))


def test_scene_sizes_vary_within_bounds():
    sizes = np.array([scene_size(0, scene) for scene in range(2_000)])
    assert sizes.min() >= 96 and sizes.max() <= 320
    ratios = sizes[:, 0] / sizes[:, 1]
    assert ratios.min() >= 0.5 and ratios.max() <= 2.0
    assert ratios.min() < 0.6 and ratios.max() > 1.7
    assert len({tuple(size) for size in sizes}) > 1_000


def test_planted_kinds_are_rare_and_spread_over_hosts():
    rows = 60_000
    kinds = Counter(planted_kind(row) for row in range(rows))
    assert set(kinds) == set(PLANTED_RULES) | {None}
    for kind in PLANTED_RULES:
        assert 0.003 <= kinds[kind] / rows <= 0.005, kind
        hosts = {row % 16 for row in range(rows) if planted_kind(row) == kind}
        assert len(hosts) == 16, kind
    for kind in ("exact_duplicate", "near_duplicate"):
        row = _first_row(kind)
        assert planted_kind(row - 1) is None and planted_kind(row - 2) is None
    assert planted_kind(_first_row("missing") + PLANTED_MODULUS) == "missing"


def test_missing_is_404():
    assert row_response(_first_row("missing")).status == 404


def test_truncated_is_half_a_jpeg_that_does_not_decode():
    row = _first_row("truncated")
    response = row_response(row)
    assert (response.status, response.content_type) == (200, "image/jpeg")
    whole = scene_jpeg(0, row, *scene_size(0, row))
    assert response.body == whole[: len(whole) // 2]
    assert _decoded_failure_reason(response.body) == "corrupt"


def test_not_image_is_an_html_page():
    response = row_response(_first_row("not_image"))
    assert (response.status, response.content_type.split(";")[0]) == (200, "text/html")
    assert _decoded_failure_reason(response.body) == "not_an_image"


def test_opt_out_is_a_valid_image_with_noai_header():
    response = row_response(_first_row("opt_out"))
    assert (response.status, response.content_type) == (200, "image/jpeg")
    assert dict(response.headers) == {"X-Robots-Tag": "noai"}
    _decoded(response.body)


def test_redirect_private_points_at_another_loopback_address():
    row = _first_row("redirect_private")
    response = row_response(row, port=4321)
    assert response.status == 302
    assert dict(response.headers) == {"Location": f"http://127.0.0.2:4321/img0/photos/{row:08d}.jpg"}


def test_exact_duplicate_repeats_previous_rows_bytes():
    for row in range(_first_row("exact_duplicate"), 2_000, PLANTED_MODULUS):
        assert row_response(row).body == row_response(row - 1).body


def test_near_duplicate_is_a_smaller_recompressed_copy_of_row_minus_two():
    for row in range(_first_row("near_duplicate"), 5_000, PLANTED_MODULUS):
        near, source = row_response(row), row_response(row - 2)
        assert near.status == 200 and near.body != source.body
        near_image, source_image = _decoded(near.body), _decoded(source.body)
        assert near_image.width == round(source_image.width * 0.75)
        assert near_image.height == round(source_image.height * 0.75)
        hashes, failures = perceptual_hashes([near.body, source.body])
        assert failures == [None, None]
        assert hamming_distances(hashes[0], hashes[1]) <= NEAR_DUPLICATE_DISTANCE, row


def test_different_scenes_are_not_near_duplicates():
    rows = [row for row in range(DISTINCT_SCENE_ROWS) if planted_kind(row) is None]
    hashes, failures = perceptual_hashes(row_response(row).body for row in rows)
    assert not any(failures)
    distances = hamming_distances(hashes[:, None], hashes[None, :])
    pair_distances = distances[np.triu_indices(len(rows), k=1)]
    assert int((pair_distances <= NEAR_DUPLICATE_DISTANCE).sum()) == 0
    # Margin: the generator keeps different scenes far from the threshold, not just over it.
    assert int(pair_distances.min()) >= 2 * NEAR_DUPLICATE_DISTANCE


def test_served_over_http():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with ImageServer(demo_resolver(seed=0)) as server:
        row = 3
        with opener.open(f"{server.base_url}/img{row % 16}/photos/{row:08d}.jpg", timeout=10) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == row_response(row).body
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(f"{server.base_url}/img1/photos/{_first_row('missing'):08d}.jpg", timeout=10)
        missing.value.close()
        assert missing.value.code == 404


def test_logo_rows_serve_flat_brand_marks_on_white():
    from curation.demo_images import LOGO_BRANDS, logo_image

    rows = [row for row in range(3 * PLANTED_MODULUS) if planted_kind(row) == "logo"]
    assert len(rows) == 3
    for row in rows:
        response = row_response(row)
        assert response.status == 200 and response.content_type == "image/jpeg"
        pixels = np.asarray(Image.open(io.BytesIO(response.body)).convert("RGB")).reshape(-1, 3).astype(int)
        _, colour = LOGO_BRANDS[(row // PLANTED_MODULUS) % len(LOGO_BRANDS)]
        near_brand = (np.abs(pixels - np.array(colour)).sum(axis=1) < 60).mean()
        near_white = (pixels.min(axis=1) > 235).mean()
        assert near_brand > 0.05 and near_white > 0.3 and near_brand + near_white > 0.9
    assert logo_image(0, rows[0]).tobytes() == logo_image(0, rows[0]).tobytes()
