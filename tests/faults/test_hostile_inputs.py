"""Hostile inputs: every malformed shard, row or image ends in a clear error (naming the file, column and problem),
a skipped-and-recorded shard, or a ledger reason, with rows in = rows out + ledger rows; nothing hangs or blows up.

The cases, their expected outcomes and what each test asserts are tabled in tests/faults/README.md. Row-level cases
share one ingest run over a folder of shards (one Spark job instead of twenty); shard-level errors are raised while
planning, before Spark does any work, so they cost milliseconds. A SIGALRM guard fails any case that runs past
CASE_SECONDS instead of letting it hang the suite.
"""

import contextlib
import hashlib
import io
import json
import re
import signal
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from curation.cli import main as cli_main
from curation.ops.imagehash import DecodedImage, DecodeFailure, decode_image, hamming_distances, perceptual_hash
from curation.ops.ingest import IngestError, IngestOptions
from curation.ops.jaccard import exact_jaccard
from curation.ops.metaclip import Matcher, build_reference_automaton, reference_match
from curation.ops.minhash import MinHasher
from curation.ops.shingles import normalise_texts
from curation.ops.uid import compute_uids, uid_of
from curation.pipeline import run_one_stage
from curation.schema import REASONS_SHARING_KEPT_UID, Reason

CASE_SECONDS = 120
KEPT = "kept"


@contextlib.contextmanager
def time_limit(seconds: int = CASE_SECONDS):
    """Raise TimeoutError in the main thread after `seconds`: a hostile input that hangs a stage fails its case."""

    def expire(signum, frame):
        raise TimeoutError(f"a hostile-input case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def guarded():
    with time_limit():
        yield


def write_shard(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def parquet_bytes(table: pa.Table, **options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def assert_ledger_invariant(record: dict, stage_dir: Path) -> tuple[pa.Table, pa.Table]:
    """rows in = rows out + ledger rows, as recorded and as written; no uid both kept and ledgered except a
    duplicate_pair (which shares the kept first occurrence's uid by definition). Returns (data, ledger)."""
    data = pq.read_table(stage_dir, columns=["uid"]) if record["rows_out"] else pa.table({"uid": pa.array([], "str")})
    ledger_dir = stage_dir / "_ledger"
    ledger = pq.read_table(ledger_dir) if any(ledger_dir.glob("*.parquet")) else pa.table(
        {"uid": pa.array([], "str"), "reason": pa.array([], "str")}
    )
    assert record["rows_in"] == record["rows_out"] + sum(record["drops"].values())
    assert (data.num_rows, ledger.num_rows) == (record["rows_out"], sum(record["drops"].values()))
    assert dict(Counter(ledger["reason"].to_pylist())) == record["drops"]
    ledgered = {r["uid"] for r in ledger.to_pylist() if r["reason"] not in REASONS_SHARING_KEPT_UID}
    assert not ledgered & set(data["uid"].to_pylist()), "a uid is both published and ledgered"
    return data, ledger


# ------------------------------------------------------------------------------------------------------------------
# Row-level cases: one ingest run over a folder of shards

TEN_MB_CAPTION = "x" * 10_000_000
# Collision bait: without the NUL rule both pairs hash "https://h.example/\x00z\x00c", so a published row and a
# ledgered row (or two distinct published pairs) would share one uid.
COLLIDING_CAPTION_NUL = ("https://h.example/", "z\x00c")
COLLIDING_URL_NUL = ("https://h.example/\x00z", "c")

# case -> (url, caption, expected fate); rows of shard a_strings.parquet (plain string columns), in order.
STRING_ROWS = {
    "clean row": ("https://img.example/1.jpg", "a dog on a beach", KEPT),
    "ESC in caption": ("https://img.example/2.jpg", "red \x1b[31mdog\x1b[0m", KEPT),
    "RTL override in caption": ("https://img.example/3.jpg", "cat \u202egnp.exe", KEPT),
    "vertical tab and DEL in caption": ("https://img.example/4.jpg", "hot\x0bdog\x7f", KEPT),
    "NUL in caption": ("https://img.example/5.jpg", "hot\x00dog", Reason.NUL_CHARACTER),
    "NUL in url": ("https://img.example/6\x00.jpg", "a bird", Reason.NUL_CHARACTER),
    "ESC in url host": ("https://img\x1b.example/7.jpg", "a fish", Reason.NOT_HTTP_URL),
    "DEL in url path": ("https://img.example/8\x7f.jpg", "a cow", Reason.NOT_HTTP_URL),
    "javascript url": ("javascript:alert(1)", "a goat", Reason.NOT_HTTP_URL),
    "null url": (None, "a horse", Reason.MISSING_URL),
    "null caption": ("https://img.example/9.jpg", None, Reason.MISSING_CAPTION),
    "whitespace caption": ("https://img.example/10.jpg", " \t\r\n ", Reason.EMPTY_CAPTION),
    "caption at the limit": ("https://img.example/11.jpg", "y" * 4096, KEPT),
    "10 MB caption": ("https://img.example/12.jpg", TEN_MB_CAPTION, Reason.CAPTION_TOO_LONG),
    "uid collision bait, NUL in caption": (*COLLIDING_CAPTION_NUL, Reason.NUL_CHARACTER),
    "uid collision bait, NUL in url": (*COLLIDING_URL_NUL, Reason.NUL_CHARACTER),
    "duplicate pair, first": ("https://img.example/dup.jpg", "the same pair", KEPT),
    "duplicate pair, same shard": ("https://img.example/dup.jpg", "the same pair", Reason.DUPLICATE_PAIR),
}
# Shard b_binary.parquet: a binary caption column, as mis-encoded crawls have.
BINARY_ROWS = {
    "invalid UTF-8 (Latin-1)": ("https://img.example/20.jpg", b"caf\xe9 latte", Reason.INVALID_UTF8),
    "lone surrogate bytes": ("https://img.example/21.jpg", b"\xed\xa0\x80 moon", Reason.INVALID_UTF8),
    "overlong UTF-8": ("https://img.example/22.jpg", b"\xc0\xaf etc", Reason.INVALID_UTF8),
    "valid UTF-8 bytes": ("https://img.example/23.jpg", "naïve café 東京".encode(), KEPT),
    "duplicate pair, other shard and type": ("https://img.example/dup.jpg", b"the same pair", Reason.DUPLICATE_PAIR),
}
NULL_TYPED_ROWS = 3  # c_nulls.parquet: url and caption of Arrow type null ("nulls everywhere")
# d_encodings.parquet: a dictionary-encoded url (a pandas categorical) and a string_view caption.
ENCODED_ROWS = {
    "dictionary-encoded url": ("https://img.example/30.jpg", "a tiger", KEPT),
    "dictionary-encoded url, repeated value": ("https://img.example/30.jpg", "a lion", KEPT),
}


def _raw(value) -> bytes:
    return b"" if value is None else value if isinstance(value, bytes) else value.encode("utf-8")


def _row_cases() -> dict[str, tuple[str, str]]:
    """case -> (uid, expected fate) for every row-level case."""
    cases = {}
    for rows in (STRING_ROWS, BINARY_ROWS, ENCODED_ROWS):
        for name, (url, caption, fate) in rows.items():
            cases[name] = (uid_of(_raw(url), _raw(caption)), fate)
    return cases


ROW_CASES = _row_cases()


@pytest.fixture(scope="module")
def hostile_rows(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_rows")
    shards = root / "shards"
    write_shard(shards / "a_strings.parquet", {
        "url": pa.array([r[0] for r in STRING_ROWS.values()], pa.string()),
        "caption": pa.array([r[1] for r in STRING_ROWS.values()], pa.string()),
    })
    write_shard(shards / "b_binary.parquet", {
        "url": pa.array([r[0] for r in BINARY_ROWS.values()], pa.string()),
        "caption": pa.array([r[1] for r in BINARY_ROWS.values()], pa.binary()),
    })
    write_shard(shards / "c_nulls.parquet", {"url": pa.nulls(NULL_TYPED_ROWS), "caption": pa.nulls(NULL_TYPED_ROWS)})
    write_shard(shards / "d_encodings.parquet", {
        "url": pa.array([r[0] for r in ENCODED_ROWS.values()], pa.string()).dictionary_encode(),
        "caption": pa.array([r[1] for r in ENCODED_ROWS.values()], pa.string_view()),
    })
    write_shard(shards / "e_empty.parquet", {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    with time_limit():
        record = run_one_stage(spark, "ingest", [str(shards)], root / "ingest")
    _, ledger = assert_ledger_invariant(record, root / "ingest")
    return {"record": record, "data": pq.read_table(root / "ingest"), "ledger": ledger}


def test_hostile_rows_keep_the_ledger_invariant(hostile_rows):
    record = hostile_rows["record"]
    assert record["rows_in"] == len(STRING_ROWS) + len(BINARY_ROWS) + NULL_TYPED_ROWS + len(ENCODED_ROWS)
    assert record["drops"][Reason.MISSING_URL] == 1 + NULL_TYPED_ROWS


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_hostile_row_is_kept_or_ledgered_with_its_reason(hostile_rows, case):
    uid, _ = ROW_CASES[case]
    # Several cases can share a uid (a duplicate pair, the collision bait): compare every fate of that uid.
    expected = Counter(fate for other_uid, fate in ROW_CASES.values() if other_uid == uid)
    kept_count = pc.sum(pc.equal(hostile_rows["data"]["uid"], uid)).as_py() or 0
    actual = Counter({KEPT: kept_count}) + Counter(
        row["reason"] for row in hostile_rows["ledger"].to_pylist() if row["uid"] == uid
    )
    assert actual == expected


def test_kept_captions_are_byte_exact_and_duplicates_point_to_the_first(hostile_rows):
    captions = dict(zip(hostile_rows["data"]["uid"].to_pylist(), hostile_rows["data"]["caption"].to_pylist(),
                        strict=True))
    for rows in (STRING_ROWS, BINARY_ROWS):
        for url, caption, fate in rows.values():
            if fate == KEPT:
                assert captions[uid_of(_raw(url), _raw(caption))].encode("utf-8") == _raw(caption)
    duplicates = [r for r in hostile_rows["ledger"].to_pylist() if r["reason"] == Reason.DUPLICATE_PAIR]
    first = uid_of(b"https://img.example/dup.jpg", b"the same pair")
    assert [r["related_uid"] for r in duplicates] == [first, first]
    assert {json.loads(r["detail"])["first_file"].rsplit("/", 1)[1] for r in duplicates} == {"a_strings.parquet"}


def test_null_typed_columns_are_missing_urls_with_file_and_row(hostile_rows):
    details = [json.loads(r["detail"]) for r in hostile_rows["ledger"].to_pylist()
               if r["reason"] == Reason.MISSING_URL and r["uid"] == uid_of(b"", b"")]
    assert sorted((Path(d["file"]).name, d["row"]) for d in details) == [("c_nulls.parquet", i) for i in range(3)]


def test_a_huge_list_keep_column_is_carried_and_stays_one_row(spark, tmp_path):
    # "Billion laughs" for parquet: 5 million equal int64s compress to a few kB and expand to 40 MB in one row.
    elements = 5_000_000
    offsets = pa.array([0, elements, elements + 1], pa.int32())
    big = pa.ListArray.from_arrays(offsets, pa.array(np.zeros(elements + 1, dtype=np.int64)))
    shard = write_shard(tmp_path / "in" / "big.parquet", {
        "url": ["https://img.example/big.jpg", "https://img.example/small.jpg"], "caption": ["big", "small"],
        "big": big,
    })
    assert shard.stat().st_size < 1_000_000
    record = run_one_stage(spark, "ingest", [str(shard)], tmp_path / "ingest", {"keep_columns": ["big"]})
    assert_ledger_invariant(record, tmp_path / "ingest")
    carried = pq.read_table(tmp_path / "ingest", columns=["caption", "big"]).sort_by("caption")
    assert pc.list_value_length(carried["big"]).to_pylist() == [elements, 1]


# ------------------------------------------------------------------------------------------------------------------
# Shard-level cases: refused while planning, with the file, column and problem named


def _table(**columns) -> pa.Table:
    return pa.table(columns)


URLS = ["https://img.example/a.jpg", "https://img.example/b.jpg"]
GOOD = _table(url=URLS, caption=["a", "b"])
TRUNCATED = parquet_bytes(_table(url=URLS * 200, caption=["c"] * 400))
SHARD_ERRORS = {
    # case -> (files written into the input folder, options, message pattern)
    "no url column": ({"s.parquet": _table(link=URLS, caption=["a", "b"])}, {},
                      r"s\.parquet: no url column found .*'link'"),
    "no caption column": ({"s.parquet": _table(url=URLS, words=["a", "b"])}, {},
                          r"s\.parquet: no text column found .*'words'"),
    "named url column missing": ({"s.parquet": GOOD}, {"url_column": "URL"},
                                 r"s\.parquet: url column 'URL' not found"),
    "url as int64": ({"s.parquet": _table(url=[1, 2], caption=["a", "b"])}, {},
                     r"s\.parquet: url column 'url' has type int64, expected a string or binary column"),
    "caption as list<string>": ({"s.parquet": _table(url=URLS, caption=[["a"], ["b"]])}, {},
                                r"s\.parquet: text column 'caption' has type list<.*>, expected a string"),
    "caption as struct": ({"s.parquet": _table(url=URLS, caption=[{"t": "a"}, {"t": "b"}])}, {},
                          r"s\.parquet: text column 'caption' has type struct<.*>, expected a string"),
    "duplicate column names": (
        {"s.parquet": pa.Table.from_arrays([pa.array(URLS), pa.array(["a", "b"]), pa.array(URLS)],
                                           names=["url", "caption", "url"])},
        {}, r"s\.parquet: column name\(s\) \['url'\] appear more than once"),
    "keep column missing in one shard": (
        {"a.parquet": _table(url=URLS, caption=["a", "b"], w=[1, 2]), "b.parquet": GOOD},
        {"keep_columns": ["w"]}, r"b\.parquet: keep column\(s\) \['w'\] not found"),
    "keep column types differ between shards": (
        {"a.parquet": _table(url=URLS, caption=["a", "b"], w=[1, 2]),
         "b.parquet": _table(url=URLS, caption=["c", "d"], w=["x", "y"])},
        {"keep_columns": ["w"]},
        r"b\.parquet: keep column 'w' has type string, but earlier shards have int64"),
    "dictionary-encoded keep column": (
        {"s.parquet": _table(url=URLS, caption=["a", "b"], w=pa.array(["x", "y"]).dictionary_encode())},
        {"keep_columns": ["w"]}, r"s\.parquet: keep column 'w' has type dictionary<.*Spark cannot carry"),
    "zero-byte file": ({"s.parquet": b""}, {}, r"s\.parquet: Parquet file size is 0 bytes"),
    "truncated parquet": ({"s.parquet": TRUNCATED[: len(TRUNCATED) // 2]}, {},
                          r"s\.parquet: .*magic bytes not found"),
    "README.txt beside the shards": ({"a.parquet": GOOD, "README.txt": b"crawl of 2024-01\n"}, {},
                                     r"README\.txt: .*(footer|magic bytes)"),
    "JPEG beside the shards": ({"a.parquet": GOOD, "cover.jpg": b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9"},
                               {}, r"cover\.jpg: .*magic bytes not found"),
}


def _write_folder(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            pq.write_table(content, folder / name)
    return folder


@pytest.mark.parametrize("case", list(SHARD_ERRORS))
def test_bad_shard_fails_the_plan_naming_file_column_and_problem(spark, tmp_path, case):
    files, options, pattern = SHARD_ERRORS[case]
    folder = _write_folder(tmp_path / "in", files)
    with pytest.raises(IngestError, match=pattern) as raised:
        run_one_stage(spark, "ingest", [str(folder)], tmp_path / "ingest", options)
    assert "cannot use input shard" in str(raised.value) and "--skip-bad-files" in str(raised.value)
    assert not (tmp_path / "ingest").exists(), "a failed plan must leave no stage folder"


UNUSABLE_SHARDS = ["no url column", "no caption column", "url as int64", "caption as struct", "zero-byte file",
                   "truncated parquet", "README.txt beside the shards", "JPEG beside the shards"]


def test_skip_bad_files_records_every_unusable_shard_and_ingests_the_rest(spark, tmp_path):
    folder = _write_folder(tmp_path / "in", {"good.parquet": GOOD})
    expected_skipped = set()
    for index, case in enumerate(UNUSABLE_SHARDS):
        files, _, _ = SHARD_ERRORS[case]
        bad = {name: content for name, content in files.items() if content is not GOOD}
        expected_skipped |= {str(_write_folder(folder / f"bad{index}", bad) / name) for name in bad}
    record = run_one_stage(spark, "ingest", [str(folder)], tmp_path / "ingest", {"skip_bad_files": True})
    assert_ledger_invariant(record, tmp_path / "ingest")
    assert (record["rows_in"], record["rows_out"]) == (2, 2)
    assert [f["path"] for f in record["input"]["files"]] == [str(folder / "good.parquet")]
    skipped = {entry["path"]: entry["error"] for entry in record["input"]["skipped_files"]}
    assert set(skipped) == expected_skipped and all(skipped.values())


@pytest.mark.parametrize(
    ("case", "make_input", "pattern"),
    [
        ("empty folder", lambda root: _write_folder(root / "empty", {}), r"input folder .* holds no files"),
        ("only hidden and underscore files",
         lambda root: _write_folder(root / "hidden", {".part.parquet": GOOD, "_SUCCESS": b""}),
         r"input folder .* holds no files"),
        ("missing path", lambda root: root / "nowhere", r"input '.*nowhere' does not exist"),
        ("glob matching nothing", lambda root: _write_folder(root / "g", {"a.txt": b"x"}) / "*.parquet",
         r"input pattern .* matches no file"),
    ],
)
def test_empty_or_missing_input_is_a_clear_error(spark, tmp_path, case, make_input, pattern):
    with pytest.raises(IngestError, match=pattern):
        run_one_stage(spark, "ingest", [str(make_input(tmp_path))], tmp_path / "ingest")


def test_only_empty_shards_give_an_empty_stage(spark, tmp_path):
    folder = _write_folder(tmp_path / "in", {"a.parquet": GOOD.slice(0, 0), "b.parquet": GOOD.slice(0, 0)})
    record = run_one_stage(spark, "ingest", [str(folder)], tmp_path / "ingest")
    assert (record["rows_in"], record["rows_out"], record["drops"]) == (0, 0, {})
    assert (tmp_path / "ingest" / "_SUCCESS").is_file()


def test_a_corrupt_page_behind_a_valid_footer_fails_naming_file_and_row_group(spark, tmp_path):
    rows = 2_000
    data = bytearray(parquet_bytes(_table(url=[f"https://img.example/{i}.jpg" for i in range(rows)],
                                          caption=[f"caption {i}" for i in range(rows)]), compression="none"))
    data[len(data) // 3: len(data) // 3 + 2_000] = b"\xff" * 2_000  # data pages only: the footer stays readable
    folder = _write_folder(tmp_path / "in", {"s.parquet": bytes(data)})
    # skip_bad_files only covers shards whose footer is unusable: rows of this one may already be counted.
    for skip_bad_files in (False, True):
        with pytest.raises(Exception, match=r"cannot read row group 0 of input shard .*s\.parquet"):
            run_one_stage(spark, "ingest", [str(folder)], tmp_path / f"ingest{skip_bad_files}",
                          {"skip_bad_files": skip_bad_files})
        assert not (tmp_path / f"ingest{skip_bad_files}").exists()


@pytest.mark.parametrize(
    ("keep_columns", "pattern"),
    [
        (("uid",), r"keep_columns \['uid'\] clash"),
        (("url",), r"keep_columns \['url'\] clash"),
        (("_source_row",), r"keep_columns \['_source_row'\] clash"),
        (("w", "w"), r"keep_columns names \['w'\] more than once"),
    ],
)
def test_keep_columns_that_would_shadow_the_stage_columns_are_refused(keep_columns, pattern):
    # A shard's own `uid` column kept under that name would replace the computed uid.
    with pytest.raises(ValueError, match=pattern):
        IngestOptions(keep_columns=keep_columns)


def test_cli_exits_2_with_the_message(spark, tmp_path, caplog):
    folder = _write_folder(tmp_path / "in", {"s.parquet": _table(url=[1, 2], caption=["a", "b"])})
    assert cli_main(["ingest", "--input", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert re.search(r"s\.parquet: url column 'url' has type int64", caplog.text)
    caplog.clear()
    good = _write_folder(tmp_path / "good", {"s.parquet": _table(url=URLS, caption=["a", "b"], uid=["x", "y"])})
    argv = ["ingest", "--input", str(good), "--output", str(tmp_path / "out"), "--keep-columns", "uid"]
    assert cli_main(argv) == 2
    assert "keep_columns ['uid'] clash" in caplog.text


# ------------------------------------------------------------------------------------------------------------------
# Images: decode_image, and the dedup_image stage


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int, paletted: bool = False) -> bytes:
    """A complete, valid 1-bit side x side PNG of one colour: about side**2 / 8000 bytes on disk, side**2 pixels
    (3 side**2 bytes as RGB) once decoded. Compressed a row at a time, so building it costs no memory either."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0, then side bits
    image_data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    colour_type = 3 if paletted else 0
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, colour_type, 0, 0, 0))]
    if paletted:
        chunks.append(_chunk(b"PLTE", bytes([200, 30, 30, 0, 0, 0])))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _chunk(b"IDAT", image_data) + _chunk(b"IEND", b"")


def field(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth random RGB picture; different seeds give pictures far apart in pHash."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


# Frame seeds per format; the two animations differ, or dedup_image would rightly merge their equal first frames.
ANIMATION_SEEDS = {"GIF": (40, 41, 42), "PNG": (43, 44, 45)}


def _animated(image_format: str) -> bytes:
    frames = [field(seed).convert("L") for seed in ANIMATION_SEEDS[image_format]]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _paletted_with_transparency() -> bytes:
    paletted = field(50).convert("P")
    return encode(paletted, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    return encode(Image.fromarray(np.asarray(field(60).convert("L")).astype(np.uint16) * 257), "PNG")


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<rect width="64" height="64" fill="red"/></svg>')
# case -> (bytes, expected DecodeFailure reason, or the decoded (source mode, output mode))
IMAGE_CASES = {
    "truncated JPEG": (encode(field(1), "JPEG")[:300], "corrupt"),
    "JPEG signature then text": (b"\xff\xd8\xff\xe0 this is not a JPEG", "corrupt"),
    "zero bytes": (b"", "empty"),
    "null": (None, "missing"),
    "HTML pretending to be a JPEG": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
    "GIF signature then text": (b"GIF89a, then just words", "not_an_image"),
    "SVG": (SVG, "not_an_image"),
    "1-bit PNG bomb 30000x30000": (bomb_png(30_000), "decompression_bomb"),
    "paletted PNG bomb 20000x20000": (bomb_png(20_000, paletted=True), "decompression_bomb"),
    "PNG 10000x10000 (1-2x the pixel limit)": (bomb_png(10_000), "decompression_bomb"),
    "CMYK JPEG": (encode(field(2).convert("CMYK"), "JPEG"), ("CMYK", "RGB")),
    "16-bit PNG": (_sixteen_bit(), ("I;16", "L")),
    "animated GIF": (_animated("GIF"), ("P", "RGB")),
    "animated PNG": (_animated("PNG"), ("L", "L")),
    "paletted PNG with transparency": (_paletted_with_transparency(), ("P", "RGB")),
    "1x1 pixel": (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), ("RGB", "RGB")),
}
BOMBS = [case for case, (_, expected) in IMAGE_CASES.items() if expected == "decompression_bomb"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_hostile_image_decodes_or_gives_a_reason(case):
    data, expected = IMAGE_CASES[case]
    result = decode_image(data)
    if isinstance(expected, str):
        assert isinstance(result, DecodeFailure) and result.reason == expected, result
        assert result.detail
        return
    assert isinstance(result, DecodedImage), result
    assert (result.source_mode, result.image.mode) == expected
    assert 0 <= perceptual_hash(result.image) < 2**64
    if case.startswith("animated"):
        first_frame = np.asarray(field(ANIMATION_SEEDS[case.split()[1]][0]).convert("L"))
        np.testing.assert_array_equal(np.asarray(result.image.convert("L")), first_frame)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", BOMBS)
def test_a_bomb_is_refused_before_any_pixel_is_decoded(case, monkeypatch):
    # Every Pillow decoder decodes pixels in ImageFile.load; were it reached, the reason would be "corrupt", and
    # the 20000x20000 one would first allocate 400 MB (1.2 GB as RGB).
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data, _ = IMAGE_CASES[case]
    assert len(data) < 200_000
    result = decode_image(data)
    assert isinstance(result, DecodeFailure) and result.reason == "decompression_bomb", result
    assert re.search(r"\d+ ?x ?\d+|\d+ pixels", result.detail)


@pytest.fixture(scope="module")
def image_stage(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_images")
    cases = {**IMAGE_CASES, "a good photo": (encode(field(3), "JPEG"), ("RGB", "RGB"))}
    urls = [f"https://img.example/{index}.img" for index in range(len(cases))]
    captions = list(cases)
    shard = write_shard(root / "in" / "images.parquet", {
        "url": urls, "caption": captions, "jpg": pa.array([data for data, _ in cases.values()], pa.binary()),
    })
    with time_limit():
        ingest_record = run_one_stage(spark, "ingest", [str(shard)], root / "ingest", {"keep_columns": ["jpg"]})
        record = run_one_stage(spark, "dedup_image", root / "ingest", root / "dedup")
    assert ingest_record["rows_out"] == len(cases)
    _, ledger = assert_ledger_invariant(record, root / "dedup")
    uid = {caption: uid_of(url.encode(), caption.encode()) for url, caption in zip(urls, captions, strict=True)}
    return {"cases": cases, "uid": uid, "record": record, "kept": pq.read_table(root / "dedup"), "ledger": ledger}


def test_dedup_image_ledgers_every_undecodable_image_with_its_reason(image_stage):
    cases, uid = image_stage["cases"], image_stage["uid"]
    ledger = {r["uid"]: r for r in image_stage["ledger"].to_pylist()}
    kept = set(image_stage["kept"]["uid"].to_pylist())
    for case, (_, expected) in cases.items():
        if isinstance(expected, str):
            row = ledger[uid[case]]
            assert row["reason"] == Reason.UNDECODABLE_IMAGE, case
            assert json.loads(row["detail"])["reason"] == expected, case
        else:
            assert uid[case] in kept, case
    assert image_stage["record"]["drops"] == {Reason.UNDECODABLE_IMAGE: sum(isinstance(e, str)
                                                                            for _, e in cases.values())}


def test_dedup_image_hashes_the_decodable_ones(image_stage):
    kept = image_stage["kept"].to_pylist()
    hashes = np.array([row["image_phash"] for row in kept], dtype=np.int64).view(np.uint64)
    distances = hamming_distances(hashes[:, None], hashes[None, :])
    assert (distances[~np.eye(len(kept), dtype=bool)] > 4).all(), "the decodable cases are distinct pictures"
    assert all(row["image_width"] >= 1 and row["image_height"] >= 1 for row in kept)


# ------------------------------------------------------------------------------------------------------------------
# Properties: uid, MinHash, MetaCLIP matcher (run under the derandomized "ci" profile of tests/conftest.py)

NUL_FREE_BYTES = st.binary(max_size=48).map(lambda raw: raw.replace(b"\x00", b""))
ARROW_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # Arrow utf8 cannot hold surrogates


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_uid_is_the_contract_formula_deterministic_and_lowercase_hex(url, caption):
    uid = uid_of(url, caption)
    assert uid == hashlib.sha256(url + b"\x00" + caption).digest()[:16].hex() == uid_of(url, caption)
    assert re.fullmatch(r"[0-9a-f]{32}", uid)
    assert compute_uids(pa.array([url], pa.binary()), pa.array([caption], pa.binary())).to_pylist() == [uid]


@given(st.lists(st.tuples(ARROW_TEXT, ARROW_TEXT), max_size=8))
def test_uids_of_string_columns_are_those_of_their_utf8_bytes(pairs):
    urls, captions = pa.array([u for u, _ in pairs], pa.string()), pa.array([c for _, c in pairs], pa.string())
    assert compute_uids(urls, captions).to_pylist() == [uid_of(u.encode(), c.encode()) for u, c in pairs]


@given(NUL_FREE_BYTES, st.binary(max_size=48), st.data())
def test_uid_differs_when_url_or_caption_differs(url, caption, data):
    # Without a NUL in the url the first NUL of url + NUL + caption is the separator, so the pair is recoverable
    # from the hashed bytes; ingest ledgers any NUL (see the next test), so every kept row's uid is its own.
    other_url = data.draw(st.one_of(st.just(url), NUL_FREE_BYTES), label="other url")
    other_caption = data.draw(st.one_of(st.just(caption), st.binary(max_size=48)), label="other caption")
    if (other_url, other_caption) != (url, caption):
        assert uid_of(other_url, other_caption) != uid_of(url, caption)


def test_a_nul_in_the_url_makes_the_uid_ambiguous():
    # Why ingest refuses NUL (nul_character): the uid contract cannot tell these pairs apart.
    assert uid_of(*(s.encode() for s in COLLIDING_URL_NUL)) == uid_of(*(s.encode() for s in COLLIDING_CAPTION_NUL))


SHINGLE_LISTS = st.lists(st.text(max_size=6), max_size=30)


ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def mangled(text: str) -> str:
    """The same caption as a crawl might mangle it: ASCII letters upper-cased, whitespace runs lengthened."""
    return "\t " + re.sub(r"(\s+)", r"\1 \n", text.translate(ASCII_UPPER)) + " \r"


@given(ARROW_TEXT, st.sampled_from([("char", 5), ("char", 3), ("word", 2)]))
def test_identical_and_equally_normalised_texts_have_identical_signatures(text, shingling):
    kind, size = shingling
    assert normalise_texts([mangled(text)]) == normalise_texts([text])
    signatures = MinHasher(num_perm=32, kind=kind, size=size).signatures([text, "".join(list(text)), mangled(text)])
    np.testing.assert_array_equal(signatures[1], signatures[0])
    np.testing.assert_array_equal(signatures[2], signatures[0])


@given(SHINGLE_LISTS, SHINGLE_LISTS)
def test_signature_of_a_union_is_the_minimum_of_the_signatures(first, second):
    # MinHash is a min over the set: an exact property, no estimate involved.
    signatures = MinHasher(num_perm=64).signatures([first, second, first + second])
    np.testing.assert_array_equal(signatures[2], np.minimum(signatures[0], signatures[1]))


@given(st.sets(st.integers(0, 200), min_size=1, max_size=60), st.sets(st.integers(0, 200), min_size=1, max_size=60))
def test_jaccard_estimate_is_within_the_hoeffding_bound(first, second):
    num_perm = 256
    shingles = [[f"s{value}" for value in sorted(values)] for values in (first, second)]
    signatures = MinHasher(num_perm=num_perm).signatures(shingles)
    estimate = float((signatures[0] == signatures[1]).mean())
    # Each permutation agrees with probability J, independently: P(|estimate - J| >= t) <= 2 exp(-2 k t^2), which
    # is 2e-7 at t = 0.2 and k = 256; the examples are derandomized, so this never flickers.
    assert abs(estimate - exact_jaccard(shingles[0], shingles[1])) < 0.2


HOSTILE_ALPHABET = "ab \x00\x1b\u202e\u200d\u0301\x0b\x85\u2028\ufeff.,\t\n"


def metaclip_spacing(text: str) -> str:
    """MetaCLIP's substr_matching.spacing, restated (as tests/unit/test_metaclip.py does)."""
    spaced = f" {text} "
    for punctuation in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(punctuation, f" {punctuation} ")
    for character in ["\t", "\n", "\r"]:
        spaced = spaced.replace(character, " ")
    return spaced


@settings(max_examples=300)
@given(st.lists(st.text(HOSTILE_ALPHABET, max_size=16), min_size=1, max_size=5), st.data())
def test_matcher_equals_the_reference_on_control_and_bidi_characters(texts, data):
    entries = data.draw(st.lists(st.text(HOSTILE_ALPHABET, min_size=1, max_size=4), max_size=4), label="entries")
    for text in texts:  # slices of the spaced texts make matches frequent rather than merely possible
        spaced = metaclip_spacing(text)[1:-1]
        start = data.draw(st.integers(0, len(spaced)), label="start")
        entries.append(spaced[start: start + data.draw(st.integers(1, 6), label="length")])
    automaton = build_reference_automaton(entries)
    expected = [reference_match(text, automaton) for text in texts]
    assert Matcher.from_entries(entries).match(texts).to_pylist() == expected
    assert expected == [[i for i, entry in enumerate(entries) if f" {entry} " in metaclip_spacing(text)]
                        for text in texts]
