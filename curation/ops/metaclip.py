"""MetaCLIP v1 substring matching (DESIGN.md section 4, "Substring matching"), vectorised.

MetaCLIP (facebookresearch/MetaCLIP, metaclip/substr_matching.py) spaces a caption, then runs one
Aho-Corasick pass over it with every metadata entry written as ' ' + entry + ' ':

    spaced = ' ' + text + ' ';  each of , . ; : ? ! ` -> ' ' + it + ' ';  each of \\t \\n \\r -> ' '
    entry e matches iff ' ' + e + ' ' occurs in spaced (case-sensitive)

`spacing`, `build_reference_automaton` and `reference_match` are that procedure, kept as the oracle of
the tests and the baseline of bench/bench_match.py. `Matcher` computes the same ids for a whole batch
with Arrow kernels and numpy, through this equivalent formulation: with S = spaced without its outer
two spaces, e matches iff e.split(' ') occurs as a contiguous run of S.split(' ') (empty tokens
included), because the spaces delimiting ' ' + e + ' ' must be separators of S's tokens. So matching
is a walk of a trie of the entries' token sequences along each token position of the batch, one
depth (one token) at a time for all positions together. Tokens become ids through the entries' token
vocabulary and trie edges are exact integer keys (a hashed bit table only pre-filters them and has no
false negatives), so no hash collision can produce a wrong id.

One deliberate difference from MetaCLIP's code: it stores (id, key) per spaced entry in the automaton,
so when the list holds the same entry twice only the last id is ever reported. Here (and in the
reference below) every id whose entry matches is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARACTERS_TO_SPACE = ("\t", "\n", "\r")

MATCH_TYPE = pa.list_(pa.int32())

# A dict lookup of one Python bytes object costs about as much as Arrow hashing this many vocabulary tokens
# (measured: ~450 ns against ~14 ns).
_DICT_LOOKUP_COST_RATIO = 32


def spacing(text: str) -> str:
    """MetaCLIP's caption spacing: pad with spaces, isolate punctuation, turn tabs and line breaks into spaces."""
    spaced_text = f" {text} "
    for punctuation in PUNCTUATION_TO_WRAP:
        spaced_text = spaced_text.replace(punctuation, f" {punctuation} ")
    for character in CHARACTERS_TO_SPACE:
        spaced_text = spaced_text.replace(character, " ")
    return spaced_text


def build_reference_automaton(entries: Sequence[str]) -> ahocorasick.Automaton:
    """A pyahocorasick automaton of ' ' + entry + ' ', whose value is the tuple of ids sharing that entry."""
    ids_by_spaced_entry: dict[str, list[int]] = {}
    for entry_id, entry in enumerate(entries):
        ids_by_spaced_entry.setdefault(f" {entry} ", []).append(entry_id)
    automaton = ahocorasick.Automaton()
    for spaced_entry, entry_ids in ids_by_spaced_entry.items():
        automaton.add_word(spaced_entry, tuple(entry_ids))
    automaton.make_automaton()
    return automaton


def reference_match(text: str, automaton_or_entries: ahocorasick.Automaton | Sequence[str]) -> list[int]:
    """Sorted ids of the entries matching `text`, by MetaCLIP's procedure: spacing, then one Aho-Corasick pass."""
    if isinstance(automaton_or_entries, ahocorasick.Automaton):
        automaton = automaton_or_entries
    else:
        automaton = build_reference_automaton(automaton_or_entries)
    if len(automaton) == 0:  # pyahocorasick refuses to iterate an automaton without words
        return []
    matched_entry_ids: set[int] = set()
    for _end_index, entry_ids in automaton.iter(spacing(text)):
        matched_entry_ids.update(entry_ids)
    return sorted(matched_entry_ids)


def _to_utf8_binary(texts: Sequence[str | None]) -> pa.Array:
    """Python strings as UTF-8 bytes; lone surrogates (possible in JSON-loaded text) survive via surrogatepass.

    Token equality on these bytes is equality of the Python strings, since the encoding is injective.
    """
    try:
        return pa.array(texts, type=pa.string()).cast(pa.binary())
    except UnicodeEncodeError:
        return pa.array(
            [None if text is None else text.encode("utf-8", "surrogatepass") for text in texts], type=pa.binary()
        )


def _binary_view(texts: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    """One contiguous (large_)binary array over the texts, so the code below sees bytes and one chunk."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if not isinstance(texts, pa.Array):
        return _to_utf8_binary(texts)
    if pa.types.is_large_string(texts.type) or pa.types.is_large_binary(texts.type):
        return texts.view(pa.large_binary())
    if pa.types.is_string(texts.type) or pa.types.is_binary(texts.type):
        return texts.view(pa.binary())
    if pa.types.is_null(texts.type):
        return texts.cast(pa.binary())
    raise TypeError(f"texts must be strings, got Arrow type {texts.type}")


_SPACE = ord(" ")
_BYTE_AFTER_SPACING = np.arange(256, dtype=np.uint8)
_BYTE_AFTER_SPACING[[ord(character) for character in CHARACTERS_TO_SPACE]] = _SPACE
_IS_PUNCTUATION_BYTE = np.zeros(256, bool)
_IS_PUNCTUATION_BYTE[[ord(punctuation) for punctuation in PUNCTUATION_TO_WRAP]] = True


def _terminated_tokens(texts: pa.Array, *, metaclip_spacing: bool) -> tuple[pa.Array, np.ndarray]:
    """Each text's ' '-separated tokens, every token keeping the ' ' after it, and each token's row.

    The texts get a ' ' appended, so every token is followed by exactly one ' ' and the tokens tile the
    byte buffer: they become one binary array over that buffer, without copying, for Arrow to hash.
    With `metaclip_spacing` the texts are spaced like MetaCLIP's `spacing` first (minus its leading ' '),
    so the tokens are those of S. UTF-8 never uses these ASCII bytes inside a multi-byte character, so
    working on bytes is working on characters. A null text is treated as empty; callers mask it.
    """
    empty, space = pa.scalar(b"", texts.type), pa.scalar(b" ", texts.type)
    terminated = pc.binary_join_element_wise(pc.fill_null(texts, empty), empty, space)
    offset_type = np.int64 if pa.types.is_large_binary(terminated.type) else np.int32
    _validity, offsets_buffer, data_buffer = terminated.buffers()
    offsets = np.frombuffer(offsets_buffer, offset_type)[terminated.offset : terminated.offset + len(terminated) + 1]
    data = np.frombuffer(data_buffer, np.uint8)[offsets[0] : offsets[-1]] if len(terminated) else np.zeros(0, np.uint8)
    offsets = offsets.astype(np.int64) - offsets[0]
    if metaclip_spacing:
        data = _BYTE_AFTER_SPACING[data]
        punctuation_positions = np.flatnonzero(_IS_PUNCTUATION_BYTE[data])
        # Each mark gains a ' ' on either side: mark i moves 2 * i + 1 bytes to the right.
        spaced_positions = punctuation_positions + 2 * np.arange(len(punctuation_positions)) + 1
        keeps_original_byte = np.ones(len(data) + 2 * len(punctuation_positions), bool)
        keeps_original_byte[spaced_positions - 1] = False
        keeps_original_byte[spaced_positions + 1] = False
        spaced = np.full(len(keeps_original_byte), _SPACE, np.uint8)
        spaced[keeps_original_byte] = data
        offsets += 2 * np.searchsorted(punctuation_positions, offsets)
        data = spaced
    separators = np.flatnonzero(data == _SPACE)
    # Large offsets always, so that entry and text tokens share one type whatever the batch size.
    token_offsets = np.concatenate(([0], separators + 1))
    tokens = pa.Array.from_buffers(
        pa.large_binary(), len(separators), [None, pa.py_buffer(token_offsets), pa.py_buffer(data)]
    )
    token_rows = np.repeat(np.arange(len(texts)), np.diff(np.searchsorted(separators, offsets)))
    return tokens, token_rows


class Matcher:
    """Batch MetaCLIP matching: `match(texts)` equals `[reference_match(t, entries) for t in texts]`.

    Entries become token sequences (split on ' '), kept as a trie whose nodes are prefixes of them.
    A depth-1 node is the id of its token in the entries' token vocabulary; deeper nodes are numbered
    after the vocabulary, and the edge parent -> child through token t is the exact int64 key
    parent * vocabulary_size + t in a sorted table. Pickling ships only the entry list.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self._entries = list(entries)
        entry_tokens, entry_of_token = _terminated_tokens(_to_utf8_binary(self._entries), metaclip_spacing=False)
        encoded_tokens = pc.dictionary_encode(entry_tokens)
        self._vocabulary = encoded_tokens.dictionary
        self._vocabulary_size = len(self._vocabulary)
        self._token_id_by_bytes = dict(zip(self._vocabulary.to_pylist(), range(self._vocabulary_size), strict=True))
        token_lengths = np.bincount(entry_of_token, minlength=len(self._entries))
        self._max_tokens = int(token_lengths.max(initial=0))
        self._build_trie(encoded_tokens.indices.to_numpy().astype(np.int64), token_lengths)

    @classmethod
    def from_entries(cls, entries: Sequence[str]) -> Matcher:
        """A matcher for this metadata list; entry id = index in the list, duplicates included."""
        return cls(entries)

    def __reduce__(self):
        return (Matcher.from_entries, (self._entries,))

    def _build_trie(self, token_ids: np.ndarray, token_lengths: np.ndarray) -> None:
        """Number the trie's nodes depth by depth and record its edges, terminals and entry ids."""
        vocabulary_size = self._vocabulary_size
        entry_starts = np.cumsum(token_lengths) - token_lengths
        entry_nodes = token_ids[entry_starts]
        node_count = vocabulary_size
        edge_keys = [np.zeros(0, np.int64)]
        for depth in range(2, self._max_tokens + 1):
            longer = np.flatnonzero(token_lengths >= depth)
            keys = entry_nodes[longer] * vocabulary_size + token_ids[entry_starts[longer] + depth - 1]
            depth_keys, child_of_entry = np.unique(keys, return_inverse=True)
            entry_nodes[longer] = node_count + child_of_entry
            edge_keys.append(depth_keys)
            node_count += len(depth_keys)
        # Parents are numbered depth by depth, so every key of a depth exceeds those of the depth before: the
        # concatenation is sorted, and the child of the i-th key is node vocabulary_size + i.
        self._edge_keys = np.concatenate(edge_keys)
        self._edge_children = vocabulary_size + np.arange(len(self._edge_keys), dtype=np.int64)
        # Node-indexed arrays get one extra False slot at the end: depth-1 nodes are token ids, and the token id
        # -1 ("in no entry") then indexes that slot.
        self._has_children = np.zeros(node_count + 1, bool)
        self._has_children[self._edge_keys // max(vocabulary_size, 1)] = True
        self._edge_filter_bits = max(10, int(np.ceil(np.log2(16 * len(self._edge_keys) + 1))))
        self._edge_filter = np.zeros(1 << self._edge_filter_bits, bool)
        self._edge_filter[self._edge_filter_slot(self._edge_keys)] = True

        entry_order = np.argsort(entry_nodes, kind="stable")
        self._entry_ids_by_node = entry_order.astype(np.int32)
        self._entry_offsets_by_node = np.searchsorted(entry_nodes[entry_order], np.arange(node_count + 2))
        entries_per_node = np.diff(self._entry_offsets_by_node)
        self._is_terminal = entries_per_node > 0
        self._has_duplicate_entries = bool((entries_per_node > 1).any())

    def _edge_filter_slot(self, keys: np.ndarray) -> np.ndarray:
        """Fibonacci hash of edge keys: a cheap first test that rejects most non-edges before the binary search."""
        return (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - self._edge_filter_bits)

    def _token_ids(self, tokens: pa.Array) -> np.ndarray:
        """Vocabulary id of every text token, -1 when no entry has that token.

        Arrow hashes the batch's tokens; its few distinct ones are then looked up either one by one in a
        dict (a cost per distinct token) or all at once by probing their Arrow hash table with the whole
        vocabulary (a cost per vocabulary token, roughly 30 times smaller), whichever is cheaper.
        """
        encoded = pc.dictionary_encode(tokens)
        distinct_tokens = encoded.dictionary
        if len(distinct_tokens) * _DICT_LOOKUP_COST_RATIO < self._vocabulary_size:
            token_id_by_bytes = self._token_id_by_bytes
            batch_to_vocabulary = np.fromiter(
                (token_id_by_bytes.get(token, -1) for token in distinct_tokens.to_pylist()),
                dtype=np.int64,
                count=len(distinct_tokens),
            )
        else:
            batch_index_of_vocabulary = pc.index_in(self._vocabulary, value_set=distinct_tokens)
            in_batch = batch_index_of_vocabulary.is_valid().to_numpy(zero_copy_only=False)
            batch_to_vocabulary = np.full(len(distinct_tokens), -1, np.int64)
            batch_to_vocabulary[batch_index_of_vocabulary.drop_null().to_numpy()] = np.flatnonzero(in_batch)
        return batch_to_vocabulary[encoded.indices.to_numpy(zero_copy_only=False)]

    def match(self, texts: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ListArray:
        """Sorted unique matching entry ids per text, as list<int32>; a null text gives an empty list."""
        binary_texts = _binary_view(texts)
        tokens, token_rows = _terminated_tokens(binary_texts, metaclip_spacing=True)
        token_ids = self._token_ids(tokens)
        if binary_texts.null_count:
            token_ids[~binary_texts.is_valid().to_numpy(zero_copy_only=False)[token_rows]] = -1
        # Depth 1 runs over whole arrays (a token's successor is the next element); deeper depths follow only
        # the positions whose prefix is still a node of the trie.
        first_hits = np.flatnonzero(self._is_terminal[token_ids])
        matched_rows, matched_nodes = [token_rows[first_hits]], [token_ids[first_hits]]
        if self._max_tokens > 1:
            extendable = (
                self._has_children[token_ids[:-1]] & (token_ids[1:] >= 0) & (token_rows[1:] == token_rows[:-1])
            )
            positions = np.flatnonzero(extendable)
            positions, nodes = self._follow_edges(positions, token_ids[positions], token_ids[positions + 1])
            # Padding past the last token lets every lookahead index in bounds and fail the same-row test.
            padding = np.full(self._max_tokens, -1, np.int64)
            padded_rows = np.concatenate((token_rows, padding))
            padded_ids = np.concatenate((token_ids, padding))
            for depth in range(2, self._max_tokens + 1):
                terminal = self._is_terminal[nodes]
                matched_rows.append(token_rows[positions[terminal]])
                matched_nodes.append(nodes[terminal])
                if depth == self._max_tokens or not len(positions):
                    break
                next_tokens = padded_ids[positions + depth]
                extendable = (
                    self._has_children[nodes]
                    & (next_tokens >= 0)
                    & (padded_rows[positions + depth] == token_rows[positions])
                )
                positions, nodes = self._follow_edges(
                    positions[extendable], nodes[extendable], next_tokens[extendable]
                )
        return self._collect(len(binary_texts), np.concatenate(matched_rows), np.concatenate(matched_nodes))

    def _follow_edges(
        self, positions: np.ndarray, nodes: np.ndarray, next_tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The positions whose node has an edge through their next token, and the children reached."""
        keys = nodes * self._vocabulary_size + next_tokens
        maybe_edge = self._edge_filter[self._edge_filter_slot(keys)]
        positions, keys = positions[maybe_edge], keys[maybe_edge]
        edge_index = np.minimum(np.searchsorted(self._edge_keys, keys), len(self._edge_keys) - 1)
        is_edge = self._edge_keys[edge_index] == keys
        return positions[is_edge], self._edge_children[edge_index[is_edge]]

    def _collect(self, text_count: int, rows: np.ndarray, nodes: np.ndarray) -> pa.ListArray:
        """(text row, trie node) hits -> per-row sorted unique entry ids."""
        if self._has_duplicate_entries:
            ids_per_hit = self._entry_offsets_by_node[nodes + 1] - self._entry_offsets_by_node[nodes]
            hit_of_id = np.repeat(np.arange(len(nodes)), ids_per_hit)
            id_slot = np.arange(len(hit_of_id)) - np.repeat(np.cumsum(ids_per_hit) - ids_per_hit, ids_per_hit)
            rows = rows[hit_of_id]
            entry_ids = self._entry_ids_by_node[self._entry_offsets_by_node[nodes[hit_of_id]] + id_slot]
        else:
            entry_ids = self._entry_ids_by_node[self._entry_offsets_by_node[nodes]]
        entry_count = max(len(self._entries), 1)
        row_entry_keys = np.sort(rows * entry_count + entry_ids)
        first_of_run = np.ones(len(row_entry_keys), bool)
        first_of_run[1:] = row_entry_keys[1:] != row_entry_keys[:-1]
        row_entry_keys = row_entry_keys[first_of_run]
        ids_per_row = np.bincount(row_entry_keys // entry_count, minlength=text_count)
        offsets = np.concatenate(([0], np.cumsum(ids_per_row))).astype(np.int32)
        values = (row_entry_keys % entry_count).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=MATCH_TYPE)

    def unmatchable_entry_ids(self) -> list[int]:
        """Ids of entries that no text can match.

        Every spaced text is a run of blocks ' p ' (p punctuation), ' ', and single other characters
        (never \\t \\n \\r). So ' ' + e + ' ' occurs in some spaced text iff e has no \\t \\n \\r and, among
        e.split(' '), each token holding punctuation is exactly one punctuation mark and no two such
        tokens are adjacent (two marks need two spaces between them). Then e occurs in
        spacing(e without the separators next to its punctuation tokens).
        """
        return [entry_id for entry_id, entry in enumerate(self._entries) if not is_matchable_entry(entry)]


def is_matchable_entry(entry: str) -> bool:
    """Whether some text matches `entry` (see `Matcher.unmatchable_entry_ids` for why this test is exact)."""
    if any(character in entry for character in CHARACTERS_TO_SPACE):
        return False
    previous_was_punctuation = False
    for token in entry.split(" "):
        is_punctuation = token in PUNCTUATION_TO_WRAP
        if is_punctuation and previous_was_punctuation:
            return False
        if not is_punctuation and any(punctuation in token for punctuation in PUNCTUATION_TO_WRAP):
            return False
        previous_was_punctuation = is_punctuation
    return True
