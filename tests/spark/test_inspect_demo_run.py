"""`curation inspect` on a finished run of every demo stage (the session's `demo_run`): a published sample, a sample
dropped at each stage that dropped something, a survivor, entries, and unknown uids and entries."""

import json
import shutil
import time
from itertools import takewhile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from curation.cli import main as cli_main
from curation.inspection import InspectError, inspect_entry, inspect_uid
from curation.io import list_files
from curation.ops.metaclip import reference_match
from curation.run_folder import stage_chain
from curation.schema import REASONS_SHARING_KEPT_UID

pytestmark = pytest.mark.spark


def label(run, folder) -> str:
    return str(folder.resolve().relative_to(run.resolve()))


def shards(run) -> ds.Dataset:
    return ds.dataset(sorted(str(p) for p in (run / "publish" / "shards").glob("*.parquet")), format="parquet")


def metadata(run) -> list[str]:
    match = next(folder for folder, record in stage_chain(run / "publish") if record["stage"] == "match")
    return json.loads((match / "_artifacts" / "metadata.json").read_text())


def stage_lines(lines: list[str]) -> list[str]:
    return list(takewhile(lambda line: line.startswith("  "), lines[lines.index("stages (chain order):") + 1:]))


def test_published_sample(demo_run):
    table = shards(demo_run).to_table(columns=["uid", "caption", "entry_ids", "clip_score", "cluster",
                                               "keep_probability", "__filename"])
    row = table.slice(table.num_rows // 2, 1).to_pylist()[0]
    started = time.perf_counter()
    lines = inspect_uid(demo_run, row["uid"])
    assert time.perf_counter() - started < 10
    shard = label(demo_run, Path(row["__filename"]))
    assert lines[1] == f"fate: published in {shard}"
    assert f"caption: {row['caption']}" in lines

    chain = stage_chain(demo_run / "publish")
    shown = stage_lines(lines)
    assert [line.split()[:2] for line in shown] == [[r["stage"], label(demo_run, f)] for f, r in chain]
    for line, (_, record) in zip(shown, chain, strict=True):
        status = line.split()[2].rstrip(":")
        expected = "published" if record["stage"] == "publish" else (
            "passed" if record.get("data_from") else "kept")
        assert status == expected, line

    entries = metadata(demo_run)
    text = "\n".join(lines)
    matched = ", ".join(f"{entries[i]!r} ({i})" for i in row["entry_ids"][:30])
    assert f"matched MetaCLIP entries ({len(row['entry_ids'])})" in text and matched in text
    assert f"clip_score={row['clip_score']:.6g}" in text
    assert f"keep_probability={row['keep_probability']:.6g}" in text
    assert f"cluster: cluster={row['cluster']}" in text


def test_a_sample_dropped_at_each_stage_that_dropped(demo_run):
    checked = set()
    expected = set()
    for folder, record in stage_chain(demo_run / "publish"):
        if not (folder / "_ledger").is_dir():
            continue
        ledger = ds.dataset(str(folder / "_ledger"), format="parquet").to_table().to_pylist()
        drops = sorted((r for r in ledger if r["reason"] not in REASONS_SHARING_KEPT_UID), key=lambda r: r["uid"])
        if not drops:
            continue
        expected.add(record["stage"])
        pick = drops[0]
        lines = inspect_uid(demo_run, pick["uid"])
        where = label(demo_run, folder)
        assert lines[1] == f"fate: dropped at stage {record['stage']} ({where}): {pick['reason']}"
        assert any(line.split()[:4] == [record["stage"], where, "DROPPED:", pick["reason"]] for line in lines)
        if pick["related_uid"]:
            assert any(line.startswith(f"  related_uid: {pick['related_uid']} (") for line in lines)
        checked.add(record["stage"])
    assert checked == expected
    # The run drops at ingest, balance, download, semdedup, prune and flag_logos (policy drop) at least.
    assert {"ingest", "balance", "download", "semdedup", "prune", "flag_logos"} <= checked


def test_a_survivor_counts_what_it_absorbed(demo_run):
    ledgers = [str(path) for folder, _ in stage_chain(demo_run / "publish") for path in list_files(folder / "_ledger")]
    table = ds.dataset(ledgers, format="parquet").to_table(columns=["uid", "related_uid"])
    table = table.filter(pc.and_(pc.is_valid(table["related_uid"]), pc.not_equal(table["uid"], table["related_uid"])))
    counts = table.group_by("related_uid").aggregate([("uid", "count")]).sort_by([("uid_count", "descending"),
                                                                                  ("related_uid", "ascending")])
    survivor, absorbed = counts["related_uid"][0].as_py(), counts["uid_count"][0].as_py()
    text = "\n".join(inspect_uid(demo_run, survivor))
    assert f"survivor of {absorbed} dropped row{'s' if absorbed > 1 else ''}" in text


def test_unknown_uid(demo_run, capsys):
    with pytest.raises(InspectError, match="no sample with uid"):
        inspect_uid(demo_run, "f" * 32)
    assert cli_main(["inspect", str(demo_run), "--uid", "f" * 32]) == 1


def test_entry_counts_and_examples(demo_run, capsys):
    count_dir = next(f for f, r in stage_chain(demo_run / "publish") if r["stage"] == "count")
    counts = ds.dataset(str(count_dir / "_artifacts" / "entry_counts.parquet")).to_table()
    published = shards(demo_run).to_table(columns=["uid", "caption", "entry_ids"])
    top = counts.sort_by([("count", "descending"), ("entry_id", "ascending")]).slice(0, 1).to_pylist()[0]
    entry, entry_id = top["entry"], top["entry_id"]
    lines = inspect_entry(demo_run, entry, examples=3)
    text = "\n".join(lines)
    assert lines[0].startswith(f"entry {entry!r}: id {entry_id} of ")
    assert f"c_e = {top['count']:,} (id {entry_id}" in text
    holding = sum(entry_id in ids for ids in published.column("entry_ids").to_pylist())
    assert f"publish      publish: {holding:,} of {published.num_rows:,} rows" in text
    header = f"examples (3 of {holding:,}, smallest uids, from the release):"
    assert header in lines
    examples = lines[lines.index(header) + 1:]
    assert len(examples) == 3
    entries = metadata(demo_run)
    captions = dict(zip(published["uid"].to_pylist(), published["caption"].to_pylist(), strict=True))
    for line in examples:
        uid = line.split()[0]
        assert entry_id in reference_match(captions[uid], entries)
    assert cli_main(["inspect", str(demo_run), "--entry", entry, "--examples", "2"]) == 0
    assert f"examples (2 of {holding:,}" in capsys.readouterr().out


def test_unknown_entry_suggests_close_matches(demo_run, capsys):
    entry = "photograph"
    assert entry in metadata(demo_run)
    typo = "photograhp"
    with pytest.raises(InspectError) as error:
        inspect_entry(demo_run, typo)
    assert f"{typo!r} is not an entry of the run's metadata" in str(error.value)
    close = str(error.value).split("close matches: ", 1)[1]
    assert repr(entry) in close.split(", ")
    assert cli_main(["inspect", str(demo_run), "--entry", typo]) == 1


def test_run_without_publish(demo_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("*.tar"))
    shutil.rmtree(copy / "publish")
    uid = shards(demo_run).to_table(columns=["uid"])["uid"][0].as_py()
    last = sorted((copy / "stages").iterdir())[-1]
    assert inspect_uid(copy, uid)[1] == (f"fate: kept to the last stage of the run (stages/{last.name}); the run "
                                         "has no publish stage")
