"""The vectorised MetaCLIP matcher against MetaCLIP's own per-caption procedure (the oracle)."""

import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops.metaclip import (
    MATCH_TYPE,
    Matcher,
    build_reference_automaton,
    is_matchable_entry,
    reference_match,
    spacing,
)

# Restated from facebookresearch/MetaCLIP metaclip/substr_matching.py rather than imported, so that a change
# to the module's constants cannot move the oracle along with the code under test.
PUNCTUATION_TO_WRAP = [",", ".", ";", ":", "?", "!", "`"]
CHARACTERS_TO_SPACE = ["\t", "\n", "\r"]


def metaclip_spacing(text):
    spaced_text = f" {text} "
    for punct_to_wrap in PUNCTUATION_TO_WRAP:
        spaced_text = spaced_text.replace(punct_to_wrap, f" {punct_to_wrap} ")
    for char_to_space in CHARACTERS_TO_SPACE:
        spaced_text = spaced_text.replace(char_to_space, " ")
    return spaced_text


EDGE_ENTRIES = [
    "apple",
    "Apple",
    "apple pie",
    "pie",
    "a",
    "b",
    "a b",
    ".",
    ",",
    "?",
    "!",
    "`",
    "",
    " ",
    "  ",
    "a  b",
    " apple",
    "apple ",
    "a , b",
    "a ,  , b",
    "a , , b",
    "a,,b",
    "...",
    "?!",
    "U.S.",
    "St. Louis",
    "e.g",
    "a\tb",
    "new\nline",
    "café",
    "東京",
    "東京 タワー",
    "🍎",
    "🍎 apple",
    "naïve café",
    "rock 'n' roll",
    "x-ray",
    "apple",  # a duplicate: both ids must be reported
    "`code`",
    "` code `",
    "apple\u00a0pie",
    "apple\x0bpie",
]

EDGE_TEXTS = [
    "apple",
    "Apple pie",
    "APPLE",
    "an apple pie.",
    "apple\tpie",
    "apple\npie\r\n",
    "apple\r\rpie",
    "a\tb",
    "a  b",
    "a   b",
    "  leading and trailing  ",
    " ",
    "",
    None,
    "a,,b",
    "a,b",
    "a, ,b",
    "...",
    "?!",
    "end.",
    "U.S. flag",
    "St. Louis arch",
    "e.g. this",
    "`code` and ``quoted''",
    "café au lait",
    "naïve café, 東京 タワー",
    "東京タワー",
    "🍎 apple 🍎",
    "rock 'n' roll",
    "x-ray; of an apple: really? yes!",
    "tab\t\tdouble",
    "new\nline",
    "\t",
    "\n\r",
    ",",
    "a ,  , b",
    "a , , b",
    "apple\u00a0pie",  # only \t \n \r become spaces: other whitespace stays part of a token
    "apple\x0bpie apple\x0cpie",
]


def reference_all(texts, entries):
    automaton = build_reference_automaton(entries)
    return [[] if text is None else reference_match(text, automaton) for text in texts]


def brute_force_match(text, entries):
    """DESIGN.md's definition, literally: ' ' + e + ' ' occurs in the spaced text."""
    spaced_text = metaclip_spacing(text)
    return [entry_id for entry_id, entry in enumerate(entries) if f" {entry} " in spaced_text]


def test_edge_cases_equal_reference():
    matcher = Matcher.from_entries(EDGE_ENTRIES)
    result = matcher.match(EDGE_TEXTS)
    assert result.type == MATCH_TYPE
    assert result.null_count == 0
    assert result.to_pylist() == reference_all(EDGE_TEXTS, EDGE_ENTRIES)


def test_reference_equals_the_definition_on_edge_cases():
    for text in EDGE_TEXTS:
        if text is not None:
            assert reference_match(text, EDGE_ENTRIES) == brute_force_match(text, EDGE_ENTRIES)


def test_known_answers():
    entries = ["apple", "Apple", ".", "", "apple", "a b", "a,b", "东京"]
    texts = ["Apple.", "an apple", "a  b", "a,b", None, "", "东京!"]
    assert Matcher.from_entries(entries).match(texts).to_pylist() == [
        [1, 2, 3],  # " Apple .  ": case-sensitive; the full stop stands alone and leaves two spaces at the end
        [0, 4],  # a duplicated entry reports every id
        [3],  # two consecutive spaces hold the empty entry, but "a b" needs exactly one
        [],  # " a , b ": "a,b" can never match
        [],  # a null text gives an empty list, not null
        [3],  # "" spaces to "  "
        [3, 7],  # " 东京 !  "
    ]


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda texts: pa.array(texts, pa.string()), id="string"),
        pytest.param(lambda texts: pa.array(texts, pa.large_string()), id="large_string"),
        pytest.param(lambda texts: pa.array(texts, pa.string()).slice(3), id="sliced"),
        pytest.param(
            lambda texts: pa.chunked_array([pa.array(texts[:5], pa.string()), pa.array(texts[5:], pa.string())]),
            id="chunked",
        ),
        pytest.param(lambda texts: pa.chunked_array([pa.array(texts, pa.large_string())]), id="one_chunk"),
        pytest.param(lambda texts: tuple(texts), id="python"),
    ],
)
def test_input_kinds(convert):
    texts = convert(EDGE_TEXTS)
    python_texts = texts.to_pylist() if isinstance(texts, pa.Array | pa.ChunkedArray) else list(texts)
    assert Matcher.from_entries(EDGE_ENTRIES).match(texts).to_pylist() == reference_all(python_texts, EDGE_ENTRIES)


def test_empty_inputs_and_entries():
    matcher = Matcher.from_entries(EDGE_ENTRIES)
    assert matcher.match([]).to_pylist() == []
    assert matcher.match(pa.array([], pa.string())).type == MATCH_TYPE
    assert matcher.match(pa.array([None, None])).to_pylist() == [[], []]
    # "" spaces to "  ", which holds the empty entry but not " " or "  " (those need 3 and 4 spaces).
    assert matcher.match([None, ""]).to_pylist() == [[], [EDGE_ENTRIES.index("")]]
    assert Matcher.from_entries([]).match(["a b", None, ""]).to_pylist() == [[], [], []]
    assert Matcher.from_entries([]).unmatchable_entry_ids() == []


def test_lone_surrogates_match_like_python_strings():
    entries = ["\ud800", "x \udfff", "x"]
    texts = ["a \ud800 b", "x \udfff", "\ud800x", None]
    assert Matcher.from_entries(entries).match(texts).to_pylist() == reference_all(texts, entries)


def test_pickle_rebuilds_an_equal_matcher():
    matcher = pickle.loads(pickle.dumps(Matcher.from_entries(EDGE_ENTRIES)))
    assert matcher.match(EDGE_TEXTS).to_pylist() == reference_all(EDGE_TEXTS, EDGE_ENTRIES)


def test_rejects_non_string_arrays():
    with pytest.raises(TypeError):
        Matcher.from_entries(["a"]).match(pa.array([1, 2]))


# --- unmatchable entries -------------------------------------------------------------------------------------

PUNCTUATION_PATTERN = "[" + re.escape("".join(PUNCTUATION_TO_WRAP)) + "]"


def violates_spacing_invariant(spaced: str) -> bool:
    """Every spacing() output has no \\t \\n \\r, a ' ' on both sides of each mark, and >= 2 spaces between marks.

    A string starting and ending with ' ' that violates this cannot occur inside any spacing() output:
    its marks are interior, so the neighbours it shows are the neighbours they would have there.
    """
    if any(character in spaced for character in CHARACTERS_TO_SPACE):
        return True
    marks = [found.start() for found in re.finditer(PUNCTUATION_PATTERN, spaced)]
    if any(spaced[index - 1] != " " or spaced[index + 1] != " " for index in marks):
        return True
    return any(later - earlier < 3 for earlier, later in zip(marks, marks[1:], strict=False))


def witness_text(entry: str) -> str:
    """A text that matches a matchable entry: drop the separators next to its punctuation tokens, which
    spacing() puts back."""
    tokens = entry.split(" ")
    text = tokens[0]
    for previous, token in zip(tokens, tokens[1:], strict=False):
        separator = "" if previous in PUNCTUATION_TO_WRAP or token in PUNCTUATION_TO_WRAP else " "
        text += separator + token
    return text


def check_unmatchable_report(entries):
    unmatchable = set(Matcher.from_entries(entries).unmatchable_entry_ids())
    for entry_id, entry in enumerate(entries):
        if entry_id in unmatchable:
            assert violates_spacing_invariant(f" {entry} "), entry
        else:
            assert entry_id in reference_match(witness_text(entry), entries), entry
    return unmatchable


def test_unmatchable_edge_entries():
    unmatchable = check_unmatchable_report(EDGE_ENTRIES)
    assert {EDGE_ENTRIES[entry_id] for entry_id in unmatchable} == {
        "a , , b",
        "a,,b",
        "...",
        "?!",
        "U.S.",
        "St. Louis",
        "e.g",
        "a\tb",
        "new\nline",
        "`code`",
    }
    assert is_matchable_entry(".") and is_matchable_entry("") and is_matchable_entry("a ,  , b")


ALPHABET = "aAb é字\u00a0" + "".join(PUNCTUATION_TO_WRAP) + "".join(CHARACTERS_TO_SPACE)


@st.composite
def texts_and_entries(draw):
    texts = draw(st.lists(st.none() | st.text(ALPHABET, max_size=24), min_size=1, max_size=6))
    entries = draw(st.lists(st.text(ALPHABET, max_size=6), max_size=8))
    # Pieces of the spaced texts make matches (and near misses) frequent, not just possible.
    for text in texts:
        if text:
            spaced_text = metaclip_spacing(text)[1:-1]
            start = draw(st.integers(0, len(spaced_text)))
            end = draw(st.integers(start, min(len(spaced_text), start + 8)))
            entries.append(spaced_text[start:end])
    return texts, draw(st.permutations(entries))


@settings(derandomize=True, deadline=None, max_examples=300)
@given(texts_and_entries())
def test_property_matcher_equals_reference(case):
    texts, entries = case
    expected = reference_all(texts, entries)
    assert Matcher.from_entries(entries).match(texts).to_pylist() == expected
    assert expected == [[] if text is None else brute_force_match(text, entries) for text in texts]


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.text(ALPHABET, max_size=30))
def test_property_spacing_is_metaclips_and_satisfies_the_invariant(text):
    assert spacing(text) == metaclip_spacing(text)
    assert not violates_spacing_invariant(spacing(text))


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.lists(st.text(ALPHABET, max_size=8), max_size=10), st.lists(st.text(ALPHABET, max_size=20), max_size=5))
def test_property_unmatchable_report_is_exact(entries, texts):
    unmatchable = check_unmatchable_report(entries)
    for matches in reference_all(texts, entries):
        assert unmatchable.isdisjoint(matches)


# --- real captions ---------------------------------------------------------------------------------------


def test_real_captions_equal_reference(shared_data):
    captions = pq.read_table(shared_data / "captions_mixed" / "captions_mixed.parquet", columns=["caption"])
    caption_column = captions.column("caption")
    python_captions = caption_column.to_pylist()
    words: dict[str, None] = {}
    bigrams: dict[str, None] = {}
    for caption in python_captions[::3]:
        if caption is None:
            continue
        tokens = metaclip_spacing(caption).split(" ")
        words.update(dict.fromkeys(tokens))
        bigrams.update(dict.fromkeys(f"{first} {second}" for first, second in zip(tokens, tokens[1:], strict=False)))
    lemma_names = (shared_data / "wordnet30" / "wordnet30_lemma_names.txt").read_text(encoding="utf-8").splitlines()
    entries = [*words, *list(bigrams)[:60_000], *lemma_names, "", ".", "a  b", "St. Louis"]
    assert len(entries) > 200_000

    matcher = Matcher.from_entries(entries)
    result = matcher.match(caption_column)
    assert len(result) == len(python_captions) == 51_240
    expected = reference_all(python_captions, entries)
    assert result.to_pylist() == expected
    assert sum(map(len, expected)) > 10 * len(expected)  # the comparison is not vacuous
    # Small batches look their few distinct tokens up one by one rather than probing with the vocabulary.
    for start in range(0, len(python_captions), 997):
        assert matcher.match(caption_column.slice(start, 997)).to_pylist() == expected[start : start + 997]
    unmatchable = set(matcher.unmatchable_entry_ids())
    assert entries.index("St. Louis") in unmatchable
    assert all(unmatchable.isdisjoint(ids) for ids in expected)
