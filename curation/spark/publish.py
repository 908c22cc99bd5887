"""Publish: the last stage's rows as uid-range parquet shards, the whole run's ledger, and the manifest.

With downloaded images, `images/shard-k.tar` beside `shards/shard-k.parquet` holds the same rows' images as a
webdataset (`<uid>.jpg`, `.txt`, `.json`).

Shard k of S holds the uids whose first 60 bits fall in the k-th of S equal ranges, sorted by uid; S =
ceil(rows / shard_rows). Because the uid is a uniform hash this gives shards of about `shard_rows` rows whose
content depends only on the set of rows, never on partitioning, and a takedown changes only the shards it touches.
"""

import io
import logging
import math
import os
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import LEDGER_DIR, atomic_write_json, canonical_json, sha256_of_json
from curation.manifest import build_manifest, file_entry, read_manifest, release_sha256, tar_entry
from curation.ops import tars as tar_ops
from curation.run_folder import (
    MANIFEST_NAME,
    RELEASE_IMAGES_DIR,
    RELEASE_LEDGER_DIR,
    RELEASE_SHARDS_DIR,
    downloaded_images_dir,
    resolve_data_dir,
    stage_chain,
)
from curation.schema import CAPTION, LEDGER_SCHEMA, UID
from curation.spark.common import arrow_schema_of
from curation.spark.executor import StageContext, StageOutput

logger = logging.getLogger(__name__)

SHARD_ROW_GROUP_ROWS = 65_536
_UID_PREFIX_SPAN = 1 << 60
IMAGE_POINTER_COLUMNS = ("image_shard", "image_key")


def shard_of_prefix_expression(shard_count: int) -> str:
    """Spark SQL giving the shard of a row from its uid (integer arithmetic only, so exact everywhere)."""
    width = -(-_UID_PREFIX_SPAN // shard_count)
    return f"cast(div(cast(conv(substring({UID}, 1, 15), 16, 10) as bigint), {width}) as int)"


def write_parquet_shard(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    pq.write_table(table, temporary, compression="zstd", row_group_size=SHARD_ROW_GROUP_ROWS, write_statistics=True)
    os.replace(temporary, path)


def _json_value(value):
    """A row value as JSON can hold it: NaN and infinities as null (JSON has none), dates, times and decimals as
    their ISO/decimal text, lists and maps element by element."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | str):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def write_image_tar(table: pa.Table, images_dir: str, path: Path, reader: tar_ops.TarReader,
                     schema: pa.Schema) -> None:
    """The shard's samples as a webdataset tar (`<uid>.jpg`, `<uid>.txt`, `<uid>.json` with the row's published
    columns, binary ones left out), byte-identical for the same rows: members in uid order with fixed owner, mode
    and time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    record_columns = [field.name for field in schema
                      if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type))]
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in table.to_pylist():
            found = reader.image(os.path.join(images_dir, row["image_shard"]), row["image_key"])
            if found is None:
                raise ValueError(f"uid {row[UID]}: no image for key {row['image_key']} in {row['image_shard']}")
            extension, image = found
            sample = {
                extension: image,
                "txt": row[CAPTION].encode(),
                "json": canonical_json({name: _json_value(row[name]) for name in record_columns}).encode(),
            }
            for member_extension, data in sample.items():
                info = tarfile.TarInfo(f"{row[UID]}.{member_extension}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(temporary, path)


def _shard_worker(out_dir: str, prefix: str, schema: pa.Schema, images_dir: str | None):
    """Writes each shard of a partition (rows arrive sorted by shard, then by the sort columns), and with
    `images_dir` its image tar beside it."""

    def run(batches):
        current, pending = None, []
        reader = tar_ops.TarReader()

        def flush():
            table = pa.Table.from_batches(pending)
            path = Path(out_dir) / f"{prefix}-{current:05d}.parquet"
            write_parquet_shard(table.select(schema.names).cast(schema).combine_chunks(), path)
            tar_path = None
            if images_dir is not None:
                tar_path = Path(out_dir).parent / RELEASE_IMAGES_DIR / f"{prefix}-{current:05d}.tar"
                write_image_tar(table, images_dir, tar_path, reader, schema)
            columns = [pa.array([current], pa.int32()), pa.array([str(path)]),
                       pa.array([str(tar_path) if tar_path else None], pa.string())]
            return pa.RecordBatch.from_arrays(columns, ["shard", "path", "tar"])

        try:
            for batch in batches:
                shards = batch.column("_shard").to_numpy()
                start = 0
                while start < len(shards):
                    shard = int(shards[start])
                    end = start
                    while end < len(shards) and shards[end] == shard:
                        end += 1
                    if current is not None and shard != current:
                        yield flush()
                        pending = []
                    current = shard
                    pending.append(batch.slice(start, end - start))
                    start = end
            if pending:
                yield flush()
        finally:
            reader.close()

    return run


def write_uid_shards(df, rows: int, shard_rows: int, out_dir: Path, prefix: str, schema: pa.Schema,
                     sort_columns: list[str], images_dir: Path | None = None) -> list[tuple[Path, Path | None]]:
    """(parquet shard, image tar or None) per uid-range shard, in shard order."""
    from pyspark.sql import functions as F

    shard_count = max(1, math.ceil(rows / shard_rows))
    sharded = df.withColumn("_shard", F.expr(shard_of_prefix_expression(shard_count)))
    sharded = sharded.repartition(shard_count, "_shard").sortWithinPartitions("_shard", *sort_columns)
    worker = _shard_worker(str(out_dir), prefix, schema, str(images_dir) if images_dir else None)
    written = sharded.mapInArrow(worker, "shard int, path string, tar string").collect()
    return [(Path(row["path"]), Path(row["tar"]) if row["tar"] else None)
            for row in sorted(written, key=lambda row: row["shard"])]


def _stage_summary(folder: Path, record: dict) -> dict:
    return {
        "stage": record["stage"],
        "folder": folder.name,
        "version": record["version"],
        "rows_in": record["rows_in"],
        "rows_out": record["rows_out"],
        "drops": record["drops"],
        "seconds": record["seconds"],
    }


def run_publish(context: StageContext) -> StageOutput:
    """Write the release folder: shards/, ledger/, manifest.json (the executor adds the record, `_SUCCESS` last)."""
    spark, input_dir, config, run_config = context.spark, context.input_dir, context.config, context.run_config
    shard_rows = context.options["shard_rows"]
    chain = stage_chain(input_dir)
    last_record = chain[-1][1]
    data_df = spark.read.parquet(str(resolve_data_dir(input_dir)))
    # With downloaded images the release carries them as tars; the rows' pointers into the run's download tars
    # mean nothing outside the run and are left out.
    images_dir = downloaded_images_dir(input_dir) if "image_shard" in data_df.columns else None
    data_schema = arrow_schema_of(data_df.drop(*IMAGE_POINTER_COLUMNS) if images_dir else data_df)

    ledger_folders = [str(folder / LEDGER_DIR) for folder, _ in chain if (folder / LEDGER_DIR).is_dir()]
    ledger_df = spark.read.schema(
        "uid string, stage string, reason string, related_uid string, detail string"
    ).parquet(*ledger_folders)
    ledger_rows = sum(record["rows_in"] - record["rows_out"] for _, record in chain)

    release_dir = context.building_dir
    written = write_uid_shards(
        data_df, last_record["rows_out"], shard_rows, release_dir / RELEASE_SHARDS_DIR, "shard", data_schema, [UID],
        images_dir,
    )
    shard_paths = [path for path, _ in written]
    image_shards = [tar_entry(release_dir, tar, rows=file_entry(release_dir, path)["rows"])
                    for path, tar in written if tar is not None]
    ledger_paths = [path for path, _ in write_uid_shards(
        ledger_df, ledger_rows, shard_rows, release_dir / RELEASE_LEDGER_DIR, "ledger", LEDGER_SCHEMA,
        ["uid", "stage", "reason", "related_uid", "detail"],
    )]
    ingest_record = chain[0][1]
    inputs = [
        {**f, "fingerprint": ingest_record["input"]["fingerprint"]} for f in ingest_record["input"]["files"]
    ]
    metadata = next((r["metadata"] for _, r in reversed(chain) if r["stage"] == "match"), None)
    balancing_points = [{"stage_folder": folder.name, "rows_in": r["rows_in"], "rows_out": r["rows_out"],
                         **r["balancing"]} for folder, r in chain if r["stage"] == "balance"]
    # Spark settings (master, partitions) change how, not what: they are recorded as volatile execution data.
    execution = {"spark": (run_config or {}).get("spark"), "spark_version": spark.version}
    config_for_manifest = (
        {k: v for k, v in run_config.items() if k != "spark"} if run_config is not None
        else {"publish": config}
    )

    manifest = build_manifest(
        name=context.options["name"],
        config=config_for_manifest,
        config_sha256=sha256_of_json(config_for_manifest),
        inputs=inputs,
        skipped_inputs=ingest_record["input"].get("skipped_files", []),
        stages=[_stage_summary(folder, record) for folder, record in chain],
        shards=[file_entry(release_dir, p) for p in shard_paths],
        image_shards=image_shards,
        ledger_files=[file_entry(release_dir, p) for p in ledger_paths],
        metadata=metadata and {**metadata, "path": Path(metadata["path"]).name},
        balancing=balancing_points[-1] if balancing_points else None,
        balancing_points=balancing_points,
        execution=execution,
    )

    atomic_write_json(release_dir / MANIFEST_NAME, manifest)
    totals = manifest["totals"]
    if totals["rows_in"] != totals["rows_published"] + totals["rows_in_ledger"]:
        raise RuntimeError(f"ledger invariant broken at publish: {totals}")
    # From the file as written, so the digest is the one `curation verify --expect-sha256` recomputes.
    digest = release_sha256(read_manifest(release_dir / MANIFEST_NAME))
    logger.info("published %d rows in %d shards; release sha256: %s", totals["rows_published"], len(shard_paths),
                digest)
    return StageOutput(rows_out=totals["rows_published"],
                       record={"manifest": MANIFEST_NAME, "shards": len(shard_paths), "release_sha256": digest})
