"""`curation inspect RUN_DIR --entry ENTRY`: one metadata entry's story (see `curation.inspection`)."""

import difflib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from curation.inspection.common import (
    InspectError,
    chain,
    metadata_entries,
    scan,
    text,
)
from curation.io import ARTIFACTS_DIR
from curation.run_folder import Artifact, RunFolder
from curation.schema import CAPTION, ENTRY_IDS, UID
from curation.terminal import printable


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
    return [printable(line) for line in _entry_story(run_dir, entry, examples)]


def _entry_story(run_dir: Path, entry: str, examples: int) -> list[str]:
    stages = chain(RunFolder(run_dir))
    metadata = metadata_entries(stages)
    if metadata is None:
        raise InspectError(f"{run_dir} has no match stage (with {ARTIFACTS_DIR}/{Artifact.METADATA}): entries are "
                           "MetaCLIP metadata entries, matched by the match stage")
    entries, match_stage = metadata
    entry_ids = [i for i, e in enumerate(entries) if e == entry]
    source = f"{match_stage.label}/{ARTIFACTS_DIR}/{Artifact.METADATA}"
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
        id_filter = ds.field("entry_id").isin(entry_ids)
        if stage.artifact(Artifact.ENTRY_COUNTS).is_file() and stage.name != "balance":
            table = scan([stage.artifact(Artifact.ENTRY_COUNTS)], ["entry_id", "count"], id_filter)
            for item in table.to_pylist():
                lines.append(f"  {stage.name:<8} {stage.label}: c_e = {item['count']:,} (id {item['entry_id']}, "
                             "rows of its input holding the entry)")
                counted = True
        if stage.artifact(Artifact.BALANCED_COUNTS).is_file():
            table = scan([stage.artifact(Artifact.BALANCED_COUNTS)], ["entry_id", "count_before", "count_after"],
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
        if stage.data_schema is None or ENTRY_IDS not in stage.data_schema.names or stage.data_dir in seen_data:
            continue
        seen_data.add(stage.data_dir)
        table = scan(stage.data_files, [UID, ENTRY_IDS])
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
        found = scan(stage.data_files, [UID, CAPTION], ds.field(UID).isin(uids)).to_pylist()
        captions = {item[UID]: item.get(CAPTION) for item in found}
        where = "the release" if stage.is_release else f"{stage.label}, the last stage with such rows"
        lines.append(f"examples ({len(uids)} of {len(rows):,}, smallest uids, from {where}):")
        for uid in uids:
            lines.append(f"  {uid}  {text(captions.get(uid), 160)}")
    return lines
