"""Spark adapter of block_images: drop every image on a sha256 blocklist, or within a Hamming distance of a listed
perceptual hash (`curation.ops.image_blocklist`), with reason `blocked_image`.

A listed sha256 is matched against both the stored image's sha256 and, where the rows carry it, the download
stage's `image_source_sha256` (of the original file as served, before resizing and re-encoding): a data owner hashes
the file they published, which is not the bytes this pipeline stores.

The image keys come from the rows when an upstream dedup_image stage wrote them (`image_sha256`, `image_phash`), and
are otherwise computed from the images, read as dedup_image reads them: the rows' image-bytes column
(`image_column`), or else the upstream download stage's tars the rows point to. Only what a list needs is computed
(sha256 of the bytes for the sha256 list, a decode and the DCT pHash for the phash list). The lists are broadcast to
every task (they are small next to the corpus; see the ops module). An image that cannot be read or decoded is
not hashed and so not blocked by the phash list (dedup_image is the stage that drops undecodable images); the stage
record counts such rows (`unhashed`). Rows pass through unchanged: the stage adds no columns.

Ledger detail (JSON): `{"list": "sha256", "matched": "image_sha256" | "image_source_sha256", "sha256": <the blocked
digest>}` (which of the row's two digests was listed; the stored one when both were), or `{"list": "phash",
"blocked_phash": <16 hex>, "image_phash": <16 hex>, "distance": <bits>}`; an image on both lists is reported by its
sha256.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.ops.image_blocklist import format_phash, load_phash_list, load_sha256_list, sha256_matches
from curation.ops.imagehash import DecodeFailure, PhashIndex, decode_image, image_sha256, perceptual_hash
from curation.schema import UID, Reason
from curation.spark.executor import StageContext
from curation.spark.rowfilter import DropRule, FilterPlan

logger = logging.getLogger(__name__)

_BLOCK_DETAIL = "_block_detail"  # the ledger detail of a blocked row; null on the others
_KEYS_SCHEMA = f"{UID} string, _sha256 string, _phash long"
_MATCHES_SCHEMA = f"{UID} string, _block_list string, {_BLOCK_DETAIL} string"


def _hash_worker(image_column: str, want_sha256: bool, want_phash: bool):
    """(uid, _sha256, _phash) of each row's image bytes; null where not wanted, no image, or (phash) undecodable."""

    def run(batches):
        for batch in batches:
            digests, hashes = [], []
            for data in batch.column(image_column).to_pylist():
                digests.append(image_sha256(data) if want_sha256 and data is not None else None)
                phash = None
                if want_phash and data is not None:
                    decoded = decode_image(data)
                    if not isinstance(decoded, DecodeFailure):
                        # A signed long carries the 64 bits, as dedup_image's image_phash.
                        phash = int(np.uint64(perceptual_hash(decoded.image)).view(np.int64))
                hashes.append(phash)
            yield pa.RecordBatch.from_arrays(
                [batch.column(UID), pa.array(digests, pa.string()), pa.array(hashes, pa.int64())],
                names=[UID, "_sha256", "_phash"],
            )

    return run


def _match_worker(sha256_broadcast, phash_broadcast, max_distance: int):
    """(uid, list, detail) of the rows whose image is blocked; other rows are left out."""

    def run(batches):
        blocked_sha256 = sha256_broadcast.value
        blocked_phash = phash_broadcast.value
        index = PhashIndex(blocked_phash, max_distance)
        for batch in batches:
            digests = batch.column("_sha256").to_pylist()
            sources = batch.column("_source_sha256").to_pylist()
            by_stored = sha256_matches(digests, blocked_sha256)
            by_source = sha256_matches(sources, blocked_sha256) & ~by_stored
            by_sha256 = by_stored | by_source
            phashes = batch.column("_phash")
            has_phash = np.asarray(phashes.is_valid())
            nearest, distance = index.nearest(np.asarray(phashes.fill_null(0)).view(np.uint64))
            by_phash = has_phash & (nearest >= 0) & ~by_sha256
            rows = np.flatnonzero(by_sha256 | by_phash)
            if len(rows) == 0:
                continue
            uids = batch.column(UID).take(pa.array(rows))
            lists, details = [], []
            for row in rows:
                if by_sha256[row]:
                    matched, digest = (("image_sha256", digests[row]) if by_stored[row]
                                       else ("image_source_sha256", sources[row]))
                    lists.append("sha256")
                    details.append(json.dumps({"list": "sha256", "matched": matched, "sha256": digest.lower()},
                                              sort_keys=True))
                else:
                    lists.append("phash")
                    details.append(json.dumps({
                        "list": "phash", "blocked_phash": format_phash(blocked_phash[nearest[row]]),
                        "image_phash": format_phash(phashes[int(row)].as_py()), "distance": int(distance[row]),
                    }, sort_keys=True))
            yield pa.RecordBatch.from_arrays([uids, pa.array(lists, pa.string()), pa.array(details, pa.string())],
                                             names=[UID, "_block_list", _BLOCK_DETAIL])

    return run


def _image_keys(df, input_dir: Path, image_column: str, want_sha256: bool, want_phash: bool,
                partitions: int | None):
    """(uid, _sha256, _source_sha256, _phash) for every row, from the rows' precomputed columns where they have them,
    else from the images; and where the keys came from. `_source_sha256` is only ever a column (the download stage's
    image_source_sha256): the original bytes are not kept, so it cannot be computed."""
    from pyspark.sql import functions as F

    from curation.spark.download import row_images

    compute_sha256 = want_sha256 and "image_sha256" not in df.columns
    compute_phash = want_phash and "image_phash" not in df.columns
    use_source = want_sha256 and "image_source_sha256" in df.columns
    precomputed = df.select(
        UID,
        (F.col("image_sha256") if want_sha256 and not compute_sha256 else F.lit(None)).cast("string").alias("_sha256"),
        (F.col("image_source_sha256") if use_source else F.lit(None)).cast("string").alias("_source_sha256"),
        (F.col("image_phash") if want_phash and not compute_phash else F.lit(None)).cast("long").alias("_phash"),
    )
    source_sha256 = "column image_source_sha256" if use_source else None
    if not (compute_sha256 or compute_phash):
        return precomputed, {"sha256": "column image_sha256" if want_sha256 else None,
                             "source_sha256": source_sha256, "phash": "column image_phash" if want_phash else None}
    images, source = row_images(df, input_dir, image_column, partitions,
                                ", nor image_sha256 / image_phash from dedup_image,")
    computed = images.mapInArrow(_hash_worker(image_column, compute_sha256, compute_phash), _KEYS_SCHEMA)
    keys = precomputed.join(computed.select(UID, F.col("_sha256").alias("_c_sha256"),
                                            F.col("_phash").alias("_c_phash")), UID, "left")
    keys = keys.select(UID, F.coalesce("_sha256", "_c_sha256").alias("_sha256"), "_source_sha256",
                       F.coalesce("_phash", "_c_phash").alias("_phash"))
    sources = {"sha256": (source if compute_sha256 else "column image_sha256") if want_sha256 else None,
               "source_sha256": source_sha256,
               "phash": (source if compute_phash else "column image_phash") if want_phash else None}
    return keys, sources


def block_images_plan(context: StageContext, df) -> FilterPlan:
    """Drop the rows whose image is on the sha256 list (`sha256_file`) or within `max_distance` bits of a hash on
    the perceptual-hash list (`phash_file`)."""
    from pyspark.sql import functions as F

    options = context.typed
    blocked_sha256 = load_sha256_list(Path(options.sha256_file)) if options.sha256_file else frozenset()
    blocked_phash = (load_phash_list(Path(options.phash_file)) if options.phash_file
                     else np.zeros(0, dtype=np.uint64))
    logger.info("block_images: %d sha256 digests, %d perceptual hashes (max distance %d)", len(blocked_sha256),
                len(blocked_phash), options.max_distance)

    want_sha256, want_phash = bool(blocked_sha256), len(blocked_phash) > 0
    summary = {"sha256_entries": len(blocked_sha256), "phash_entries": int(len(blocked_phash)),
               "max_distance": options.max_distance, "matched_by": {"sha256": 0, "phash": 0}, "unhashed": 0}
    if not (want_sha256 or want_phash):
        logger.warning("block_images: the lists hold no hash; every row passes")
        return FilterPlan(record={"block_images": summary})
    keys, summary["key_sources"] = _image_keys(df, context.input_dir, options.image_column, want_sha256, want_phash,
                                               context.partitions)
    keys = keys.localCheckpoint()
    unhashed = F.lit(False)
    if want_sha256:
        unhashed = unhashed | F.col("_sha256").isNull()
    if want_phash:
        unhashed = unhashed | F.col("_phash").isNull()
    summary["unhashed"] = keys.filter(unhashed).count()
    matches = keys.mapInArrow(
        _match_worker(context.broadcast(blocked_sha256), context.broadcast(blocked_phash), options.max_distance),
        _MATCHES_SCHEMA).localCheckpoint()
    summary["matched_by"].update({row[0]: row[1] for row in matches.groupBy("_block_list").count().collect()})
    return FilterPlan(rows=df.join(matches, UID, "left"), drops=(DropRule(_BLOCK_DETAIL, Reason.BLOCKED_IMAGE),),
                      record={"block_images": summary})
