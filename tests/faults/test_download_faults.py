"""Hostile image servers against the download op (issue 17, cases 3 and 4): decompression bombs, trickling bodies,
endless and oversized responses, a trickled TLS handshake, and the memory and time one shard may take.

One server on 127.0.0.1 plays every part, chosen by the URL's first path segment; see tests/faults/README.md
(the D cases) for the table.
"""

import http.server
import io
import json
import socket
import threading
import time
import uuid

import pyarrow as pa
import pytest
from PIL import Image

from curation.ops import download as download_ops
from curation.ops.download import DownloadOptions, ShardStalled
from curation.schema import CAPTION, UID, URL, Reason
from tests.faults.test_hostile_inputs import bomb_png

# A shard's peak RSS above its starting RSS may not reach this (the acceptance: 300 MB).
RSS_HEADROOM_BYTES = 300 * 1024 * 1024
TRICKLE_SECONDS_PER_BYTE = 0.25
# Fast enough for a test, slow enough that a trickled image never finishes within it.
DEADLINE_SECONDS = 2.0


def _jpeg(side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


PHOTO = _jpeg()
BOMB_20000 = bomb_png(20_000)  # 48 kB on the wire, 400 million pixels: the bomb
BOMB_10000 = bomb_png(10_000)  # between Pillow's limit and twice it: refused by our cap, not by Pillow


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    """What each path does: see `_ROUTES` and `handle` (a TLS ClientHello gets a trickled answer)."""

    protocol_version = "HTTP/1.0"
    server: "_HostileServer"

    def handle(self) -> None:
        if self.request.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS record: the client wants a handshake
            # A handshake record announcing 16 kB, then a byte at a time: each byte is within any read timeout.
            self._trickle(b"\x16\x03\x03\x40\x00" + b"\x00" * 16384)
            return
        super().handle()

    def do_GET(self) -> None:
        route = self.path.split("/")[1]
        if route == "photo":
            self._answer(PHOTO)
        elif route == "bomb":
            self._answer(BOMB_20000, "image/png")
        elif route == "bomb10000":
            self._answer(BOMB_10000, "image/png")
        elif route == "page":
            self._answer(b"<html><body>not an image</body></html>", "text/html")
        elif route == "trickle":  # a real JPEG, a byte every TRICKLE_SECONDS_PER_BYTE
            self._headers(len(PHOTO))
            self._trickle(PHOTO)
        elif route == "slow":  # a real JPEG in four pieces 0.3 s apart: slow, but well within the deadline
            self._headers(len(PHOTO))
            for start in range(0, len(PHOTO), len(PHOTO) // 4 + 1):
                time.sleep(0.3)
                self._write(PHOTO[start:start + len(PHOTO) // 4 + 1])
        elif route == "huge":  # declares 10 GB
            self._headers(10**10)
            self._write(b"\xff" * 65536)
        elif route == "endless":  # no Content-Length (the body ends when the connection does) and no end
            self._headers(None)
            while not self.server.stopping.is_set() and self._write(b"\xff" * 65536):
                pass
        else:
            self.send_error(404)

    def _answer(self, body: bytes, content_type: str = "image/jpeg") -> None:
        self._headers(len(body), content_type)
        self._write(body)

    def _headers(self, length: int | None, content_type: str = "image/jpeg") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()

    def _trickle(self, body: bytes) -> None:
        for index in range(len(body)):
            if self.server.stopping.wait(TRICKLE_SECONDS_PER_BYTE) or not self._write(body[index:index + 1]):
                return

    def _write(self, data: bytes) -> bool:
        """False once the client has hung up (it gave up on us, as it should)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        return True

    def log_message(self, format, *args) -> None:
        pass


class _HostileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self) -> None:
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), _HostileHandler)

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-trickle is the point


@pytest.fixture(autouse=True)
def hang_guard():
    """Every case here ends in seconds; one that hangs fails instead of holding CI (as test_hostile_inputs does)."""
    import signal

    def fail(*_):
        raise TimeoutError("a download fault case hung")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def server():
    httpd = _HostileServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _options(server, **more) -> DownloadOptions:
    host, port = server.server_address[:2]
    settings = {"allow_hosts": (f"{host}:{port}",), "image_size": 32, "timeout": 1, "thread_count": 8,
                "image_deadline": DEADLINE_SECONDS, "stall_seconds": 30.0, **more}
    return DownloadOptions(**settings)


def _rows(urls: list[str]) -> pa.Table:
    return pa.table({UID: [uuid.uuid4().hex for _ in urls], URL: urls, CAPTION: ["a caption"] * len(urls)})


def _fates(server, paths: list[str], tmp_path, options: DownloadOptions) -> dict[str, tuple[str | None, str]]:
    """path -> (ledger reason or None for stored, error message) after downloading one shard of `paths`."""
    host, port = server.server_address[:2]
    rows = _rows([f"http://{host}:{port}{path}" for path in paths])
    statuses = download_ops.download_shard(rows, 0, tmp_path, options).to_pylist()
    path_of = dict(zip(rows.column(UID).to_pylist(), paths, strict=True))
    return {path_of[row[UID]]: (download_ops.ledger_reason(row["status"], row["error_message"]),
                                row["error_message"]) for row in statuses}


def test_each_hostile_response_ends_in_its_ledger_reason(server, tmp_path):
    paths = ["/photo/1", "/slow/1", "/bomb/1", "/bomb10000/1", "/page/1", "/trickle/1", "/huge/1", "/endless/1"]
    fates = _fates(server, paths, tmp_path, _options(server, max_image_bytes=1_000_000))

    assert fates["/photo/1"] == (None, None)
    assert fates["/slow/1"] == (None, None)
    reason, error = fates["/bomb/1"]
    assert reason == Reason.IMAGE_REJECTED
    assert "pixel cap of 89478485" in error and "400000000 pixels" in error
    assert fates["/bomb10000/1"] == (Reason.IMAGE_REJECTED, "image of 10000x10000 pixels is above the pixel cap of "
                                                            "89478485")
    assert fates["/page/1"] == (Reason.IMAGE_REJECTED, "no web image format recognised in the image's header")
    assert fates["/trickle/1"] == (Reason.DOWNLOAD_FAILED, "the download took longer than its deadline of 2 s")
    assert fates["/huge/1"] == (Reason.DOWNLOAD_FAILED, "Content-Length 10000000000 is above the cap of 1000000 bytes")
    assert fates["/endless/1"] == (Reason.DOWNLOAD_FAILED, "the response is longer than the cap of 1000000 bytes")
    detail = json.loads(download_ops.ledger_detail(0, "000000001", "failed_to_resize", fates["/bomb10000/1"][1]))
    assert "10000x10000" in detail["error"]


def test_a_lower_pixel_cap_rejects_an_ordinary_photo(server, tmp_path):
    fates = _fates(server, ["/photo/1"], tmp_path, _options(server, max_image_pixels=64 * 64 - 1))
    assert fates["/photo/1"] == (Reason.IMAGE_REJECTED, "image of 64x64 pixels is above the pixel cap of 4095")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak_rss() -> int:
    """Set the process's peak RSS (VmHWM) to its current RSS, which it returns (Linux's clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _peak_rss_bytes()


def test_32_threads_of_bombs_and_trickles_stay_small_and_end_within_the_deadline(server, tmp_path):
    """The acceptance test: a server serving only 20000x20000 PNG bombs and trickling JPEGs. Without the pixel cap
    each bomb decodes to 1.2 GB; without the deadline each trickle would take len(PHOTO) / 4 s (minutes)."""
    bombs, trickles = 96, 32
    paths = [f"/bomb/{i}" for i in range(bombs)] + [f"/trickle/{i}" for i in range(trickles)]
    options = _options(server, thread_count=32)
    download_ops.download_shard(_rows(["http://127.0.0.1:1/warm-up"]), 1, tmp_path / "warm-up", options)
    start_rss = _reset_peak_rss()
    started = time.monotonic()
    fates = _fates(server, paths, tmp_path, options)
    elapsed = time.monotonic() - started
    growth = _peak_rss_bytes() - start_rss

    assert {fates[f"/bomb/{i}"][0] for i in range(bombs)} == {Reason.IMAGE_REJECTED}
    assert {fates[f"/trickle/{i}"] for i in range(trickles)} == {
        (Reason.DOWNLOAD_FAILED, "the download took longer than its deadline of 2 s")
    }
    assert growth < RSS_HEADROOM_BYTES, f"peak RSS grew {growth / 2**20:.0f} MiB over {start_rss / 2**20:.0f} MiB"
    # Every trickle runs at once (32 threads), so the shard takes about one deadline, not one per image.
    assert elapsed < 2 * DEADLINE_SECONDS + 5, f"the shard took {elapsed:.1f} s"


def test_a_shard_that_stops_moving_fails_its_task_and_keeps_nothing(server, tmp_path):
    """A server that trickles its TLS handshake sends no response byte and ends no request: the watchdog abandons
    the shard after stall_seconds although the image deadline is far off."""
    host, port = server.server_address[:2]
    rows = _rows([f"https://{host}:{port}/photo/{i}" for i in range(4)])
    options = _options(server, image_deadline=60.0, stall_seconds=2.0)
    started = time.monotonic()
    with pytest.raises(ShardStalled, match=r"shard 00000 stalled: no byte received and no request ended for 2 s"):
        download_ops.download_shard(rows, 0, tmp_path, options)
    assert time.monotonic() - started < 2.0 + 5
    assert not download_ops.is_shard_done(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []
    # The abandonment ended with that shard: the process's next shard downloads as usual.
    assert _fates(server, ["/photo/1"], tmp_path, options) == {"/photo/1": (None, None)}


def test_a_slow_shard_that_keeps_moving_is_not_cut(server, tmp_path):
    """Longer in all than stall_seconds, but never that long without a byte: every image is stored."""
    paths = [f"/slow/{i}" for i in range(6)]
    started = time.monotonic()
    fates = _fates(server, paths, tmp_path, _options(server, thread_count=2, stall_seconds=1.5))
    assert time.monotonic() - started > 1.5
    assert set(fates.values()) == {(None, None)}
