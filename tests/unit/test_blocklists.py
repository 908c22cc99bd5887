"""Domain and URL blocklists at ingest: parsing, subdomain matching, url normalisation, and the ledger reasons."""

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ops.blocklists import BlocklistError, blocked_masks, load_domain_blocklist, load_url_blocklist
from curation.ops.ingest import IngestOptions, normalise_rows
from curation.ops.url_host import whatwg_host
from curation.schema import Reason


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_domain_file_accepts_comments_wildcards_and_case(tmp_path):
    path = _write(tmp_path, "domains.txt", "# takedowns\n\nExample.COM\n*.pinimg.com\n.shop.example.org.\n")
    assert load_domain_blocklist(path) == frozenset({"example.com", "pinimg.com", "shop.example.org"})


@pytest.mark.parametrize("line", ["http://example.com", "example.com/path", "no-dot", "user@example.com"])
def test_a_line_that_is_not_a_domain_is_an_error_naming_file_and_line(tmp_path, line):
    path = _write(tmp_path, "domains.txt", f"good.com\n{line}\n")
    with pytest.raises(BlocklistError, match=r"domains.txt:2"):
        load_domain_blocklist(path)


def test_url_file_is_normalised_and_needs_a_scheme(tmp_path):
    path = _write(tmp_path, "urls.txt", "HTTP://Example.com:80/a.jpg#frag\n")
    assert load_url_blocklist(path) == frozenset({"http://example.com/a.jpg"})
    with pytest.raises(BlocklistError, match="bad.txt:1"):
        load_url_blocklist(_write(tmp_path, "bad.txt", "example.com/a.jpg\n"))


@pytest.mark.parametrize("line", ["bücher..de", "ü" * 64 + ".de", "bü<cher.de", "xn--a.de"])
def test_a_domain_idna_cannot_encode_is_a_blocklist_error_naming_file_and_line(tmp_path, line):
    path = _write(tmp_path, "domains.txt", f"bücher.de\n{line}\n")
    with pytest.raises(BlocklistError, match=r"domains.txt:2: .* is not a valid (internationalised )?domain name"):
        load_domain_blocklist(path)


def test_an_idn_domain_is_stored_as_punycode_and_blocks_its_hosts(tmp_path):
    domains = load_domain_blocklist(_write(tmp_path, "domains.txt", "*.Bücher.de\nstraße.de\nEVIL。example\n"))
    assert domains == frozenset({"xn--bcher-kva.de", "xn--strae-oqa.de", "evil.example"})
    assert _blocked_by_domain(["http://img.bücher.de/x.jpg", "http://xn--strae-oqa.de/x.jpg"], domains) == [True] * 2


def test_an_ip_address_entry_blocks_every_form_of_that_address(tmp_path):
    domains = load_domain_blocklist(_write(tmp_path, "domains.txt", "127.0.0.1\n"))
    urls = ["http://127.0.0.1/", "http://0x7f.1/", "http://2130706433/", "http://0177.0.0.1./", "http://127.0.0.2/"]
    assert _blocked_by_domain(urls, domains) == [True, True, True, True, False]


def _blocked_by_domain(urls: list[str | None], domains: frozenset[str]) -> list[bool]:
    return blocked_masks(pa.array(urls, type=pa.string()), domains, frozenset())[0].tolist()


def test_url_lines_end_at_the_first_whitespace_so_a_trailing_note_still_matches(tmp_path):
    path = _write(tmp_path, "urls.txt", "http://a.example/b.jpg  # req 42\nHTTPS://B.example/c.jpg\tDMCA 7\n")
    assert load_url_blocklist(path) == frozenset({"http://a.example/b.jpg", "https://b.example/c.jpg"})
    with pytest.raises(BlocklistError, match=r"bad.txt:1: 'a.example/b.jpg' is not a URL"):
        load_url_blocklist(_write(tmp_path, "bad.txt", "a.example/b.jpg http://a.example/b.jpg\n"))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BlocklistError, match="cannot read blocklist"):
        load_domain_blocklist(tmp_path / "absent.txt")


@pytest.mark.parametrize(("url", "blocked"), [
    ("http://example.com/a", True), ("http://img.cdn.example.com/a", True), ("http://badexample.com/a", False),
    ("http://example.com.evil.net/a", False), ("http://com/a", False), (None, False),
    ("https://user:pw@IMG.Example.com:8443/x.jpg", True), ("http://[::1/", False), ("not a url", False),
    ("ftp://example.com/a", False),
])
def test_subdomains_are_blocked_and_lookalikes_are_not(url, blocked):
    assert _blocked_by_domain([url], frozenset({"example.com"})) == [blocked]


# issue 17 case 11: each way of writing the host that a laxer parser read as another host
EVIL_SPELLINGS = [
    "http://%65vil.example/a.jpg", "http://evil.example\\@good.example/a.jpg", "http://EVIL.Example/a.jpg",
    "http://evil.example./a.jpg", "http://img.evil.example../a.jpg", "http://evil\u3002example/a.jpg",
    "http://ｅｖｉｌ．ｅｘａｍｐｌｅ/a.jpg", "http://evil%2Eexample/a.jpg", "http://ev\til.example/a.jpg",
    "http://good.example@evil.example/a.jpg", "http://good.example:80@evil.example:8080/a.jpg",
    "http:\\\\evil.example/a.jpg", "  http://evil.example/a.jpg", "http://ev\u00adil.example/a.jpg",
]


@pytest.mark.parametrize("url", EVIL_SPELLINGS)
def test_every_spelling_of_a_blocked_host_is_blocked(url):
    assert _blocked_by_domain([url], frozenset({"evil.example"})) == [True]


@pytest.mark.parametrize("url", ["http://good.example#@evil.example/", "http://good.example/?@evil.example/",
                                 "http://evil.example.good.example/", "http://notevil.example/"])
def test_a_blocked_host_elsewhere_in_the_url_does_not_block_it(url):
    assert _blocked_by_domain([url], frozenset({"evil.example"})) == [False]


def test_every_spelling_of_a_blocked_url_is_blocked(tmp_path):
    blocked = load_url_blocklist(_write(tmp_path, "u.txt", "http://evil.example/a.jpg\n"))
    spellings = ["http://%65vil.example/a.jpg", "HTTP://EVIL.example.:80/a.jpg#x", "http://evil\u3002example/a.jpg",
                 "http:\\\\evil.example/a.jpg", "http://evil.example/a.jpg\t", "http://evil.example/b.jpg"]
    by_url = blocked_masks(pa.array(spellings), frozenset(), blocked)[1].tolist()
    assert by_url == [True] * 5 + [False]


def test_ingest_ledgers_blocked_rows_on_real_captions(shared_data, tmp_path):
    """Block the most common host of the img2dataset test shard (and one url of another host): exactly those rows go
    to the ledger, with their reason, and nothing else changes."""
    table = pq.read_table(next((shared_data / "captions_img2dataset").glob("test_10000.parquet")))
    hosts = [whatwg_host(url) for url in table.column("URL").to_pylist()]
    top_host, top_count = collections.Counter(h for h in hosts if h).most_common(1)[0]
    other_url = next(url for url, host in zip(table.column("URL").to_pylist(), hosts, strict=True)
                     if host and host != top_host and not host.endswith("." + top_host))
    plain_kept, plain_rejected = normalise_rows(table, IngestOptions(), "test_10000.parquet")

    options = IngestOptions(blocked_domains=load_domain_blocklist(_write(tmp_path, "d.txt", top_host + "\n")),
                            blocked_urls=load_url_blocklist(_write(tmp_path, "u.txt", "HTTP" + other_url[4:] + "\n")))
    kept, rejected = normalise_rows(table, options, "test_10000.parquet")
    reasons = collections.Counter(rejected.column("reason").to_pylist())
    assert reasons[Reason.BLOCKED_DOMAIN] >= top_count - plain_rejected.num_rows and reasons[Reason.BLOCKED_DOMAIN] > 0
    assert reasons[Reason.BLOCKED_URL] == other_url_count(table, other_url)
    assert len(kept) + len(rejected) == len(table)
    assert len(kept) == len(plain_kept) - reasons[Reason.BLOCKED_DOMAIN] - reasons[Reason.BLOCKED_URL]
    assert not blocked_masks(kept.column("url").combine_chunks(), options.blocked_domains, frozenset())[0].any()


def other_url_count(table: pa.Table, url: str) -> int:
    return table.column("URL").to_pylist().count(url)


def test_an_earlier_reason_wins_over_a_blocklist(tmp_path):
    table = pa.table({"url": ["ftp://example.com/a.jpg", "http://example.com/b.jpg"], "caption": ["a", "b"]})
    options = IngestOptions(blocked_domains=frozenset({"example.com"}))
    _, rejected = normalise_rows(table, options, "t.parquet")
    assert rejected.column("reason").to_pylist() == [Reason.NOT_HTTP_URL, Reason.BLOCKED_DOMAIN]
