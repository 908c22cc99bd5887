"""`curation inspect RUN_DIR`: the story of one sample (`--uid`) or one metadata entry (`--entry`), from the run
folder alone, with pyarrow (no Spark).

A sample's story follows the run's stage chain (the records' input links, from ingest to publish, or to the last
complete stage of a run without a release): in which stage folders its row is, what each stage added to it (entry
ids, scores, groups, image fields), where it was published, or the ledger row that says where and why it was
dropped, with the uid it was a duplicate of (and that uid's own fate). A survivor is told how many ledger rows name
it as their `related_uid`. Every read is a pyarrow dataset scan with a filter on `uid` and only the columns needed.

An entry's story: its id in the metadata the match stage used, its counts at each count and balance stage (their
`entry_counts.parquet` and `balanced_counts.parquet` artifacts), how many rows hold it in each stage's data, and a
few example rows from the release (or the last stage that still has rows holding it).
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from curation.io import (
    ARTIFACTS_DIR,
    LEDGER_DIR,
    StageFolderError,
    is_complete,
    list_files,
    resolve_data_dir,
    stage_chain,
)
from curation.schema import CAPTION, ENTRY_IDS, REASONS_SHARING_KEPT_UID, UID, URL

# Artifact names of the match, count and balance stages (curation.spark.stages; not imported, it needs pyspark).
METADATA_ARTIFACT = "metadata.json"
ENTRY_COUNTS_ARTIFACT = "entry_counts.parquet"
BALANCED_COUNTS_ARTIFACT = "balanced_counts.parquet"
RELEASE_SHARDS_DIR = "shards"

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
MAX_SHOWN_ENTRIES = 30
MAX_TEXT_CHARS = 300
# C0 and C1 controls and DEL (tab and newlines too: a line holds one value) as Python escapes; the bidi embedding,
# override and isolate characters as \uNNNN. Other Unicode is shown as it is.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{ord(char): escape for char, escape in (("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))},
    **{code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}
UID_HEX_CHARS = 32


class InspectError(LookupError):
    """An unknown uid or entry, or a folder that is not a run: the message is what to show."""


@dataclass
class _Stage:
    folder: Path
    record: dict
    label: str
    data_files: list[Path] = field(default_factory=list)
    ledger_files: list[Path] = field(default_factory=list)
    # the stage folder whose data this stage's rows are (itself, or for count/mine_logos the one it points to)
    data_dir: Path | None = None
    schema: pa.Schema | None = None

    @property
    def name(self) -> str:
        return self.record["stage"]

    @property
    def passes_through(self) -> bool:
        return bool(self.record.get("data_from"))


# ------------------------------------------------------------------------------------------------- the run's chain


def _last_folder(run_dir: Path) -> Path:
    """The folder the run's chain ends at: its release, else the last complete stage folder, else `run_dir` itself
    when it is a stage folder."""
    if not run_dir.exists():
        raise InspectError(f"{run_dir} does not exist")
    if is_complete(run_dir / "publish"):
        return run_dir / "publish"
    stages_dir = run_dir / "stages"
    if stages_dir.is_dir():
        complete = [p for p in stages_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)]
        if complete:
            return max(complete, key=_position_key)
    if is_complete(run_dir):
        return run_dir
    raise InspectError(f"{run_dir} is not a run folder: it has no complete publish/ or stages/NN_<stage>/ folder")


def _position_key(folder: Path) -> tuple[int, str]:
    prefix = folder.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else -1, folder.name)


def _label(folder: Path, run_dir: Path) -> str:
    try:
        return str(folder.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(folder)


def _chain(run_dir: Path) -> list[_Stage]:
    run_dir = Path(run_dir)
    try:
        chain = stage_chain(_last_folder(run_dir))
    except StageFolderError as error:
        raise InspectError(f"{run_dir}: the stage chain is broken: {error}") from error
    stages = []
    for folder, record in chain:
        stage = _Stage(folder=folder.resolve(), record=record, label=_label(folder, run_dir))
        if record["stage"] == "publish":
            stage.data_dir = stage.folder
            stage.data_files = [p for p in list_files(stage.folder / RELEASE_SHARDS_DIR) if p.suffix == ".parquet"]
        else:
            stage.data_dir = resolve_data_dir(stage.folder).resolve()
            stage.data_files = [p for p in list_files(stage.data_dir) if p.suffix == ".parquet"]
            stage.ledger_files = [p for p in list_files(stage.folder / LEDGER_DIR) if p.suffix == ".parquet"]
        if stage.data_files:
            stage.schema = ds.dataset([str(p) for p in stage.data_files], format="parquet").schema
        stages.append(stage)
    return stages


def _scan(files: list[Path], columns: list[str], row_filter=None) -> pa.Table:
    """The listed columns (those the files have) of the rows passing `row_filter`."""
    if not files:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    dataset = ds.dataset([str(p) for p in files], format="parquet")
    present = [name for name in columns if name in dataset.schema.names or name == "__filename"]
    return dataset.to_table(columns=present, filter=row_filter)


def _displayable(schema: pa.Schema) -> list[str]:
    """Columns worth printing: no bytes (images) and no fixed-size lists (embeddings)."""
    shown = []
    for schema_field in schema:
        kind = schema_field.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_list(kind):
            continue
        shown.append(schema_field.name)
    return shown


# ------------------------------------------------------------------------------------------------- formatting


def _text(value, limit: int = MAX_TEXT_CHARS) -> str:
    text = _printable(value if isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _printable(text: str) -> str:
    """`text` with its control and bidi characters escaped, so that a crawled caption or url cannot drive the
    terminal (an OSC 52 clipboard write, a screen clear) or reorder what is shown around it."""
    return text.translate(_ESCAPES)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        shown = ", ".join(_value(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]" + (f" ({len(value)})" if len(value) > 8 else "")
    if isinstance(value, str):
        return _text(value, 120)
    return "null" if value is None else str(value)


def _pairs(row: dict, names) -> str:
    return ", ".join(f"{name}={_value(row[name])}" for name in names if name in row)


def _detail(detail: str | None) -> str:
    if not detail:
        return "-"
    try:
        parsed = json.loads(detail)
    except json.JSONDecodeError:
        return _text(detail)
    if isinstance(parsed, dict):
        return ", ".join(f"{key}={_value(value)}" for key, value in parsed.items())
    return _text(detail)


# ------------------------------------------------------------------------------------------------- one sample


@dataclass
class _Trace:
    """What the run's folders hold about one uid."""

    rows: dict[int, dict | None]  # stage index -> the stage's own columns of the row (None: the row is not there)
    files: dict[int, str]  # stage index -> data file holding the row
    own: list[tuple[int, dict]]  # ledger rows of the uid (stage index, row)
    absorbed: list[tuple[int, dict]]  # ledger rows naming the uid as related_uid (other uids)


def _ledger_rows(stages: list[_Stage], uid: str, with_related: bool) -> tuple[list, list]:
    own, absorbed = [], []
    for index, stage in enumerate(stages):
        if not stage.ledger_files:
            continue
        row_filter = ds.field(UID) == uid
        if with_related:
            row_filter = row_filter | (ds.field("related_uid") == uid)
        table = _scan(stage.ledger_files, [UID, "stage", "reason", "related_uid", "detail"], row_filter)
        for row in table.to_pylist():
            (own if row[UID] == uid else absorbed).append((index, row))
    return own, absorbed


def _trace(stages: list[_Stage], uid: str) -> _Trace:
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
        if stage.schema is None:
            rows[index] = None
            continue
        shown = _displayable(stage.schema)
        rewritten = REWRITTEN_COLUMNS.get(stage.name, ())
        new = [name for name in shown if name != UID and (name not in previous_names or name in rewritten)]
        if stage.name == "ingest":
            new = [name for name in new if name not in (URL, CAPTION)]
        previous_names = set(stage.schema.names)
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


def _full_row(stage: _Stage, uid: str) -> dict:
    table = _scan(stage.data_files, _displayable(stage.schema), ds.field(UID) == uid)
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else {}


def _brief_fate(stages: list[_Stage], uid: str, run_dir: Path) -> str:
    """Where `uid` ended: published, kept to the last stage, or dropped (stage and reason)."""
    last = stages[-1]
    found = _scan(last.data_files, [UID, "__filename"], ds.field(UID) == uid) if last.data_files else None
    if found is not None and found.num_rows:
        where = _label(Path(found.column("__filename")[0].as_py()), run_dir)
        return f"published in {where}" if last.name == "publish" else f"kept to the last stage ({last.label})"
    own, _ = _ledger_rows(stages, uid, with_related=False)
    drops = [(i, row) for i, row in own if row["reason"] not in REASONS_SHARING_KEPT_UID]
    if drops:
        index, row = drops[0]
        return f"dropped at {stages[index].name} ({stages[index].label}): {row['reason']}"
    return "not found in this run"


def _metadata_entries(stages: list[_Stage], before: int | None = None) -> tuple[list[str], _Stage] | None:
    """The metadata entries of the last match stage (up to stage index `before`), and that stage."""
    matches = [s for i, s in enumerate(stages) if s.name == "match" and (before is None or i <= before)]
    if not matches:
        return None
    path = matches[-1].folder / ARTIFACTS_DIR / METADATA_ARTIFACT
    if not path.is_file():
        return None
    return json.loads(path.read_bytes()), matches[-1]


def _raw_source(stage: _Stage, detail: str | None) -> list[str]:
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
                return [f"raw url ({url_column}): {_value(raw[url_column])}",
                        f"raw caption ({text_column}): {_value(raw[text_column])}"]
            first += group_rows
    except Exception as error:  # noqa: BLE001 - the raw shard is only a courtesy: it may be gone or changed
        return [f"(the raw row could not be read from {path}: {error})"]
    return []


def inspect_uid(run_dir: Path, uid: str) -> list[str]:
    """The story of one sample in the run at `run_dir`, as lines to print; InspectError for an unknown uid."""
    # Values are escaped where they are formatted; this pass covers the rest read from the run (ledger reasons,
    # related uids, paths, a raw shard's error message).
    return [_printable(line) for line in _sample_story(run_dir, uid)]


def _sample_story(run_dir: Path, uid: str) -> list[str]:
    run_dir = Path(run_dir).resolve()
    stages = _chain(run_dir)
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
    published = stages[-1].name == "publish" and last_present == len(stages) - 1
    if published:
        lines.append(f"fate: published in {_label(Path(trace.files[last_present]), run_dir)}")
    elif drops:
        index, row = drops[0]
        lines.append(f"fate: dropped at stage {stages[index].name} ({stages[index].label}): {row['reason']}")
        if row["related_uid"]:
            relation = "the sample it duplicates" if stages[index].name in DEDUP_STAGES else "related sample"
            survivor_fate = _brief_fate(stages, row["related_uid"], run_dir)
            lines.append(f"  related_uid: {row['related_uid']} ({relation}; {survivor_fate})")
        lines.append(f"  detail: {_detail(row['detail'])}")
        for other_index, other in drops[1:]:
            lines.append(f"  also in the ledger of {stages[other_index].label}: {other['reason']} (a broken run?)")
    elif last_present == len(stages) - 1:
        lines.append(f"fate: kept to the last stage of the run ({stages[-1].label}); the run has no publish stage")
    else:
        lines.append(f"fate: in the data of {stages[last_present].label}, then in no stage's data and no ledger: "
                     "the ledger invariant is broken (run `curation verify`)")

    row = _full_row(stages[_data_index(stages, last_present)], uid) if last_present is not None else {}
    if row:
        lines.append(f"url: {_value(row.get(URL))}")
        lines.append(f"caption: {_text(row.get(CAPTION))}")
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
            if stage.name == "publish":
                status = f"published ({_label(Path(trace.files[index]), run_dir)})"
            elif stage.passes_through:
                status = "passed (the stage's rows are its input's)"
            else:
                status = "kept"
            added = _pairs(stage_row, [n for n in stage_row if n != ENTRY_IDS and stage_row[n] is not None])
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
    cluster = _pairs(row, [n for n in ("cluster", "centroid_similarity", "prune_cluster") if n in row])
    if cluster:
        lines.append(f"cluster: {cluster}")
    scores = [n for n in SCORE_COLUMNS if n in row] + [
        n for n in row if n not in SCORE_COLUMNS and isinstance(row[n], float) and n not in GROUP_COLUMNS]
    if scores:
        lines.append(f"scores: {_pairs(row, scores)}")
    if "spurious_logo" in row:
        lines.append(f"spurious logo: {_value(row['spurious_logo'])}")
    image = [n for n in row if n.startswith("image_") and n not in scores and n not in GROUP_COLUMNS]
    if image:
        lines.append(f"image: {_pairs(row, image)}")
    shown = {UID, URL, CAPTION, ENTRY_IDS, *scores, *image, *GROUP_COLUMNS, "centroid_similarity"}
    other = [n for n in row if n not in shown]
    if other:
        lines.append(f"other columns: {_pairs(row, other)}")
    return lines


def _data_index(stages: list[_Stage], index: int) -> int:
    """The index of the stage whose data files hold stage `index`'s rows (itself unless it passes through)."""
    for earlier in range(index, -1, -1):
        if stages[earlier].data_dir == stages[index].data_dir and not stages[earlier].passes_through:
            return earlier
    return index


def _entry_lines(stages: list[_Stage], row: dict, last_present: int | None) -> list[str]:
    if not row or ENTRY_IDS not in row:
        return []
    entry_ids = row[ENTRY_IDS] or []
    if not entry_ids:
        return ["matched MetaCLIP entries: none (kept by keep_unmatched)"]
    metadata = _metadata_entries(stages, last_present)
    entries = metadata[0] if metadata else None

    def name(entry_id: int) -> str:
        return repr(entries[entry_id]) if entries is not None and 0 <= entry_id < len(entries) else "?"

    shown = ", ".join(f"{name(i)} ({i})" for i in entry_ids[:MAX_SHOWN_ENTRIES])
    more = f", ... {len(entry_ids) - MAX_SHOWN_ENTRIES} more" if len(entry_ids) > MAX_SHOWN_ENTRIES else ""
    source = f" [{metadata[1].label}/{ARTIFACTS_DIR}/{METADATA_ARTIFACT}]" if metadata else ""
    return [f"matched MetaCLIP entries ({len(entry_ids)}){source}: {shown}{more}"]


def _dedup_lines(stages: list[_Stage], row: dict, trace: _Trace, copies: list) -> list[str]:
    lines = []
    if copies:
        lines.append(f"copies: {len(copies)} more row{'s' if len(copies) > 1 else ''} with the same (url, caption) "
                     f"{'were' if len(copies) > 1 else 'was'} dropped at {stages[copies[0][0]].name} "
                     f"({copies[0][1]['reason']}: {_detail(copies[0][1]['detail'])})")
    if row.get("text_dup_group") is not None:
        lines.append(f"caption dedup: in near-duplicate group {row['text_dup_group']} of "
                     f"{_value(row.get('text_dup_group_size'))} rows, and kept")
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


# ------------------------------------------------------------------------------------------------- one entry


def _rows_with_entry(table: pa.Table, entry_ids: list[int]) -> np.ndarray:
    """Indices of the rows whose entry_ids list holds one of `entry_ids`."""
    column = table.column(ENTRY_IDS)
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros(0, np.int64)
    flat = pc.list_flatten(column)
    parents = pc.list_parent_indices(column).to_numpy()
    hits = pc.fill_null(pc.is_in(flat, value_set=pa.array(entry_ids, flat.type)), False)
    return np.unique(parents[hits.to_numpy(zero_copy_only=False)])


def _close_matches(entry: str, entries: list[str]) -> list[str]:
    folded = entry.casefold().strip()
    same_but_case = [e for e in entries if e.casefold() == folded and e != entry]
    close = difflib.get_close_matches(entry, entries, n=8, cutoff=0.6)
    return list(dict.fromkeys(same_but_case + close))[:8]


def inspect_entry(run_dir: Path, entry: str, examples: int = 5) -> list[str]:
    """An entry's id, its counts at each count/balance stage, rows holding it by stage, and example rows."""
    # As inspect_uid: uids and paths read from the run are escaped too.
    return [_printable(line) for line in _entry_story(run_dir, entry, examples)]


def _entry_story(run_dir: Path, entry: str, examples: int) -> list[str]:
    run_dir = Path(run_dir)
    stages = _chain(run_dir)
    metadata = _metadata_entries(stages)
    if metadata is None:
        raise InspectError(f"{run_dir} has no match stage (with {ARTIFACTS_DIR}/{METADATA_ARTIFACT}): entries are "
                           "MetaCLIP metadata entries, matched by the match stage")
    entries, match_stage = metadata
    entry_ids = [i for i, e in enumerate(entries) if e == entry]
    source = f"{match_stage.label}/{ARTIFACTS_DIR}/{METADATA_ARTIFACT}"
    if not entry_ids:
        close = _close_matches(entry, entries)
        suggestion = f"; close matches: {', '.join(repr(c) for c in close)}" if close else "; no close match"
        raise InspectError(f"{entry!r} is not an entry of the run's metadata ({len(entries):,} entries in "
                           f"{source}){suggestion}")

    ids_text = ", ".join(str(i) for i in entry_ids)
    lines = [f"entry {entry!r}: id {ids_text} of {len(entries):,} in {source}"]
    if len(entry_ids) > 1:
        lines.append("  (the metadata lists it more than once; each id is matched and counted)")

    lines.append("counts:")
    counted = False
    for stage in stages:
        artifacts = stage.folder / ARTIFACTS_DIR
        id_filter = ds.field("entry_id").isin(entry_ids)
        if (artifacts / ENTRY_COUNTS_ARTIFACT).is_file() and stage.name != "balance":
            table = _scan([artifacts / ENTRY_COUNTS_ARTIFACT], ["entry_id", "count"], id_filter)
            for item in table.to_pylist():
                lines.append(f"  {stage.name:<8} {stage.label}: c_e = {item['count']:,} (id {item['entry_id']}, "
                             "rows of its input holding the entry)")
                counted = True
        if (artifacts / BALANCED_COUNTS_ARTIFACT).is_file():
            table = _scan([artifacts / BALANCED_COUNTS_ARTIFACT], ["entry_id", "count_before", "count_after"],
                          id_filter)
            balancing = stage.record.get("balancing", {})
            threshold = balancing.get("t")
            for item in table.to_pylist():
                before, after = item["count_before"], item["count_after"]
                if threshold is not None and before:
                    p_entry = min(1.0, threshold / before)
                    rule = (f"t = {threshold:.6g} ({balancing.get('t_from', 't')}), p_e = min(1, t / c_e) = "
                            f"{p_entry:.4g}: {'head entry, cut' if p_entry < 1 else 'tail entry, all kept'}")
                else:
                    rule = f"t = {threshold}" if threshold is not None else "t unknown"
                lines.append(f"  {stage.name:<8} {stage.label}: {before:,} before -> {after:,} after (id "
                             f"{item['entry_id']}; {rule})")
                counted = True
    if not counted:
        lines.append("  (no count or balance stage in this run)")

    lines.append("rows holding the entry, by stage:")
    holding: list[tuple[int, pa.Table, np.ndarray]] = []
    seen_data: set[Path] = set()
    for index, stage in enumerate(stages):
        if stage.schema is None or ENTRY_IDS not in stage.schema.names or stage.data_dir in seen_data:
            continue
        seen_data.add(stage.data_dir)
        table = _scan(stage.data_files, [UID, ENTRY_IDS])
        rows = _rows_with_entry(table, entry_ids)
        lines.append(f"  {stage.name:<12} {stage.label}: {len(rows):,} of {table.num_rows:,} rows")
        holding.append((index, table, rows))

    with_rows = [(index, table, rows) for index, table, rows in holding if len(rows)]
    if not with_rows:
        lines.append("no row of this run holds the entry")
        return lines
    if examples > 0:
        index, table, rows = with_rows[-1]
        stage = stages[index]
        uids = sorted(table.column(UID).take(pa.array(rows, pa.int64())).to_pylist())[:examples]
        found = _scan(stage.data_files, [UID, CAPTION], ds.field(UID).isin(uids)).to_pylist()
        captions = {item[UID]: item.get(CAPTION) for item in found}
        where = "the release" if stage.name == "publish" else f"{stage.label}, the last stage with such rows"
        lines.append(f"examples ({len(uids)} of {len(rows):,}, smallest uids, from {where}):")
        for uid in uids:
            lines.append(f"  {uid}  {_text(captions.get(uid), 160)}")
    return lines
