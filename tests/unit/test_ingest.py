import json

import pyarrow as pa
import pytest

from curation.ops.ingest import IngestError, IngestOptions, normalise_rows, resolve_columns
from curation.ops.uid import uid_of
from curation.schema import Reason


def _table(urls, texts, text_type=None):
    return pa.table({"URL": pa.array(urls, pa.string()), "TEXT": pa.array(texts, text_type or pa.string())})


def test_every_bad_row_reason_in_priority_order():
    urls = ["http://ok/1", None, "   ", "http://ok/3", "http://ok/4", "ftp://x/y", "http://ok/6", "javascript:x",
            "http://", "HTTPS://Ok.example/Path"]
    texts = ["fine", "a", "b", None, " \t\n", "c", "x" * 11, "d", "e", "also fine"]
    kept, rejected = normalise_rows(_table(urls, texts), IngestOptions(max_caption_chars=10), "s.parquet", 100)
    assert kept["caption"].to_pylist() == ["fine", "also fine"]
    assert kept["_source_row"].to_pylist() == [100, 109]
    assert rejected["reason"].to_pylist() == [
        Reason.MISSING_URL, Reason.EMPTY_URL, Reason.MISSING_CAPTION, Reason.EMPTY_CAPTION, Reason.NOT_HTTP_URL,
        Reason.CAPTION_TOO_LONG, Reason.NOT_HTTP_URL, Reason.NOT_HTTP_URL,
    ]
    details = [json.loads(d) for d in rejected["detail"].to_pylist()]
    assert [d["row"] for d in details] == [101, 102, 103, 104, 105, 106, 107, 108]
    assert {d["file"] for d in details} == {"s.parquet"}


def test_invalid_utf8_in_a_binary_column_is_ledgered_with_a_uid_over_raw_bytes():
    table = _table(["http://a/1", "http://a/2"], [b"caf\xe9 latte", b"good"], pa.binary())
    kept, rejected = normalise_rows(table, IngestOptions(), "b.parquet")
    assert kept["caption"].to_pylist() == ["good"]
    assert rejected["reason"].to_pylist() == [Reason.INVALID_UTF8]
    assert rejected["uid"].to_pylist() == [uid_of(b"http://a/1", b"caf\xe9 latte")]


def test_invalid_utf8_hidden_in_a_string_column_is_caught():
    valid = pa.array(["ok", "xx"], pa.string())
    data = bytearray(valid.buffers()[2].to_pybytes())
    data[2] = 0xFF
    broken = pa.Array.from_buffers(pa.string(), 2, [None, valid.buffers()[1], pa.py_buffer(bytes(data))])
    table = pa.table({"url": pa.array(["http://a/1", "http://a/2"]), "caption": broken})
    kept, rejected = normalise_rows(table, IngestOptions(), "s.parquet")
    assert kept["caption"].to_pylist() == ["ok"]
    assert rejected["reason"].to_pylist() == [Reason.INVALID_UTF8]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["URL", "TEXT", "similarity"], ("URL", "TEXT")),
        (["url", "caption"], ("url", "caption")),
        (["url", "text", "uid"], ("url", "text")),
    ],
)
def test_common_schemas_are_detected(names, expected):
    assert resolve_columns(names, IngestOptions(), "f") == expected


def test_explicit_columns_win_and_missing_ones_are_clear_errors():
    assert resolve_columns(["u", "t", "url", "caption"], IngestOptions(url_column="u", text_column="t"), "f") == (
        "u", "t"
    )
    with pytest.raises(IngestError, match="f.parquet.*'nope' not found"):
        resolve_columns(["url", "caption"], IngestOptions(text_column="nope"), "f.parquet")
    with pytest.raises(IngestError, match="no text column found"):
        resolve_columns(["url", "other"], IngestOptions(), "f.parquet")


def test_a_mistyped_column_is_a_clear_error():
    table = pa.table({"url": ["http://a/1"], "caption": pa.array([3], pa.int64())})
    with pytest.raises(IngestError, match="'caption' has type int64"):
        normalise_rows(table, IngestOptions(), "f.parquet")


def test_keep_columns_travel_with_kept_rows():
    table = pa.table({"url": ["http://a/1", None], "caption": ["x", "y"], "WIDTH": [10, 20]})
    kept, _ = normalise_rows(table, IngestOptions(keep_columns=("WIDTH",)), "f")
    assert kept["WIDTH"].to_pylist() == [10]


def test_nonpositive_caption_limit_is_rejected():
    with pytest.raises(ValueError):
        IngestOptions(max_caption_chars=0)
