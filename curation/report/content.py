"""The report's sections that look into the rows: duplicates (with an image gallery), clusters and pruning, mined
logos, score distributions."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.report import plots
from curation.report.markup import absent, esc, fmt_float, fmt_int, fmt_value, img, key_values, note, table
from curation.report.reading import (
    MAX_SAMPLE_ROWS,
    RunView,
    has_columns,
    ledger_detail,
    numbers,
    read_columns,
    read_ledger,
    stages_by_name,
    stages_named,
)
from curation.run_folder import Artifact, StageFolder
from curation.schema import Reason

GALLERY_GROUPS = 8
GALLERY_MEMBERS = 6
LOGO_TABLE_ROWS = 24


def _sizes_by_survivor(ledger: pa.Table) -> dict[str, int]:
    """Group sizes (dropped members + the survivor) keyed by the survivor's uid, from ledger rows whose
    related_uid is the survivor."""
    if not len(ledger):
        return {}
    counts = ledger.group_by("related_uid").aggregate([("uid", "count")])
    return {uid: n + 1 for uid, n in zip(counts.column("related_uid").to_pylist(),
                                          counts.column("uid_count").to_pylist(), strict=True) if uid is not None}


def _caption_group_sizes(stage: StageFolder) -> np.ndarray:
    """Sizes of dedup_text's near-duplicate caption groups: every group keeps at least its survivor, whose row
    carries the group id and size; without those columns, from the ledger."""
    files = stage.data_files
    if has_columns(files, ["text_dup_group", "text_dup_group_size"]):
        groups, _ = read_columns(files, ["text_dup_group", "text_dup_group_size"],
                                 filters=[("text_dup_group_size", ">=", 2)])
        groups = groups.filter(pc.is_valid(groups.column("text_dup_group")))
        distinct = groups.group_by("text_dup_group").aggregate([("text_dup_group_size", "max")])
        return np.sort(numbers(distinct.column("text_dup_group_size_max")).astype(np.int64))
    ledger = read_ledger(stage, [Reason.NEAR_DUPLICATE_CAPTION], ["uid", "related_uid"])
    return np.sort(np.asarray(list(_sizes_by_survivor(ledger).values()), dtype=np.int64))


def section_dedup(run: RunView) -> str:
    text_stages, image_stages, exact_stages = stages_by_name(run.stages, "dedup_text", "dedup_image", "dedup_exact")
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


def _gallery(run: RunView, stage: StageFolder) -> str:
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
        rank = ledger_detail(detail).get("rank")
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


def stage_heading(stage: StageFolder) -> str:
    return f"<h3>{esc(stage.name)} <code>{esc(stage.label)}</code></h3>"


def record_summary(stage: StageFolder, key: str) -> str:
    """The summary a stage's record keeps under `key`, as a table (unset values left out)."""
    summary = stage.record.get(key) or {}
    return key_values([(k, fmt_value(v)) for k, v in sorted(summary.items()) if v is not None])


def section_pruning(run: RunView) -> str:
    clusters, semdedups, prunes = stages_by_name(run.stages, "cluster", "semdedup", "prune")
    if not (clusters or semdedups or prunes):
        return absent("cluster, semdedup or prune")
    parts = []
    for stage in clusters:
        parts.append(stage_heading(stage) + record_summary(stage, "kmeans"))
        artifact = stage.artifact(Artifact.CLUSTER_SIZES)
        if artifact.is_file():
            sizes = pq.read_table(artifact).column("size").to_numpy()
            parts.append(img(plots.cluster_sizes(sizes, f"Rows per k-means cluster ({len(sizes):,} clusters)"),
                             "cluster sizes"))
    for stage in semdedups:
        parts.append(stage_heading(stage))
        info = stage.record.get("semdedup") or {}
        drops = stage.record.get("drops") or {}
        parts.append(key_values([("eps", fmt_float(info.get("eps"))), ("similarity threshold (1 - eps)",
                                                                         fmt_float(info.get("threshold"))),
                                 ("eps from", esc(info.get("eps_from", ""))),
                                 ("rows in / out", f"{fmt_int(stage.record.get('rows_in'))} / "
                                                   f"{fmt_int(stage.record.get('rows_out'))}"),
                                 ("semantic duplicates", fmt_int(drops.get(Reason.SEMANTIC_DUPLICATE, 0)))]))
        kept = np.empty(0)
        files = stage.data_files
        if has_columns(files, ["semdedup_max_similarity"]):
            kept = numbers(read_columns(files, ["semdedup_max_similarity"], MAX_SAMPLE_ROWS)[0].column(0))
        ledger = read_ledger(stage, [Reason.SEMANTIC_DUPLICATE], ["detail"])
        dropped = np.asarray([ledger_detail(d).get("similarity") for d in ledger.column("detail").to_pylist()],
                             dtype=np.float64) if len(ledger) else np.empty(0)
        if kept.size or dropped.size:
            threshold = info.get("threshold")
            parts.append(img(plots.distributions([{
                "series": [("kept", kept), ("dropped", dropped)], "xlabel": "cosine similarity",
                "title": "Largest similarity to an earlier member of the cluster",
                "threshold": (threshold, f"1 - eps = {threshold:.4g}") if isinstance(threshold, float) else None,
            }]), "semdedup similarity histogram"))
    for stage in prunes:
        info = stage.record.get("prune") or {}
        parts.append(stage_heading(stage) + record_summary(stage, "prune"))
        artifact = stage.artifact(Artifact.PRUNING_CLUSTERS)
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


def section_logos(run: RunView) -> str:
    banks, mines, flags = logo_stages = stages_by_name(run.stages, "logo_bank", "mine_logos", "flag_logos")
    if not any(logo_stages):
        return absent("logo_bank, mine_logos or flag_logos")
    parts = [stage_heading(stage) + record_summary(stage, "logo_bank") for stage in banks]
    for stage in mines:
        parts.append(stage_heading(stage))
        mining = stage.record.get("mining") or {}
        parts.append(key_values([(k, fmt_value(mining[k])) for k in ("models", "targets", "logos", "probes", "scale",
                                                                 "pastes", "seconds") if k in mining]))
        sheet = stage.artifact(Artifact.CONTACT_SHEET)
        if sheet.is_file():
            parts.append(img(_png_of_file(sheet), "contact sheet of mined logos", "sheet"))
        else:
            parts.append(note("No contact sheet (no logo was mined)."))
        table_path = stage.artifact(Artifact.MINING)
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
        parts.append(stage_heading(stage))
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


def section_scores(run: RunView) -> str:
    panels, rows = [], []
    for column, source_name, (rule_stage, option), rule_label in SCORES:
        source = next((s for s in run.stages if s.name == source_name and has_columns(s.data_files, [column])),
                      None) or next((s for s in run.stages if has_columns(s.data_files, [column])), None)
        if source is None:
            continue
        series = []
        for label, files in ((f"after {source.label.rsplit('/', 1)[-1]}", source.data_files),
                             ("published", run.published_files())):
            if has_columns(files, [column]):
                values = numbers(read_columns(files, [column], MAX_SAMPLE_ROWS)[0].column(0))
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
