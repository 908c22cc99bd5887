"""Hostile urls (issue 17 case 11): every way of writing a host that one parser reads otherwise than another is
refused at ingest, or reaches the blocklists and url dedup as the host the WHATWG URL Standard (a browser, and the
downloader's urllib.request) reads. One ingest run with both blocklists and one dedup_exact run over its output; the
cases U1-U30 are tabled in tests/faults/README.md.
"""

import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ops.uid import uid_of
from curation.pipeline import run_one_stage
from curation.schema import REASONS_SHARING_KEPT_UID, Reason

KEPT = "kept"
BLOCKED_DOMAINS = ["evil.example", "127.0.0.1", "xn--bcher-kva.example"]
BLOCKED_URL = "http://blocked.example/a.jpg"

# case -> (url, expected fate after ingest, text the ledger detail's "why" holds, for a refused ambiguous url)
CASES = {
    "U1": ("http://%65vil.example/a.jpg", Reason.NOT_HTTP_URL, "urllib '%65vil.example'"),
    "U2": ("http://evil.example\\@good.example/a.jpg", Reason.NOT_HTTP_URL, "'evil.example', urllib 'good.example'"),
    "U3": ("http://EVIL.Example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U4": ("http://evil.example./a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U5": ("http://img.evil.example../a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U6": ("http://evil\u3002example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U7": ("http://ｅｖｉｌ．ｅｘａｍｐｌｅ/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U8": ("http://evil%2eexample/a.jpg", Reason.NOT_HTTP_URL, "urllib 'evil%2eexample'"),
    "U9": ("http://ev\til.example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U10": ("http://ev\u00adil.example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U11": ("http://good.example@evil.example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U12": ("http://good.example:80@evil.example:8080/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U13": ("http://good.example#@evil.example/a.jpg", KEPT, None),
    "U14": ("http://evil.example.good.example/a.jpg", KEPT, None),
    "U15": ("http://0x7f.1/a.jpg", Reason.NOT_HTTP_URL, "'127.0.0.1', urllib '0x7f.1'"),
    "U16": ("http://2130706433/a.jpg", Reason.NOT_HTTP_URL, "urllib '2130706433'"),
    "U17": ("http://127.0.0.1/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U18": ("http://straße.example/a.jpg", Reason.NOT_HTTP_URL, "'xn--strae-oqa.example', urllib 'straße.example'"),
    "U19": ("http://BÜCHER.example/a.jpg", Reason.BLOCKED_DOMAIN, None),
    "U20": ("http:\\\\evil.example/a.jpg", Reason.NOT_HTTP_URL, None),
    "U21": ("http://xn--a.example/a.jpg", Reason.NOT_HTTP_URL, "not a URL by the WHATWG URL Standard"),
    "U22": ("http://a.example:99999/a.jpg", Reason.NOT_HTTP_URL, "not a URL by the WHATWG URL Standard"),
    "U23": ("http://exa<mple.example/a.jpg", Reason.NOT_HTTP_URL, "not a URL by the WHATWG URL Standard"),
    "U24": ("HTTP://BLOCKED.example.:80/a.jpg#top", Reason.BLOCKED_URL, None),
    "U25": ("http://blocked\u3002example/a.jpg", Reason.BLOCKED_URL, None),
    "U26": ("http://blocked.example/a.jpg\t", Reason.BLOCKED_URL, None),
    "U27": ("http://img.example/p.jpg", KEPT, None),
    "U28": ("HTTP://IMG.EXAMPLE.:80/p.jpg#f", KEPT, None),
    "U29": ("http://img\u3002example/p.jpg", KEPT, None),
    "U30": ("https://cdn.shop.example/images/p-1.jpg?w=640", KEPT, None),
}
# dedup_exact keeps one of these: they are one url written three ways
ONE_URL_WRITTEN_THREE_WAYS = ("U27", "U28", "U29")


def _caption(case: str) -> str:
    return f"caption of {case}"


@pytest.fixture(scope="module")
def hostile_urls(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("urls")
    shard = root / "in" / "urls.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"url": [url for url, _, _ in CASES.values()], "caption": [_caption(c) for c in CASES]}),
                   shard)
    (root / "domains.txt").write_text("".join(domain + "\n" for domain in BLOCKED_DOMAINS))
    (root / "urls.txt").write_text(BLOCKED_URL + "\n")
    options = {"blocked_domains_file": str(root / "domains.txt"), "blocked_urls_file": str(root / "urls.txt")}
    ingest = run_one_stage(spark, "ingest", [str(shard)], root / "ingest", options)
    dedup = run_one_stage(spark, "dedup_exact", root / "ingest", root / "dedup")
    return {"ingest": (ingest, root / "ingest"), "dedup": (dedup, root / "dedup")}


def _fates(record: dict, stage_dir) -> tuple[set[str], dict[str, list[dict]]]:
    """(uids kept, ledger rows by uid), with rows in = rows out + ledger rows checked."""
    kept = set(pq.read_table(stage_dir, columns=["uid"])["uid"].to_pylist()) if record["rows_out"] else set()
    ledger_files = list((stage_dir / "_ledger").glob("*.parquet"))
    ledgered = defaultdict(list)
    for row in (pq.read_table(stage_dir / "_ledger").to_pylist() if ledger_files else []):
        ledgered[row["uid"]].append(row)
    assert record["rows_in"] == record["rows_out"] + sum(record["drops"].values()) == len(kept) + sum(
        len(rows) for rows in ledgered.values())
    assert not {uid for uid, rows in ledgered.items() if rows[0]["reason"] not in REASONS_SHARING_KEPT_UID} & kept
    return kept, ledgered


def _uid(case: str) -> str:
    return uid_of(CASES[case][0].encode(), _caption(case).encode())


@pytest.mark.parametrize("case", list(CASES))
def test_each_url_is_kept_or_ledgered_with_its_reason(hostile_urls, case):
    kept, ledgered = _fates(*hostile_urls["ingest"])
    _, expected, why = CASES[case]
    if expected == KEPT:
        assert _uid(case) in kept and _uid(case) not in ledgered
        return
    [row] = ledgered[_uid(case)]
    assert row["reason"] == expected
    detail = json.loads(row["detail"])
    if why is None:
        assert "why" not in detail
    else:
        assert why in detail["why"]


def test_every_row_ends_published_or_ledgered(hostile_urls):
    record, _ = hostile_urls["ingest"]
    assert record["rows_in"] == len(CASES)


def test_one_image_url_written_three_ways_is_one_dedup_key(hostile_urls):
    kept, ledgered = _fates(*hostile_urls["dedup"])
    uids = [_uid(case) for case in ONE_URL_WRITTEN_THREE_WAYS]
    [first] = [uid for uid in uids if uid in kept]
    for uid in set(uids) - {first}:
        [row] = ledgered[uid]
        assert (row["reason"], row["related_uid"]) == (Reason.DUPLICATE_URL, first)
        assert json.loads(row["detail"])["normalised_url"] == "http://img.example/p.jpg"
