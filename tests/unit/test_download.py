"""The download op's own checks, without a server: the pixel cap read from the header, and its options."""

import io

import pytest
from PIL import Image

from curation.config import ConfigError
from curation.ops import download as download_ops
from curation.ops.download import DownloadOptions, PixelCappedResizer
from curation.ops.safe_http import ResponseLimits
from curation.stages.download import STAGE


def _encoded(side: tuple[int, int], image_format: str = "PNG") -> io.BytesIO:
    buffer = io.BytesIO()
    Image.new("L", side).save(buffer, format=image_format)
    buffer.seek(0)
    return buffer


class _RecordingResizer:
    """Stands in for img2dataset's Resizer: records what reaches it."""

    def __init__(self):
        self.streams = []

    def __call__(self, img_stream, blurring_bbox_list=None):
        self.streams.append(img_stream.tell())
        return b"stored", 1, 1, 1, 1, None


def test_an_image_within_the_cap_reaches_the_resizer_from_its_first_byte():
    resizer = _RecordingResizer()
    assert PixelCappedResizer(resizer, 100 * 50)(_encoded((100, 50))) == (b"stored", 1, 1, 1, 1, None)
    assert resizer.streams == [0]


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_an_image_above_the_cap_is_refused_with_its_size_and_never_resized(image_format):
    resizer = _RecordingResizer()
    result = PixelCappedResizer(resizer, 100 * 50 - 1)(_encoded((100, 50), image_format))
    assert result == (None, None, None, None, None, "image of 100x50 pixels is above the pixel cap of 4999")
    assert resizer.streams == []


def test_bytes_without_a_web_image_header_are_refused():
    result = PixelCappedResizer(_RecordingResizer(), 10**6)(io.BytesIO(b"%PDF-1.7 not an image"))
    assert result[-1] == "no web image format recognised in the image's header"


def test_the_stage_defaults_are_the_ops_defaults():
    options = DownloadOptions.from_options(STAGE.options({}, {}))
    assert options == DownloadOptions()
    assert options.response_limits() == ResponseLimits()
    record = download_ops.options_record(options)
    limits = {key: record[key] for key in ("image_deadline", "max_image_bytes", "max_image_pixels", "stall_seconds")}
    assert limits == {"image_deadline": 60.0, "max_image_bytes": 32 * 1024 * 1024, "max_image_pixels": 89_478_485,
                      "stall_seconds": 120.0}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"stall_seconds": 10}, r"stall_seconds \(10\) must be above timeout \(10\)"),
        ({"image_deadline": 0}, "image_deadline"),
        ({"max_image_bytes": 0}, "max_image_bytes"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        # Pillow refuses above twice its limit at open: a larger cap would promise what the header check cannot keep
        ({"max_image_pixels": 2 * 89_478_485 + 1},
         r"max_image_pixels is 178956971; allowed: an integer in \[1, 178956970\]"),
    ],
)
def test_limits_that_would_cut_every_download_are_refused_at_load(given, message):
    with pytest.raises(ConfigError, match=message):
        STAGE.options(given, {})
