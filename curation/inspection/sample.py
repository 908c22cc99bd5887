"""`curation inspect RUN_DIR --uid UID`: one sample's story (see `curation.inspection`)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds

from curation.inspection.common import (
    MAX_SHOWN_ENTRIES,
    InspectError,
    chain,
    detail_text,
    displayable,
    metadata_entries,
    pairs,
    scan,
    text,
    value_text,
)
from curation.io import ARTIFACTS_DIR
from curation.run_folder import Artifact, RunFolder, StageFolder
from curation.schema import CAPTION, ENTRY_IDS, REASONS_SHARING_KEPT_UID, UID, URL
from curation.terminal import printable

# How the row's columns are grouped in the story; any other float column counts as a score too.
SCORE_COLUMNS = (
    "clip_score", "nsfw_score", "keep_probability", "logo_score", "centroid_similarity", "semdedup_max_similarity",
    "spurious_logo_similarity",
)
GROUP_COLUMNS = (
    "text_dup_group", "text_dup_group_size", "image_dup_group", "cluster", "prune_cluster", "spurious_logo",
)
# Columns a stage writes again although an upstream stage had them (a second balance replaces keep_probability).
REWRITTEN_COLUMNS = {"balance": ("keep_probability",)}
DEDUP_STAGES = {"dedup_exact": "exact duplicates", "dedup_text": "near-duplicate captions",
                "dedup_image": "duplicate images", "semdedup": "semantic duplicates"}
UID_HEX_CHARS = 32


@dataclass
class _Trace:
    """What the run's folders hold about one uid."""

    rows: dict[int, dict | None]  # stage index -> the stage's own columns of the row (None: the row is not there)
    files: dict[int, str]  # stage index -> data file holding the row
    own: list[tuple[int, dict]]  # ledger rows of the uid (stage index, row)
    absorbed: list[tuple[int, dict]]  # ledger rows naming the uid as related_uid (other uids)


def _ledger_rows(stages: list[StageFolder], uid: str, with_related: bool) -> tuple[list, list]:
    own, absorbed = [], []
    for index, stage in enumerate(stages):
        if not stage.ledger_files:
            continue
        row_filter = ds.field(UID) == uid
        if with_related:
            row_filter = row_filter | (ds.field("related_uid") == uid)
        table = scan(stage.ledger_files, [UID, "stage", "reason", "related_uid", "detail"], row_filter)
        for row in table.to_pylist():
            (own if row[UID] == uid else absorbed).append((index, row))
    return own, absorbed


def _trace(stages: list[StageFolder], uid: str) -> _Trace:
    rows: dict[int, dict | None] = {}
    files: dict[int, str] = {}
    by_data_dir: dict[Path, int] = {}
    previous_names: set[str] = set()
    for index, stage in enumerate(stages):
        if stage.data_dir in by_data_dir:  # a pass-through stage: its rows are an earlier stage's
            rows[index] = {} if rows[by_data_dir[stage.data_dir]] is not None else None
            files[index] = files.get(by_data_dir[stage.data_dir], "")
            continue
        by_data_dir[stage.data_dir] = index
        if stage.data_schema is None:
            rows[index] = None
            continue
        shown = displayable(stage.data_schema)
        rewritten = REWRITTEN_COLUMNS.get(stage.name, ())
        new = [name for name in shown if name != UID and (name not in previous_names or name in rewritten)]
        if stage.name == "ingest":
            new = [name for name in new if name not in (URL, CAPTION)]
        previous_names = set(stage.data_schema.names)
        dataset = ds.dataset([str(p) for p in stage.data_files], format="parquet")
        table = dataset.to_table(columns=[UID, "__filename", *new], filter=ds.field(UID) == uid)
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            files[index] = row.pop("__filename")
            row.pop(UID)
            rows[index] = row
        else:
            rows[index] = None
    own, absorbed = _ledger_rows(stages, uid, with_related=True)
    return _Trace(rows, files, own, absorbed)


def _full_row(stage: StageFolder, uid: str) -> dict:
    table = scan(stage.data_files, displayable(stage.data_schema), ds.field(UID) == uid)
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else {}


def _brief_fate(stages: list[StageFolder], uid: str, run: RunFolder) -> str:
    """Where `uid` ended: published, kept to the last stage, or dropped (stage and reason)."""
    last = stages[-1]
    found = scan(last.data_files, [UID, "__filename"], ds.field(UID) == uid) if last.data_files else None
    if found is not None and found.num_rows:
        where = run.label(Path(found.column("__filename")[0].as_py()))
        return f"published in {where}" if last.is_release else f"kept to the last stage ({last.label})"
    own, _ = _ledger_rows(stages, uid, with_related=False)
    drops = [(i, row) for i, row in own if row["reason"] not in REASONS_SHARING_KEPT_UID]
    if drops:
        index, row = drops[0]
        return f"dropped at {stages[index].name} ({stages[index].label}): {row['reason']}"
    return "not found in this run"


def _raw_source(stage: StageFolder, detail: str | None) -> list[str]:
    """The url and caption of an ingest-dropped row, read from its raw shard (file and row in the detail)."""
    try:
        where = json.loads(detail or "{}")
        path, row_number = where["file"], int(where["row"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return []
    try:
        import pyarrow.parquet as pq

        from curation.ops.ingest import IngestOptions, resolve_columns

        config = stage.record.get("config", {})
        parquet = pq.ParquetFile(path)
        url_column, text_column = resolve_columns(
            parquet.schema_arrow.names,
            IngestOptions(url_column=config.get("url_column"), text_column=config.get("text_column")), path,
        )
        first = 0
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            if row_number < first + group_rows:
                table = parquet.read_row_group(group, columns=[url_column, text_column])
                raw = table.slice(row_number - first, 1).to_pylist()[0]
                return [f"raw url ({url_column}): {value_text(raw[url_column])}",
                        f"raw caption ({text_column}): {value_text(raw[text_column])}"]
            first += group_rows
    except Exception as error:  # noqa: BLE001 - the raw shard is only a courtesy: it may be gone or changed
        return [f"(the raw row could not be read from {path}: {error})"]
    return []


def inspect_uid(run_dir: Path, uid: str) -> list[str]:
    """The story of one sample in the run at `run_dir`, as lines to print; InspectError for an unknown uid."""
    # Values are escaped where they are formatted; this pass covers the rest read from the run (ledger reasons,
    # related uids, paths, a raw shard's error message).
    return [printable(line) for line in _sample_story(run_dir, uid)]


def _sample_story(run_dir: Path, uid: str) -> list[str]:
    run = RunFolder(run_dir)
    run_dir = run.path
    stages = chain(run)
    uid = uid.strip().lower()
    trace = _trace(stages, uid)
    present = [i for i, row in trace.rows.items() if row is not None]
    copies = [(i, row) for i, row in trace.own if row["reason"] in REASONS_SHARING_KEPT_UID]
    drops = [(i, row) for i, row in trace.own if row["reason"] not in REASONS_SHARING_KEPT_UID]
    if not present and not drops:
        hint = "" if len(uid) == UID_HEX_CHARS and all(c in "0123456789abcdef" for c in uid) else (
            f" (a uid is {UID_HEX_CHARS} hex digits: the start of sha256(url NUL caption))")
        raise InspectError(f"no sample with uid {uid!r} in {run_dir}: it is in no stage's data and no ledger{hint}")

    last_present = present[-1] if present else None
    lines = [f"sample {uid} in {run_dir}"]
    published = stages[-1].is_release and last_present == len(stages) - 1
    if published:
        lines.append(f"fate: published in {run.label(Path(trace.files[last_present]))}")
    elif drops:
        index, row = drops[0]
        lines.append(f"fate: dropped at stage {stages[index].name} ({stages[index].label}): {row['reason']}")
        if row["related_uid"]:
            relation = "the sample it duplicates" if stages[index].name in DEDUP_STAGES else "related sample"
            survivor_fate = _brief_fate(stages, row["related_uid"], run)
            lines.append(f"  related_uid: {row['related_uid']} ({relation}; {survivor_fate})")
        lines.append(f"  detail: {detail_text(row['detail'])}")
        for other_index, other in drops[1:]:
            lines.append(f"  also in the ledger of {stages[other_index].label}: {other['reason']} (a broken run?)")
    elif last_present == len(stages) - 1:
        lines.append(f"fate: kept to the last stage of the run ({stages[-1].label}); the run has no publish stage")
    else:
        lines.append(f"fate: in the data of {stages[last_present].label}, then in no stage's data and no ledger: "
                     "the ledger invariant is broken (run `curation verify`)")

    row = _full_row(stages[_data_index(stages, last_present)], uid) if last_present is not None else {}
    if row:
        lines.append(f"url: {value_text(row.get(URL))}")
        lines.append(f"caption: {text(row.get(CAPTION))}")
    elif drops and stages[drops[0][0]].name == "ingest":
        lines.extend(_raw_source(stages[drops[0][0]], drops[0][1]["detail"]))

    lines.append("stages (chain order):")
    width = max(len(s.label) for s in stages)
    name_width = max(len(s.name) for s in stages)
    dropped_at = drops[0][0] if drops else None
    for index, stage in enumerate(stages):
        prefix = f"  {stage.name:<{name_width}}  {stage.label:<{width}}  "
        stage_row = trace.rows.get(index)
        if stage_row is not None:
            if stage.is_release:
                status = f"published ({run.label(Path(trace.files[index]))})"
            elif stage.passes_through:
                status = "passed (the stage's rows are its input's)"
            else:
                status = "kept"
            added = pairs(stage_row, [n for n in stage_row if n != ENTRY_IDS and stage_row[n] is not None])
            if ENTRY_IDS in stage_row:
                count = len(stage_row[ENTRY_IDS] or [])
                added = ", ".join(filter(None, [f"{count} matched entr{'y' if count == 1 else 'ies'}", added]))
            lines.append(prefix + status + (f": {added}" if added else ""))
        elif index == dropped_at:
            row_drop = drops[0][1]
            related = f" (related_uid {row_drop['related_uid']})" if row_drop["related_uid"] else ""
            lines.append(prefix + f"DROPPED: {row_drop['reason']}{related}")
        elif dropped_at is not None and index > dropped_at:
            remaining = len(stages) - index
            lines.append(f"  (not reached: the {remaining} stage{'s' if remaining > 1 else ''} after "
                         f"{stages[dropped_at].name})")
            break
        else:
            lines.append(prefix + "not in this stage's data")

    lines.extend(_entry_lines(stages, row, last_present))
    lines.extend(_dedup_lines(stages, row, trace, copies))
    cluster = pairs(row, [n for n in ("cluster", "centroid_similarity", "prune_cluster") if n in row])
    if cluster:
        lines.append(f"cluster: {cluster}")
    scores = [n for n in SCORE_COLUMNS if n in row] + [
        n for n in row if n not in SCORE_COLUMNS and isinstance(row[n], float) and n not in GROUP_COLUMNS]
    if scores:
        lines.append(f"scores: {pairs(row, scores)}")
    if "spurious_logo" in row:
        lines.append(f"spurious logo: {value_text(row['spurious_logo'])}")
    image = [n for n in row if n.startswith("image_") and n not in scores and n not in GROUP_COLUMNS]
    if image:
        lines.append(f"image: {pairs(row, image)}")
    shown = {UID, URL, CAPTION, ENTRY_IDS, *scores, *image, *GROUP_COLUMNS, "centroid_similarity"}
    other = [n for n in row if n not in shown]
    if other:
        lines.append(f"other columns: {pairs(row, other)}")
    return lines


def _data_index(stages: list[StageFolder], index: int) -> int:
    """The index of the stage whose data files hold stage `index`'s rows (itself unless it passes through)."""
    for earlier in range(index, -1, -1):
        if stages[earlier].data_dir == stages[index].data_dir and not stages[earlier].passes_through:
            return earlier
    return index


def _entry_lines(stages: list[StageFolder], row: dict, last_present: int | None) -> list[str]:
    if not row or ENTRY_IDS not in row:
        return []
    entry_ids = row[ENTRY_IDS] or []
    if not entry_ids:
        return ["matched MetaCLIP entries: none (kept by keep_unmatched)"]
    metadata = metadata_entries(stages, last_present)
    entries = metadata[0] if metadata else None

    def name(entry_id: int) -> str:
        return repr(entries[entry_id]) if entries is not None and 0 <= entry_id < len(entries) else "?"

    shown = ", ".join(f"{name(i)} ({i})" for i in entry_ids[:MAX_SHOWN_ENTRIES])
    more = f", ... {len(entry_ids) - MAX_SHOWN_ENTRIES} more" if len(entry_ids) > MAX_SHOWN_ENTRIES else ""
    source = f" [{metadata[1].label}/{ARTIFACTS_DIR}/{Artifact.METADATA}]" if metadata else ""
    return [f"matched MetaCLIP entries ({len(entry_ids)}){source}: {shown}{more}"]


def _dedup_lines(stages: list[StageFolder], row: dict, trace: _Trace, copies: list) -> list[str]:
    lines = []
    if copies:
        lines.append(f"copies: {len(copies)} more row{'s' if len(copies) > 1 else ''} with the same (url, caption) "
                     f"{'were' if len(copies) > 1 else 'was'} dropped at {stages[copies[0][0]].name} "
                     f"({copies[0][1]['reason']}: {detail_text(copies[0][1]['detail'])})")
    if row.get("text_dup_group") is not None:
        lines.append(f"caption dedup: in near-duplicate group {row['text_dup_group']} of "
                     f"{value_text(row.get('text_dup_group_size'))} rows, and kept")
    if row.get("image_dup_group") is not None:
        lines.append(f"image dedup: in duplicate-image group {row['image_dup_group']}, and kept")
    if trace.absorbed:
        by_stage: dict[tuple[int, str], list[str]] = {}
        for index, ledger_row in trace.absorbed:
            by_stage.setdefault((index, ledger_row["reason"]), []).append(ledger_row[UID])
        lines.append(f"survivor of {len(trace.absorbed)} dropped row{'s' if len(trace.absorbed) > 1 else ''} "
                     "(ledger rows whose related_uid is this sample):")
        for (index, reason), uids in sorted(by_stage.items()):
            examples = ", ".join(sorted(uids)[:3]) + (", ..." if len(uids) > 3 else "")
            lines.append(f"  {stages[index].name} ({stages[index].label}): {reason} x {len(uids)} (e.g. {examples})")
    elif any(stages[i].name in DEDUP_STAGES and not stages[i].passes_through for i, r in trace.rows.items() if r):
        lines.append("survivor of: no dropped row names this sample as its related_uid")
    return lines


