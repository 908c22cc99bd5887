"""The row-filter stages' drop rules (`curation.spark.rowfilter.drop_by_rules`), on Arrow tables without Spark."""

import pyarrow as pa

from curation.spark.rowfilter import DropRule, drop_by_rules

TABLE = pa.Table.from_batches([pa.record_batch({
    "uid": ["a", "b", "c", "d"],
    "score": [0.1, 0.9, 0.5, 0.7],
    "_failure": [None, "truncated", None, "bomb"],
    "_over": [None, '{"s":0.9}', None, '{"s":0.7}'],
    "_logo": [None, None, "l1", None],
})])


def test_the_first_matching_rule_names_reason_and_detail():
    kept, dropped = drop_by_rules((DropRule("_failure", "undecodable"), DropRule("_over", "too_high")), TABLE)
    assert kept["uid"].to_pylist() == ["a", "c"]
    assert dropped.to_pylist() == [{"uid": "b", "reason": "undecodable", "detail": "truncated"},
                                   {"uid": "d", "reason": "undecodable", "detail": "bomb"}]
    kept, dropped = drop_by_rules((DropRule("_over", "too_high"), DropRule("_logo", "logo", related="_logo")), TABLE)
    assert kept["uid"].to_pylist() == ["a"]
    assert dropped.to_pylist() == [{"uid": "b", "reason": "too_high", "detail": '{"s":0.9}', "related_uid": None},
                                   {"uid": "c", "reason": "logo", "detail": "l1", "related_uid": "l1"},
                                   {"uid": "d", "reason": "too_high", "detail": '{"s":0.7}', "related_uid": None}]


def test_no_rule_keeps_every_row_and_an_empty_table_stays_empty():
    kept, dropped = drop_by_rules((), TABLE)
    assert kept.equals(TABLE) and len(dropped) == 0
    kept, dropped = drop_by_rules((DropRule("_failure", "undecodable"),), TABLE.slice(0, 0))
    assert len(kept) == 0 and len(dropped) == 0 and dropped.column_names == ["uid", "reason", "detail"]
