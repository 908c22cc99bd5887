"""`curation takedown` on the demo run's release: removed samples leave every shard and tar, untouched shards are
copied byte for byte, the ledger and manifest account for the removal, verify passes, and takedowns chain."""

import contextlib
import hashlib
import io
import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.io import sha256_of_file
from curation.manifest import file_entry, read_manifest, release_sha256, verify_manifest
from curation.ops.image_blocklist import BlocklistError, format_phash
from curation.run_folder import MANIFEST_NAME, is_complete
from curation.schema import Reason
from curation.takedown import takedown_release

pytestmark = pytest.mark.spark  # the demo_run fixture runs the pipeline on Spark; the takedown itself needs none


def _files(release) -> dict[str, str]:
    return {path.relative_to(release).as_posix(): sha256_of_file(path) for path in sorted(release.rglob("*"))
            if path.is_file()}


def _manifest(release) -> dict:
    return json.loads((release / MANIFEST_NAME).read_text())


def _published_uids(release) -> set[str]:
    return {uid for entry in _manifest(release)["shards"]
            for uid in pq.read_table(release / entry["path"], columns=["uid"]).column("uid").to_pylist()}


def _tar_samples(release) -> dict[str, bytes]:
    samples = {}
    for entry in _manifest(release)["image_shards"]:
        with tarfile.open(release / entry["path"]) as tar:
            for member in tar:
                samples[member.name] = tar.extractfile(member).read()
    return samples


def _shard(release, index: int):
    return pq.read_table(release / "shards" / f"shard-{index:05d}.parquet")


def _tar_image(release, index: int, uid: str) -> bytes:
    with tarfile.open(release / "images" / f"shard-{index:05d}.tar") as tar:
        return tar.extractfile(f"{uid}.jpg").read()


@pytest.fixture(scope="module")
def first(demo_run, tmp_path_factory):
    """Take down 3 uids (shards 0 and 2), 1 url (shard 0, written with an upper-case host and a fragment) and 1
    image sha256 (shard 2, hashed from the published jpg) plus an unknown uid, through the CLI."""
    release = demo_run / "publish"
    root = tmp_path_factory.mktemp("takedown")
    before = _files(release)
    assert len(_manifest(release)["shards"]) == 3
    shard0, shard2 = _shard(release, 0).to_pylist(), _shard(release, 2).to_pylist()
    uids = [shard0[0]["uid"], shard0[5]["uid"], shard2[3]["uid"]]
    url_row, image_row = shard0[9], shard2[7]
    scheme, rest = url_row["url"].split("://", 1)
    host, path = rest.split("/", 1)
    (root / "uids.txt").write_text("# request 42\n" + "\n".join(u.upper() for u in uids) + "\n" + "0" * 32 + "\n")
    (root / "urls.txt").write_text(f"{scheme.upper()}://{host.upper()}/{path}#top\n")
    digest = hashlib.sha256(_tar_image(release, 2, image_row["uid"])).hexdigest()
    (root / "hashes.txt").write_text(digest + "\n")
    new = root / "new"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli_main(["takedown", str(release), "--output", str(new), "--uids", str(root / "uids.txt"),
                         "--urls", str(root / "urls.txt"), "--image-hashes", str(root / "hashes.txt"),
                         "--reason", "DMCA request 42"]) == 0
    # The new release's digest, for a consumer to pin as publish prints it for a first release.
    assert printed.getvalue().splitlines()[-1] == f"release sha256: {release_sha256(read_manifest(new))}"
    removed = {*uids, url_row["uid"], image_row["uid"]}
    assert len(removed) == 5
    return {"release": release, "root": root, "new": new, "before": before, "removed": removed, "uids": uids,
            "url_uid": url_row["uid"], "image_uid": image_row["uid"]}


def test_the_removed_samples_are_in_no_shard_and_no_tar_and_everything_else_stays(first):
    release, new, removed = first["release"], first["new"], first["removed"]
    old_uids = _published_uids(release)
    assert removed <= old_uids
    assert _published_uids(new) == old_uids - removed
    samples = _tar_samples(new)
    assert not {name.split(".", 1)[0] for name in samples} & removed
    old_samples = _tar_samples(release)
    assert samples == {name: data for name, data in old_samples.items() if name.split(".", 1)[0] not in removed}
    assert is_complete(new) and not list(new.parent.glob(".new.tmp-*"))


def test_untouched_shards_are_copied_byte_for_byte_and_touched_ones_rewritten_as_publish_would(first):
    release, new = first["release"], first["new"]
    old, now = _files(release), _files(new)
    identical = [path for path in now if path.startswith(("shards/", "images/")) and old.get(path) == now[path]]
    assert identical == ["images/shard-00001.tar", "shards/shard-00001.parquet"]
    summary = _manifest(new)["takedown"]
    assert (summary["shards_reused"], summary["shards_rewritten"], summary["shards_dropped"]) == (1, 2, 0)
    for index in (0, 2):
        old_table = _shard(release, index)
        kept = old_table.filter([uid not in first["removed"] for uid in old_table.column("uid").to_pylist()])
        assert _shard(new, index).equals(kept), "a rewritten shard holds the remaining rows, columns and types as-is"


def test_verify_passes_and_the_totals_still_balance(first):
    new = first["new"]
    assert verify_manifest(new) == []
    assert cli_main(["verify", str(new)]) == 0
    manifest = _manifest(new)
    totals, old_totals = manifest["totals"], _manifest(first["release"])["totals"]
    assert totals["rows_in"] == old_totals["rows_in"] == totals["rows_published"] + totals["rows_in_ledger"]
    assert totals["rows_published"] == old_totals["rows_published"] - 5
    assert totals["drops_by_reason"][Reason.TAKEDOWN] == 5
    assert manifest["stages"][-1] == {**manifest["stages"][-1], "stage": "takedown", "rows_out":
                                      old_totals["rows_published"] - 5, "drops": {Reason.TAKEDOWN: 5}}


def test_the_manifest_names_the_release_it_replaces_and_the_request(first):
    manifest, old_path = _manifest(first["new"]), first["release"] / MANIFEST_NAME
    assert manifest["replaces"] == {"name": "demo-run", "path": str(old_path.resolve()),
                                    "sha256": sha256_of_file(old_path),
                                    "created": _manifest(first["release"])["created"]}
    takedown = manifest["takedown"]
    assert takedown["reason"] == "DMCA request 42" and takedown["sequence"] == 1
    assert takedown["rows_removed"] == 5
    assert takedown["removed_by_list"] == {"uid": 3, "url": 1, "image_sha256": 1, "image_source_sha256": 0,
                                           "image_phash": 0}
    assert takedown["unknown_uids"] == 1 and takedown["unknown_uids_listed"] == ["0" * 32]
    assert takedown["unmatched_urls"] == 0 and takedown["unmatched_image_hashes"] == 0
    assert takedown["lists"]["uids"]["sha256"] == sha256_of_file(first["root"] / "uids.txt")
    for key in ("dataset", "config", "config_sha256", "inputs", "metadata", "balancing", "balancing_points"):
        assert manifest[key] == _manifest(first["release"])[key]


def test_the_ledger_keeps_the_old_files_and_adds_the_removed_rows_with_their_reason(first):
    release, new = first["release"], first["new"]
    old_files = _manifest(release)["ledger"]["files"]
    files = _manifest(new)["ledger"]["files"]
    assert files[:-1] == old_files and files[-1]["path"] == "ledger/takedown-00001.parquet"
    assert all(sha256_of_file(new / f["path"]) == sha256_of_file(release / f["path"]) for f in old_files)
    rows = pq.read_table(new / files[-1]["path"]).to_pylist()
    assert [row["uid"] for row in rows] == sorted(first["removed"])
    assert {row["stage"] for row in rows} == {"takedown"} and {row["reason"] for row in rows} == {Reason.TAKEDOWN}
    matched = {row["uid"]: json.loads(row["detail"]) for row in rows}
    assert all(d["request_reason"] == "DMCA request 42" for d in matched.values())
    assert matched[first["url_uid"]]["matched"] == ["url"]
    assert matched[first["image_uid"]]["matched"] == ["image_sha256"]
    assert all(matched[uid]["matched"] == ["uid"] for uid in first["uids"])


def test_the_old_release_is_untouched(first):
    assert _files(first["release"]) == first["before"]


def test_a_second_takedown_chains_on_the_first(first, tmp_path):
    new = first["new"]
    row = _shard(new, 1).to_pylist()[4]
    (tmp_path / "hashes.txt").write_text(format_phash(row["image_phash"]) + "\n")
    summary = takedown_release(new, tmp_path / "second", None, None, tmp_path / "hashes.txt", "second request")
    second = tmp_path / "second"
    manifest = _manifest(second)
    assert manifest["replaces"]["path"] == str((new / MANIFEST_NAME).resolve())
    assert manifest["replaces"]["sha256"] == sha256_of_file(new / MANIFEST_NAME)
    assert summary["removed_by_list"]["image_phash"] >= 1 and row["uid"] not in _published_uids(second)
    assert summary["shards_reused"] == 2 and summary["ledger_file"] == "ledger/takedown-00002.parquet"
    assert [f["path"] for f in manifest["ledger"]["files"]][-2:] == ["ledger/takedown-00001.parquet",
                                                                      "ledger/takedown-00002.parquet"]
    assert [s["stage"] for s in manifest["stages"]][-2:] == ["takedown", "takedown"]
    assert verify_manifest(second) == []


def test_a_request_matching_nothing_still_writes_a_valid_release(first, tmp_path):
    (tmp_path / "uids.txt").write_text("f" * 32 + "\n")
    summary = takedown_release(first["release"], tmp_path / "same", tmp_path / "uids.txt", None, None, "no-op")
    assert summary["rows_removed"] == 0 and summary["unknown_uids"] == 1 and summary["ledger_file"] is None
    assert summary["shards_reused"] == 3 and summary["shards_rewritten"] == 0
    old, now = _files(first["release"]), _files(tmp_path / "same")
    assert all(now[path] == old[path] for path in now if path.startswith(("shards/", "images/", "ledger/")))
    assert verify_manifest(tmp_path / "same") == []


def test_a_listed_sha256_of_the_original_file_takes_its_sample_down(first, tmp_path):
    """Data owners hash the file they published: the release keeps the download stage's image_source_sha256, which
    differs from the re-encoded image the tar holds."""
    row = _shard(first["release"], 1).to_pylist()[2]
    published = hashlib.sha256(_tar_image(first["release"], 1, row["uid"])).hexdigest()
    assert row["image_source_sha256"] != row["image_sha256"] == published
    (tmp_path / "hashes.txt").write_text(row["image_source_sha256"] + "  owner's original\n")
    summary = takedown_release(first["release"], tmp_path / "new", None, None, tmp_path / "hashes.txt", "owner")
    assert summary["rows_removed"] == 1 and summary["removed_by_list"]["image_source_sha256"] == 1
    (ledger,) = pq.read_table(tmp_path / "new" / summary["ledger_file"]).to_pylist()
    assert ledger["uid"] == row["uid"] and json.loads(ledger["detail"])["matched"] == ["image_source_sha256"]
    assert verify_manifest(tmp_path / "new") == []


def test_image_hashes_are_computed_from_the_tars_when_the_shards_lack_the_columns(first, tmp_path):
    """A release published without dedup_image: no image_sha256 / image_phash columns."""
    release = tmp_path / "release"
    shutil.copytree(first["release"], release)
    manifest = _manifest(release)
    for entry in manifest["shards"]:
        table = pq.read_table(release / entry["path"])
        pq.write_table(table.drop_columns(["image_sha256", "image_phash"]), release / entry["path"])
        entry.update(file_entry(release, release / entry["path"]))
    (release / MANIFEST_NAME).write_text(json.dumps(manifest))
    rows = _shard(first["release"], 0).to_pylist()
    digest = hashlib.sha256(_tar_image(release, 0, rows[1]["uid"])).hexdigest()
    (tmp_path / "hashes.txt").write_text(f"{digest}\n{format_phash(rows[2]['image_phash'])}\n")
    summary = takedown_release(release, tmp_path / "new", None, None, tmp_path / "hashes.txt", "r")
    assert summary["removed_by_list"]["image_sha256"] >= 1 and summary["removed_by_list"]["image_phash"] >= 1
    assert not {rows[1]["uid"], rows[2]["uid"]} & _published_uids(tmp_path / "new")
    assert verify_manifest(tmp_path / "new") == []


def test_bad_requests_are_clear_errors_and_write_nothing(first, tmp_path):
    release = first["release"]
    with pytest.raises(ValueError, match="at least one list"):
        takedown_release(release, tmp_path / "x", None, None, None, "r")
    (tmp_path / "uids.txt").write_text("a" * 32 + "\nnot-a-uid\n")
    with pytest.raises(BlocklistError, match=r"uids\.txt:2: 'not-a-uid' is not a uid"):
        takedown_release(release, tmp_path / "x", tmp_path / "uids.txt", None, None, "r")
    (tmp_path / "ok.txt").write_text("a" * 32 + "\n")
    with pytest.raises(ValueError, match="must be a folder apart from the release"):
        takedown_release(release, release, tmp_path / "ok.txt", None, None, "r")
    with pytest.raises(ValueError, match="must be a folder apart from the release"):
        takedown_release(release, release / "inner", tmp_path / "ok.txt", None, None, "r")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a release folder"):
        takedown_release(release, tmp_path / "busy", tmp_path / "ok.txt", None, None, "r")
    assert cli_main(["takedown", str(release), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_publish_writers_reproduce_a_published_shard_and_tar_byte_for_byte(first, tmp_path):
    """What makes a rewritten shard what publish would write for the remaining rows: the same writers, given the
    rows of a published shard, give back its exact bytes."""
    import pyarrow as pa

    from curation.ops import tars as tar_ops
    from curation.spark.publish import write_image_tar, write_parquet_shard

    release = first["release"]
    table = _shard(release, 1)
    write_parquet_shard(table.combine_chunks(), tmp_path / "shard.parquet")
    tar = release / "images" / "shard-00001.tar"
    pointers = table.append_column("image_shard", pa.array([tar.name] * table.num_rows))
    pointers = pointers.append_column("image_key", table.column("uid"))
    with tar_ops.TarReader() as reader:
        write_image_tar(pointers, str(tar.parent), tmp_path / "shard.tar", reader, table.schema)
    assert sha256_of_file(tmp_path / "shard.parquet") == sha256_of_file(release / "shards" / "shard-00001.parquet")
    assert sha256_of_file(tmp_path / "shard.tar") == sha256_of_file(tar)
