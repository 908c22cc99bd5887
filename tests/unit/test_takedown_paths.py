"""`curation takedown` on a tiny hand-built release (no Spark, no images): manifest paths that leave the release are
refused before anything is read or written, and an image sha256 list matches the original file's sha256 as well as
the published image's."""

import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import sha256_of_file
from curation.manifest import build_manifest, file_entry, safe_member, verify_manifest
from curation.run_folder import MANIFEST_NAME
from curation.schema import LEDGER_SCHEMA
from curation.takedown import takedown_release

ROWS = 4


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _release(root):
    """A valid release of ROWS published rows (stored and source image sha256 columns, no tars) and one ledger
    row."""
    release = root / "release"
    (release / "shards").mkdir(parents=True)
    (release / "ledger").mkdir()
    uids = [f"{i:x}" * 32 for i in range(ROWS)]
    pq.write_table(pa.table({
        "uid": uids,
        "url": [f"https://img.example/{i}.jpg" for i in range(ROWS)],
        "caption": [f"photo {i}" for i in range(ROWS)],
        "image_sha256": [_digest(f"stored {i}") for i in range(ROWS)],
        "image_source_sha256": [_digest(f"original {i}") for i in range(ROWS)],
    }), release / "shards" / "shard-00000.parquet")
    pq.write_table(pa.table({"uid": ["f" * 32], "stage": ["ingest"], "reason": ["empty_caption"],
                             "related_uid": [None], "detail": [None]}, schema=LEDGER_SCHEMA),
                   release / "ledger" / "ledger-00000.parquet")
    stage = {"stage": "ingest", "folder": "00_ingest", "version": 1, "rows_in": ROWS + 1, "rows_out": ROWS,
             "drops": {"empty_caption": 1}, "seconds": 0.1}
    manifest = build_manifest(
        name="tiny", config={}, config_sha256=_digest("{}"), inputs=[{"path": "in.parquet", "rows": ROWS + 1}],
        skipped_inputs=[], stages=[stage], shards=[file_entry(release, release / "shards" / "shard-00000.parquet")],
        ledger_files=[file_entry(release, release / "ledger" / "ledger-00000.parquet")], metadata=None,
        balancing=None,
    )
    (release / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_manifest(release) == []
    return release, uids


def _point(release, section: str, path: str) -> None:
    """Make the first entry of a manifest section (shards, image_shards, ledger) name `path` instead."""
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    if section == "image_shards":
        manifest["image_shards"] = [{"path": path, "rows": ROWS, "bytes": 0, "sha256": _digest("")}]
    else:
        entries = manifest["ledger"]["files"] if section == "ledger" else manifest["shards"]
        entries[0]["path"] = path
    (release / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("section", ["shards", "image_shards", "ledger"])
def test_an_absolute_manifest_path_is_refused_and_the_file_it_names_is_untouched(tmp_path, section):
    release, uids = _release(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the release's")
    _point(release, section, str(victim))
    (tmp_path / "uids.txt").write_text(uids[0] + "\n")
    named = re.escape(repr(str(victim)))
    with pytest.raises(ValueError, match=rf"manifest\.json: .*{named}.* escapes the release folder"):
        takedown_release(release, tmp_path / "new", tmp_path / "uids.txt", None, None, "r")
    assert victim.read_text() == "not the release's"
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
    assert any("escapes the release folder" in problem for problem in verify_manifest(release))


@pytest.mark.parametrize(("section", "path"), [("shards", "../x.parquet"), ("ledger", "ledger/../../x.parquet"),
                                               ("shards", "")])
def test_a_manifest_path_outside_the_release_is_refused_before_anything_is_written(tmp_path, section, path):
    release, uids = _release(tmp_path)
    outside = tmp_path / "x.parquet"
    outside.write_bytes(b"beside the release")
    _point(release, section, path)
    (tmp_path / "uids.txt").write_text(uids[0] + "\n")
    with pytest.raises(ValueError, match=rf"manifest\.json: {section}.* entry .*{re.escape(repr(path))}"):
        takedown_release(release, tmp_path / "new", tmp_path / "uids.txt", None, None, "r")
    assert outside.read_bytes() == b"beside the release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "uids.txt", "x.parquet"]


@pytest.mark.parametrize("relative", ["/etc/passwd", "a/../../b", "..", "", ".", None])
def test_safe_member_accepts_only_paths_inside_the_release(tmp_path, relative):
    with pytest.raises(ValueError, match="manifest path"):
        safe_member(tmp_path, relative)
    assert safe_member(tmp_path, "shards/./shard-00000.parquet") == tmp_path / "shards" / "shard-00000.parquet"


def test_an_image_sha256_list_matches_the_original_files_digest_and_the_published_images(tmp_path):
    release, uids = _release(tmp_path)
    table = pq.read_table(release / "shards" / "shard-00000.parquet").to_pylist()
    (tmp_path / "hashes.txt").write_text(f"{table[1]['image_source_sha256'].upper()}  owner's file\n"
                                         f"{table[2]['image_sha256']}\n{_digest('never published')}\n")
    summary = takedown_release(release, tmp_path / "new", None, None, tmp_path / "hashes.txt", "owner request")
    assert summary["rows_removed"] == 2 and summary["unmatched_image_hashes"] == 1
    assert summary["removed_by_list"] == {"uid": 0, "url": 0, "image_sha256": 1, "image_source_sha256": 1,
                                          "image_phash": 0}
    new = tmp_path / "new"
    ledger = pq.read_table(new / summary["ledger_file"]).to_pylist()
    assert {row["uid"]: json.loads(row["detail"])["matched"] for row in ledger} == {
        uids[1]: ["image_source_sha256"], uids[2]: ["image_sha256"]}
    published = pq.read_table(new / "shards" / "shard-00000.parquet").column("uid").to_pylist()
    assert published == [uids[0], uids[3]]
    assert verify_manifest(new) == []
    assert sha256_of_file(new / "ledger" / "ledger-00000.parquet") == sha256_of_file(
        release / "ledger" / "ledger-00000.parquet")
