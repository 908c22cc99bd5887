"""dedup_exact and dedup_text on Spark: planted near duplicates in real captions, chains, url normalisation."""

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.ops.uid import uid_of

pytestmark = pytest.mark.spark

THRESHOLD = 0.8


def _shingles(text: str, size: int = 5) -> set[str]:
    """The test's own char 5-gram shingling (lowercase, whitespace collapsed), independent of curation.ops."""
    normal = " ".join(text.lower().split())
    if len(normal) < size:
        return {normal} if normal else set()
    return {normal[i : i + size] for i in range(len(normal) - size + 1)}


def _jaccard(a: str, b: str) -> float:
    left, right = _shingles(a), _shingles(b)
    return len(left & right) / len(left | right) if left | right else 0.0


def _real_or_generated_captions(shared_data_dir: Path | None) -> list[str]:
    if shared_data_dir is not None:
        table = pq.read_table(shared_data_dir / "captions_cc3m" / "cc3m_validation.parquet", columns=["caption"])
        captions = [c for c in table["caption"].to_pylist() if c]
        extra = pq.read_table(shared_data_dir / "captions_img2dataset" / "test_10000.parquet", columns=["TEXT"])
        return list(dict.fromkeys(captions + [c for c in extra["TEXT"].to_pylist() if c]))
    rng = np.random.default_rng(5)
    words = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in "dgklmnprst"]
    return [" ".join(rng.choice(words, size=rng.integers(6, 20))) for _ in range(12_000)]


def _edit(text: str, rng) -> str:
    positions = [i for i, ch in enumerate(text) if ch.isalpha()]
    i = positions[int(rng.integers(len(positions)))]
    return text[:i] + ("x" if text[i] != "x" else "y") + text[i + 1 :]


def _reorder(text: str, rng) -> str:
    words = text.split(" ")
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _append_site(text: str, rng) -> str:
    return f"{text} | {['etsy', 'ebay', 'amazon', 'zazzle'][int(rng.integers(4))]}.com"


EDITS = {"edit": _edit, "reorder": _reorder, "site": _append_site}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real captions plus >= 50 planted near-duplicate pairs (exact Jaccard >= 0.8) of each edit type."""
    from tests.conftest import shared_data_dir

    captions = _real_or_generated_captions(shared_data_dir())
    rng = np.random.default_rng(0)
    bases = [captions[i] for i in rng.permutation(len(captions)) if len(captions[i].split(" ")) >= 8]
    pairs, used = {kind: [] for kind in EDITS}, 0
    for kind, edit in EDITS.items():
        while len(pairs[kind]) < 60:
            base = bases[used]
            used += 1
            variant = edit(base, rng)
            if variant != base and _jaccard(base, variant) >= THRESHOLD:
                pairs[kind].append((base, variant))
    variants = [variant for kind in EDITS for _, variant in pairs[kind]]
    texts = captions + variants
    urls = [f"https://img.example.com/{i}.jpg" for i in range(len(texts))]
    root = tmp_path_factory.mktemp("planted")
    pq.write_table(pa.table({"url": urls, "caption": texts}), root / "captions.parquet")
    uid_of_text = {text: uid_of(url.encode(), text.encode()) for url, text in zip(urls, texts, strict=True)}
    return {"root": root, "pairs": pairs, "uid_of_text": uid_of_text, "texts": texts, "urls": urls}


@pytest.fixture(scope="module")
def dedup_run(spark, planted):
    output = planted["root"] / "dedup"
    code = cli_main(["dedup-text", "--input", str(planted["root"] / "captions.parquet"), "--output", str(output),
                     "--threshold", "0.8", "--policy", "keep_one"])
    assert code == 0
    kept = pq.read_table(output, columns=["uid", "caption", "text_dup_group", "text_dup_group_size"]).to_pylist()
    ledger = pq.read_table(output / "_ledger").to_pylist()
    group_of = {row["uid"]: row["text_dup_group"] for row in kept}
    for row in ledger:
        if row["reason"] == "near_duplicate_caption":
            group_of[row["uid"]] = json.loads(row["detail"])["group"]
    members: dict[str, list[str]] = {}
    for uid, group in group_of.items():
        if group is not None:
            members.setdefault(group, []).append(uid)
    return {"output": output, "kept": kept, "ledger": ledger, "group_of": group_of, "members": members}


def test_planted_near_duplicates_are_found_with_recall_above_095(planted, dedup_run):
    group_of, uid_of_text = dedup_run["group_of"], planted["uid_of_text"]
    for kind, pairs in planted["pairs"].items():
        assert len(pairs) >= 50
        found = sum(
            1 for base, variant in pairs
            if group_of.get(uid_of_text[base]) is not None
            and group_of.get(uid_of_text[base]) == group_of.get(uid_of_text[variant])
        )
        assert found / len(pairs) >= 0.95, f"{kind}: recall {found}/{len(pairs)}"


def test_every_drop_is_justified_by_a_chain_of_true_near_duplicates_to_a_kept_row(planted, dedup_run):
    text_of = {uid: text for text, uid in planted["uid_of_text"].items()}
    members = dedup_run["members"]
    kept_uids = {row["uid"] for row in dedup_run["kept"]}
    dropped = [row for row in dedup_run["ledger"] if row["reason"] == "near_duplicate_caption"]
    assert dropped, "the planted pairs must produce drops"
    justified = 0
    for row in dropped:
        group = members[json.loads(row["detail"])["group"]]
        # Breadth-first search over pairs whose exact Jaccard (recomputed here) is >= the threshold.
        reached, frontier = {row["uid"]}, [row["uid"]]
        while frontier:
            current = frontier.pop()
            for other in group:
                if other not in reached and _jaccard(text_of[current], text_of[other]) >= THRESHOLD:
                    reached.add(other)
                    frontier.append(other)
        justified += bool(reached & kept_uids)
        assert row["related_uid"] in kept_uids
    assert justified / len(dropped) >= 0.95
    assert sum(1 for uid in kept_uids if dedup_run["group_of"].get(uid)) == len(members), "keep_one per group"


def test_group_columns_and_ledger_invariant(planted, dedup_run):
    record = json.loads((dedup_run["output"] / "_stage.json").read_text())
    assert record["rows_in"] == len(planted["texts"])
    assert record["rows_out"] + sum(record["drops"].values()) == record["rows_in"]
    assert record["dedup"]["bands"] * record["dedup"]["rows_per_band"] <= 128
    sizes = {row["text_dup_group"]: row["text_dup_group_size"] for row in dedup_run["kept"] if row["text_dup_group"]}
    for group, size in sizes.items():
        assert size == sum(1 for g in dedup_run["group_of"].values() if g == group)


def _chain() -> tuple[str, str, str]:
    """a ~ b ~ c (exact Jaccard >= 0.8 between neighbours) with a !~ c."""
    a = "a vintage red bicycle leaning against the old brick wall of the village bakery at dawn in the south of france"
    b = a.replace("vintage", "vintagx")
    c = b.replace("bakery", "bakerx").replace("south", "soxth")
    assert _jaccard(a, b) >= THRESHOLD and _jaccard(b, c) >= THRESHOLD and _jaccard(a, c) < THRESHOLD
    return a, b, c


def test_a_chain_lands_in_one_group(spark, tmp_path):
    chain = _chain()
    texts = [*chain, "an unrelated caption about a blue teapot on a kitchen table", "a dog"]
    urls = [f"https://chain.example/{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"url": urls, "caption": texts}), tmp_path / "chain.parquet")
    assert cli_main(["dedup-text", "--input", str(tmp_path / "chain.parquet"), "--output", str(tmp_path / "out"),
                     "--policy", "tag"]) == 0
    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    groups = {rows[text]["text_dup_group"] for text in chain}
    assert len(groups) == 1 and None not in groups
    assert rows[chain[0]]["text_dup_group_size"] == 3
    assert rows[texts[3]]["text_dup_group"] is None and rows[texts[4]]["text_dup_group"] is None


def test_dedup_exact_normalises_urls_and_keeps_the_smallest_uid(spark, tmp_path):
    urls = ["https://Example.COM/a.jpg#x", "https://example.com/a.jpg", "HTTPS://example.com/a.jpg?q=1",
            "https://example.com/b.jpg", "https://example.com/c.jpg"]
    captions = ["one", "two", "three", "same caption", "same caption"]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "raw.parquet")
    output = tmp_path / "exact"
    assert cli_main(["dedup-exact", "--input", str(tmp_path / "raw.parquet"), "--output", str(output),
                     "--by-caption"]) == 0
    uids = [uid_of(u.encode(), c.encode()) for u, c in zip(urls, captions, strict=True)]
    kept = set(pq.read_table(output)["uid"].to_pylist())
    ledger = {row["uid"]: row for row in pq.read_table(output / "_ledger").to_pylist()}
    same_url = sorted(uids[:2])
    assert same_url[0] in kept and ledger[same_url[1]]["reason"] == "duplicate_url"
    assert ledger[same_url[1]]["related_uid"] == same_url[0]
    assert uids[2] in kept, "a different query string is a different url"
    same_caption = sorted(uids[3:])
    assert same_caption[0] in kept and ledger[same_caption[1]]["reason"] == "duplicate_caption"
    assert len(kept) + len(ledger) == 5


def test_every_small_group_holds_a_pair_at_or_above_the_threshold(planted, dedup_run):
    """A group of up to 6 members is held together by at least one pair whose exact Jaccard (recomputed here) is
    >= the threshold: LSH candidates below it never form a group."""
    text_of = {uid: text for text, uid in planted["uid_of_text"].items()}
    members = dedup_run["members"]
    for group in members.values():
        if len(group) <= 6:
            assert any(_jaccard(text_of[a], text_of[b]) >= THRESHOLD for a, b in combinations(group, 2))
