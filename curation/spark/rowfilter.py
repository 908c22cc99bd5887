"""The one adapter of the row-filtering stages (filter, nsfw, block_images, decontaminate, flag_logos, sample).

Each such stage prepares a `FilterPlan` on the driver: the rows to pass over (the input, or the input joined with
what a whole-input pass computed: scores, blocklist matches, caption counts), how a row is kept or dropped, and what
the record says. A row is dropped either by `keep`, a picklable function that splits one Arrow table into kept rows
(with the columns the stage adds) and dropped rows (uid, reason, and optionally related_uid and detail), or by
`drops`: rules that drop the rows on which an earlier Spark pass set a detail column. This adapter applies them in
one `mapInArrow` pass and returns the tagged rows to the executor; since the pass is row-local, several such stages
can later share one.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import UID
from curation.spark.common import arrow_schema_of, spark_schema, tag_dropped, tag_kept, with_tags
from curation.spark.executor import StageContext, StageOutput

DROPPED_REASON = "reason"
DROPPED_RELATED = "related_uid"
DROPPED_DETAIL = "detail"


@dataclass(frozen=True)
class DropRule:
    """Drop the rows whose `detail` column is set, with `reason`, that detail, and the `related` column as related
    uid. Of several rules the first that matches a row names its reason."""

    detail: str
    reason: str
    related: str | None = None


def drop_by_rules(rules: tuple[DropRule, ...], table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows, dropped rows as uid, reason, detail and, where a rule names one, related_uid) of `table`."""
    if not rules:
        return table, pa.table({UID: pa.array([], pa.string()), DROPPED_REASON: pa.array([], pa.string())})
    matches = [pc.is_valid(table.column(rule.detail)) for rule in rules]
    dropped = reduce(pc.or_, matches)
    nothing = pa.nulls(len(table), pa.string())
    reason, detail, related = nothing, nothing, nothing
    for rule, matched in reversed(list(zip(rules, matches, strict=True))):
        reason = pc.if_else(matched, rule.reason, reason)
        detail = pc.if_else(matched, table.column(rule.detail), detail)
        if rule.related is not None:
            related = pc.if_else(matched, table.column(rule.related), related)
    columns = {UID: table.column(UID).filter(dropped), DROPPED_REASON: reason.filter(dropped),
               DROPPED_DETAIL: detail.filter(dropped)}
    if any(rule.related is not None for rule in rules):
        columns[DROPPED_RELATED] = related.filter(dropped)
    return table.filter(pc.invert(dropped)), pa.table(columns)


@dataclass
class FilterPlan:
    """What a row-filtering stage prepared: over `rows`, either `keep(table) -> (kept, dropped)` or the `drops`
    rules; the columns it adds to the kept rows (`added`, replacing input columns of the same name); its record
    fields, and `after_write` as `StageOutput`'s."""

    rows: object | None = None  # default: the input rows
    keep: Callable[[pa.Table], tuple[pa.Table, pa.Table]] | None = None
    drops: tuple[DropRule, ...] = ()
    added: list[pa.Field] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    after_write: Callable[[Path, int, dict[str, int]], dict] | None = None


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
    """Run a row-filtering stage: its `plan(context, rows)` on the driver, then its `keep` or `drops` over every
    batch."""
    df = context.read_rows()
    plan = context.stage.plan(context, df)
    added_names = {f.name for f in plan.added}
    data_schema = pa.schema([f for f in arrow_schema_of(df) if f.name not in added_names] + plan.added)
    schema = with_tags(data_schema)
    keep = plan.keep if plan.keep is not None else partial(drop_by_rules, tuple(plan.drops))
    rows = plan.rows if plan.rows is not None else df
    tagged = rows.mapInArrow(_keep_worker(keep, context.stage.name, schema), spark_schema(schema))
    return StageOutput(rows=tagged, columns=data_schema.names, record=plan.record, after_write=plan.after_write)
