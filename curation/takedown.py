"""`curation takedown RELEASE --output NEW_RELEASE`: a new release without the samples a takedown request names.

A request is up to three lists (at least one), each a UTF-8 text file, one entry a line, blank lines and lines
starting with '#' ignored, anything after an entry's first whitespace a comment:
- uids (`--uids`): 32 hex digits each;
- urls (`--urls`): compared after the url normalisation of dedup_exact and the ingest blocklist
  (`curation.ops.urls.normalise_url`: scheme case, the WHATWG host (percent-decoded, lowercased, punycode, an IPv4
  number as a dotted quad, no trailing dot), default port, fragment);
- image hashes (`--image-hashes`): the sha256 of a published image's bytes (64 hex digits: `sha256sum` of the
  `<uid>.jpg` in the release's tar) or of the original file as it was downloaded (the shards' `image_source_sha256`
  column, written by the download stage: a data owner hashes the file they published, not the resized copy the
  release holds), or its 64-bit perceptual hash (16 hex digits, `curation.ops.imagehash`; the `image_phash` column
  viewed unsigned), matched exactly (Hamming distance 0): a takedown removes the images that were named, while the
  block_images stage is the place for near-duplicate matching before a release is built. The published image's
  hashes are the shards' `image_sha256` / `image_phash` columns when dedup_image ran (the sha256 of the same bytes
  the tars hold), else they are computed from the images in the tars.

Every sample matching any list is removed. The new release keeps the old one's layout: shard k holds the same
uid range, so a shard and its image tar with nothing removed are copied byte for byte (checked against the old
manifest's sha256 while copying), and a changed shard and its tar are rewritten by publish's own writers from the
remaining rows: byte-identical to what publish writes for those rows. A shard left empty is dropped, as publish
writes no empty shard. The old ledger files are copied; the removed rows go to a new ledger file
`ledger/takedown-NNNNN.parquet` (NNNNN counts the takedowns in the release's lineage; stage `takedown`, reason
`takedown`, detail JSON `{"request_reason": ..., "matched": [lists that matched: uid, url, image_sha256,
image_source_sha256, image_phash], ...}`), so rows in = rows published + rows in the ledger still holds. The
manifest gains a `takedown` stage summary and a `takedown` section (the request's files with their sha256, counts,
unknown uids), and `replaces` names the release it supersedes (dataset name, manifest path and sha256, created), so
successive takedowns chain.

Every shard, image tar and ledger path of the old manifest is checked (`curation.manifest.safe_member`, the rule
`curation verify` applies) before anything is read or written: the manifest is input, and a path that is absolute or
climbs out with `..` would otherwise make the copy overwrite a file outside the release.

The new release is built in a hidden temporary folder beside `output_dir` and renamed into place with `_SUCCESS`
written last (`curation.io.StageWriter`), like a published release; the old release is never modified. No Spark:
pyarrow over the shards, one shard in memory at a time.
"""

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io import StageWriter, atomic_write_json, sha256_of_file
from curation.manifest import build_manifest, file_entry, read_manifest, safe_member, tar_entry
from curation.ops import tars as tar_ops
from curation.ops.blocklists import BlocklistError, load_url_blocklist
from curation.ops.image_blocklist import load_image_hash_list, sha256_matches
from curation.ops.imagehash import DecodeFailure, PhashIndex, decode_image, image_sha256, perceptual_hash
from curation.ops.urls import normalise_urls
from curation.run_folder import MANIFEST_NAME, RELEASE_LEDGER_DIR, is_complete, locate_manifest
from curation.schema import LEDGER_SCHEMA, UID, URL, Reason
from curation.spark.common import StageRun
from curation.spark.publish import write_image_tar, write_parquet_shard

logger = logging.getLogger(__name__)

STAGE = "takedown"
# 2: a listed sha256 also matches the shards' image_source_sha256, counted and named in the detail as its own list.
TAKEDOWN_VERSION = 2
LEDGER_PREFIX = "takedown"
_UID = re.compile(r"[0-9a-fA-F]{32}")
_COPY_CHUNK = 1 << 20
# How many unknown uids / unmatched urls the summary lists by value (all are counted).
_LISTED = 100


def load_uid_list(path: Path) -> frozenset[str]:
    """The lowercase uids of a uid list file (32 hex digits a line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BlocklistError(f"cannot read uid list {path}: {error}") from error
    uids = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = entry.split(None, 1)[0]
        if not _UID.fullmatch(entry):
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a uid (32 hex digits)")
        uids.add(entry.lower())
    return frozenset(uids)


def _copy_verified(source: Path, target: Path, entry: dict) -> None:
    """Copy `source` byte for byte, checking its size and sha256 against its manifest `entry` on the way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
    if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
        raise ValueError(f"{source}: {size} bytes with sha256 {digest.hexdigest()}, but the release's manifest says "
                         f"{entry['bytes']} bytes with sha256 {entry['sha256']}: the release is damaged (run "
                         "`curation verify` on it)")


def _tar_images(tar_path: Path, uids: list[str]) -> list[bytes | None]:
    """The image bytes of each uid's sample in a release tar (None where it has none)."""
    index = tar_ops.index_tar(tar_path)
    images = []
    with open(tar_path, "rb") as handle:
        for uid in uids:
            files = index.get(uid, {})
            extension = tar_ops.image_extension(files)
            images.append(tar_ops.read_member(handle, files[extension]) if extension else None)
    return images


class _Request:
    """The lists of a takedown request and what matched them."""

    def __init__(self, uids_file: Path | None, urls_file: Path | None, image_hashes_file: Path | None):
        self.files = {name: Path(path) for name, path in
                      (("uids", uids_file), ("urls", urls_file), ("image_hashes", image_hashes_file)) if path}
        if not self.files:
            raise ValueError("a takedown needs at least one list: --uids, --urls or --image-hashes")
        self.uids = load_uid_list(self.files["uids"]) if "uids" in self.files else frozenset()
        self.urls = load_url_blocklist(self.files["urls"]) if "urls" in self.files else frozenset()
        self.sha256, phashes = (load_image_hash_list(self.files["image_hashes"]) if "image_hashes" in self.files
                                else (frozenset(), np.zeros(0, dtype=np.uint64)))
        self.phash = PhashIndex(phashes, 0)
        self.found_uids: set[str] = set()
        self.found_urls: set[str] = set()
        self.found_sha256: set[str] = set()
        # Indexes of the listed phashes matched: the list is distinct, so the unmatched ones are counted from it.
        self.found_phash: set[int] = set()

    @property
    def wants_images(self) -> bool:
        return bool(self.sha256) or len(self.phash) > 0

    def matches(self, table: pa.Table, tar_path: Path | None) -> tuple[np.ndarray, list[list[str]]]:
        """(rows to remove, the lists each matched) for one shard's rows."""
        rows = table.num_rows
        uids = table.column(UID).to_pylist()
        by_uid = np.zeros(rows, dtype=bool)
        if self.uids and rows:
            by_uid = pc.is_in(table.column(UID).combine_chunks(), value_set=pa.array(sorted(self.uids), pa.string()))
            by_uid = by_uid.to_numpy(zero_copy_only=False).astype(bool)
        self.found_uids.update(u for u, hit in zip(uids, by_uid, strict=True) if hit)
        by_url = np.zeros(rows, dtype=bool)
        if self.urls:
            normalised = normalise_urls(table.column(URL)).to_pylist()
            by_url = np.fromiter((u is not None and u in self.urls for u in normalised), dtype=bool, count=rows)
            self.found_urls.update(u for u, hit in zip(normalised, by_url, strict=True) if hit)
        by_sha256, by_source, by_phash = (np.zeros(rows, dtype=bool) for _ in range(3))
        if self.wants_images and rows:
            digests, sources, phashes = self._image_keys(table, tar_path, uids)
            if self.sha256:
                by_sha256 = sha256_matches(digests, self.sha256)
                by_source = sha256_matches(sources, self.sha256)
                self.found_sha256.update(d for d, hit in zip(digests, by_sha256, strict=True) if hit)
                self.found_sha256.update(d for d, hit in zip(sources, by_source, strict=True) if hit)
            if len(self.phash):
                valid = np.asarray([p is not None for p in phashes], dtype=bool)
                values = np.asarray([p if p is not None else 0 for p in phashes], dtype=np.uint64)
                nearest, _ = self.phash.nearest(values)
                by_phash = valid & (nearest >= 0)
                self.found_phash.update(nearest[by_phash].tolist())
        matched = [[name for name, hit in (("uid", by_uid[i]), ("url", by_url[i]), ("image_sha256", by_sha256[i]),
                                           ("image_source_sha256", by_source[i]), ("image_phash", by_phash[i])) if hit]
                   for i in range(rows)]
        return by_uid | by_url | by_sha256 | by_source | by_phash, matched

    def _image_keys(self, table: pa.Table, tar_path: Path | None, uids: list[str]):
        """sha256 of each row's published image, sha256 of its original file (both lowercase hex) and unsigned phash
        of its published image, None where not needed or not known (the original's only from image_source_sha256:
        the original bytes are not in the release)."""
        rows = table.num_rows
        digests: list = [None] * rows
        sources: list = [None] * rows
        phashes: list = [None] * rows
        if self.sha256 and "image_source_sha256" in table.column_names:
            sources = [d.lower() if d else None for d in table.column("image_source_sha256").to_pylist()]
        need_sha256 = bool(self.sha256) and "image_sha256" not in table.column_names
        need_phash = len(self.phash) > 0 and "image_phash" not in table.column_names
        if self.sha256 and not need_sha256:
            digests = [d.lower() if d else None for d in table.column("image_sha256").to_pylist()]
        if len(self.phash) and not need_phash:
            phashes = [None if v is None else v & ((1 << 64) - 1) for v in table.column("image_phash").to_pylist()]
        if need_sha256 or need_phash:
            if tar_path is None:
                raise ValueError("the request lists image hashes, but the release has no images (no image tars) "
                                 "and its shards no image_sha256 / image_phash columns")
            for row, data in enumerate(_tar_images(tar_path, uids)):
                if data is None:
                    continue
                if need_sha256:
                    digests[row] = image_sha256(data)
                if need_phash:
                    decoded = decode_image(data)
                    if not isinstance(decoded, DecodeFailure):
                        phashes[row] = perceptual_hash(decoded.image)
        return digests, sources, phashes

    def report(self) -> dict:
        unknown = sorted(self.uids - self.found_uids)
        unmatched_urls = sorted(self.urls - self.found_urls)
        return {
            "requested": {"uids": len(self.uids), "urls": len(self.urls), "image_sha256": len(self.sha256),
                          "image_phash": len(self.phash)},
            "unknown_uids": len(unknown),
            "unknown_uids_listed": unknown[:_LISTED],
            "unmatched_urls": len(unmatched_urls),
            "unmatched_urls_listed": unmatched_urls[:_LISTED],
            "unmatched_image_hashes": (len(self.sha256 - self.found_sha256)
                                       + len(self.phash) - len(self.found_phash)),
        }


def _check_output(release_dir: Path, output_dir: Path) -> None:
    release, output = release_dir.resolve(), output_dir.resolve()
    if output == release or release in output.parents or output in release.parents:
        raise ValueError(f"the new release {output_dir} must be a folder apart from the release {release_dir} "
                         "(a takedown never modifies the release it starts from)")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output_dir} exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not (is_complete(output) and (output / MANIFEST_NAME).is_file()):
        raise ValueError(f"{output_dir} exists and is not a release folder: refusing to replace it")


def _check_member_paths(manifest_path: Path, manifest: dict) -> None:
    """ValueError naming the manifest and the entry when a shard, image tar or ledger path would leave the release
    folder; called before anything is read or written, so that the plain joins on these paths afterwards are safe."""
    sections = (("shards", manifest["shards"]), ("image_shards", manifest["image_shards"]),
                ("ledger files", manifest["ledger"]["files"]))
    for section, entries in sections:
        for entry in entries:
            try:
                safe_member(manifest_path.parent, entry.get("path"))
            except ValueError as error:
                raise ValueError(f"{manifest_path}: {section} entry {entry!r}: {error}; refusing to read or write "
                                 "through it (run `curation verify` on the release)") from error


def _twin_tars(manifest: dict) -> dict[str, dict]:
    """The image tar entry of each shard path (shards/shard-k.parquet -> images/shard-k.tar)."""
    by_stem = {Path(entry["path"]).stem: entry for entry in manifest["image_shards"]}
    return {entry["path"]: by_stem[Path(entry["path"]).stem] for entry in manifest["shards"]
            if Path(entry["path"]).stem in by_stem}


def takedown_release(
    release_dir: Path, output_dir: Path, uids_file: Path | None, urls_file: Path | None,
    image_hashes_file: Path | None, reason: str,
) -> dict:
    """Write `output_dir`: the release at `release_dir` without every sample the request's lists match (module
    docstring). Returns a summary: rows removed (in all and per list), shards rewritten, reused and dropped, the
    request's unknown uids and unmatched entries, the new manifest's path and what it replaces."""
    started = time.time()
    manifest_path = locate_manifest(Path(release_dir))
    release_dir, output_dir = manifest_path.parent, Path(output_dir)
    _check_output(release_dir, output_dir)
    request = _Request(uids_file, urls_file, image_hashes_file)
    manifest = read_manifest(manifest_path)
    _check_member_paths(manifest_path, manifest)
    manifest_sha256 = sha256_of_file(manifest_path)
    previous = manifest.get("takedown") or {}
    sequence = int(previous.get("sequence", 0)) + 1
    tars = _twin_tars(manifest)
    config = {
        "stage": STAGE, "reason": reason,
        "lists": {name: {"path": str(path), "sha256": sha256_of_file(path)} for name, path in request.files.items()},
        "replaces_sha256": manifest_sha256,
    }
    run = StageRun(STAGE, TAKEDOWN_VERSION, config)

    rows_before = sum(entry["rows"] for entry in manifest["shards"])
    removed_uids: list[str] = []
    removed_details: list[str] = []
    by_list = {"uid": 0, "url": 0, "image_sha256": 0, "image_source_sha256": 0, "image_phash": 0}
    shards, image_shards = [], []
    counts = {"shards_reused": 0, "shards_rewritten": 0, "shards_dropped": 0}
    with StageWriter(output_dir) as writer:
        root = writer.temp_dir
        for entry in manifest["shards"]:
            source = release_dir / entry["path"]
            tar = tars.get(entry["path"])
            tar_path = release_dir / tar["path"] if tar else None
            # Only the columns the lists are matched on are read; a shard with a match is read whole afterwards.
            names = pq.read_schema(source).names
            keys = pq.read_table(source, columns=[c for c in (UID, URL, "image_sha256", "image_source_sha256",
                                                              "image_phash") if c in names])
            remove, matched = request.matches(keys, tar_path)
            if not remove.any():
                _copy_verified(source, root / entry["path"], entry)
                shards.append(dict(entry))
                if tar:
                    _copy_verified(tar_path, root / tar["path"], tar)
                    image_shards.append(dict(tar))
                counts["shards_reused"] += 1
                continue
            for path, expected in ((source, entry), (tar_path, tar)):
                if path is not None and sha256_of_file(path) != expected["sha256"]:
                    raise ValueError(f"{path}: sha256 differs from the release's manifest: the release is damaged "
                                     "(run `curation verify` on it)")
            table = pq.read_table(source)
            uids = table.column(UID).to_pylist()
            if uids != keys.column(UID).to_pylist():
                raise RuntimeError(f"{source} changed while the takedown read it")
            for row in np.flatnonzero(remove):
                removed_uids.append(uids[row])
                for name in matched[row]:
                    by_list[name] += 1
                removed_details.append(json.dumps({"request_reason": reason, "matched": matched[row],
                                                   "release_shard": entry["path"]}, sort_keys=True))
            kept = table.filter(pa.array(~remove))
            if kept.num_rows == 0:
                counts["shards_dropped"] += 1
                continue
            target = root / entry["path"]
            write_parquet_shard(kept.combine_chunks(), target)
            shards.append(file_entry(root, target))
            if tar:
                tar_target = root / tar["path"]
                pointers = kept.append_column("image_shard", pa.array([tar_path.name] * kept.num_rows, pa.string()))
                pointers = pointers.append_column("image_key", kept.column(UID))
                with tar_ops.TarReader() as reader:
                    write_image_tar(pointers, str(tar_path.parent), tar_target, reader, kept.schema)
                image_shards.append(tar_entry(root, tar_target, rows=kept.num_rows))
            counts["shards_rewritten"] += 1

        ledger_files = []
        for entry in manifest["ledger"]["files"]:
            _copy_verified(release_dir / entry["path"], root / entry["path"], entry)
            ledger_files.append(dict(entry))
        ledger_path = None
        if removed_uids:
            order = np.argsort(np.asarray(removed_uids), kind="stable")
            ledger = pa.table({
                "uid": pa.array([removed_uids[i] for i in order], pa.string()),
                "stage": pa.array([STAGE] * len(order), pa.string()),
                "reason": pa.array([Reason.TAKEDOWN] * len(order), pa.string()),
                "related_uid": pa.nulls(len(order), pa.string()),
                "detail": pa.array([removed_details[i] for i in order], pa.string()),
            }, schema=LEDGER_SCHEMA)
            ledger_path = root / RELEASE_LEDGER_DIR / f"{LEDGER_PREFIX}-{sequence:05d}.parquet"
            if ledger_path.exists():
                raise ValueError(f"{ledger_path.name} is already a ledger file of {release_dir}")
            write_parquet_shard(ledger, ledger_path)
            ledger_files.append(file_entry(root, ledger_path))

        rows_removed = len(removed_uids)
        rows_after = rows_before - rows_removed
        drops = {Reason.TAKEDOWN: rows_removed} if rows_removed else {}
        stage_summary = {"stage": STAGE, "folder": None, "version": TAKEDOWN_VERSION, "rows_in": rows_before,
                         "rows_out": rows_after, "drops": drops, "seconds": round(time.time() - started, 3)}
        replaces = {"name": manifest["dataset"], "path": str(manifest_path.resolve()), "sha256": manifest_sha256,
                    "created": manifest["created"]}
        new_manifest = build_manifest(
            name=manifest["dataset"], config=manifest["config"], config_sha256=manifest["config_sha256"],
            inputs=manifest["inputs"], skipped_inputs=manifest["skipped_inputs"],
            stages=[*manifest["stages"], stage_summary], shards=shards, ledger_files=ledger_files,
            metadata=manifest["metadata"], balancing=manifest["balancing"],
            execution={"command": "takedown"}, replaces=replaces, image_shards=image_shards,
            balancing_points=manifest["balancing_points"],
        )
        report = request.report()
        new_manifest["takedown"] = {
            "sequence": sequence, "reason": reason, "lists": config["lists"], "rows_removed": rows_removed,
            "removed_by_list": by_list,
            "ledger_file": ledger_path.relative_to(root).as_posix() if ledger_path else None,
            **report, **counts,
        }
        totals = new_manifest["totals"]
        if totals["rows_in"] != totals["rows_published"] + totals["rows_in_ledger"]:
            raise RuntimeError(f"ledger invariant broken by the takedown: {totals}")
        atomic_write_json(root / MANIFEST_NAME, new_manifest)
        record = run.record({"release": writer.link_to(release_dir), "manifest_sha256": manifest_sha256},
                            rows_before, rows_after, drops, manifest=MANIFEST_NAME, shards=len(shards))
        writer.commit(record)
    summary = {
        "release": str(output_dir), "manifest": str(output_dir / MANIFEST_NAME), "replaces": replaces,
        "rows_before": rows_before, "rows_after": rows_after, "rows_removed": rows_removed,
        "removed_by_list": by_list, "ledger_file": new_manifest["takedown"]["ledger_file"], **counts, **report,
    }
    logger.info("takedown: %d of %d rows removed (%s); %d shards rewritten, %d reused, %d dropped -> %s",
                rows_removed, rows_before, by_list, counts["shards_rewritten"], counts["shards_reused"],
                counts["shards_dropped"], summary["manifest"])
    if report["unknown_uids"]:
        logger.warning("takedown: %d requested uid(s) are not published in %s (e.g. %s)", report["unknown_uids"],
                       release_dir, report["unknown_uids_listed"][:5])
    return summary
