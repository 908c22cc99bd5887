"""`curation inspect` on a small hand-made run folder (no Spark): every fate a sample can have, and entries."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.inspection import InspectError, inspect_entry, inspect_uid
from curation.io import StageWriter
from curation.ops.uid import uid_of
from curation.schema import LEDGER_SCHEMA

ENTRIES = ["dog", "cat", "red", "photo", "red dog"]


def uid(n: int) -> str:
    return uid_of(f"http://example.com/{n}.jpg".encode(), f"caption {n}".encode())


A, B, C, D, E, F, G = (uid(n) for n in range(7))
CAPTIONS = {A: "a red dog photo", B: "a cat", C: "a red cat", D: "a dog", F: "another red dog photo"}


def row(key: str, **extra) -> dict:
    return {"uid": key, "url": f"http://example.com/{key[:6]}.jpg", "caption": CAPTIONS.get(key, "x"), **extra}


def ledger(key: str, stage: str, reason: str, related: str | None = None, detail: dict | None = None) -> dict:
    return {"uid": key, "stage": stage, "reason": reason, "related_uid": related,
            "detail": json.dumps(detail) if detail is not None else None}


def write_stage(run: Path, position: int, name: str, rows: list[dict] | None, upstream: Path | None,
                ledger_rows: list[dict] = (), artifacts: dict | None = None, **record) -> Path:
    folder = run / "stages" / f"{position:02d}_{name}"
    with StageWriter(folder) as writer:
        writer.temp_dir.mkdir(parents=True)
        if rows is not None:
            pq.write_table(pa.Table.from_pylist(rows), writer.temp_dir / "part-00000.parquet")
        if ledger_rows:
            writer.ledger_dir.mkdir()
            pq.write_table(pa.Table.from_pylist(list(ledger_rows), schema=LEDGER_SCHEMA),
                           writer.ledger_dir / "part-00000.parquet")
        for artifact, write in (artifacts or {}).items():
            write(writer.artifacts_dir / artifact)
        link = {"stage": writer.link_to(upstream)} if upstream else {"files": []}
        writer.commit({"stage": name, "config": {"stage": name}, "input": link, **record})
    return folder


def counts_writer(**columns):
    def write(path: Path) -> None:
        pq.write_table(pa.table({"entry_id": pa.array(range(len(ENTRIES)), pa.int32()), "entry": ENTRIES,
                                 **{k: pa.array(v, pa.int64()) for k, v in columns.items()}}), path)

    return write


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """ingest (G: missing url; a copy of A) -> dedup_exact (E duplicates A's url) -> match (B unmatched) -> count
    -> balance (D not drawn) -> publish (A, C, F)."""
    root = tmp_path_factory.mktemp("inspect")
    raw = root / "raw.parquet"
    pq.write_table(pa.table({"url": [None, "http://x/a.jpg"], "caption": ["lost caption", "a"]}), raw)
    run = root / "run"
    kept = [A, B, C, D, E, F]
    ingest = write_stage(run, 1, "ingest", [row(k, WIDTH=10) for k in kept], None, [
        ledger(G, "ingest", "missing_url", detail={"file": str(raw), "row": 0}),
        ledger(A, "ingest", "duplicate_pair", A, {"file": str(raw), "row": 1, "first_row": 0}),
    ])
    exact = write_stage(run, 2, "dedup_exact", [row(k, WIDTH=10) for k in kept if k != E], ingest,
                        [ledger(E, "dedup_exact", "duplicate_url", A, {"normalised_url": "http://example.com/a"})])
    ids = {A: [0, 2, 3, 4], C: [1, 2], D: [0], F: [0, 2, 3, 4]}
    metadata = {"metadata.json": lambda path: path.write_text(json.dumps(ENTRIES))}
    match = write_stage(run, 3, "match", [row(k, WIDTH=10, entry_ids=ids[k]) for k in (A, C, D, F)], exact,
                        [ledger(B, "match", "no_metadata_match")], metadata)
    count = write_stage(run, 4, "count", None, match, artifacts={"entry_counts.parquet": counts_writer(
        count=[3, 1, 3, 2, 2])}, data_from="../03_match")
    balance = write_stage(
        run, 5, "balance", [row(k, WIDTH=10, entry_ids=ids[k], keep_probability=p, clip_score=0.25)
                            for k, p in ((A, 1.0), (C, 1.0), (F, 1.0))], count,
        [ledger(D, "balance", "balance_not_drawn", detail={"p_keep": 0.667})],
        {"balanced_counts.parquet": counts_writer(count_before=[3, 1, 3, 2, 2], count_after=[2, 1, 3, 2, 2])},
        balancing={"t": 2.0, "t_from": "t"},
    )
    publish = run / "publish"
    with StageWriter(publish) as writer:
        (writer.temp_dir / "shards").mkdir(parents=True)
        shard = pq.read_table(balance / "part-00000.parquet")
        pq.write_table(shard.sort_by("uid"), writer.temp_dir / "shards" / "shard-00000.parquet")
        writer.commit({"stage": "publish", "config": {}, "input": {"stage": writer.link_to(balance)}})
    return run


def text_of(lines: list[str]) -> str:
    return "\n".join(lines)


def test_published_sample_tells_every_stage_and_what_it_absorbed(run):
    lines = inspect_uid(run, A)
    assert lines[0] == f"sample {A} in {run.resolve()}"
    assert lines[1] == "fate: published in publish/shards/shard-00000.parquet"
    assert "caption: a red dog photo" in lines
    stage_lines = lines[lines.index("stages (chain order):") + 1:][:6]
    assert [line.split()[:2] for line in stage_lines] == [
        ["ingest", "stages/01_ingest"], ["dedup_exact", "stages/02_dedup_exact"], ["match", "stages/03_match"],
        ["count", "stages/04_count"], ["balance", "stages/05_balance"], ["publish", "publish"]]
    assert stage_lines[0].endswith("kept: WIDTH=10")
    assert stage_lines[2].endswith("kept: 4 matched entries")
    assert "passed" in stage_lines[3]
    assert stage_lines[4].endswith("kept: keep_probability=1, clip_score=0.25")
    text = text_of(lines)
    assert "matched MetaCLIP entries (4) [stages/03_match/_artifacts/metadata.json]: 'dog' (0), 'red' (2), " \
           "'photo' (3), 'red dog' (4)" in text
    assert "copies: 1 more row with the same (url, caption) was dropped at ingest (duplicate_pair" in text
    assert "survivor of 1 dropped row" in text
    assert f"dedup_exact (stages/02_dedup_exact): duplicate_url x 1 (e.g. {E})" in text
    assert "scores: clip_score=0.25, keep_probability=1" in text


@pytest.mark.parametrize(("key", "stage", "folder", "reason"), [
    (G, "ingest", "stages/01_ingest", "missing_url"),
    (E, "dedup_exact", "stages/02_dedup_exact", "duplicate_url"),
    (B, "match", "stages/03_match", "no_metadata_match"),
    (D, "balance", "stages/05_balance", "balance_not_drawn"),
])
def test_dropped_sample_names_the_stage_and_reason(run, key, stage, folder, reason):
    lines = inspect_uid(run, key)
    assert lines[1] == f"fate: dropped at stage {stage} ({folder}): {reason}"
    assert any(line.split()[:4] == [stage, folder, "DROPPED:", reason] for line in lines)
    stages_after = {"ingest": 5, "dedup_exact": 4, "match": 3, "balance": 1}[stage]
    assert any(f"(not reached: the {stages_after} stage" in line for line in lines)


def test_dropped_duplicate_points_at_its_survivor_and_its_fate(run):
    text = text_of(inspect_uid(run, E))
    assert f"related_uid: {A} (the sample it duplicates; published in publish/shards/shard-00000.parquet)" in text
    assert "detail: normalised_url=http://example.com/a" in text
    assert "caption: x" in text  # its row as it stood before the drop


def test_ingest_drop_shows_the_raw_row(run):
    text = text_of(inspect_uid(run, G))
    assert "raw url (url): null" in text and "raw caption (caption): lost caption" in text


def test_balance_drop_shows_entries_and_probability(run):
    text = text_of(inspect_uid(run, D))
    assert "detail: p_keep=0.667" in text
    assert "matched MetaCLIP entries (1) [stages/03_match/_artifacts/metadata.json]: 'dog' (0)" in text


def test_unknown_uid(run, capsys):
    with pytest.raises(InspectError, match=f"no sample with uid '{'0' * 32}'"):
        inspect_uid(run, "0" * 32)
    with pytest.raises(InspectError, match="32 hex digits"):
        inspect_uid(run, "not-a-uid")
    assert cli_main(["inspect", str(run), "--uid", "0" * 32]) == 1
    assert capsys.readouterr().out == ""


def test_uid_is_case_insensitive_and_cli_prints_the_story(run, capsys):
    assert inspect_uid(run, A.upper())[1].startswith("fate: published")
    assert cli_main(["inspect", str(run), "--uid", A]) == 0
    assert "fate: published in publish/shards/shard-00000.parquet" in capsys.readouterr().out


def test_run_without_publish_uses_the_last_stage(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "publish")
    lines = inspect_uid(copy, A)
    assert lines[1] == "fate: kept to the last stage of the run (stages/05_balance); the run has no publish stage"
    assert inspect_uid(copy, D)[1] == "fate: dropped at stage balance (stages/05_balance): balance_not_drawn"


def test_not_a_run_folder(tmp_path):
    with pytest.raises(InspectError, match="not a run folder"):
        inspect_uid(tmp_path, A)
    with pytest.raises(InspectError, match="does not exist"):
        inspect_entry(tmp_path / "nothing", "dog")


def test_entry_counts_rows_and_examples(run):
    lines = inspect_entry(run, "red", examples=5)
    text = text_of(lines)
    assert lines[0] == f"entry 'red': id 2 of {len(ENTRIES)} in stages/03_match/_artifacts/metadata.json"
    assert "count    stages/04_count: c_e = 3 (id 2" in text
    assert "balance  stages/05_balance: 3 before -> 3 after (id 2; t = 2 (t), p_e = min(1, t / c_e) = 0.6667: " \
           "head entry, cut)" in text
    assert "match        stages/03_match: 3 of 4 rows" in text
    assert "publish      publish: 3 of 3 rows" in text
    assert "examples (3 of 3, smallest uids, from the release):" in text
    example_lines = lines[lines.index("examples (3 of 3, smallest uids, from the release):") + 1:]
    assert [line.split()[0] for line in example_lines] == sorted([A, C, F])
    assert f"  {A}  a red dog photo" in example_lines
    assert len(inspect_entry(run, "red", examples=1)) == len(lines) - 2


def test_entry_without_published_rows_takes_examples_from_the_last_stage_with_them(run):
    text = text_of(inspect_entry(run, "dog"))
    assert "publish      publish: 2 of 3 rows" in text
    lines = inspect_entry(run, "cat")
    assert "publish      publish: 1 of 3 rows" in text_of(lines)
    lines = inspect_entry(run, "dog", examples=0)
    assert not any(line.startswith("examples") for line in lines)


def test_unknown_entry_suggests_close_matches(run, capsys):
    with pytest.raises(InspectError) as error:
        inspect_entry(run, "Dog")
    message = str(error.value)
    assert "'Dog' is not an entry of the run's metadata (5 entries in stages/03_match/_artifacts/metadata.json)" \
        in message
    assert "close matches: 'dog'" in message
    with pytest.raises(InspectError, match="no close match"):
        inspect_entry(run, "zzzzzz")
    assert cli_main(["inspect", str(run), "--entry", "phot"]) == 1
    assert capsys.readouterr().out == ""


HOSTILE = "\x1b]52;c;cm0gLXJmIH4=\x07caption\x1b[2J\tend\n\x9b31m \u202eevil\u202c \u2066x\u2069 \x00\x7f"
SHOWN = "\\x1b]52;c;cm0gLXJmIH4=\\x07caption\\x1b[2J\\tend\\n\\x9b31m \\u202eevil\\u202c \\u2066x\\u2069 \\x00\\x7f"


def test_control_and_bidi_characters_from_the_data_are_escaped_and_other_unicode_is_kept(tmp_path):
    """A caption, url, ledger detail or reason holding terminal escapes (an OSC 52 clipboard write, a screen clear)
    or bidi overrides is shown escaped; accents and CJK stay as they are."""
    kept, dropped = uid(100), uid(101)
    caption, url = f"café 東京 {HOSTILE}", "http://example.com/\x1b[2J\u202egpj.exe"
    ingest = write_stage(tmp_path, 1, "ingest", [
        {"uid": kept, "url": url, "caption": caption, "note": HOSTILE},
        {"uid": dropped, "url": "http://example.com/b.jpg", "caption": "b", "note": "b"},
    ], None)
    write_stage(tmp_path, 2, "match", [{"uid": kept, "url": url, "caption": caption, "entry_ids": [0]}], ingest,
                [ledger(dropped, "match", "reason\x1b[2J", kept, {"why": HOSTILE})],
                {"metadata.json": lambda path: path.write_text(json.dumps([f"dog{HOSTILE}"]))})
    lines = [*inspect_uid(tmp_path, kept), *inspect_uid(tmp_path, dropped),
             *inspect_entry(tmp_path, f"dog{HOSTILE}")]
    escaped = {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), *"\u202a\u202b\u202c\u202d\u202e",
               *"\u2066\u2067\u2068\u2069"}
    assert not [line for line in lines if escaped & set(line)]
    text = text_of(lines)
    assert f"caption: café 東京 {SHOWN}" in lines
    assert "url: http://example.com/\\x1b[2J\\u202egpj.exe" in lines
    assert f"note={SHOWN}" in text
    assert f"detail: why={SHOWN}" in text
    assert "reason\\x1b[2J" in text
    assert f"  {kept}  café 東京 {SHOWN}" in lines
