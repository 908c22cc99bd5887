"""Releases that must not verify, and a digest that pins one (issue 17, cases 8 and 13; rows R1-R24 of README.md here).

One small run folder is built once per module the way the executor and publish write it (ingest -> dedup_exact ->
publish, drops in both stages, four shards, a non-ASCII name), without Spark so the module stays fast; every case
tampers with its own copy. `tests/spark/test_spine.py` checks the digest on a release that Spark published. The
`curation` commands run as subprocesses, started together so their start-up overlaps: a manifest they cannot read is
one `ERROR` line naming the file and the key, exit 2, no traceback, nothing written.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import run_summary
from curation.io import StageWriter, sha256_of_json
from curation.manifest import (
    ManifestError,
    build_manifest,
    count_problems,
    file_entry,
    read_manifest,
    release_sha256,
    verify_manifest,
)
from curation.run_folder import MANIFEST_NAME
from curation.schema import LEDGER_SCHEMA
from curation.verify import verify_run

# (stage, rows in, rows out, the reason of its drops); 47 rows read from two input shards of 20 and 27.
STAGES = [("ingest", 47, 44, "empty_caption"), ("dedup_exact", 44, 40, "duplicate_url")]
INPUTS = [{"path": "raw/a.parquet", "rows": 20}, {"path": "raw/b.parquet", "rows": 27}]
SHARD_ROWS = 10


def _uids(start: int, stop: int) -> list[str]:
    return [f"{i:032x}" for i in range(start, stop)]


def _rows(uids: list[str]) -> pa.Table:
    return pa.table({"uid": uids, "url": [f"https://img.example/{u[-4:]}.jpg" for u in uids],
                     "caption": [f"a photo of thing {u[-4:]}" for u in uids]})


def _ledger(uids: list[str], stage: str, reason: str) -> pa.Table:
    return pa.table({"uid": uids, "stage": [stage] * len(uids), "reason": [reason] * len(uids),
                     "related_uid": [None] * len(uids), "detail": [None] * len(uids)}, schema=LEDGER_SCHEMA)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, list]:
    """(run folder, what run_pipeline would return for it): stage folders with data, ledger and record, and a
    release of 40 rows in 4 uid-ordered shards, the 7 dropped rows in its ledger, and the manifest publish
    writes."""
    run_dir = tmp_path_factory.mktemp("releases") / "run"
    results, summaries, dropped, upstream = [], [], [], None
    for position, (stage, rows_in, rows_out, reason) in enumerate(STAGES, start=1):
        folder = run_dir / "stages" / f"{position:02d}_{stage}"
        ledger = _ledger(_uids(rows_out, rows_in), stage, reason)
        with StageWriter(folder) as writer:
            writer.temp_dir.mkdir(parents=True)
            pq.write_table(_rows(_uids(0, rows_out)), writer.temp_dir / "part-00000.parquet")
            writer.ledger_dir.mkdir()
            pq.write_table(ledger, writer.ledger_dir / "part-00000.parquet")
            record = {"stage": stage, "version": 1, "rows_in": rows_in, "rows_out": rows_out,
                      "drops": {reason: rows_in - rows_out}, "seconds": 0.5,
                      "input": {"stage": upstream and writer.link_to(upstream)}}
            writer.commit(record)
        results.append((folder, record, False))
        summaries.append({"stage": stage, "folder": folder.name, "version": 1, "rows_in": rows_in,
                          "rows_out": rows_out, "drops": record["drops"], "seconds": 0.5})
        dropped.append(ledger)
        upstream = folder
    release = run_dir / "publish"
    with StageWriter(release) as writer:
        root = writer.temp_dir
        (root / "shards").mkdir(parents=True)
        (root / "ledger").mkdir()
        shards = []
        for index, start in enumerate(range(0, STAGES[-1][2], SHARD_ROWS)):
            path = root / "shards" / f"shard-{index:05d}.parquet"
            pq.write_table(_rows(_uids(start, start + SHARD_ROWS)), path)
            shards.append(file_entry(root, path))
        pq.write_table(pa.concat_tables(dropped), root / "ledger" / "ledger-00000.parquet")
        config = {"name": "épinglé", "seed": 1, "stages": [stage for stage, *_ in STAGES] + ["publish"]}
        manifest = build_manifest(
            name="épinglé", config=config, config_sha256=sha256_of_json(config), inputs=INPUTS, skipped_inputs=[],
            stages=summaries, shards=shards, ledger_files=[file_entry(root, root / "ledger" / "ledger-00000.parquet")],
            metadata=None, balancing=None, execution={"spark": None},
        )
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
        record = {"stage": "publish", "version": 1, "rows_in": 40, "rows_out": 40, "drops": {}, "seconds": 0.5,
                  "input": {"stage": writer.link_to(upstream)}, "release_sha256": release_sha256(manifest)}
        writer.commit(record)
    results.append((release, record, False))
    return run_dir, results


def _copy(published, tmp_path) -> Path:
    release = tmp_path / "release"
    shutil.copytree(published[0] / "publish", release)
    return release


def _edit(release: Path, change) -> dict:
    """Apply `change` to the release's manifest (in place, as a user would with an editor) and return it."""
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    change(manifest)
    (release / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def _curation(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "curation", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _refused(process: subprocess.Popen, message: str) -> None:
    """Exit 2 with one ERROR line that says `message`, and no traceback."""
    stdout, stderr = process.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert message in errors[0], errors[0]


# ------------------------------------------------------------------------------------------- the digest


def test_a_published_release_verifies_and_its_digest_is_the_canonical_form(published):
    """R1."""
    run_dir, results = published
    manifest_path = run_dir / "publish" / MANIFEST_NAME
    canonical = json.dumps(json.loads(manifest_path.read_text()), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False).encode("utf-8")
    digest = release_sha256(read_manifest(manifest_path))
    assert digest == hashlib.sha256(canonical).hexdigest()
    assert verify_manifest(manifest_path, digest) == []
    assert verify_run(run_dir, digest.upper()) == []
    assert run_summary(results, run_dir)[-1] == f"release sha256: {digest}"  # printed by `curation run`


def test_reformatting_the_manifest_keeps_the_digest_and_any_edit_changes_it(published, tmp_path):
    """R2, R3: the digest is over the content, not the layout of manifest.json."""
    release = _copy(published, tmp_path)
    digest = release_sha256(read_manifest(release))
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    (release / MANIFEST_NAME).write_text(json.dumps(dict(reversed(manifest.items())), ensure_ascii=True))
    assert verify_manifest(release, digest) == []
    _edit(release, lambda m: m.update(created="2020-01-01T00:00:00+00:00"))
    problems = verify_manifest(release, digest)
    assert problems == [f"release sha256 is {release_sha256(read_manifest(release))}, expected {digest}: this is "
                        "not the release pinned"]


def test_an_expected_sha256_that_is_not_one_is_refused(published, tmp_path):
    """R4, and R3 on a run folder."""
    with pytest.raises(ValueError, match="'abc' is not 64 hexadecimal digits"):
        verify_manifest(_copy(published, tmp_path), "abc")
    assert verify_run(published[0], "ab" * 32) == [
        f"publish: release sha256 is {release_sha256(read_manifest(published[0]))}, expected {'ab' * 32}: this is "
        "not the release pinned"]


# ------------------------------------------------------------------------------------------- case 8


def test_a_deleted_shard_with_inputs_and_totals_edited_to_match_fails_on_the_stages(published, tmp_path):
    """R5: the attack of case 8. The shard and its entry are gone and inputs[] and totals agree with what is left, so
    only stages[] still tells the truth."""
    release = _copy(published, tmp_path)
    manifest = read_manifest(release)
    gone = manifest["shards"][0]
    (release / gone["path"]).unlink()

    def hide(m):
        m["shards"] = m["shards"][1:]
        m["totals"]["rows_published"] -= gone["rows"]
        m["totals"]["rows_in"] -= gone["rows"]
        m["inputs"][0]["rows"] -= gone["rows"]

    _edit(release, hide)
    published_rows = manifest["totals"]["rows_published"]
    rows_in = manifest["totals"]["rows_in"]
    assert verify_manifest(release) == [
        f"totals.rows_in = {rows_in - gone['rows']} but stages[0].rows_in (ingest) = {rows_in}",
        f"stages[1].rows_out (dedup_exact) = {published_rows} but totals.rows_published = "
        f"{published_rows - gone['rows']}",
    ]


EDITS = {
    # R6-R13: one count changed where it is stated; each message names both keys.
    "totals.rows_in": (lambda m: m["totals"].update(rows_in=m["totals"]["rows_in"] + 1),
                       "the sum of inputs[].rows = 47 but totals.rows_in = 48"),
    "totals.rows_published": (lambda m: m["totals"].update(rows_published=m["totals"]["rows_published"] - 1),
                              "stages[1].rows_out (dedup_exact) = 40 but totals.rows_published = 39"),
    "totals.rows_in_ledger": (lambda m: m["totals"].update(rows_in_ledger=6),
                              "totals.rows_in_ledger = 6 but ledger.rows = 7"),
    "totals.drops_by_reason": (lambda m: m["totals"]["drops_by_reason"].update(duplicate_url=3),
                               "totals.drops_by_reason.duplicate_url = 3 but the sum of stages[].drops.duplicate_url"
                               " = 4"),
    "ledger.rows": (lambda m: m["ledger"].update(rows=8), "ledger.rows = 8 but the sum of ledger.files[].rows = 7"),
    "stages[0].rows_out": (lambda m: m["stages"][0].update(rows_out=45),
                           "stages[1].rows_in (dedup_exact) = 44 but stages[0].rows_out (ingest) = 45"),
    "stages[1].drops": (lambda m: m["stages"][1]["drops"].update(duplicate_url=5),
                        "stages[1].rows_in (dedup_exact) = 44 but stages[1].rows_out + its drops = 45"),
    "config": (lambda m: m["config"].update(seed=2), "config_sha256 = "),
    # R14: the drops moved to another stage and reason everywhere the manifest says them: only the ledger files
    # (their stage and reason columns) still disagree.
    "relabelled drops": (lambda m: (m["stages"][1].update(drops={"empty_caption": 4}),
                                    m["stages"][0].update(drops={"duplicate_url": 3}),
                                    m["totals"].update(drops_by_reason={"duplicate_url": 3, "empty_caption": 4})),
                         "the ledger files hold 0 row(s) of stage 'dedup_exact' with reason 'empty_caption', "
                         "stages[].drops say 4"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_every_count_stated_twice_must_agree(published, tmp_path, edit):
    release = _copy(published, tmp_path)
    change, message = EDITS[edit]
    _edit(release, change)
    problems = verify_manifest(release)
    assert any(problem.startswith(message) for problem in problems), problems


def test_balancing_points_and_image_shards_repeat_their_stage_and_shard(published):
    """R15: counts stated again by the balance summaries and the image tars (hand-added: this release has neither)."""
    manifest = read_manifest(published[0])
    stage = manifest["stages"][1]
    point = {"stage_folder": stage["folder"], "rows_in": stage["rows_in"], "rows_out": stage["rows_out"] + 1}
    shard = manifest["shards"][0]
    tar = {**shard, "path": shard["path"].replace("shards/", "images/").replace(".parquet", ".tar"), "rows": 1}
    edited = {**manifest, "balancing_points": [point], "balancing": None, "image_shards": [tar]}
    assert count_problems(edited) == [
        f"balancing_points[0].rows_out = {stage['rows_out'] + 1} but stages[1].rows_out = {stage['rows_out']}",
        f"image_shards[0].rows = 1 but shards[0].rows ({shard['path']}) = {shard['rows']}",
        *[f"shards[{i}] ({s['path']}) has no image tar in image_shards" for i, s in enumerate(manifest["shards"])
          if i],
        "balancing differs from the last of balancing_points",
    ]


def test_a_run_folder_whose_manifest_stages_differ_from_the_records_fails(published, tmp_path):
    """R16: `curation verify RUN` also holds stages[] against the stage records."""
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    manifest = _edit(run_dir / "publish", lambda m: m["stages"][0].update(drops={"empty_caption": 2, "odd": 1}))
    assert ("publish: stages[0] = {'stage': 'ingest', 'rows_in': 47, 'rows_out': 44, 'drops': "
            f"{manifest['stages'][0]['drops']}}} but the record of 01_ingest says {{'stage': 'ingest', 'rows_in': 47, "
            "'rows_out': 44, 'drops': {'empty_caption': 3}}") in verify_run(run_dir)


# ------------------------------------------------------------------------------------------- case 13


MALFORMED = {
    # R17: each a ManifestError naming the file and the key.
    "missing key": (lambda m: m.pop("totals"), "key 'totals' is missing"),
    "shards null": (lambda m: m.update(shards=None), "key 'shards' is null, expected an array"),
    "nested key": (lambda m: m["ledger"].pop("files"), "key 'ledger.files' is missing"),
    "entry key": (lambda m: m["shards"][1].pop("sha256"), "key 'shards[1].sha256' is missing"),
    "negative count": (lambda m: m["stages"][0]["drops"].update(empty_caption=-3),
                       "key 'stages[0].drops.empty_caption' is -3, expected a count (an integer, 0 or more)"),
    "string count": (lambda m: m["totals"].update(rows_in="47"), "key 'totals.rows_in' is a string, expected a count"),
    "format": (lambda m: m.update(format="curation.manifest/v0"), "key 'format' is 'curation.manifest/v0'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_manifest_readers_cannot_rely_on_is_refused_naming_the_key(published, tmp_path, case):
    release = _copy(published, tmp_path)
    change, message = MALFORMED[case]
    _edit(release, change)
    with pytest.raises(ManifestError) as refused:
        verify_manifest(release)
    assert str(refused.value).startswith(f"{release / MANIFEST_NAME}: {message}")


def test_a_file_the_manifest_does_not_list_fails_verify(published, tmp_path):
    """R25: a consumer reading shards/*.parquet would read it, and neither the checksums nor the digest cover it."""
    release = _copy(published, tmp_path)
    shard = sorted((release / "shards").glob("*.parquet"))[0]
    shutil.copy(shard, release / "shards" / "shard-99999.parquet")
    (release / "images").mkdir(exist_ok=True)
    (release / "images" / "extra.tar").write_bytes(b"")
    (release / "shards" / ".shard-00001.parquet.tmp-0123456789ab").write_bytes(b"")  # a killed task's leftover
    assert verify_manifest(release) == [
        "shards/shard-99999.parquet is in the release but not in the manifest",
        "images/extra.tar is in the release but not in the manifest",
    ]


@pytest.mark.parametrize(("content", "message"), [
    (b"{\"format\": ", "not valid JSON (Expecting value: line 1 column 12"),
    (b"[1, 2]", "holds an array, expected a manifest object"),
    (b"{\"format\": NaN}", "NaN is not a JSON value"),
    (b"{\"format\": 1e999}", "the number 1e999 is out of range"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    # a first-wins reader would see the first "shards", Python and the digest the last
    (b"{\"format\": 1, \"shards\": [], \"shards\": []}", r"key\S+ \S+'shards'\S+ appear more than once in one object"),
])
def test_a_manifest_that_is_not_json_is_refused_naming_the_file(tmp_path, content, message):
    """R18."""
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ManifestError, match=f"^{tmp_path / MANIFEST_NAME}: {message}".replace("(", r"\(")):
        read_manifest(tmp_path)


def test_every_command_refuses_a_broken_manifest_in_one_line_and_leaves_nothing(published, tmp_path):
    """R19-R24, through the CLI: verify, takedown and report read the manifest and refuse it (exit 2, one line, no
    traceback, no output written); inspect does not read the manifest and answers from the shards; a report
    --output that names a folder is refused before anything is written; a wrong --expect-sha256 exits 1."""
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    release = _copy(published, tmp_path)
    digest = release_sha256(read_manifest(release))
    _edit(run_dir / "publish", lambda m: m.update(shards=None))
    missing = tmp_path / "missing" / MANIFEST_NAME
    missing.parent.mkdir()
    missing.write_text(json.dumps({k: v for k, v in read_manifest(release).items() if k != "totals"}))
    (tmp_path / "uids.txt").write_text("0" * 32 + "\n")
    (tmp_path / "reports").mkdir()
    uid = pq.read_table(release / read_manifest(release)["shards"][0]["path"]).column("uid")[0].as_py()
    commands = {
        "verify run": _curation("verify", run_dir),
        "verify missing": _curation("verify", missing),
        "takedown": _curation("takedown", run_dir / "publish", "--output", tmp_path / "new", "--uids",
                              tmp_path / "uids.txt"),
        "report": _curation("report", run_dir, "--output", tmp_path / "report.html"),
        "report folder": _curation("report", published[0], "--output", tmp_path / "reports"),
        "inspect": _curation("inspect", run_dir, "--uid", uid),
        "wrong sha256": _curation("verify", release, "--expect-sha256", "0" * 64),
        "right sha256": _curation("verify", release, "--expect-sha256", digest),
    }
    shards_null = f"{run_dir.resolve() / 'publish' / MANIFEST_NAME}: key 'shards' is null, expected an array"
    _refused(commands["verify run"], shards_null)
    _refused(commands["verify missing"], f"{missing}: key 'totals' is missing")
    _refused(commands["takedown"], f"{run_dir / 'publish' / MANIFEST_NAME}: key 'shards' is null")
    _refused(commands["report"], shards_null)
    _refused(commands["report folder"], f"report output {tmp_path / 'reports'} is a folder")
    stdout, stderr = commands["inspect"].communicate(timeout=120)
    assert commands["inspect"].returncode == 0 and "Traceback" not in stderr and "fate: published" in stdout, stderr
    stdout, stderr = commands["wrong sha256"].communicate(timeout=120)
    assert commands["wrong sha256"].returncode == 1 and f"expected {'0' * 64}" in stderr
    stdout, stderr = commands["right sha256"].communicate(timeout=120)
    assert commands["right sha256"].returncode == 0, stderr
    assert stdout.splitlines()[-1] == f"release sha256: {digest}"
    assert not (tmp_path / "new").exists() and not (tmp_path / "report.html").exists()
    assert not list(tmp_path.glob(".*")) and list((tmp_path / "reports").iterdir()) == []
    assert not (run_dir / "report.html").exists()
