"""The download stage."""

from dataclasses import asdict

from curation.stage import RateAssumption, Stage, StageOptions, check_with, option


class DownloadStage(Stage):
    name = "download"
    flow = 70
    summary = "img2dataset download into webdataset tars; failures ledgered"
    input_help = "stage folder of the rows to download"
    reads_images = True
    description = (
        "img2dataset's `Downloader` per uid-range shard (one Spark task per shard) into webdataset tars "
        "(`_artifacts/images/NNNNN.tar`: jpg, txt, json with the uid), resized per config; X-Robots-Tag opt-outs "
        "honoured. Safe by default: a URL whose host resolves to a loopback, private, link-local, multicast, "
        "unspecified, reserved or shared address, or a scheme other than http(s), is refused before connecting, also "
        "after a redirect, and the connection goes to the address that was checked (no second DNS lookup); "
        "`allow_hosts` lists host:port pairs exempt from this (tests, the demo). Proxy variables are ignored. Adds "
        "`image_shard`, `image_key`, `image_width`, `image_height`, `image_original_width`, `image_original_height`, "
        "`image_source_sha256`; finished shards survive a crash and are not downloaded again. Bounded per image: "
        "`image_deadline` for the whole download (the `timeout` is per read), `max_image_bytes`, and "
        "`max_image_pixels` read from the header before decoding (decompression bombs); a shard that makes no "
        "progress for `stall_seconds` fails its task (retried by Spark on a cluster)"
    )
    drops = (
        "`download_failed`, `download_refused`, `download_opt_out`, `image_rejected` (detail: shard, key, img2dataset "
        "status and error message)"
    )

    class Options(StageOptions):
        allow_hosts: list[str] = option(
            [],
            "host:port pairs that may be reached although they resolve to a loopback, private, link-local or "
            "multicast address (refused by default)",
        )
        shard_rows: int = option(10000, "about this many rows per image tar (uid-range shards)", at_least=1)
        image_bytes_column: str | None = option(
            None, "also store each image's bytes in this column of the rows (e.g. jpg)"
        )
        image_size: int = option(256, "img2dataset image_size: target side in pixels")
        resize_mode: str = option(
            "border",
            "img2dataset resize_mode: no, border, keep_ratio, keep_ratio_largest, center_crop",
            choices=("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"),
        )
        resize_only_if_bigger: bool = option(False, "img2dataset: never upscale")
        encode_format: str = option(
            "jpg", "image format in the tars: jpg, png or webp", choices=("jpg", "png", "webp")
        )
        encode_quality: int = option(95, "img2dataset encode_quality")
        skip_reencode: bool = option(False, "img2dataset: keep the original bytes when no resize is needed")
        min_image_size: int = option(0, "img2dataset: smaller images are image_rejected")
        max_aspect_ratio: float | None = option(
            None, "img2dataset: images with a larger aspect ratio are image_rejected (default none)"
        )
        timeout: int = option(10, "seconds a connect or one read may wait (per read: see image_deadline)")
        image_deadline: float = option(
            60.0,
            "seconds one image's download may take in all (connect, redirects, headers, body); a server that "
            "trickles bytes is cut off there (download_failed)",
            above=0,
        )
        max_image_bytes: int = option(
            32 * 1024 * 1024,
            "longest response read for one image, in bytes (download_failed); a longer Content-Length is refused "
            "before the body is read",
            at_least=1,
        )
        max_image_pixels: int = option(
            89_478_485,
            "images of more pixels (width x height, read from the header before decoding) are image_rejected; "
            "default Pillow's limit, at most twice it (Pillow refuses larger images itself)",
            at_least=1, at_most=2 * 89_478_485,
        )
        stall_seconds: float = option(
            120.0,
            "shard watchdog: when no response byte arrives and no request ends in a shard for this many seconds "
            "(the network or DNS gone), its task fails (Spark retries it up to spark.task.maxFailures, which is 1 "
            "in local mode: the stage fails); a slow shard that keeps moving is never cut. Must be above timeout",
        )
        retries: int = option(0, "img2dataset retries per URL")
        thread_count: int = option(32, "download threads per Spark task")
        user_agent_token: str | None = option(
            None, "token added to the User-Agent, also matched in X-Robots-Tag directives"
        )
        disallowed_header_directives: list[str] = option(
            ["noai", "noimageai", "noindex", "noimageindex"],
            "X-Robots-Tag directives that opt an image out (download_opt_out)",
        )

        def check(self) -> None:
            from curation.ops import download as download_ops

            check_with("download", lambda: download_ops.DownloadOptions.from_options(asdict(self)))

    assumed_rate = RateAssumption(
        50,
        "images/s",
        (
            "network-bound: img2dataset with 32 threads per core on a well-connected machine (guess); 10% of web links"
            " assumed dead or refused"
        ),
        0.9,
    )
    adapter = "curation.spark.download:run_download"
    estimated_by = "download"


STAGE = DownloadStage()
