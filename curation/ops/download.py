"""Download one shard of rows with img2dataset, safely and ledger-complete (DESIGN.md section 1: download).

img2dataset's own `Downloader` does the work (threads, retries, resizing, opt-out headers, webdataset writing);
this module adds what a curation run needs around it:

- the address check: `curation.ops.safe_http` is installed as the process's urllib opener before any request, so
  URLs resolving to loopback, private, link-local or multicast addresses are refused before connecting, also after
  redirects (img2dataset downloads through `urllib.request.urlopen`, which uses that opener);
- atomic, resumable shards: img2dataset writes into a per-attempt temporary folder, and the shard's tar, status
  parquet and stats json are moved into place only when complete, the stats json last (the done marker);
- a status for every row: img2dataset's per-shard parquet lists every sample with its status and error message,
  and `ledger_reason` turns those into ledger reasons;
- bounded cost per image: the safe opener cuts a download at its total deadline (`image_deadline`; img2dataset's
  `timeout` bounds one read only, so a server trickling a byte a second held a download for ever) and at
  `max_image_bytes`; the image's size is read from its header before img2dataset decodes it, and an image of more
  than `max_image_pixels` is rejected (a 48 kB PNG of 20000x20000 pixels decodes to 1.2 GB);
- a shard watchdog: when the shard makes no progress (no response byte received, no request ended; the bytes of a
  TLS handshake do not count) for `stall_seconds`, every download of the shard is abandoned and the task fails, for
  Spark to retry on a cluster (in local mode a task is tried once, so the stage fails). Progress, not total time: a
  slow shard that keeps moving is never cut, and a stall (the network or DNS gone) is not the rows' fault, so they
  are not ledgered.

img2dataset imports torch (through wandb and albumentations), so it is imported inside the functions that need it:
importing this module stays light, and only download workers pay for it.
"""

import json
import logging
import os
import shutil
import threading
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from curation.ops.imagehash import DECODABLE_FORMATS, PIL_DEFAULT_MAX_PIXELS
from curation.ops.safe_http import (
    REFUSED_MARKER,
    TRANSFERS,
    ResponseLimits,
    install_safe_opener,
    parse_allow_hosts,
)
from curation.schema import CAPTION, UID, URL, Reason

logger = logging.getLogger(__name__)

# img2dataset names shards with this many digits; a run's shard ids must fit (100,000 shards of 10,000 rows = 1e9).
SHARD_DIGITS = 5
# img2dataset's error message when an X-Robots-Tag header forbids the use (its `is_disallowed`).
OPT_OUT_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"
STATUS_COLUMNS = [
    UID, "key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256",
]
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# img2dataset's return value for an image it did not store: (image, width, height, original width and height, error).
_NOT_STORED = (None, None, None, None, None)


@dataclass(frozen=True)
class DownloadOptions:
    """img2dataset's settings for one run; the names and defaults are img2dataset's unless noted."""

    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    skip_reencode: bool = False
    min_image_size: int = 0
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")
    timeout: int = 10
    retries: int = 0
    # img2dataset defaults to 256 threads per process; 32 is kinder to the hosts of a small run and to test servers.
    thread_count: int = 32
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)
    # Ours, not img2dataset's. Pillow's own limit, which dedup_image's decoding also keeps.
    max_image_pixels: int = PIL_DEFAULT_MAX_PIXELS
    image_deadline: float = ResponseLimits.deadline_seconds
    max_image_bytes: int = ResponseLimits.max_bytes
    stall_seconds: float = 120.0

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format must be jpg, png or webp, not {self.encode_format!r}")
        if self.image_size < 1 or self.thread_count < 1 or self.timeout < 1 or self.retries < 0:
            raise ValueError("image_size, thread_count and timeout must be positive and retries >= 0")
        parse_allow_hosts(self.allow_hosts)
        self.response_limits()
        # Pillow refuses more than twice its limit at open, so a larger cap would be a promise the header check breaks.
        if not 1 <= self.max_image_pixels <= 2 * PIL_DEFAULT_MAX_PIXELS:
            raise ValueError(
                f"max_image_pixels must be in [1, {2 * PIL_DEFAULT_MAX_PIXELS}], not {self.max_image_pixels}"
            )
        # A read may wait `timeout` seconds without a byte, so a shorter watch would cut shards that are only slow.
        if not self.stall_seconds > self.timeout:
            raise ValueError(f"stall_seconds ({self.stall_seconds}) must be above timeout ({self.timeout})")

    def response_limits(self) -> ResponseLimits:
        return ResponseLimits(deadline_seconds=self.image_deadline, max_bytes=self.max_image_bytes)

    @classmethod
    def from_options(cls, options: dict) -> "DownloadOptions":
        """From the download stage's option dict (the keys that are not img2dataset's are ignored)."""
        fields = {name: options[name] for name in cls.__dataclass_fields__ if name in options}
        fields["allow_hosts"] = tuple(options["allow_hosts"])
        fields["disallowed_header_directives"] = tuple(options["disallowed_header_directives"])
        if fields.get("max_aspect_ratio") is None:
            fields["max_aspect_ratio"] = float("inf")
        return cls(**fields)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def is_shard_done(output_folder: Path, shard_id: int) -> bool:
    return (Path(output_folder) / f"{shard_name(shard_id)}_stats.json").is_file()


def read_shard_statuses(output_folder: Path, shard_id: int) -> pa.Table:
    """The status row of every sample of a finished shard (STATUS_COLUMNS)."""
    table = pq.read_table(Path(output_folder) / f"{shard_name(shard_id)}.parquet")
    return table.select(STATUS_COLUMNS)


class PixelCappedResizer:
    """img2dataset's resizer behind a check of the image's size in its header: an image of more than `max_pixels`
    pixels, or one whose size Pillow cannot read from a web image format's header, is not stored (img2dataset's
    failed_to_resize, ledgered image_rejected) and never decoded."""

    def __init__(self, resizer, max_pixels: int) -> None:
        self._resizer = resizer
        self._max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        TRANSFERS.note()  # a row reached the resizer: the shard is moving even while no byte arrives
        refusal = self.refusal(img_stream)
        img_stream.seek(0)
        if refusal is not None:
            return (*_NOT_STORED, refusal)
        return self._resizer(img_stream, blurring_bbox_list)

    def refusal(self, img_stream) -> str | None:
        """Why the image must not be decoded, or None. Opening reads the header only."""
        try:
            # The cap is ours; Pillow's warning between its limit and twice it would only repeat it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(img_stream, formats=DECODABLE_FORMATS) as opened:
                    width, height = opened.size
        except Image.DecompressionBombError as error:  # above twice Pillow's limit: refused by Pillow at open
            return f"image above the pixel cap of {self._max_pixels}: {error}"
        except UnidentifiedImageError:
            return "no web image format recognised in the image's header"
        # A malformed header raises whatever the format's parser hits (SyntaxError, struct.error, ...).
        except Exception as error:
            return f"cannot read the image's size from its header: {type(error).__name__}: {error}"
        if width * height > self._max_pixels:
            return f"image of {width}x{height} pixels is above the pixel cap of {self._max_pixels}"
        return None


class _StallWatch:
    """Abandons the process's downloads when they make no progress for `stall_seconds` (see the module docstring)."""

    def __init__(self, shard_id: int, stall_seconds: float) -> None:
        self._shard_id, self._stall_seconds = shard_id, stall_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"stall-watch-{shard_name(shard_id)}", daemon=True)
        self.abandoned_because: str | None = None

    def __enter__(self) -> "_StallWatch":
        TRANSFERS.restart()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.abandoned_because = TRANSFERS.abandoned_because
        TRANSFERS.restart()  # the abandonment ends with this shard: later downloads of the process may run

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self._stall_seconds / 10)):
            if TRANSFERS.idle_seconds() > self._stall_seconds:
                because = (f"shard {shard_name(self._shard_id)} stalled: no byte received and no request ended for "
                           f"{self._stall_seconds:g} s (stall_seconds)")
                logger.error("%s; abandoning its downloads", because)
                TRANSFERS.abandon(because)
                return


class ShardStalled(RuntimeError):
    """The shard watchdog abandoned the shard; the task fails so that Spark retries it."""


def download_shard(
    rows: pa.Table, shard_id: int, output_folder: str | os.PathLike, options: DownloadOptions
) -> pa.Table:
    """Download the images of `rows` (uid, url, caption) into `output_folder/<shard>.tar` (webdataset: jpg, txt and
    json with the uid) and return the status of every row (STATUS_COLUMNS).

    A shard already finished in `output_folder` is not downloaded again: its recorded statuses are returned.
    Rows are processed in uid order, so the shard's sample keys do not depend on how rows reached this call.
    Raises ShardStalled when the shard makes no progress for `options.stall_seconds`. The watchdog and the limits
    are per process: a process downloads one shard at a time (a Spark Python worker runs one task at a time).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    output_folder = Path(output_folder)
    if is_shard_done(output_folder, shard_id):
        logger.info("shard %s is already downloaded", shard_name(shard_id))
        return read_shard_statuses(output_folder, shard_id)
    attempt = output_folder / f".{shard_name(shard_id)}.tmp-{uuid.uuid4().hex[:12]}"
    attempt.mkdir(parents=True)
    try:
        rows = rows.select([URL, CAPTION, UID]).sort_by(UID)
        input_path = attempt / "input.feather"
        feather.write_feather(rows, input_path, compression="uncompressed")
        img2dataset_resizer = Resizer(
            image_size=options.image_size, resize_mode=options.resize_mode,
            resize_only_if_bigger=options.resize_only_if_bigger, encode_format=options.encode_format,
            encode_quality=options.encode_quality, skip_reencode=options.skip_reencode,
            min_image_size=options.min_image_size, max_image_area=options.max_image_area,
            max_aspect_ratio=options.max_aspect_ratio,
        )
        resizer = PixelCappedResizer(img2dataset_resizer, options.max_image_pixels)
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=options.thread_count,
            save_caption=True, extract_exif=False, output_folder=str(attempt), column_list=[URL, CAPTION, UID],
            timeout=options.timeout, number_sample_per_shard=max(1, len(rows)), oom_shard_count=SHARD_DIGITS,
            compute_hash="sha256", verify_hash_type=None, encode_format=options.encode_format,
            retries=options.retries, user_agent_token=options.user_agent_token,
            disallowed_header_directives=list(options.disallowed_header_directives) or None,
        )
        install_safe_opener(options.allow_hosts, options.response_limits())
        # download_shard, not the Downloader's __call__, which prints and swallows a failed shard: here a failure
        # must fail the task so that Spark retries it and nothing is silently missing.
        with _StallWatch(shard_id, options.stall_seconds) as watch:
            downloader.download_shard((shard_id, str(input_path)))
        if watch.abandoned_because is not None:
            raise ShardStalled(watch.abandoned_because)
        name = shard_name(shard_id)
        for suffix in (".tar", ".parquet", "_stats.json"):
            os.replace(attempt / f"{name}{suffix}", output_folder / f"{name}{suffix}")
    finally:
        shutil.rmtree(attempt, ignore_errors=True)
    statuses = read_shard_statuses(output_folder, shard_id)
    if len(statuses) != len(rows):
        raise RuntimeError(f"shard {shard_id}: img2dataset reported {len(statuses)} of {len(rows)} rows")
    return statuses


def ledger_reason(status: str, error_message: str | None) -> str | None:
    """The ledger reason of a sample with img2dataset `status` and `error_message`; None for a success."""
    if status == "success":
        return None
    message = error_message or ""
    if REFUSED_MARKER in message:
        return Reason.DOWNLOAD_REFUSED
    if message == OPT_OUT_MESSAGE:
        return Reason.DOWNLOAD_OPT_OUT
    if status == "failed_to_resize":
        return Reason.IMAGE_REJECTED
    return Reason.DOWNLOAD_FAILED


def ledger_detail(shard_id: int, key: str, status: str, error_message: str | None) -> str:
    return json.dumps({"shard": shard_name(shard_id), "key": key, "status": status, "error": error_message})


def options_record(options: DownloadOptions) -> dict:
    record = asdict(options)
    # JSON has no infinity; img2dataset's "no limit" is recorded as null.
    return {key: (None if value == float("inf") else value) for key, value in record.items()}
