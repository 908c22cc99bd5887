"""`curation report` over a finished run of every demo stage (the session's `demo_run`, read only).

(Named apart from tests/unit/test_report.py: without __init__.py files pytest cannot import two test modules of the
same name.)
"""

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.manifest import release_sha256
from curation.report import SECTION_IDS, write_report
from curation.run_folder import stage_chain
from tests.unit.test_report import classes_in, is_absent, page_problems, parse_page, text_of

pytestmark = pytest.mark.spark

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(demo_run, tmp_path_factory) -> str:
    path = write_report(demo_run, tmp_path_factory.mktemp("report") / "report.html")
    return path.read_text()


def test_every_section_renders_with_inline_images_only(report):
    assert page_problems(report) == []
    parser = parse_page(report)
    assert list(parser.sections) == list(SECTION_IDS)
    for section in SECTION_IDS:
        assert not is_absent(report, section), section
        assert "error" not in classes_in(report, section), section
    for section in ("funnel", "balancing", "captions", "dedup", "pruning", "scores", "throughput"):
        assert any(s == section and css == "plot" for s, css, _ in parser.images), section
    assert [css for s, css, _ in parser.images if s == "logos"] == ["sheet"]
    assert len(report.encode()) < 3 * 1024 * 1024


def test_the_funnel_matches_the_stage_records(report, demo_run):
    chain = stage_chain(demo_run / "publish")
    rows = parse_page(report).funnel_rows
    assert [row["stage"] for row in rows] == [
        Path(folder).relative_to(demo_run.resolve()).as_posix() for folder, _ in chain
    ]
    for row, (_, record) in zip(rows, chain, strict=True):
        assert (row["rows_in"], row["rows_out"], row["dropped"]) == (
            record["rows_in"], record["rows_out"], sum(record["drops"].values())
        ), row["stage"]
    text = text_of(report, "funnel")
    for _, record in chain:
        for reason, count in record["drops"].items():
            assert f"{reason}: {count:,}" in text


def test_the_gallery_shows_image_duplicate_groups_as_thumbnails(report, demo_run):
    thumbs = [src for section, css, src in parse_page(report).images if section == "dedup" and css == "thumb"]
    folder = next(folder for folder, record in stage_chain(demo_run / "publish") if record["stage"] == "dedup_image")
    ledger = pq.read_table(folder / "_ledger", columns=["reason", "related_uid"]).to_pylist()
    sizes: dict[tuple, int] = {}
    for row in ledger:
        if row["reason"] in ("near_duplicate_image", "duplicate_image_bytes"):
            sizes[(row["reason"], row["related_uid"])] = sizes.get((row["reason"], row["related_uid"]), 1) + 1
    assert sizes, "the demo run has image duplicates"
    near_first = sorted(sizes.items(), key=lambda item: (item[0][0] != "near_duplicate_image", -item[1], item[0][1]))
    assert len(thumbs) == sum(min(size, 6) for _, size in near_first[:8])
    for src in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and max(image.size) <= 96
    assert "no image" not in text_of(report, "dedup")


def test_manifest_and_balancing_name_their_sources(report, demo_run):
    manifest_path = demo_run / "publish" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    text = text_of(report, "manifest")
    assert release_sha256(manifest) in text
    assert manifest["dataset"] in text and f"{manifest['totals']['rows_published']:,}" in text
    chain = stage_chain(demo_run / "publish")
    balances = [(folder, record) for folder, record in chain if record["stage"] == "balance"]
    balancing = text_of(report, "balancing")
    for position, (folder, record) in enumerate(balances, start=1):
        assert f"balance {position} of {len(balances)}" in balancing
        assert f"t {record['balancing']['t']:,.6g}" in balancing
        assert folder.name in balancing


def test_the_report_is_deterministic(report, demo_run, tmp_path):
    again = write_report(demo_run, tmp_path / "again.html")
    assert again.read_text() == report
    assert not (demo_run / "report.html").exists()


@pytest.mark.slow
def test_a_screenshot_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.is_file() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is not installed")
    page = tmp_path / "report.html"
    page.write_text(report)
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1280,4000", page.as_uri()], check=True, timeout=120, capture_output=True)
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
