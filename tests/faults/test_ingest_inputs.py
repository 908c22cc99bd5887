"""Hostile inputs on the ingest side (issue 17, cases 5, 7, 10 and 13): wide shards, paths holding glob characters,
an empty input, keep columns Spark cannot carry, footers whose row counts lie, and an object store that cannot be
reached. Each ends in one error naming the file, column or key, and leaves no stage folder; the cases are tabled in
tests/faults/README.md ("Ingest inputs", I1-I14).
"""

import datetime
import decimal
import json
import re
import socket
import struct
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.inputs import expand_inputs, plan_inputs, read_row_group
from curation.io import OutputError, check_apart
from curation.ops.ingest import IngestError, IngestOptions
from curation.pipeline import run_one_stage
from tests.faults.test_hostile_inputs import time_limit

URLS = ["http://a.example/1.jpg", "http://a.example/2.jpg", "http://a.example/3.jpg"]
CAPTIONS = ["a cat", "a dog", "a cow"]
WIDE_COLUMNS = 20_000  # planning them took 50 s while the checks were quadratic, 0.2 s once linear


@pytest.fixture(autouse=True)
def guarded():
    with time_limit():
        yield


def write_shard(path: Path, columns: dict | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns or {"url": URLS, "caption": CAPTIONS}), path, **options)
    return path


def _files(locations: list[str]) -> list[str]:
    return [path for _, path in expand_inputs(locations)]


# ------------------------------------------------------------------------------------------------------------------
# Case 5: a shard with very many columns


def _wide_shard(path: Path, extra_name: str | None = None) -> Path:
    """A one-row shard of url, caption and WIDE_COLUMNS - 2 int8 columns (`extra_name` renaming the last)."""
    names = ["url", "caption"] + [f"c{i}" for i in range(WIDE_COLUMNS - 3)] + [extra_name or "last"]
    one = pa.array([1], pa.int8())
    table = pa.Table.from_arrays([pa.array(URLS[:1]), pa.array(CAPTIONS[:1])] + [one] * (WIDE_COLUMNS - 2), names)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, use_dictionary=False, write_statistics=False)
    return path


def test_a_wide_shard_is_planned_in_linear_time_and_ingested_reading_only_its_columns(spark, tmp_path):
    shard = _wide_shard(tmp_path / "in" / "s.parquet")
    started = time.perf_counter()
    plan = plan_inputs([str(shard)], IngestOptions(keep_columns=("c7",)))
    # Generous: quadratic checks took 50 s on 20,000 columns; linear ones take a fraction of a second.
    assert time.perf_counter() - started < 15
    assert plan.rows == 1 and [f.name for f in plan.keep_fields] == ["c7"]
    record = run_one_stage(spark, "ingest", [str(shard)], tmp_path / "ingest", {"keep_columns": ["c7"]})
    assert (record["rows_in"], record["rows_out"]) == (1, 1)
    assert pq.read_schema(next((tmp_path / "ingest").glob("part-*.parquet"))).names == ["uid", "url", "caption", "c7"]


def test_a_wide_shards_errors_list_a_bounded_number_of_columns(tmp_path):
    repeated = _wide_shard(tmp_path / "a" / "s.parquet", extra_name="c5")
    with pytest.raises(IngestError, match=r"s\.parquet: column name\(s\) \['c5'\] appear more than once") as raised:
        plan_inputs([str(repeated)], IngestOptions())
    assert len(str(raised.value)) < 2000
    missing = r"keep column\(s\) \['nope'\] not found; the shard has 20000 columns"
    with pytest.raises(IngestError, match=missing) as raised:
        plan_inputs([str(_wide_shard(tmp_path / "b" / "s.parquet"))], IngestOptions(keep_columns=("nope",)))
    assert len(str(raised.value)) < 2000


# ------------------------------------------------------------------------------------------------------------------
# Case 7: paths holding glob characters; case 10: an empty input


@pytest.fixture
def bracketed(tmp_path) -> Path:
    """`glob[1]/s.parquet` beside `glob1/s.parquet`, which the pattern `glob[1]` would match."""
    write_shard(tmp_path / "glob1" / "s.parquet")
    return write_shard(tmp_path / "glob[1]" / "s.parquet")


def test_an_existing_path_is_taken_literally(bracketed, tmp_path):
    assert _files([str(bracketed)]) == [str(bracketed)]
    assert _files([str(bracketed.parent)]) == [str(bracketed)]  # a folder named with brackets


def test_a_star_pattern_takes_brackets_literally(bracketed, tmp_path):
    assert _files([str(tmp_path / "glob[1]" / "*.parquet")]) == [str(bracketed)]


def test_the_glob_prefix_makes_brackets_a_character_class(bracketed, tmp_path):
    assert _files([f"glob:{tmp_path}/glob[0-9]/*.parquet"]) == [str(tmp_path / "glob1" / "s.parquet")]
    assert _files([f"glob:{tmp_path}/**/s.parquet"]) == sorted([str(bracketed), str(tmp_path / "glob1" / "s.parquet")])


def test_a_missing_bracketed_path_is_not_globbed(bracketed, tmp_path):
    missing = str(tmp_path / "glob[2]" / "s.parquet")
    write_shard(tmp_path / "glob2" / "s.parquet")
    with pytest.raises(IngestError, match=re.escape(f"input {missing!r} does not exist (brackets are taken literally: "
                                                    f"write glob:{missing} for a pattern)")):
        expand_inputs([missing])


@pytest.mark.parametrize("location", ["", "  ", "glob:"])
def test_an_empty_input_is_refused_naming_the_key(location):
    with pytest.raises(IngestError, match=r"^input: the location .* is empty \(it would read the current folder\)"):
        expand_inputs([location])


def test_outputs_stay_apart_from_inputs_under_the_same_rule(bracketed, tmp_path):
    folder = bracketed.parent
    # The folder exists, so it is the input itself, not a pattern whose output may be its neighbour.
    with pytest.raises(OutputError, match="is inside the input"):
        check_apart(folder / "out", [str(folder)])
    with pytest.raises(OutputError, match="is or contains the input"):
        check_apart(tmp_path, [str(folder / "*.parquet")])
    check_apart(tmp_path / "out", [f"glob:{tmp_path}/glob[0-9]/*.parquet"])  # a glob's folder may hold the output
    check_apart(tmp_path / "out", [""])  # refused by the planner instead, which names the key


def test_the_cli_ingests_the_bracketed_path_and_refuses_an_empty_one(spark, bracketed, tmp_path, caplog):
    assert cli_main(["ingest", "--input", str(bracketed), "--output", str(tmp_path / "out")]) == 0
    files = json.loads((tmp_path / "out" / "_stage.json").read_text())["input"]["files"]
    assert [f["path"] for f in files] == [str(bracketed)]
    assert cli_main(["ingest", "--input", "", "--output", str(tmp_path / "empty")]) == 2
    assert "input: the location '' is empty" in caplog.text
    assert not (tmp_path / "empty").exists()


# ------------------------------------------------------------------------------------------------------------------
# Case 13: keep columns Spark cannot carry, by name or by type


@pytest.mark.parametrize(
    ("keep_columns", "pattern"),
    [
        (("UID",), r"keep_columns \['UID'\] clash"),
        (("Caption",), r"keep_columns \['Caption'\] clash"),
        (("URL",), r"keep_columns \['URL'\] clash"),
        (("w", "W"), r"keep_columns names \['w'\] more than once"),
        (("a.b",), r"keep_columns \['a\.b'\] hold '\.' or '`'"),
        (("a`b",), r"keep_columns \['a`b'\] hold '\.' or '`'"),
    ],
)
def test_keep_column_names_spark_would_misread_are_refused(keep_columns, pattern):
    with pytest.raises(ValueError, match=pattern):
        IngestOptions(keep_columns=keep_columns)


# What Spark 4.3's Arrow bridge does with each (checked by a real ingest of each): unsigned integers, float16 and
# time32 fail converting the schema; large_list, fixed_size_binary and fixed_size_list fail in the JVM; decimal256
# has no Spark type; a duration arrives as bare int64 and a zoned timestamp without its zone.
UNCARRIED = {
    "uint64": pa.array([2**64 - 1, 1, 2], pa.uint64()),
    "float16": pa.array([1.5, 2.0, 3.0], pa.float16()),
    "time32": pa.array([1000, 2000, 3000], pa.time32("ms")),
    "duration": pa.array([1, 2, 3], pa.duration("us")),
    "large_list": pa.array([[1], [2, 3], []], pa.large_list(pa.int64())),
    "fixed_size_binary": pa.array([b"ab", b"cd", b"ef"], pa.binary(2)),
    "timestamp with time zone": pa.array([1, 2, 3], pa.timestamp("us", tz="Europe/Paris")),
    "decimal256": pa.array([decimal.Decimal("1.5")] * 3, pa.decimal256(40, 1)),
    "list of uint64": pa.array([[1], [2], [3]], pa.list_(pa.uint64())),
}


@pytest.mark.parametrize("kind", list(UNCARRIED))
def test_a_keep_column_spark_cannot_carry_fails_the_plan_naming_file_column_and_type(spark, tmp_path, kind):
    column = UNCARRIED[kind]
    shard = write_shard(tmp_path / "in" / "s.parquet", {"url": URLS, "caption": CAPTIONS, "w": column})
    file_type = re.escape(str(pq.read_schema(shard).field("w").type))
    with pytest.raises(IngestError, match=rf"s\.parquet: keep column 'w' has type {file_type}, which Spark cannot"):
        run_one_stage(spark, "ingest", [str(shard.parent)], tmp_path / "ingest", {"keep_columns": ["w"]})
    assert not (tmp_path / "ingest").exists()


def test_the_keep_column_types_spark_carries_arrive_unchanged(spark, tmp_path):
    carried = {
        "small": pa.array([1, -2, 3], pa.int8()),
        "ratio": pa.array([0.5, 1.5, 2.5], pa.float32()),
        "price": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-3.25")], pa.decimal128(10, 2)),
        "taken": pa.array([datetime.datetime(2020, 1, 2, 3, 4, 5, 6)] * 3, pa.timestamp("us")),
        "day": pa.array([datetime.date(2020, 1, 2)] * 3, pa.date32()),
        "note": pa.array(["x", None, "z"], pa.large_string()),
        "tags": pa.array([{"k": 1}, {"k": 2}, {"k": None}], pa.struct([("k", pa.int64())])),
        "sizes": pa.array([[("w", 1)], [], [("h", 2)]], pa.map_(pa.string(), pa.int64())),
        "depths": pa.array([[1, 2], [], None], pa.list_(pa.int32())),
    }
    shard = write_shard(tmp_path / "in" / "s.parquet", {"url": URLS, "caption": CAPTIONS, **carried})
    run_one_stage(spark, "ingest", [str(shard)], tmp_path / "ingest", {"keep_columns": list(carried)})
    published = pq.read_table(tmp_path / "ingest").sort_by("url")
    for name, column in carried.items():
        narrowed = pa.string() if column.type == pa.large_string() else column.type  # the values fit 32-bit offsets
        assert published.schema.field(name).type == narrowed, name
        assert published.column(name).to_pylist() == column.to_pylist(), name


# ------------------------------------------------------------------------------------------------------------------
# Case 13: a footer whose row count lies


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _skip(data: bytes, position: int, kind: int) -> int:
    """Past one value of Thrift compact type `kind` (the footer's encoding)."""
    if kind in (1, 2):  # booleans live in the field header
        return position
    if kind == 3:
        return position + 1
    if kind in (4, 5, 6):
        return _varint(data, position)[1]
    if kind == 7:
        return position + 8
    if kind == 8:
        size, position = _varint(data, position)
        return position + size
    if kind in (9, 10):
        header, position = data[position], position + 1
        size, element = header >> 4, header & 0x0F
        if size == 15:
            size, position = _varint(data, position)
        for _ in range(size):
            position = _skip(data, position, element)
        return position
    assert kind == 12, kind
    return _walk_struct(data, position, lambda field, kind, at: None)


def _walk_struct(data: bytes, position: int, visit) -> int:
    field = 0
    while True:
        header, position = data[position], position + 1
        if header == 0:
            return position
        field += header >> 4
        assert header >> 4, "long-form field ids do not occur in pyarrow's footers"
        visit(field, header & 0x0F, position)
        position = _skip(data, position, header & 0x0F)


def lie_about_rows(path: Path, rows: int) -> None:
    """Rewrite the footer's num_rows, of the file and of each row group, as `rows` (under 64, one varint byte):
    FileMetaData field 3, and field 3 of each RowGroup in field 4. The pages keep their values."""
    data = bytearray(path.read_bytes())
    footer_length = struct.unpack("<i", data[-8:-4])[0]
    counts = []

    def visit_file(field, kind, at):
        if field == 3:
            counts.append(at)
        if field == 4:
            position = at + 1
            for _ in range(data[at] >> 4):
                position = _walk_struct(data, position, lambda f, k, a: counts.append(a) if f == 3 else None)

    _walk_struct(data, len(data) - 8 - footer_length, visit_file)
    for at in counts:
        assert data[at] < 0x80 and rows < 64
        data[at] = rows << 1  # zigzag
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("footer_rows", [2, 4])
def test_a_footer_whose_row_count_lies_fails_the_plan_naming_the_file(spark, tmp_path, footer_rows):
    shard = write_shard(tmp_path / "in" / "s.parquet")
    lie_about_rows(shard, footer_rows)
    assert pq.ParquetFile(shard).metadata.num_rows == footer_rows
    pattern = rf"s\.parquet: the footer says row group 0 has {footer_rows} rows, but its column 'url' holds 3 values"
    with pytest.raises(IngestError, match=pattern):
        run_one_stage(spark, "ingest", [str(shard.parent)], tmp_path / "ingest")
    assert not (tmp_path / "ingest").exists()


def test_a_row_group_that_no_longer_matches_the_plan_fails_its_task_naming_the_file(tmp_path):
    shard = write_shard(tmp_path / "s.parquet")
    with pytest.raises(IngestError, match=r"shard .*s\.parquet: row group 0 gave 3 rows where its footer said 2"):
        read_row_group(str(shard), 0, ["url", "caption"], footer_rows=2)


def test_the_cli_reports_a_lying_footer_in_one_line(spark, tmp_path, caplog):
    shard = write_shard(tmp_path / "in" / "s.parquet")
    lie_about_rows(shard, 2)
    assert cli_main(["ingest", "--input", str(shard), "--output", str(tmp_path / "out")]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "s.parquet: the footer says" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Case 13: an s3:// input that cannot be reached


@pytest.fixture
def dead_endpoint(monkeypatch, tmp_path) -> str:
    """host:port on 127.0.0.1 where nothing listens, with static credentials and no instance metadata lookup, so
    that no request leaves the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    environment = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://{endpoint}",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return endpoint


def test_an_unreachable_object_store_fails_in_one_line_naming_the_key(spark, dead_endpoint, tmp_path, caplog):
    location = f"s3://bucket/shards?endpoint_override={dead_endpoint}&scheme=http&region=us-east-1"
    assert cli_main(["ingest", "--input", location, "--output", str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"cannot read input {location!r}: ") and "key 'shards' in bucket 'bucket'" in errors[0]
    assert not (tmp_path / "out").exists()
