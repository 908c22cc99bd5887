import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from curation.ops import metadata
from curation.ops.metadata import (
    build_metadata,
    entries_with_blocking_punctuation,
    find_wordnet,
    load_metadata,
    metaclip_synset_name,
    metadata_sha256,
    read_wordnet_synset_names,
    write_metadata,
)

LICENCE_HEADER = (
    "  1 This software and database is being provided to you\n  2 WordNet 3.0 Copyright 2006 by Princeton.  \n"
)
SYNTHETIC_DATA_FILES = {
    "data.noun": "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is\n"
    "00002000 03 n 02 Ice_Cream 0 ice-cream 0 000 | a frozen dessert\n"
    "00002100 15 n 01 St._Louis 0 000 | a city\n",
    "data.verb": "00001740 29 v 01 breathe 0 000 01 + 02 00 | draw air\n",
    "data.adj": "00001740 00 a 01 able 0 000 | having the means\n"
    "00002200 00 s 02 eldest(a) 0 oldest 0 000 | first born\n"
    "00002300 00 a 04 .22_caliber 0 .22-caliber 0 000 | of a size\n",
    "data.adv": "00001740 02 r 01 entity 0 000 | repeated across files\n",
}
SYNTHETIC_NAMES = {"entity", "ice cream", "st", "breathe", "able", "eldest", ""}


def write_wordnet_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in SYNTHETIC_DATA_FILES.items():
        (directory / name).write_text(LICENCE_HEADER + body)
    return directory


@pytest.fixture
def no_system_wordnet(monkeypatch, tmp_path):
    """Hide any WordNet this machine has, so that discovery sees only what a test lays out."""
    monkeypatch.setattr(metadata, "nltk_search_paths", lambda: [])
    monkeypatch.setattr(metadata, "DEBIAN_WORDNET_DIR", tmp_path / "no-debian-wordnet")


@pytest.fixture(scope="module")
def real_wordnet_dir(shared_data, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("nltk_data")
    with tarfile.open(shared_data / "wordnet30" / "nltk_data_wordnet30.tgz") as archive:
        archive.extractall(target, filter="data")
    return target / "corpora" / "wordnet"


# --- load_metadata -------------------------------------------------------------------------------------------


def test_load_metadata_returns_any_string_list_unchanged(tmp_path):
    entries = ["Dog", "dog", "ice cream", "dog", "café", "u.s", " cat"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(entries, indent=2))
    assert load_metadata(path) == entries


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'["dog", "cat"', "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        (b'{"dog": 1}', "found a dict"),
        (b'["dog", "cat", 3]', "entry 2 is a int"),
        (b'["dog", null]', "entry 1 is a NoneType"),
        (b"[]", "empty list"),
        # issue 17 case 10: a blank entry matches most captions
        (b'["dog", ""]', r"line 1: entry 1 is ''; an entry must have a non-blank character"),
        (b'[\n  "dog",\n  "cat",\n  "\\t ",\n  ""\n]', r"line 4: entry 2 is '\\t ' \(and 1 more\)"),
        ('["ünï",\r\n "a" ,\r\n" "]'.encode("utf-16"), r"line 3: entry 2 is ' '"),
    ],
)
def test_load_metadata_rejects_malformed_files_naming_them(tmp_path, content, message):
    path = tmp_path / "broken-metadata.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as raised:
        load_metadata(path)
    assert str(path) in str(raised.value)


# --- canonical encoding ----------------------------------------------------------------------------------------


def test_metadata_sha256_is_the_sha256_of_the_canonical_encoding():
    entries = ["dog", "ice cream", "café", "0"]
    canonical = '["dog","ice cream","café","0"]'.encode()
    assert metadata_sha256(entries) == hashlib.sha256(canonical).hexdigest()
    assert metadata_sha256(tuple(entries)) == metadata_sha256(entries)
    # Pinned so that a change to the canonical encoding cannot pass unnoticed.
    assert metadata_sha256(["a", "b"]) == "0473ef2dc0d324ab659d3580c1134e9d812035905c4781fdd6d529b0c6860e13"


def test_write_metadata_writes_the_canonical_bytes_atomically(tmp_path):
    path = tmp_path / "out" / "metadata.json"
    write_metadata(path, ["old"])
    entries = ["dog", "café", "ice cream"]
    write_metadata(path, entries)
    assert path.read_bytes() == json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == metadata_sha256(entries)
    assert load_metadata(path) == entries
    assert [child.name for child in path.parent.iterdir()] == ["metadata.json"]


def test_entries_with_blocking_punctuation_lists_their_ids():
    entries = ["dog", "u.s", "a,b", "why?", "wow!", "semi;colon", "ti:me", "back`tick", "tab\there", "new\nline"]
    entries += ["carriage\rreturn", "ice cream", "rock'n'roll", "e-mail"]
    assert entries_with_blocking_punctuation(entries) == list(range(1, 11))


# --- WordNet ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_lemma", "name"),
    [
        ("entity", "entity"),
        ("Ice_Cream", "ice cream"),
        ("eldest(a)", "eldest"),
        ("galore(ip)", "galore"),
        ("St._Louis", "st"),
        (".22_caliber", ""),
    ],
)
def test_metaclip_synset_name_follows_nltk_and_metaclip(first_lemma, name):
    assert metaclip_synset_name(first_lemma) == name


def test_read_wordnet_synset_names_skips_the_licence_header(tmp_path):
    source = metadata.WordNetSource("wordnet_dir", write_wordnet_dir(tmp_path / "dict"))
    names, synsets = read_wordnet_synset_names(source)
    assert names == SYNTHETIC_NAMES
    assert synsets == 8
    assert metadata.wordnet_version(source) == "3.0"


def test_find_wordnet_order_explicit_then_nltk_then_debian(monkeypatch, tmp_path, no_system_wordnet):
    assert find_wordnet() is None
    debian = write_wordnet_dir(tmp_path / "debian")
    monkeypatch.setattr(metadata, "DEBIAN_WORDNET_DIR", debian)
    assert find_wordnet() == metadata.WordNetSource("debian", debian)

    nltk_zip = tmp_path / "zipped" / "corpora" / "wordnet.zip"
    nltk_zip.parent.mkdir(parents=True)
    with zipfile.ZipFile(nltk_zip, "w") as archive:
        for name, body in SYNTHETIC_DATA_FILES.items():
            archive.writestr(f"wordnet/{name}", LICENCE_HEADER + body)
    nltk_dir = write_wordnet_dir(tmp_path / "unzipped" / "corpora" / "wordnet")
    monkeypatch.setattr(metadata, "nltk_search_paths", lambda: [tmp_path / "zipped", tmp_path / "unzipped"])
    zipped = find_wordnet()
    assert zipped == metadata.WordNetSource("nltk_zip", nltk_zip)
    assert read_wordnet_synset_names(zipped) == (SYNTHETIC_NAMES, 8)
    monkeypatch.setattr(metadata, "nltk_search_paths", lambda: [tmp_path / "unzipped", tmp_path / "zipped"])
    assert find_wordnet() == metadata.WordNetSource("nltk_data", nltk_dir)

    explicit = write_wordnet_dir(tmp_path / "explicit")
    assert find_wordnet(explicit) == metadata.WordNetSource("wordnet_dir", explicit)
    with pytest.raises(ValueError, match="does not contain WordNet"):
        find_wordnet(tmp_path / "empty")


def test_nltk_search_paths_start_with_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", f"{tmp_path / 'first'}:{tmp_path / 'second'}")
    paths = metadata.nltk_search_paths()
    assert paths[:2] == [tmp_path / "first", tmp_path / "second"]
    assert Path("/usr/share/nltk_data") in paths


def test_wordnet_parse_matches_nltk_synset_names_on_real_data(real_wordnet_dir, shared_data):
    """wordnet30_synsets.tsv holds NLTK 3.10's synset.name() for every synset of this WordNet 3.0."""
    lines = (shared_data / "wordnet30" / "wordnet30_synsets.tsv").read_text().splitlines()[1:]
    nltk_names = {line.split("\t")[0].split(".")[0].replace("_", " ") for line in lines}
    names, synsets = read_wordnet_synset_names(metadata.WordNetSource("wordnet_dir", real_wordnet_dir))
    assert synsets == len(lines) == 117_659
    assert names == nltk_names
    assert len(names) == 86_555


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The multilingual functions are not available")
def test_wordnet_parse_equals_live_nltk(real_wordnet_dir, monkeypatch):
    nltk_data = pytest.importorskip("nltk.data")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # NLTK only opens corpora under its data path.
    monkeypatch.setattr(nltk_data, "path", [str(real_wordnet_dir.parent.parent), *nltk_data.path])
    wordnet = WordNetCorpusReader(str(real_wordnet_dir), None)
    nltk_names = {synset.name().split(".")[0].replace("_", " ") for synset in wordnet.all_synsets()}
    names, _ = read_wordnet_synset_names(metadata.WordNetSource("wordnet_dir", real_wordnet_dir))
    assert names == nltk_names


# --- build -----------------------------------------------------------------------------------------------------


def test_build_without_wordnet_uses_wordfreq_and_says_wordnet_was_skipped(no_system_wordnet):
    entries, record = build_metadata(wordfreq_top_n=5_000)
    wordnet, digits, wordfreq = record["sources"]
    assert wordnet["name"] == "wordnet" and wordnet["status"] == "skipped" and wordnet["entries"] == 0
    assert digits["entries"] == 100 and wordfreq["words"] == 5_000
    assert entries == sorted(set(entries))
    assert {"the", "0", "99", "dog"} <= set(entries)
    assert record["entries"] == len(entries) == digits["new_entries"] + wordfreq["new_entries"]
    assert record["duplicates_removed"] == record["entries_before_dedup"] - len(entries)
    assert record["sha256"] == metadata_sha256(entries)
    blocking = record["blocking_punctuation"]
    assert blocking["count"] == len(entries_with_blocking_punctuation(entries))
    assert all(entries[entry_id] == entry for entry_id, entry in blocking["sample"])


def test_build_with_synthetic_wordnet_merges_and_drops_blank(tmp_path, no_system_wordnet):
    entries, record = build_metadata(write_wordnet_dir(tmp_path / "dict"), wordfreq_top_n=1_000)
    wordnet = record["sources"][0]
    assert wordnet | {"path": None} == {
        "name": "wordnet",
        "status": "used",
        "kind": "wordnet_dir",
        "path": None,
        "version": "3.0",
        "synsets": 8,
        "entries": 7,
        "new_entries": 7,
    }
    assert record["dropped_blank"] == [""]
    assert "" not in entries and {"ice cream", "st", "eldest"} <= set(entries)
    assert record["entries_before_dedup"] == 8 + 100 + 1_000


def test_build_min_zipf_keeps_only_frequent_words(no_system_wordnet):
    words = metadata.wordfreq_words(top_n=2_000, min_zipf=5.5)
    assert 0 < len(words) < 2_000 and "the" in words
    _, record = build_metadata(wordfreq_top_n=2_000, min_zipf=5.5)
    assert record["sources"][2]["words"] == len(words)


def test_build_with_real_wordnet_gives_at_least_300k_entries(real_wordnet_dir):
    entries, record = build_metadata(real_wordnet_dir)
    assert len(entries) >= 300_000
    assert entries == sorted(set(entries)) and "" not in entries
    assert {"dog", "ice cream", "0", "99"} <= set(entries)
    wordnet = record["sources"][0]
    assert (wordnet["status"], wordnet["version"], wordnet["synsets"], wordnet["entries"]) == (
        "used",
        "3.0",
        117_659,
        86_555,
    )
    assert record["entries"] == len(entries) and record["sha256"] == metadata_sha256(entries)
