import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.demo import LONG_TEXT_MIN_CHARS, generate_demo_corpus
from curation.ops.metadata import DIGIT_ENTRIES, wordfreq_words

ROWS = 8_000
SHARDS = 4


@pytest.fixture(scope="module")
def entries() -> list[str]:
    return sorted(set(wordfreq_words(50_000)) | set(DIGIT_ENTRIES))


@pytest.fixture(scope="module")
def corpus(entries, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    summary = generate_demo_corpus(output_dir, entries, rows=ROWS, shards=SHARDS, seed=7)
    tables = [pq.read_table(output_dir / f"part-{shard:05d}.parquet") for shard in range(SHARDS)]
    return output_dir, summary, tables


def rows_of(tables) -> list[tuple[int, dict]]:
    return [(shard, row) for shard, table in enumerate(tables) for row in table.to_pylist()]


def matches(text: str, entry: str) -> bool:
    """MetaCLIP v1 matching of one entry (DESIGN.md section 4), for checking the corpus independently."""
    padded = re.sub(r"[\t\n\r]", " ", re.sub(r"([,.;:?!`])", r" \1 ", f" {text} "))
    return f" {entry} " in padded


def test_same_seed_gives_byte_identical_files(entries, corpus, tmp_path):
    first_dir, first_summary, _ = corpus
    second_summary = generate_demo_corpus(tmp_path, entries, rows=ROWS, shards=SHARDS, seed=7)
    assert second_summary == first_summary
    for shard in range(SHARDS):
        name = f"part-{shard:05d}.parquet"
        assert (tmp_path / name).read_bytes() == (first_dir / name).read_bytes()
    other_seed = generate_demo_corpus(tmp_path / "other", entries, rows=ROWS, shards=SHARDS, seed=8)
    assert (tmp_path / "other" / "part-00000.parquet").read_bytes() != (first_dir / "part-00000.parquet").read_bytes()
    assert other_seed["top_concepts"] != first_summary["top_concepts"]


def test_rows_shards_and_schema(corpus):
    output_dir, summary, tables = corpus
    assert sorted(path.name for path in output_dir.iterdir()) == [f"part-{shard:05d}.parquet" for shard in range(4)]
    assert sum(table.num_rows for table in tables) == summary["rows"] == ROWS
    binary_shard = int(summary["binary_text_shard"][len("part-") : -len(".parquet")])
    for shard, table in enumerate(tables):
        text_type = pa.binary() if shard == binary_shard else pa.string()
        assert table.schema == pa.schema(
            [
                ("URL", pa.string()),
                ("TEXT", text_type),
                ("WIDTH", pa.int64()),
                ("HEIGHT", pa.int64()),
                ("similarity", pa.float64()),
            ]
        )


def test_each_planted_kind_is_present_in_the_stated_numbers(corpus, entries):
    _, summary, tables = corpus
    planted = summary["planted"]
    assert all(count > 0 for count in planted.values())
    rows = rows_of(tables)
    texts = [row["TEXT"] for _, row in rows]
    urls = [row["URL"] for _, row in rows]
    assert texts.count(None) == planted["null_text"]
    assert texts.count("") + texts.count(b"") == planted["empty_text"]
    assert sum(bool(text) and not text.strip() for text in texts) == planted["whitespace_text"]
    assert urls.count(None) == planted["null_url"]
    assert urls.count("") == planted["empty_url"]
    assert sum(bool(url) and not url.startswith("http://") for url in urls) == planted["non_http_url"]
    assert sum(text is not None and len(text) >= LONG_TEXT_MIN_CHARS for text in texts) == planted["text_too_long"]
    decoded = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts]
    listings = [t for t in decoded if t and "| shop" in t and len(t) < LONG_TEXT_MIN_CHARS]
    assert len(listings) == planted["near_duplicate_rows"] == sum(summary["near_duplicate_family_sizes"])
    assert sum(bool(url) and "#from-" in url for url in urls) == planted["url_duplicate"]

    invalid = []
    for text in texts:
        if isinstance(text, bytes):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                invalid.append(text)
    assert len(invalid) == planted["invalid_utf8"]

    entry_set = set(entries)
    readable = [text.decode("utf-8", "replace") if isinstance(text, bytes) else text for text in texts]
    consonant_only = [
        text for text in readable if text and re.fullmatch(r"[b-df-hj-np-tv-z]+( [b-df-hj-np-tv-z]+)*", text)
    ]
    assert len(consonant_only) == planted["no_match"]
    for text in consonant_only:
        words = text.split(" ")
        runs = {
            " ".join(words[start:stop]) for start in range(len(words)) for stop in range(start + 1, len(words) + 1)
        }
        assert entry_set.isdisjoint(runs)


def test_duplicates_are_whole_row_copies_some_across_shards(corpus):
    _, summary, tables = corpus
    first_shard: dict[tuple, int] = {}
    repeats = cross_shard = 0
    for shard, row in rows_of(tables):
        if not (row["URL"] or "").startswith("http://"):
            continue
        text = row["TEXT"].encode("utf-8") if isinstance(row["TEXT"], str) else row["TEXT"]
        key = (row["URL"], text, row["WIDTH"], row["HEIGHT"], row["similarity"])
        if key in first_shard:
            repeats += 1
            cross_shard += first_shard[key] != shard
        else:
            first_shard[key] = shard
    assert repeats == summary["planted"]["duplicate_pair"]
    assert len({url for url, *_ in first_shard}) == len(first_shard)
    assert cross_shard > 0


def test_concepts_are_zipf_skewed(corpus):
    _, summary, tables = corpus
    texts = [row["TEXT"] for _, row in rows_of(tables)]
    texts = [text.decode("utf-8", "replace") if isinstance(text, bytes) else text for text in texts]
    texts = [text for text in texts if text and len(text) < LONG_TEXT_MIN_CHARS]
    top_concept, top_count = summary["top_concepts"][0]
    assert sum(matches(text, top_concept) for text in texts) >= top_count
    assert summary["concepts"] == 2_000
    assert top_count > 500
    assert top_count >= 50 * max(1.0, summary["median_concept_captions"])
    counts = [count for _, count in summary["top_concepts"]]
    assert counts == sorted(counts, reverse=True) and np.all(np.array(counts) > 0)


def test_rejects_too_few_rows_or_plain_entries(tmp_path, entries):
    with pytest.raises(ValueError, match="rows must be"):
        generate_demo_corpus(tmp_path, entries, rows=100)
    with pytest.raises(ValueError, match="plain-word entries"):
        generate_demo_corpus(tmp_path, ["u.s", "a,b", "0", "1"], rows=1_000)


def test_demo_requests_name_real_rows_and_their_copies_hash_close(tmp_path):
    from PIL import Image

    from curation.demo import write_demo_requests
    from curation.demo_images import demo_image_url, planted_kind, scene_image, scene_size
    from curation.ops.blocklists import load_url_blocklist
    from curation.ops.imagehash import hamming_distances, perceptual_hash
    from curation.ops.urls import normalise_url

    summary = write_demo_requests(tmp_path, rows=3_000, seed=0, image_port=18765)
    assert summary == {"blocked_urls": 4, "blocked_images": 2, "eval_images": 6}
    blocked = load_url_blocklist(tmp_path / "blocked_urls.txt")
    assert normalise_url(demo_image_url(5, 18765)) in blocked and len(blocked) == 4
    hashes = [int(line, 16) for line in (tmp_path / "blocked_image_phashes.txt").read_text().split()[1:]
              if not line.startswith("#") and len(line) == 16]
    assert len(hashes) == 2
    for path in sorted((tmp_path / "eval_images").iterdir()):
        row = int(path.stem.removeprefix("eval-"))
        assert planted_kind(row) is None
        with Image.open(path) as copy:
            copy_hash = perceptual_hash(copy.convert("RGB"))
        original_hash = perceptual_hash(scene_image(0, row, *scene_size(0, row)))
        distance = hamming_distances(np.array([copy_hash], np.uint64), np.array([original_hash], np.uint64))[0]
        assert distance <= 4, f"{path.name} hashes {distance} bits from its original"
