"""The one adapter of the row-filtering stages (filter, nsfw, block_images, decontaminate, flag_logos, sample).

Each such stage prepares a `FilterPlan` on the driver: the rows to pass over (the input, or the input joined with
what a whole-input pass computed: scores, blocklist matches, caption counts), a picklable `keep` function that
splits one Arrow table into kept rows (with the columns the stage adds) and dropped rows (uid, reason, and
optionally related_uid and detail), and what the record says. This adapter runs `keep` in one `mapInArrow` pass
and returns the tagged rows to the executor; since the pass is row-local, several such stages can later share one.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from curation.schema import UID
from curation.spark.common import arrow_schema_of, spark_schema, tag_dropped, tag_kept, with_tags
from curation.spark.executor import StageContext, StageOutput

DROPPED_REASON = "reason"
DROPPED_RELATED = "related_uid"
DROPPED_DETAIL = "detail"


@dataclass
class FilterPlan:
    """What a row-filtering stage prepared: `keep(table) -> (kept, dropped)` over `rows`, the columns it adds to
    the kept rows (`added`, replacing input columns of the same name), and its record summary."""

    keep: Callable[[pa.Table], tuple[pa.Table, pa.Table]]
    rows: object | None = None  # default: the input rows
    added: list[pa.Field] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    with_drops: Callable[[dict[str, int]], dict] | None = None  # record fields from the drops by reason


def _keep_worker(keep, stage: str, schema: pa.Schema):
    def run(batches):
        for batch in batches:
            kept, dropped = keep(pa.Table.from_batches([batch]))
            yield tag_kept(kept, schema)
            names = dropped.column_names
            yield tag_dropped(
                dropped[UID], stage, dropped[DROPPED_REASON], schema,
                related=dropped[DROPPED_RELATED] if DROPPED_RELATED in names else None,
                details=dropped[DROPPED_DETAIL] if DROPPED_DETAIL in names else None,
            )

    return run


def run_row_filter(context: StageContext) -> StageOutput:
    """Run a row-filtering stage: its `plan(context, rows)` on the driver, then its `keep` over every batch."""
    df = context.read_rows()
    plan = context.stage.plan(context, df)
    added_names = {f.name for f in plan.added}
    input_schema = arrow_schema_of(df)
    data_fields = [f for f in input_schema if f.name not in added_names]
    data_schema = pa.schema(data_fields + plan.added)
    schema = with_tags(data_schema)
    rows = plan.rows if plan.rows is not None else df
    tagged = rows.mapInArrow(_keep_worker(plan.keep, context.stage.name, schema), spark_schema(schema))
    return StageOutput(rows=tagged, columns=data_schema.names, record=plan.record, with_drops=plan.with_drops)
