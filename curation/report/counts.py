"""The report's sections built from stage records and counts: funnel, balancing, captions, throughput, manifest."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.manifest import read_manifest, release_sha256
from curation.report import plots
from curation.report.markup import absent, esc, fmt_float, fmt_int, img, key_values, note, table
from curation.report.reading import MAX_SAMPLE_ROWS, RunView, has_columns, read_columns, stages_named
from curation.run_folder import Artifact, StageFolder
from curation.schema import CAPTION

ENTRY_TABLE_ROWS = 10


def section_funnel(run: RunView) -> str:
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


def _balance_block(stage: StageFolder, position: int, total: int) -> str:
    summary = stage.record.get("balancing") or {}
    t = summary.get("t")
    artifact = stage.artifact(Artifact.BALANCED_COUNTS)
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


def _count_block(stage: StageFolder) -> str:
    artifact = stage.artifact(Artifact.ENTRY_COUNTS)
    heading = f"<h3>{esc(stage.name)} <code>{esc(stage.label)}</code></h3>"
    if not artifact.is_file():
        return heading + note("entry_counts.parquet is missing.")
    counts = pq.read_table(artifact).rename_columns(["entry_id", "entry", "count_before"])
    before = counts.column("count_before").to_numpy()
    top = np.lexsort((np.arange(len(before)), -before))[:ENTRY_TABLE_ROWS]
    return (heading + img(plots.entry_rank(before, None, None, f"Entry counts, {stage.label}"),
                          f"entry counts of {stage.label}")
            + table(["entry", "count"], _entry_rows(counts, top[before[top] > 0]), numeric={1}))


def section_balancing(run: RunView) -> str:
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


def section_captions(run: RunView) -> str:
    first = run.stages[0] if run.stages else None
    input_files = first.data_files if first else []
    if not has_columns(input_files, [CAPTION]):
        return note(f"The rows of the first stage ({first.label}) have no {CAPTION} column to measure.") if first \
            else absent("ingest")
    published_files = run.published_files()
    output_label = "published"
    if not has_columns(published_files, [CAPTION]):
        last = run.stages[-1]
        published_files, output_label = last.data_files, f"after {last.label} (nothing published)"
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


def section_throughput(run: RunView) -> str:
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


def section_manifest(run: RunView) -> str:
    path = run.folder.manifest_path
    if not path.is_file():
        return absent("publish")
    manifest = read_manifest(path)
    totals, shards, image_shards = manifest["totals"], manifest["shards"], manifest["image_shards"]
    pairs = [
        ("dataset", esc(manifest["dataset"] or "")), ("format", esc(manifest["format"])),
        ("created", esc(manifest["created"])), ("code version", esc(manifest["code_version"])),
        ("rows in", fmt_int(totals["rows_in"])), ("rows published", fmt_int(totals["rows_published"])),
        ("rows in the ledger", fmt_int(totals["rows_in_ledger"])),
        ("parquet shards", f"{len(shards):,} ({sum(s['bytes'] for s in shards):,} bytes)"),
        ("image shards", f"{len(image_shards):,} ({sum(s['bytes'] for s in image_shards):,} bytes)"),
        ("ledger files", f"{len(manifest['ledger']['files']):,}"),
        ("config sha256", f"<code>{esc(manifest['config_sha256'])}</code>"),
        ("release sha256", f"<code>{esc(release_sha256(manifest))}</code>"),
    ]
    drops = totals["drops_by_reason"]
    rows = [[esc(reason), fmt_int(count)] for reason, count in sorted(drops.items(), key=lambda i: (-i[1], i[0]))]
    shard_rows = [[f"<code>{esc(s['path'])}</code>", fmt_int(s["rows"]), fmt_int(s["bytes"]),
                   f"<code>{esc(s['sha256'][:16])}</code>"] for s in shards[:20]]
    parts = [key_values(pairs), "<h3>Rows dropped by reason</h3>",
             table(["reason", "rows"], rows, numeric={1}) if rows else note("No row was dropped."),
             "<h3>Shards</h3>", table(["path", "rows", "bytes", "sha256 (first 16)"], shard_rows, numeric={1, 2})]
    if len(shards) > 20:
        parts.append(note(f"First 20 of {len(shards):,} shards."))
    return "".join(parts)
