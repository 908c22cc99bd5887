"""What every Spark stage adapter shares: tagging rows as kept or dropped, writing both, and the stage record."""

import logging
import time
from datetime import UTC, datetime

import pyarrow as pa

import curation
from curation.io import sha256_of_json
from curation.schema import TAG_DETAIL, TAG_FIELDS, TAG_REASON, TAG_RELATED_UID, TAG_STAGE, UID

logger = logging.getLogger(__name__)


def spark_schema(arrow_schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def arrow_schema_of(df) -> pa.Schema:
    """The Arrow schema mapInArrow hands a worker for the rows of a Spark DataFrame."""
    from pyspark.sql.pandas.types import to_arrow_type

    return pa.schema([pa.field(f.name, to_arrow_type(f.dataType)) for f in df.schema.fields])


def with_tags(data_schema: pa.Schema) -> pa.Schema:
    return pa.schema(list(data_schema) + TAG_FIELDS)


def tag_kept(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """Kept rows in the tagged schema (tag columns null)."""
    columns = {name: table.column(name) for name in schema.names if name in table.column_names}
    rows = len(table)
    for field in schema:
        if field.name not in columns:
            columns[field.name] = pa.nulls(rows, field.type)
    return pa.Table.from_pydict(columns, schema=schema).combine_chunks().to_batches()[0] if rows else _empty(schema)


def tag_dropped(
    uids: pa.Array, stage: str, reasons: pa.Array | str, schema: pa.Schema, related=None, details=None
) -> pa.RecordBatch:
    """Dropped rows in the tagged schema: only uid and the tag columns are filled."""
    rows = len(uids)
    uids, related, details = _contiguous(uids), _contiguous(related), _contiguous(details)
    if isinstance(reasons, str):
        reasons = pa.array([reasons] * rows, pa.string())
    reasons = _contiguous(reasons)
    values = {
        UID: uids,
        TAG_STAGE: pa.array([stage] * rows, pa.string()),
        TAG_REASON: reasons,
        TAG_RELATED_UID: related if related is not None else pa.nulls(rows, pa.string()),
        TAG_DETAIL: details if details is not None else pa.nulls(rows, pa.string()),
    }
    columns = [values.get(f.name, pa.nulls(rows, f.type)) for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema) if rows else _empty(schema)


def _contiguous(array):
    if isinstance(array, pa.ChunkedArray):
        return array.combine_chunks() if array.num_chunks else pa.array([], array.type)
    return array


def _empty(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)


def write_tagged(tagged_df, data_columns: list[str], data_dir: str, ledger_dir: str) -> tuple[int, dict[str, int]]:
    """Write kept rows to `data_dir` and dropped rows (LEDGER_SCHEMA) to `ledger_dir`; (rows kept, drops by reason).

    Both folders are fresh temporary ones (StageWriter), so "append" only means "the folder may already exist"
    (a nested stage folder such as `_ingest` can be inside it).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    tagged_df = tagged_df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        tagged_df.filter(F.col(TAG_REASON).isNull()).select(*data_columns).write.mode("append").parquet(data_dir)
        tagged_df.filter(F.col(TAG_REASON).isNotNull()).select(
            F.col(UID).alias("uid"),
            F.col(TAG_STAGE).alias("stage"),
            F.col(TAG_REASON).alias("reason"),
            F.col(TAG_RELATED_UID).alias("related_uid"),
            F.col(TAG_DETAIL).alias("detail"),
        ).write.mode("append").parquet(ledger_dir)
        by_reason = {row[0]: row[1] for row in tagged_df.groupBy(TAG_REASON).count().collect()}
    finally:
        tagged_df.unpersist()
    kept = by_reason.pop(None, 0)
    return kept, dict(sorted(by_reason.items()))


def untagged(df):
    from pyspark.sql import functions as F

    return (
        df.withColumn(TAG_STAGE, F.lit(None).cast("string"))
        .withColumn(TAG_REASON, F.lit(None).cast("string"))
        .withColumn(TAG_RELATED_UID, F.lit(None).cast("string"))
        .withColumn(TAG_DETAIL, F.lit(None).cast("string"))
    )


def drop_where(df, condition, stage: str, reason, related=None, detail=None):
    """Tag the rows matching `condition` (and not dropped before) as dropped by `stage` with `reason` (a string or
    a Column), `related` uid and `detail` (Columns or None)."""
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    condition = condition & F.col(TAG_REASON).isNull()
    reason = reason if isinstance(reason, Column) else F.lit(reason)
    related = related if related is not None else F.lit(None).cast("string")
    detail = detail if detail is not None else F.lit(None).cast("string")
    return (
        df.withColumn(TAG_STAGE, F.when(condition, F.lit(stage)).otherwise(F.col(TAG_STAGE)))
        .withColumn(TAG_RELATED_UID, F.when(condition, related).otherwise(F.col(TAG_RELATED_UID)))
        .withColumn(TAG_DETAIL, F.when(condition, detail).otherwise(F.col(TAG_DETAIL)))
        .withColumn(TAG_REASON, F.when(condition, reason).otherwise(F.col(TAG_REASON)))
    )


class StageRun:
    """Times a stage and assembles its `_stage.json` record, checking rows in = rows out + rows dropped."""

    def __init__(self, stage: str, version: int, config: dict):
        self.stage = stage
        self.version = version
        self.config = config
        self.started = time.time()

    def record(self, input_info: dict, rows_in: int, rows_out: int, drops: dict[str, int], **extra) -> dict:
        dropped = sum(drops.values())
        if rows_in != rows_out + dropped:
            raise RuntimeError(
                f"stage {self.stage} lost rows: {rows_in} in, {rows_out} out, {dropped} in the ledger ({drops})"
            )
        finished = time.time()
        record = {
            "stage": self.stage,
            "version": self.version,
            "code_version": curation.__version__,
            "config": self.config,
            "config_sha256": sha256_of_json(self.config),
            "input": input_info,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "drops": drops,
            "started_at": datetime.fromtimestamp(self.started, UTC).isoformat(),
            "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(),
            "seconds": round(finished - self.started, 3),
            **extra,
        }
        logger.info(
            "stage %s: %d rows in, %d out, dropped %s in %.1f s", self.stage, rows_in, rows_out, drops,
            record["seconds"],
        )
        return record
