"""MetaCLIP metadata: load, hash, write and build the list of entries that captions are matched against.

A metadata list is a JSON list of strings; an entry's id is its index (DESIGN.md section 4, "MetaCLIP
metadata"). The official MetaCLIP 500k list (WordNet synsets + Wikipedia unigrams, bigrams and titles) is not
redistributable, so `build_metadata` makes the same kind of list from

* WordNet synset names with MetaCLIP's rule: for every synset, NLTK's ``synset.name()``
  ("firstlemma.pos.NN", lemma lowercased) up to its first '.', with '_' -> ' ' (Xu et al. 2023,
  "Demystifying CLIP Data", metadata part 1), read straight from the WordNet ``data.*`` files;
* the strings '0'..'99' (part of the same MetaCLIP rule);
* the most frequent English words of the ``wordfreq`` package (its "large" list), standing in for the
  Wikipedia unigrams.

Any official ``metadata.json`` a user has loads unchanged with `load_metadata`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# MetaCLIP v1 matching pads these with spaces, so an entry containing one can never occur between two spaces.
PUNCTUATION_THAT_BLOCKS_MATCHING = (",", ".", ";", ":", "?", "!", "`")
_BLOCKING_CHARACTERS = re.compile("[" + re.escape("".join(PUNCTUATION_THAT_BLOCKS_MATCHING)) + "\t\n\r]")

WORDNET_DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DIGIT_ENTRIES = tuple(str(number) for number in range(100))

# 300,000 words of wordfreq 3.1.1's English "large" list (all 319,938 have Zipf >= 1.0; the 300,000th has
# Zipf 1.06) give 300,000 entries alone and 344,037 together with WordNet 3.0, above MetaCLIP's 300k scale.
DEFAULT_WORDFREQ_TOP_N = 300_000
WORDFREQ_LANGUAGE = "en"
WORDFREQ_WORDLIST = "large"

ENTRY_ORDER = "sorted unique by Unicode code point (Python's default str ordering)"
BLOCKING_SAMPLE_SIZE = 20

# NLTK strips a trailing syntactic marker such as "(a)", "(p)" or "(ip)" from adjective lemmas; same pattern.
_LEMMA_MARKER = re.compile(r"(.*?)(\([^()]*\))?$")
_WORDNET_VERSION = re.compile(r"WordNet (\d+(?:\.\d+)+)")


def load_metadata(path: str | os.PathLike) -> list[str]:
    """Load a MetaCLIP-format metadata.json (a JSON list of strings, entry id = index) exactly as written."""
    path = Path(path)
    data = path.read_bytes()
    try:
        entries = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"metadata file {path} is not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"metadata file {path} must hold a JSON list of strings, found a {type(entries).__name__}")
    if not entries:
        raise ValueError(f"metadata file {path} holds an empty list; matching needs at least one entry")
    for entry_id, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(
                f"metadata file {path}: entry {entry_id} is a {type(entry).__name__} ({entry!r}), not a string"
            )
    blank = [entry_id for entry_id, entry in enumerate(entries) if not entry.strip()]
    if blank:
        # A blank entry matches captions that share nothing (12% of a corpus in the report that found it).
        others = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise ValueError(
            f"metadata file {path}, line {_line_of_entry(data, blank[0])}: entry {blank[0]} is "
            f"{entries[blank[0]]!r}{others}; an entry must have a non-blank character"
        )
    return entries


def _line_of_entry(data: bytes, entry_id: int) -> int:
    """The line (from 1) on which entry `entry_id` of the JSON list `data` starts; `data` is known to parse."""
    text = data.decode(json.detect_encoding(data))
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    start = position
    for _ in range(entry_id + 1):
        while text[position] in " \t\r\n,":  # JSON's whitespace, and the separator
            position += 1
        start = position
        _, position = decoder.raw_decode(text, position)
    return text.count("\n", 0, start) + 1


def canonical_metadata_bytes(entries: Sequence[str]) -> bytes:
    """The one encoding a metadata list is hashed and written in, so the same list always has the same sha256."""
    return json.dumps(list(entries), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def metadata_sha256(entries: Sequence[str]) -> str:
    """sha256 (hex) of the canonical JSON encoding of the entries (see `canonical_metadata_bytes`)."""
    return hashlib.sha256(canonical_metadata_bytes(entries)).hexdigest()


def write_metadata(path: str | os.PathLike, entries: Sequence[str]) -> None:
    """Write the canonical encoding atomically: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(file_descriptor, "wb") as temporary_file:
            temporary_file.write(canonical_metadata_bytes(entries))
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def entries_with_blocking_punctuation(entries: Sequence[str]) -> list[int]:
    """Ids of entries containing `PUNCTUATION_THAT_BLOCKS_MATCHING` or a tab/newline/carriage return.

    The builder's report; whether an entry can ever match is decided precisely by the matcher.
    """
    return [entry_id for entry_id, entry in enumerate(entries) if _BLOCKING_CHARACTERS.search(entry)]


@dataclass(frozen=True)
class WordNetSource:
    """Where WordNet's dict files were found.

    kind: "wordnet_dir" (given explicitly), "nltk_data" (corpora/wordnet), "nltk_zip" (corpora/wordnet.zip)
    or "debian" (the wordnet-base package).
    """

    kind: str
    path: Path

    def read_data_file(self, name: str) -> str:
        if self.kind == "nltk_zip":
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(f"wordnet/{name}").decode("utf-8")
        return (self.path / name).read_text(encoding="utf-8")


def _has_data_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in WORDNET_DATA_FILES)


def _zip_has_data_files(archive_path: Path) -> bool:
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return all(f"wordnet/{name}" in members for name in WORDNET_DATA_FILES)


def nltk_search_paths() -> list[Path]:
    """NLTK's data search path (nltk.data.path) computed the same way, without importing NLTK: $NLTK_DATA
    entries first, then ~/nltk_data, then the interpreter prefix and the system-wide locations."""
    paths = [Path(entry).expanduser() for entry in os.environ.get("NLTK_DATA", "").split(os.pathsep) if entry]
    if os.path.expanduser("~/") != "~/":
        paths.append(Path("~/nltk_data").expanduser())
    prefix = Path(sys.prefix)
    return paths + [
        prefix / "nltk_data",
        prefix / "share" / "nltk_data",
        prefix / "lib" / "nltk_data",
        Path("/usr/share/nltk_data"),
        Path("/usr/local/share/nltk_data"),
        Path("/usr/lib/nltk_data"),
        Path("/usr/local/lib/nltk_data"),
    ]


def find_wordnet(wordnet_dir: str | os.PathLike | None = None) -> WordNetSource | None:
    """Find WordNet's data.{noun,verb,adj,adv} files: (a) `wordnet_dir` if given (an error if it lacks them,
    rather than silently using another copy), (b) NLTK data (corpora/wordnet, then corpora/wordnet.zip, in
    each directory of `nltk_search_paths`), (c) Debian's wordnet-base at /usr/share/wordnet. None if absent."""
    if wordnet_dir is not None:
        directory = Path(wordnet_dir)
        if not _has_data_files(directory):
            raise ValueError(f"--wordnet-dir {directory} does not contain WordNet's {', '.join(WORDNET_DATA_FILES)}")
        return WordNetSource("wordnet_dir", directory)
    for search_path in nltk_search_paths():
        corpus_dir = search_path / "corpora" / "wordnet"
        if _has_data_files(corpus_dir):
            return WordNetSource("nltk_data", corpus_dir)
        corpus_zip = search_path / "corpora" / "wordnet.zip"
        if corpus_zip.is_file() and _zip_has_data_files(corpus_zip):
            return WordNetSource("nltk_zip", corpus_zip)
    if _has_data_files(DEBIAN_WORDNET_DIR):
        return WordNetSource("debian", DEBIAN_WORDNET_DIR)
    return None


def _synset_first_lemmas(data_file_text: str) -> Iterator[str]:
    """First lemma of each synset line: `offset lex_filenum ss_type w_cnt word lex_id ...`; lines starting
    with a space are the licence header."""
    for line in data_file_text.splitlines():
        if line and not line[0].isspace():
            yield line.split(maxsplit=5)[4]


def metaclip_synset_name(first_lemma: str) -> str:
    """MetaCLIP's entry for a synset: NLTK's name (first lemma, marker stripped, lowercased, + ".pos.NN") up
    to its first '.', '_' -> ' '. A lemma holding a '.' ("st._louis") is therefore cut there ("st")."""
    lemma = _LEMMA_MARKER.match(first_lemma).group(1).lower()
    return lemma.split(".")[0].replace("_", " ")


def wordnet_version(source: WordNetSource) -> str | None:
    """WordNet's version as stated in the licence header of data.noun ("WordNet 3.0 Copyright 2006 ...")."""
    for line in source.read_data_file("data.noun").splitlines():
        if line and not line[0].isspace():
            return None
        found = _WORDNET_VERSION.search(line)
        if found:
            return found.group(1)
    return None


def read_wordnet_synset_names(source: WordNetSource) -> tuple[set[str], int]:
    """The set of MetaCLIP synset names over all synsets (as NLTK's wn.all_synsets() would list them) and the
    number of synsets. The set includes '' for the ".22_caliber" synsets, as MetaCLIP's rule gives."""
    names: set[str] = set()
    synset_count = 0
    for data_file in WORDNET_DATA_FILES:
        for first_lemma in _synset_first_lemmas(source.read_data_file(data_file)):
            names.add(metaclip_synset_name(first_lemma))
            synset_count += 1
    return names, synset_count


def wordfreq_words(top_n: int | None = DEFAULT_WORDFREQ_TOP_N, min_zipf: float | None = None) -> list[str]:
    """The `top_n` most frequent words of wordfreq's English "large" list (all when None), keeping only those
    with Zipf frequency >= `min_zipf` when given (Zipf = log10 of occurrences per billion words)."""
    # Imported here: loading metadata (every matching task) must not pay for wordfreq's tokenizer imports.
    import wordfreq

    words = wordfreq.top_n_list(WORDFREQ_LANGUAGE, top_n or sys.maxsize, wordlist=WORDFREQ_WORDLIST)
    if min_zipf is not None:
        words = [
            word
            for word in words
            if wordfreq.zipf_frequency(word, WORDFREQ_LANGUAGE, wordlist=WORDFREQ_WORDLIST) >= min_zipf
        ]
    return words


def _source_record(name: str, strings: Iterable[str], already_present: set[str], **details) -> dict:
    distinct = set(strings)
    new_entries = distinct - already_present
    already_present |= new_entries
    return {"name": name, "status": "used", **details, "entries": len(distinct), "new_entries": len(new_entries)}


def build_metadata(
    wordnet_dir: str | os.PathLike | None = None,
    wordfreq_top_n: int | None = DEFAULT_WORDFREQ_TOP_N,
    min_zipf: float | None = None,
) -> tuple[list[str], dict]:
    """Build a MetaCLIP-style metadata list and a record of how it was built.

    Entries: WordNet synset names (MetaCLIP's rule, see `metaclip_synset_name`; skipped when no WordNet is
    found), '0'..'99', and wordfreq's most frequent English words; empty or whitespace-only strings (MetaCLIP's
    rule turns ".22_caliber" into '') are dropped because ' ' + '' + ' ' would match any text with a double
    space. Order: `ENTRY_ORDER`, so the same sources give the same list and sha256.

    Record: {"rule", "order", "sources": [{"name", "status", ...source details, "entries", "new_entries"}],
    "entries_before_dedup", "duplicates_removed", "dropped_blank", "entries", "sha256",
    "blocking_punctuation": {"characters", "count", "sample": [[id, entry], ...]}}. "entries" of a source
    counts its distinct strings; "new_entries" those not already given by an earlier source in the list.
    """
    present: set[str] = set()
    sources: list[dict] = []
    strings_before_dedup = 0

    wordnet = find_wordnet(wordnet_dir)
    if wordnet is None:
        logger.warning(
            "WordNet not found (no --wordnet-dir, NLTK data or %s); building without it", DEBIAN_WORDNET_DIR
        )
        sources.append(
            {
                "name": "wordnet",
                "status": "skipped",
                "reason": f"no --wordnet-dir, no corpora/wordnet in NLTK's search path, no {DEBIAN_WORDNET_DIR}",
                "entries": 0,
                "new_entries": 0,
            }
        )
    else:
        names, synset_count = read_wordnet_synset_names(wordnet)
        strings_before_dedup += synset_count
        logger.info(
            "WordNet from %s (%s): %d synsets, %d distinct names", wordnet.path, wordnet.kind, synset_count, len(names)
        )
        sources.append(
            _source_record(
                "wordnet",
                names,
                present,
                kind=wordnet.kind,
                path=str(wordnet.path),
                version=wordnet_version(wordnet),
                synsets=synset_count,
            )
        )

    strings_before_dedup += len(DIGIT_ENTRIES)
    sources.append(_source_record("digits", DIGIT_ENTRIES, present, range="0..99"))

    words = wordfreq_words(wordfreq_top_n, min_zipf)
    strings_before_dedup += len(words)
    sources.append(
        _source_record(
            "wordfreq",
            words,
            present,
            version=importlib.metadata.version("wordfreq"),
            language=WORDFREQ_LANGUAGE,
            wordlist=WORDFREQ_WORDLIST,
            top_n=wordfreq_top_n,
            min_zipf=min_zipf,
            words=len(words),
        )
    )

    blank = sorted(entry for entry in present if not entry.strip())
    entries = sorted(present.difference(blank))
    blocking_ids = entries_with_blocking_punctuation(entries)
    record = {
        "rule": (
            "WordNet: for every synset, NLTK's synset.name() up to the first '.', '_' -> ' '; plus '0'..'99'; "
            "plus wordfreq's most frequent English words; blank strings dropped"
        ),
        "order": ENTRY_ORDER,
        "sources": sources,
        "entries_before_dedup": strings_before_dedup,
        "duplicates_removed": strings_before_dedup - len(present),
        "dropped_blank": blank,
        "entries": len(entries),
        "sha256": metadata_sha256(entries),
        "blocking_punctuation": {
            "characters": "".join(PUNCTUATION_THAT_BLOCKS_MATCHING) + "\\t\\n\\r",
            "count": len(blocking_ids),
            "sample": [[entry_id, entries[entry_id]] for entry_id in blocking_ids[:BLOCKING_SAMPLE_SIZE]],
        },
    }
    logger.info(
        "metadata: %d entries (%d duplicates removed, %d with blocking punctuation), sha256 %s",
        len(entries),
        record["duplicates_removed"],
        len(blocking_ids),
        record["sha256"],
    )
    return entries, record
