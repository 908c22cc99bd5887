"""`curation report RUN_DIR`: one self-contained HTML page about a finished (or partial) run folder.

The report reads the run folder only (stage records, ledgers, artifacts, a few data columns through pyarrow, the
release manifest); it is not a stage and starts no Spark. Sections, each an `<section id=...>`:

- funnel: rows in and out of each stage and drops by reason (table and plot);
- balancing: entry counts before and after each balance stage (log-log rank plot with t, tail share, top and
  bottom entries);
- captions: caption length histograms, input (after ingest) against published;
- dedup: duplicate-group sizes (captions, image bytes, perceptual image hashes) and a gallery of image duplicate
  groups;
- pruning: cluster sizes, SemDeDup similarities and density-based pruning (complexity against quota);
- logos: SLANT's contact sheet of mined logos and their scores;
- scores: clip_score and nsfw_score histograms;
- throughput: seconds and rows/s per stage;
- manifest: the release summary.

A section whose stages are not in the run says so in one line; a section that fails to render shows the error
in its place (and logs it) instead of failing the report; a release manifest that cannot be read (a missing
key, `shards: null`) fails it, naming the file and the key (`curation.manifest.read_manifest`). Every image is an
inline `data:image/png;base64` URI, every piece of text from the data is escaped, and the page needs no script:
the file can be mailed or archived alone. The same run folder gives the same bytes (no generation timestamp;
everything in a fixed order).
"""

import logging
from pathlib import Path

import curation
from curation.io import atomic_write_bytes
from curation.manifest import read_manifest
from curation.report.content import section_dedup, section_logos, section_pruning, section_scores
from curation.report.counts import (
    section_balancing,
    section_captions,
    section_funnel,
    section_manifest,
    section_throughput,
)
from curation.report.markup import STYLE, esc
from curation.report.reading import RunView
from curation.run_folder import REPORT_NAME

logger = logging.getLogger(__name__)


SECTIONS = (
    ("funnel", "Funnel", section_funnel),
    ("balancing", "Balancing", section_balancing),
    ("captions", "Captions", section_captions),
    ("dedup", "Deduplication", section_dedup),
    ("pruning", "Clusters, SemDeDup and pruning", section_pruning),
    ("logos", "Spurious logos (SLANT)", section_logos),
    ("scores", "Scores", section_scores),
    ("throughput", "Throughput", section_throughput),
    ("manifest", "Release manifest", section_manifest),
)
SECTION_IDS = tuple(section_id for section_id, _, _ in SECTIONS)


def build_report(run_dir: Path) -> str:
    """The report's HTML for the run folder `run_dir`."""
    run = RunView(run_dir)
    logger.info("report: %d stages in %s", len(run.stages), run.folder.path)
    manifest_path = run.folder.manifest_path
    # A release whose manifest cannot be read is refused here, naming the file and key, rather than reported on.
    dataset = read_manifest(manifest_path)["dataset"] if manifest_path.is_file() else None
    title = f"Curation report: {dataset or run.folder.path.name}"
    body = []
    for section_id, heading, render in SECTIONS:
        logger.info("report: section %s", section_id)
        try:
            content = render(run)
        except Exception as error:  # noqa: BLE001 - one broken section must not cost the whole report
            logger.exception("report: section %s failed", section_id)
            content = (f'<p class="error">This section could not be rendered: '
                       f"{esc(type(error).__name__)}: {esc(error)}</p>")
        body.append(f'<section id="{section_id}"><h2>{esc(heading)}</h2>{content}</section>')
    nav = "".join(f'<a href="#{section_id}">{esc(heading)}</a>' for section_id, heading, _ in SECTIONS)
    stage_list = " &rarr; ".join(esc(s.name) for s in run.stages)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f'<p class="note">Run folder <code>{esc(run.folder.path.name)}</code>: {stage_list}</p>'
        f"<nav>{nav}</nav>{''.join(body)}"
        f'<footer><p class="note">Written by curation {esc(curation.__version__)} (curation report).</p></footer>'
        "</body></html>\n"
    )


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the report of `run_dir` to `output` (default RUN_DIR/report.html) atomically; its path."""
    output = Path(output) if output is not None else Path(run_dir) / REPORT_NAME
    if output.is_dir():
        raise ValueError(f"report output {output} is a folder: name the HTML file to write, e.g. "
                         f"{output / REPORT_NAME}")
    page = build_report(Path(run_dir))
    atomic_write_bytes(output, page.encode("utf-8", errors="replace"))
    logger.info("report: wrote %s (%.1f KiB)", output, output.stat().st_size / 1024)
    return output
