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
in its place (and logs it) instead of failing the report. Every image is an inline `data:image/png;base64` URI,
every piece of text from the data is escaped, and the page needs no script: the file can be mailed or archived
alone. The same run folder gives the same bytes (no generation timestamp; everything in a fixed order).
"""

import base64
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import curation
from curation import report_plots as plots
from curation.io import (
    ARTIFACTS_DIR,
    IMAGES_DIR,
    LEDGER_DIR,
    atomic_write_bytes,
    is_complete,
    list_files,
    read_stage_record,
    resolve_data_dir,
    sha256_of_file,
    stage_chain,
)
from curation.manifest import MANIFEST_NAME
from curation.schema import CAPTION, UID, Reason

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
SECTION_IDS = ("funnel", "balancing", "captions", "dedup", "pruning", "logos", "scores", "throughput", "manifest")
THUMBNAIL_PIXELS = 96
GALLERY_GROUPS = 8
GALLERY_MEMBERS = 6
# The caption and score histograms read at most this many rows per side (the first data files, in file order).
MAX_SAMPLE_ROWS = 2_000_000
ENTRY_TABLE_ROWS = 10
LOGO_TABLE_ROWS = 24


class ReportError(ValueError):
    """A folder that is not a run folder (no stage folder to report on)."""


@dataclass(frozen=True)
class Stage:
    folder: Path
    record: dict
    label: str  # the folder relative to the run folder, e.g. stages/06_balance

    @property
    def name(self) -> str:
        return self.record.get("stage", "?")


# ---------------------------------------------------------------------------------------------------- reading


def find_stages(run_dir: Path) -> tuple[list[Stage], list[str]]:
    """The run's stages in order (the chain ending at publish, else at the last complete stage folder), and notes
    on stage folders outside that chain (incomplete, or left from an earlier config)."""
    run_dir = Path(run_dir).resolve()
    stages_dir = run_dir / "stages"
    present = sorted(p for p in stages_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if stages_dir.is_dir() else []
    complete = [p for p in present if is_complete(p)]
    publish = run_dir / "publish"
    ends = ([publish] if is_complete(publish) else []) + list(reversed(complete))
    chain: list[tuple[Path, dict]] = []
    for end in ends:
        try:
            chain = stage_chain(end)
            break
        except (OSError, ValueError, KeyError) as error:
            logger.warning("report: cannot follow the stage chain from %s (%s)", end, error)
    notes = []
    if not chain:
        for folder in complete + ([publish] if is_complete(publish) else []):
            try:
                chain.append((folder, read_stage_record(folder)))
            except (OSError, ValueError) as error:
                notes.append(f"{_relative(folder, run_dir)}: unreadable stage record ({error})")
    stages = [Stage(folder, record, _relative(folder, run_dir)) for folder, record in chain]
    in_chain = {stage.folder.resolve() for stage in stages}
    for folder in present:
        if folder.resolve() in in_chain or any(n.startswith(_relative(folder, run_dir) + ":") for n in notes):
            continue
        state = "complete, but not in the chain that ends at the last stage" if is_complete(folder) \
            else "incomplete (no _SUCCESS or _stage.json)"
        notes.append(f"{_relative(folder, run_dir)}: {state}")
    return stages, notes


def _relative(folder: Path, run_dir: Path) -> str:
    try:
        return Path(os.path.relpath(Path(folder).resolve(), run_dir)).as_posix()
    except ValueError:
        return str(folder)


def data_files(stage: Stage) -> list[Path]:
    """The parquet files of a stage's rows (following a pass-through stage's link); none when unreadable."""
    try:
        return [p for p in list_files(resolve_data_dir(stage.folder)) if p.suffix == ".parquet"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("report: no data files for %s (%s)", stage.label, error)
        return []


def has_columns(files: list[Path], columns: list[str]) -> bool:
    if not files:
        return False
    names = set(pq.read_schema(files[0]).names)
    return all(column in names for column in columns)


def read_columns(files: list[Path], columns: list[str], limit: int | None = None, filters=None) -> tuple[pa.Table,
                                                                                                          bool]:
    """`columns` of the rows in `files` (in file order), at most `limit` rows; (table, whether it was cut)."""
    tables, rows = [], 0
    for path in files:
        table = pq.read_table(path, columns=columns, filters=filters)
        tables.append(table)
        rows += len(table)
        if limit is not None and rows >= limit:
            return pa.concat_tables(tables).slice(0, limit), True
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns}), False
    return pa.concat_tables(tables), False


def read_ledger(stage: Stage, reasons: list[str], columns: list[str]) -> pa.Table:
    """The stage's ledger rows with one of `reasons` (only `columns`)."""
    files = [p for p in list_files(stage.folder / LEDGER_DIR) if p.suffix == ".parquet"] \
        if (stage.folder / LEDGER_DIR).is_dir() else []
    tables = [pq.read_table(p, columns=columns, filters=[("reason", "in", reasons)]) for p in files]
    tables = [t for t in tables if len(t)]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def _numbers(column) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _detail(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------------- html bits


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_int(value) -> str:
    return f"{int(value):,}" if value is not None else ""


def fmt_float(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else esc(value)


def fmt_value(value) -> str:
    """A record value for a table cell: integers with thousands separators, floats to 6 significant digits,
    lists and objects as compact JSON; escaped."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return fmt_int(value)
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    if isinstance(value, list | dict):
        return esc(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str))
    return esc(value)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css_class: str = "plot") -> str:
    return f'<img class="{css_class}" alt="{esc(alt)}" src="{data_uri(png)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def absent(stage_names: str) -> str:
    return f'<p class="absent">Not in this run: no {esc(stage_names)} stage.</p>'


def table(headers: list[str], rows: list[list[str]], css_class: str = "", row_attributes: list[str] | None = None,
          numeric: set[int] | None = None) -> str:
    """An HTML table; cells are already HTML (escape data before), columns in `numeric` right-aligned."""
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        attributes = f" {row_attributes[index]}" if row_attributes else ""
        cells = "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                        for i, cell in enumerate(row))
        body.append(f"<tr{attributes}>{cells}</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_values(pairs: list[tuple[str, str]]) -> str:
    """A two-column table of already-escaped values."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def thumbnail(data: bytes | None) -> bytes | None:
    """A PNG of at most THUMBNAIL_PIXELS on its longer side, or None when the bytes are not a readable image."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            converted = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
            buffer = io.BytesIO()
            converted.save(buffer, format="PNG", optimize=True)
            return buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - any undecodable image becomes a placeholder
        logger.debug("report: unreadable thumbnail (%s)", error)
        return None


# ---------------------------------------------------------------------------------------------------- sections


def stages_named(stages: list[Stage], *names: str) -> list[Stage]:
    return [s for s in stages if s.name in names]


def section_funnel(run: "RunView") -> str:
    stages = run.stages
    if not stages:
        return absent("stage")
    rows, attributes, reasons = [], [], {}
    for index, stage in enumerate(stages, start=1):
        record = stage.record
        drops = record.get("drops") or {}
        dropped = sum(drops.values())
        for reason, count in drops.items():
            reasons[reason] = reasons.get(reason, 0) + count
        drop_text = "<br>".join(f"{esc(r)}: {fmt_int(c)}" for r, c in sorted(drops.items(), key=lambda i: (-i[1],
                                                                                                        i[0])))
        share = f"{dropped / record['rows_in']:.1%}" if record.get("rows_in") else ""
        rows.append([str(index), esc(stage.name), f"<code>{esc(stage.label)}</code>",
                     f'<span data-field="rows_in">{fmt_int(record.get("rows_in"))}</span>',
                     f'<span data-field="rows_out">{fmt_int(record.get("rows_out"))}</span>',
                     f'<span data-field="dropped">{fmt_int(dropped)}</span>', share, drop_text])
        attributes.append(f'data-stage="{esc(stage.label)}"')
    first, last = stages[0].record, stages[-1].record
    parts = [
        key_values([
            ("rows in (first stage)", fmt_int(first.get("rows_in"))),
            ("rows out (last stage)", fmt_int(last.get("rows_out"))),
            ("kept", f"{last.get('rows_out', 0) / first['rows_in']:.2%}" if first.get("rows_in") else ""),
            ("stages", fmt_int(len(stages))),
        ]),
        img(plots.funnel([s.label.rsplit("/", 1)[-1] for s in stages], [s.record.get("rows_in", 0) for s in stages],
                         [s.record.get("rows_out", 0) for s in stages], reasons), "rows per stage"),
        table(["#", "stage", "folder", "rows in", "rows out", "dropped", "dropped share", "drops by reason"], rows,
              "funnel", attributes, numeric={0, 3, 4, 5, 6}),
    ]
    if run.notes:
        parts.append("<p>Stage folders outside the run's chain (not counted above):</p><ul>"
                     + "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>")
    return "".join(parts)


def _entry_rows(table_: pa.Table, order: np.ndarray) -> list[list[str]]:
    entries = table_.column("entry").to_pylist()
    before = table_.column("count_before").to_numpy()
    after = table_.column("count_after").to_numpy() if "count_after" in table_.column_names else None
    rows = []
    for i in order.tolist():
        row = [esc(entries[i]), fmt_int(before[i])]
        if after is not None:
            row += [fmt_int(after[i]), f"{after[i] / before[i]:.3f}" if before[i] else ""]
        rows.append(row)
    return rows


def _balance_block(stage: Stage, position: int, total: int) -> str:
    summary = stage.record.get("balancing") or {}
    t = summary.get("t")
    artifact = stage.folder / ARTIFACTS_DIR / "balanced_counts.parquet"
    heading = f"<h3>{esc(stage.name)} {position} of {total} <code>{esc(stage.label)}</code></h3>"
    pairs = [("t", esc(f"{t:,.6g}" if isinstance(t, int | float) else t)),
             ("t chosen from", esc(summary.get("t_from", ""))),
             ("rows in / out", f"{fmt_int(stage.record.get('rows_in'))} / {fmt_int(stage.record.get('rows_out'))}"),
             ("tail share before (matches on entries with c_e < t)", fmt_float(summary.get("tail_share_before"))),
             ("tail share after", fmt_float(summary.get("tail_share_after")))]
    if not artifact.is_file():
        return heading + key_values(pairs) + note(f"{artifact.name} is missing: no rank plot.")
    counts = pq.read_table(artifact)
    before = counts.column("count_before").to_numpy()
    after = counts.column("count_after").to_numpy()
    pairs[2:2] = [("entries matched before / after", f"{fmt_int((before > 0).sum())} / {fmt_int((after > 0).sum())}"),
                  ("matches before / after", f"{fmt_int(before.sum())} / {fmt_int(after.sum())}")]
    ids = np.arange(len(before))
    top = np.lexsort((ids, -before))[:ENTRY_TABLE_ROWS]
    top = top[before[top] > 0]
    matched = np.flatnonzero(before > 0)
    bottom = matched[np.lexsort((matched, before[matched]))][:ENTRY_TABLE_ROWS]
    headers = ["entry", "count before", "count after", "kept share"]
    title = f"Entry counts, {stage.label}" + (f" (t = {t:,.6g})" if isinstance(t, int | float) else "")
    return (heading + key_values(pairs)
            + img(plots.entry_rank(before, after, t if isinstance(t, int | float) else None, title),
                  f"entry counts before and after {stage.label}")
            + '<div class="pair"><div><h4>Most matched entries (before)</h4>'
            + table(headers, _entry_rows(counts, top), numeric={1, 2, 3})
            + "</div><div><h4>Least matched entries (before, matched at least once)</h4>"
            + table(headers, _entry_rows(counts, bottom), numeric={1, 2, 3}) + "</div></div>")


def _count_block(stage: Stage) -> str:
    artifact = stage.folder / ARTIFACTS_DIR / "entry_counts.parquet"
    heading = f"<h3>count <code>{esc(stage.label)}</code></h3>"
    if not artifact.is_file():
        return heading + note("entry_counts.parquet is missing.")
    counts = pq.read_table(artifact).rename_columns(["entry_id", "entry", "count_before"])
    before = counts.column("count_before").to_numpy()
    top = np.lexsort((np.arange(len(before)), -before))[:ENTRY_TABLE_ROWS]
    return (heading + img(plots.entry_rank(before, None, None, f"Entry counts, {stage.label}"),
                          f"entry counts of {stage.label}")
            + table(["entry", "count"], _entry_rows(counts, top[before[top] > 0]), numeric={1}))


def section_balancing(run: "RunView") -> str:
    balances = stages_named(run.stages, "balance")
    if balances:
        intro = note("MetaCLIP balancing: an entry matched c_e times keeps each of its rows with probability "
                     "min(1, t / c_e) (a row with several entries: 1 - prod(1 - p_e)). After balancing, head entries "
                     "flatten towards t and the tail is untouched.")
        return intro + "".join(_balance_block(s, i, len(balances)) for i, s in enumerate(balances, start=1))
    counts = stages_named(run.stages, "count")
    if counts:
        return note("No balance stage in this run; the entry counts are shown as counted.") + "".join(
            _count_block(s) for s in counts)
    return absent("count or balance")


def _caption_lengths(files: list[Path]) -> tuple[np.ndarray, np.ndarray, bool]:
    captions, cut = read_columns(files, [CAPTION], MAX_SAMPLE_ROWS)
    column = captions.column(CAPTION).combine_chunks().cast(pa.string())
    characters = pc.utf8_length(column).cast(pa.float64()).to_numpy(zero_copy_only=False)
    words = pc.list_value_length(pc.utf8_split_whitespace(column)).cast(pa.float64()).to_numpy(zero_copy_only=False)
    return characters, words, cut


def section_captions(run: "RunView") -> str:
    first = run.stages[0] if run.stages else None
    input_files = data_files(first) if first else []
    if not has_columns(input_files, [CAPTION]):
        return note(f"The rows of the first stage ({first.label}) have no {CAPTION} column to measure.") if first \
            else absent("ingest")
    published_files = run.published_files()
    output_label = "published"
    if not has_columns(published_files, [CAPTION]):
        last = run.stages[-1]
        published_files, output_label = data_files(last), f"after {last.label} (nothing published)"
    input_chars, input_words, input_cut = _caption_lengths(input_files)
    series_chars = [(f"after {first.name}", input_chars)]
    series_words = [(f"after {first.name}", input_words)]
    rows = [[esc(f"after {first.label}"), *_length_stats(input_chars, input_words)]]
    output_cut = False
    if has_columns(published_files, [CAPTION]):
        out_chars, out_words, output_cut = _caption_lengths(published_files)
        series_chars.append((output_label, out_chars))
        series_words.append((output_label, out_words))
        rows.append([esc(output_label), *_length_stats(out_chars, out_words)])
    if not any(values.size for _, values in series_chars):
        return note("No caption to measure: the run has no rows.")
    parts = [img(plots.distributions([
        {"series": series_chars, "xlabel": "caption length (characters)", "title": "Caption length in characters",
         "integer": True, "clip": 0.995},
        {"series": series_words, "xlabel": "caption length (words)", "title": "Caption length in words",
         "integer": True, "clip": 0.995},
    ]), "caption length histograms"),
        table(["rows", "count", "mean chars", "median chars", "p95 chars", "mean words", "median words"], rows,
              numeric={1, 2, 3, 4, 5, 6})]
    if input_cut or output_cut:
        parts.append(note(f"Only the first {MAX_SAMPLE_ROWS:,} rows (in file order) of a side are counted."))
    return "".join(parts)


def _length_stats(characters: np.ndarray, words: np.ndarray) -> list[str]:
    if not characters.size:
        return ["0", "", "", "", "", ""]
    return [fmt_int(characters.size), f"{characters.mean():.1f}", f"{np.median(characters):.0f}",
            f"{np.quantile(characters, 0.95):.0f}", f"{words.mean():.1f}", f"{np.median(words):.0f}"]


def _sizes_by_survivor(ledger: pa.Table) -> dict[str, int]:
    """Group sizes (dropped members + the survivor) keyed by the survivor's uid, from ledger rows whose
    related_uid is the survivor."""
    if not len(ledger):
        return {}
    counts = ledger.group_by("related_uid").aggregate([("uid", "count")])
    return {uid: n + 1 for uid, n in zip(counts.column("related_uid").to_pylist(),
                                          counts.column("uid_count").to_pylist(), strict=True) if uid is not None}


def _caption_group_sizes(stage: Stage) -> np.ndarray:
    """Sizes of dedup_text's near-duplicate caption groups: every group keeps at least its survivor, whose row
    carries the group id and size; without those columns, from the ledger."""
    files = data_files(stage)
    if has_columns(files, ["text_dup_group", "text_dup_group_size"]):
        groups, _ = read_columns(files, ["text_dup_group", "text_dup_group_size"],
                                 filters=[("text_dup_group_size", ">=", 2)])
        groups = groups.filter(pc.is_valid(groups.column("text_dup_group")))
        distinct = groups.group_by("text_dup_group").aggregate([("text_dup_group_size", "max")])
        return np.sort(_numbers(distinct.column("text_dup_group_size_max")).astype(np.int64))
    ledger = read_ledger(stage, [Reason.NEAR_DUPLICATE_CAPTION], ["uid", "related_uid"])
    return np.sort(np.asarray(list(_sizes_by_survivor(ledger).values()), dtype=np.int64))


def section_dedup(run: "RunView") -> str:
    text_stages = stages_named(run.stages, "dedup_text")
    image_stages = stages_named(run.stages, "dedup_image")
    exact_stages = stages_named(run.stages, "dedup_exact")
    if not (text_stages or image_stages or exact_stages):
        return absent("dedup_exact, dedup_text or dedup_image")
    summary = []
    for stage in exact_stages + text_stages + image_stages:
        drops = stage.record.get("drops") or {}
        extra = stage.record.get("dedup") or stage.record.get("dedup_image") or {}
        settings = ", ".join(f"{k} {v}" for k, v in sorted(extra.items()) if isinstance(v, int | float | str))
        summary.append([esc(stage.name), f"<code>{esc(stage.label)}</code>",
                        "<br>".join(f"{esc(r)}: {fmt_int(c)}" for r, c in sorted(drops.items())) or "none",
                        esc(settings)])
    parts = [table(["stage", "folder", "dropped", "settings"], summary)]
    panels = []
    for stage in text_stages:
        panels.append((f"Near-duplicate captions\n{stage.label.rsplit('/', 1)[-1]}", _caption_group_sizes(stage)))
    survivors: dict[str, dict[str, int]] = {}
    for stage in image_stages:
        short = stage.label.rsplit("/", 1)[-1]
        for reason, title in ((Reason.DUPLICATE_IMAGE_BYTES, "Identical image bytes"),
                              (Reason.NEAR_DUPLICATE_IMAGE, "Near-duplicate images (perceptual hash)")):
            sizes = _sizes_by_survivor(read_ledger(stage, [reason], ["uid", "related_uid"]))
            survivors.setdefault(reason, {}).update(sizes)
            panels.append((f"{title}\n{short}", np.sort(np.asarray(list(sizes.values()), dtype=np.int64))))
    if panels:
        parts.append("<h3>Duplicate-group sizes</h3>")
        parts.append(img(plots.group_sizes(panels), "duplicate group size histograms"))
    if image_stages:
        parts.append("<h3>Image duplicate groups</h3>")
        parts.append(_gallery(run, image_stages[-1]))
    elif text_stages or exact_stages:
        parts.append(note("No dedup_image stage: no image duplicate groups."))
    return "".join(parts)


def _gallery(run: "RunView", stage: Stage) -> str:
    """Up to GALLERY_GROUPS image duplicate groups, largest first (ties by survivor uid): the survivor and up to
    GALLERY_MEMBERS - 1 dropped members (by rank), as thumbnails with their captions."""
    ledger = read_ledger(stage, [Reason.NEAR_DUPLICATE_IMAGE, Reason.DUPLICATE_IMAGE_BYTES],
                         ["uid", "reason", "related_uid", "detail"])
    if not len(ledger):
        return note("The dedup_image stage dropped no duplicate, so there is no group to show.")
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for uid, reason, survivor, detail in zip(*(ledger.column(c).to_pylist() for c in ledger.column_names),
                                             strict=True):
        if survivor is None:
            continue
        rank = _detail(detail).get("rank")
        groups.setdefault((reason, survivor), []).append((rank if isinstance(rank, int) else 1 << 30, uid))
    preference = {Reason.NEAR_DUPLICATE_IMAGE: 0, Reason.DUPLICATE_IMAGE_BYTES: 1}
    chosen = sorted(groups.items(), key=lambda item: (preference[item[0][0]], -len(item[1]), item[0][1]))
    chosen = chosen[:GALLERY_GROUPS]
    wanted = set()
    for (_, survivor), members in chosen:
        wanted.add(survivor)
        wanted.update(uid for _, uid in sorted(members)[: GALLERY_MEMBERS - 1])
    images = run.images_for(sorted(wanted), stage)
    blocks = []
    for (reason, survivor), members in chosen:
        ordered = sorted(members)
        shown = [(survivor, "kept")] + [(uid, f"dropped, rank {rank}" if rank < 1 << 30 else "dropped")
                                        for rank, uid in ordered[: GALLERY_MEMBERS - 1]]
        figures = []
        for uid, role in shown:
            png, caption = images.get(uid, (None, None))
            picture = img(png, f"image of {uid}", "thumb") if png else '<div class="missing">no image</div>'
            text = esc(caption if caption is None or len(caption) <= 60 else caption[:57] + "...") if caption else ""
            css = "kept" if role == "kept" else "dropped"
            figures.append(f'<figure class="{css}">{picture}<figcaption><b>{esc(role)}</b><br>'
                           f"<code>{esc(uid[:12])}</code><br>{text}</figcaption></figure>")
        more = len(members) - (GALLERY_MEMBERS - 1)
        tail = f'<p class="note">and {more:,} more dropped</p>' if more > 0 else ""
        kind = "near duplicates" if reason == Reason.NEAR_DUPLICATE_IMAGE else "identical bytes"
        blocks.append(f'<div class="group"><p>{esc(kind)}: {len(members) + 1:,} rows</p>'
                      f'<div class="strip">{"".join(figures)}</div>{tail}</div>')
    return (note(f"{len(groups):,} groups with a dropped member; the {len(chosen)} largest are shown "
                 "(near duplicates first).") + "".join(blocks))


def section_pruning(run: "RunView") -> str:
    clusters = stages_named(run.stages, "cluster")
    semdedups = stages_named(run.stages, "semdedup")
    prunes = stages_named(run.stages, "prune")
    if not (clusters or semdedups or prunes):
        return absent("cluster, semdedup or prune")
    parts = []
    for stage in clusters:
        kmeans = stage.record.get("kmeans") or {}
        parts.append(f"<h3>cluster <code>{esc(stage.label)}</code></h3>")
        parts.append(key_values([(k, fmt_value(v)) for k, v in sorted(kmeans.items())]))
        artifact = stage.folder / ARTIFACTS_DIR / "cluster_sizes.parquet"
        if artifact.is_file():
            sizes = pq.read_table(artifact).column("size").to_numpy()
            parts.append(img(plots.cluster_sizes(sizes, f"Rows per k-means cluster ({len(sizes):,} clusters)"),
                             "cluster sizes"))
    for stage in semdedups:
        parts.append(f"<h3>semdedup <code>{esc(stage.label)}</code></h3>")
        info = stage.record.get("semdedup") or {}
        drops = stage.record.get("drops") or {}
        parts.append(key_values([("eps", fmt_float(info.get("eps"))), ("similarity threshold (1 - eps)",
                                                                         fmt_float(info.get("threshold"))),
                                 ("eps from", esc(info.get("eps_from", ""))),
                                 ("rows in / out", f"{fmt_int(stage.record.get('rows_in'))} / "
                                                   f"{fmt_int(stage.record.get('rows_out'))}"),
                                 ("semantic duplicates", fmt_int(drops.get(Reason.SEMANTIC_DUPLICATE, 0)))]))
        kept = np.empty(0)
        files = data_files(stage)
        if has_columns(files, ["semdedup_max_similarity"]):
            kept = _numbers(read_columns(files, ["semdedup_max_similarity"], MAX_SAMPLE_ROWS)[0].column(0))
        ledger = read_ledger(stage, [Reason.SEMANTIC_DUPLICATE], ["detail"])
        dropped = np.asarray([_detail(d).get("similarity") for d in ledger.column("detail").to_pylist()],
                             dtype=np.float64) if len(ledger) else np.empty(0)
        if kept.size or dropped.size:
            threshold = info.get("threshold")
            parts.append(img(plots.distributions([{
                "series": [("kept", kept), ("dropped", dropped)], "xlabel": "cosine similarity",
                "title": "Largest similarity to an earlier member of the cluster",
                "threshold": (threshold, f"1 - eps = {threshold:.4g}") if isinstance(threshold, float) else None,
            }]), "semdedup similarity histogram"))
    for stage in prunes:
        parts.append(f"<h3>prune <code>{esc(stage.label)}</code></h3>")
        info = stage.record.get("prune") or {}
        parts.append(key_values([(k, fmt_value(v)) for k, v in sorted(info.items()) if v is not None]))
        artifact = stage.folder / ARTIFACTS_DIR / "pruning_clusters.parquet"
        if not artifact.is_file():
            parts.append(note("pruning_clusters.parquet is missing: no complexity plot."))
            continue
        clusters_table = pq.read_table(artifact)
        parts.append(img(plots.complexity_quota(
            clusters_table.column("complexity").to_numpy(), clusters_table.column("quota").to_numpy(),
            clusters_table.column("size").to_numpy(),
            f"Density-based pruning: {len(clusters_table):,} clusters, keep {info.get('n_keep', '?')} rows"),
            "cluster complexity against quota"))
        order = np.lexsort((clusters_table.column("cluster").to_numpy(),
                            -clusters_table.column("complexity").to_numpy()))
        shown = [order[:5], order[-5:]] if len(order) > 10 else [order]
        columns = [c for c in ("cluster", "size", "d_intra", "d_inter", "complexity", "probability", "quota")
                   if c in clusters_table.column_names]
        values = {c: clusters_table.column(c).to_pylist() for c in columns}
        rows = [[fmt_float(values[c][i]) if isinstance(values[c][i], float) else fmt_int(values[c][i])
                 for c in columns] for part in shown for i in part.tolist()]
        parts.append(note("Most and least complex clusters:" if len(shown) == 2 else "Clusters by complexity:"))
        parts.append(table(columns, rows, numeric=set(range(len(columns)))))
    return "".join(parts)


def section_logos(run: "RunView") -> str:
    banks = stages_named(run.stages, "logo_bank")
    mines = stages_named(run.stages, "mine_logos")
    flags = stages_named(run.stages, "flag_logos")
    if not (banks or mines or flags):
        return absent("logo_bank, mine_logos or flag_logos")
    parts = []
    for stage in banks:
        info = stage.record.get("logo_bank") or {}
        parts.append(f"<h3>logo_bank <code>{esc(stage.label)}</code></h3>")
        parts.append(key_values([(k, fmt_value(v)) for k, v in sorted(info.items()) if v is not None]))
    for stage in mines:
        parts.append(f"<h3>mine_logos <code>{esc(stage.label)}</code></h3>")
        mining = stage.record.get("mining") or {}
        parts.append(key_values([(k, fmt_value(mining[k])) for k in ("models", "targets", "logos", "probes", "scale",
                                                                 "pastes", "seconds") if k in mining]))
        sheet = stage.folder / ARTIFACTS_DIR / "contact_sheet.png"
        if sheet.is_file():
            parts.append(img(_png_of_file(sheet), "contact sheet of mined logos", "sheet"))
        else:
            parts.append(note("No contact sheet (no logo was mined)."))
        table_path = stage.folder / ARTIFACTS_DIR / "mining.parquet"
        if table_path.is_file():
            mined = pq.read_table(table_path)
            columns = [c for c in ("rank", "logo_id", "target", "spuriousness", "flip_rate", "heldout_spuriousness",
                                   "clean_target_rate") if c in mined.column_names]
            sorted_rows = sorted(mined.select(columns).to_pylist(),
                                 key=lambda r: (r.get("rank", 0), str(r.get("logo_id")), str(r.get("target"))))
            rows = [[fmt_float(r[c]) if isinstance(r[c], float) else esc("" if r[c] is None else r[c])
                     for c in columns] for r in sorted_rows[:LOGO_TABLE_ROWS]]
            parts.append(table(columns, rows, numeric={i for i, c in enumerate(columns)
                                                       if c not in ("logo_id", "target")}))
            if len(sorted_rows) > LOGO_TABLE_ROWS:
                parts.append(note(f"First {LOGO_TABLE_ROWS} of {len(sorted_rows):,} (logo, target) rows."))
    for stage in flags:
        info = stage.record.get("flag_logos") or {}
        parts.append(f"<h3>flag_logos <code>{esc(stage.label)}</code></h3>")
        parts.append(key_values([
            ("policy", esc(info.get("policy", ""))), ("threshold", fmt_float(info.get("threshold"))),
            ("logos flagged against", esc(", ".join(map(str, info.get("logos", []))) or "none")),
            ("rows dropped (spurious_logo)", fmt_int((stage.record.get("drops") or {}).get(Reason.SPURIOUS_LOGO, 0))),
        ]))
    return "".join(parts)


def _png_of_file(path: Path) -> bytes:
    """The image at `path` as PNG bytes (re-encoded when it is another format)."""
    from PIL import Image

    data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


SCORES = (
    # column, the stage that computes it, (stage, config option) of the threshold that drops on it, and its label
    ("clip_score", "embed", ("filter", "min_clip_score"), "min_clip_score"),
    ("nsfw_score", "nsfw", ("nsfw", "max_score"), "max_score"),
)


def section_scores(run: "RunView") -> str:
    panels, rows = [], []
    for column, source_name, (rule_stage, option), rule_label in SCORES:
        source = next((s for s in run.stages if s.name == source_name and has_columns(data_files(s), [column])),
                      None) or next((s for s in run.stages if has_columns(data_files(s), [column])), None)
        if source is None:
            continue
        series = []
        for label, files in ((f"after {source.label.rsplit('/', 1)[-1]}", data_files(source)),
                             ("published", run.published_files())):
            if has_columns(files, [column]):
                values = _numbers(read_columns(files, [column], MAX_SAMPLE_ROWS)[0].column(0))
                series.append((label, values))
                finite = values[np.isfinite(values)]
                rows.append([esc(column), esc(label), fmt_int(finite.size)]
                            + ([f"{f(finite):.4f}" for f in (np.min, np.mean, np.median, np.max)] if finite.size
                               else ["", "", "", ""]))
        threshold = None
        for stage in stages_named(run.stages, rule_stage):
            value = (stage.record.get("config") or {}).get(option)
            if isinstance(value, int | float):
                threshold = (float(value), f"{rule_stage} {rule_label} = {value:g}")
        panels.append({"series": series, "xlabel": column, "title": f"{column} per row", "threshold": threshold})
    if not panels:
        return absent("embed (clip_score) or nsfw (nsfw_score)")
    return (img(plots.distributions(panels), "score histograms")
            + table(["score", "rows", "count", "min", "mean", "median", "max"], rows, numeric={2, 3, 4, 5, 6}))


def section_throughput(run: "RunView") -> str:
    if not run.stages:
        return absent("stage")
    rows, labels, seconds, rates = [], [], [], []
    for stage in run.stages:
        spent = stage.record.get("seconds")
        rows_in = stage.record.get("rows_in")
        rate = rows_in / spent if isinstance(spent, int | float) and spent > 0 and rows_in is not None else None
        labels.append(stage.label.rsplit("/", 1)[-1])
        seconds.append(float(spent) if isinstance(spent, int | float) else 0.0)
        rates.append(rate)
        rows.append([esc(stage.name), f"<code>{esc(stage.label)}</code>", esc(stage.record.get("started_at", "")),
                     f"{spent:,.1f}" if isinstance(spent, int | float) else "", fmt_int(rows_in),
                     f"{rate:,.0f}" if rate is not None else ""])
    total = sum(seconds)
    rows.append(["<b>total</b>", "", "", f"<b>{total:,.1f}</b>", "", ""])
    parts = [img(plots.stage_seconds(labels, seconds, rates), "seconds per stage")] if total > 0 else \
        [note("No stage recorded a duration.")]
    parts.append(table(["stage", "folder", "started at (UTC)", "seconds", "rows in", "rows in / s"], rows,
                       numeric={3, 4, 5}))
    parts.append(note("Seconds are wall-clock time of the whole stage (planning, Spark jobs and writing); a stage "
                      "skipped as up to date keeps the time of the run that made it."))
    return "".join(parts)


def section_manifest(run: "RunView") -> str:
    path = run.run_dir / "publish" / MANIFEST_NAME
    if not path.is_file():
        return absent("publish")
    manifest = json.loads(path.read_text())
    totals = manifest.get("totals") or {}
    shards = manifest.get("shards") or []
    image_shards = manifest.get("image_shards") or []
    ledger = manifest.get("ledger") or {}
    pairs = [
        ("dataset", esc(manifest.get("dataset", ""))), ("format", esc(manifest.get("format", ""))),
        ("created", esc(manifest.get("created", ""))), ("code version", esc(manifest.get("code_version", ""))),
        ("rows in", fmt_int(totals.get("rows_in"))), ("rows published", fmt_int(totals.get("rows_published"))),
        ("rows in the ledger", fmt_int(totals.get("rows_in_ledger"))),
        ("parquet shards", f"{len(shards):,} ({sum(s.get('bytes', 0) for s in shards):,} bytes)"),
        ("image shards", f"{len(image_shards):,} ({sum(s.get('bytes', 0) for s in image_shards):,} bytes)"),
        ("ledger files", f"{len(ledger.get('files') or []):,}"),
        ("config sha256", f"<code>{esc(manifest.get('config_sha256', ''))}</code>"),
        ("manifest.json sha256", f"<code>{esc(sha256_of_file(path))}</code>"),
    ]
    drops = totals.get("drops_by_reason") or {}
    rows = [[esc(reason), fmt_int(count)] for reason, count in sorted(drops.items(), key=lambda i: (-i[1], i[0]))]
    shard_rows = [[f"<code>{esc(s.get('path', ''))}</code>", fmt_int(s.get("rows")), fmt_int(s.get("bytes")),
                   f"<code>{esc(str(s.get('sha256', ''))[:16])}</code>"] for s in shards[:20]]
    parts = [key_values(pairs), "<h3>Rows dropped by reason</h3>",
             table(["reason", "rows"], rows, numeric={1}) if rows else note("No row was dropped."),
             "<h3>Shards</h3>", table(["path", "rows", "bytes", "sha256 (first 16)"], shard_rows, numeric={1, 2})]
    if len(shards) > 20:
        parts.append(note(f"First 20 of {len(shards):,} shards."))
    return "".join(parts)


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


# ---------------------------------------------------------------------------------------------------- the page


class RunView:
    """A run folder as the sections read it: its stages in order, and images by uid."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        if not self.run_dir.is_dir():
            raise ReportError(f"{run_dir} is not a folder")
        self.stages, self.notes = find_stages(self.run_dir)
        if not self.stages:
            raise ReportError(f"{run_dir} holds no complete stage folder (stages/NN_<stage>/ or publish/): "
                              "is it a run folder?")

    def published_files(self) -> list[Path]:
        shards = self.run_dir / "publish" / "shards"
        return [p for p in list_files(shards) if p.suffix == ".parquet"] \
            if is_complete(self.run_dir / "publish") and shards.is_dir() else []

    def images_for(self, uids: list[str], stage: Stage) -> dict[str, tuple[bytes | None, str | None]]:
        """uid -> (thumbnail PNG or None, caption) for `uids`, from the image column named by `stage`'s record (if
        the rows carry one) or from the download stage's tars."""
        from curation.ops.tars import TarReader

        download = next((s for s in reversed(self.stages) if s.name == "download"
                         and self.stages.index(s) < self.stages.index(stage)), None)
        if download is None:
            return {}
        files = data_files(download)
        image_column = (stage.record.get("dedup_image") or {}).get("image_column", "jpg")
        found: dict[str, tuple[bytes | None, str | None]] = {}
        if has_columns(files, [UID, CAPTION, image_column]):
            rows, _ = read_columns(files, [UID, CAPTION, image_column], filters=[(UID, "in", uids)])
            for uid, caption, data in zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True):
                found[uid] = (thumbnail(data), caption)
            return found
        if not has_columns(files, [UID, CAPTION, "image_shard", "image_key"]):
            return {}
        rows, _ = read_columns(files, [UID, CAPTION, "image_shard", "image_key"], filters=[(UID, "in", uids)])
        images_dir = download.folder / ARTIFACTS_DIR / IMAGES_DIR
        located = sorted(zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True),
                         key=lambda row: (str(row[2]), str(row[3])))
        with TarReader() as reader:
            for uid, caption, shard, key in located:
                image = None
                if shard and key and (images_dir / shard).is_file():
                    try:
                        hit = reader.image(images_dir / shard, key)
                        image = hit[1] if hit else None
                    except (OSError, ValueError) as error:
                        logger.warning("report: cannot read %s from %s (%s)", key, shard, error)
                found[uid] = (thumbnail(image), caption)
        return found


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:0.2em}h2{border-bottom:2px solid #4878a8;padding-bottom:0.2em;margin-top:2em}
h3{margin-top:1.5em}code{font-size:0.9em;background:#f2f2f2;padding:0 0.2em}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}
thead th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:#f6f6f6;font-weight:normal}
img.plot,img.sheet{max-width:100%;height:auto;display:block;margin:0.8em 0}
p.absent{color:#777;font-style:italic}p.note{color:#555;font-size:0.9em}
p.error{color:#a00}nav a{margin-right:1em}
.pair{display:flex;flex-wrap:wrap;gap:2em}
.group{margin:0.8em 0;padding:0.5em;border:1px solid #ddd}.group p{margin:0.2em 0}
.strip{display:flex;flex-wrap:wrap;gap:0.6em}
figure{margin:0;width:112px;font-size:0.72em;word-wrap:break-word}
figure img.thumb{display:block;border:3px solid #ccc;max-width:96px;max-height:96px}
figure.kept img.thumb{border-color:#58a058}figure.dropped img.thumb{border-color:#c06040}
div.missing{width:96px;height:96px;background:#eee;color:#777;display:flex;align-items:center;
justify-content:center}
"""


def build_report(run_dir: Path) -> str:
    """The report's HTML for the run folder `run_dir`."""
    run = RunView(run_dir)
    logger.info("report: %d stages in %s", len(run.stages), run.run_dir)
    manifest_path = run.run_dir / "publish" / MANIFEST_NAME
    dataset = None
    if manifest_path.is_file():
        try:
            dataset = json.loads(manifest_path.read_text()).get("dataset")
        except ValueError:
            dataset = None
    title = f"Curation report: {dataset or run.run_dir.name}"
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
        f'<p class="note">Run folder <code>{esc(run.run_dir.name)}</code>: {stage_list}</p>'
        f"<nav>{nav}</nav>{''.join(body)}"
        f'<footer><p class="note">Written by curation {esc(curation.__version__)} (curation report).</p></footer>'
        "</body></html>\n"
    )


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the report of `run_dir` to `output` (default RUN_DIR/report.html) atomically; its path."""
    output = Path(output) if output is not None else Path(run_dir) / REPORT_NAME
    page = build_report(Path(run_dir))
    atomic_write_bytes(output, page.encode("utf-8", errors="replace"))
    logger.info("report: wrote %s (%.1f KiB)", output, output.stat().st_size / 1024)
    return output
