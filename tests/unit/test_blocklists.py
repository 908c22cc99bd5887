"""Domain and URL blocklists at ingest: parsing, subdomain matching, url normalisation, and the ledger reasons."""

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ops.blocklists import (
    BlocklistError,
    host_of,
    is_blocked_host,
    load_domain_blocklist,
    load_url_blocklist,
)
from curation.ops.ingest import IngestOptions, normalise_rows
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


@pytest.mark.parametrize("line", ["bücher..de", "ü" * 64 + ".de"])
def test_a_domain_idna_cannot_encode_is_a_blocklist_error_naming_file_and_line(tmp_path, line):
    path = _write(tmp_path, "domains.txt", f"bücher.de\n{line}\n")
    with pytest.raises(BlocklistError, match=r"domains.txt:2: .* is not a valid internationalised domain"):
        load_domain_blocklist(path)


def test_an_idn_domain_is_stored_as_punycode_and_blocks_its_hosts(tmp_path):
    domains = load_domain_blocklist(_write(tmp_path, "domains.txt", "*.Bücher.de\n"))
    assert domains == frozenset({"xn--bcher-kva.de"})
    assert is_blocked_host(host_of("http://img.bücher.de/x.jpg"), domains)


def test_url_lines_end_at_the_first_whitespace_so_a_trailing_note_still_matches(tmp_path):
    path = _write(tmp_path, "urls.txt", "http://a.example/b.jpg  # req 42\nHTTPS://B.example/c.jpg\tDMCA 7\n")
    assert load_url_blocklist(path) == frozenset({"http://a.example/b.jpg", "https://b.example/c.jpg"})
    with pytest.raises(BlocklistError, match=r"bad.txt:1: 'a.example/b.jpg' is not a URL"):
        load_url_blocklist(_write(tmp_path, "bad.txt", "a.example/b.jpg http://a.example/b.jpg\n"))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BlocklistError, match="cannot read blocklist"):
        load_domain_blocklist(tmp_path / "absent.txt")


@pytest.mark.parametrize(("host", "blocked"), [
    ("example.com", True), ("img.cdn.example.com", True), ("badexample.com", False), ("example.com.evil.net", False),
    ("com", False), (None, False),
])
def test_subdomains_are_blocked_and_lookalikes_are_not(host, blocked):
    assert is_blocked_host(host, frozenset({"example.com"})) is blocked


def test_host_of_handles_ports_userinfo_idn_and_garbage():
    assert host_of("https://user:pw@IMG.Example.com:8443/x.jpg") == "img.example.com"
    assert host_of("http://bücher.de/x.jpg") == "xn--bcher-kva.de"
    assert host_of("http://[::1/") is None
    assert host_of("not a url") is None


def test_ingest_ledgers_blocked_rows_on_real_captions(shared_data, tmp_path):
    """Block the most common host of the img2dataset test shard (and one url of another host): exactly those rows go
    to the ledger, with their reason, and nothing else changes."""
    table = pq.read_table(next((shared_data / "captions_img2dataset").glob("test_10000.parquet")))
    hosts = [host_of(url) for url in table.column("URL").to_pylist()]
    top_host, top_count = collections.Counter(h for h in hosts if h).most_common(1)[0]
    other_url = next(url for url, host in zip(table.column("URL").to_pylist(), hosts, strict=True)
                     if host and host != top_host and not is_blocked_host(host, frozenset({top_host})))
    plain_kept, plain_rejected = normalise_rows(table, IngestOptions(), "test_10000.parquet")

    options = IngestOptions(blocked_domains=load_domain_blocklist(_write(tmp_path, "d.txt", top_host + "\n")),
                            blocked_urls=load_url_blocklist(_write(tmp_path, "u.txt", "HTTP" + other_url[4:] + "\n")))
    kept, rejected = normalise_rows(table, options, "test_10000.parquet")
    reasons = collections.Counter(rejected.column("reason").to_pylist())
    assert reasons[Reason.BLOCKED_DOMAIN] >= top_count - plain_rejected.num_rows and reasons[Reason.BLOCKED_DOMAIN] > 0
    assert reasons[Reason.BLOCKED_URL] == other_url_count(table, other_url)
    assert len(kept) + len(rejected) == len(table)
    assert len(kept) == len(plain_kept) - reasons[Reason.BLOCKED_DOMAIN] - reasons[Reason.BLOCKED_URL]
    assert not any(is_blocked_host(host_of(u), options.blocked_domains) for u in kept.column("url").to_pylist())


def other_url_count(table: pa.Table, url: str) -> int:
    return table.column("URL").to_pylist().count(url)


def test_an_earlier_reason_wins_over_a_blocklist(tmp_path):
    table = pa.table({"url": ["ftp://example.com/a.jpg", "http://example.com/b.jpg"], "caption": ["a", "b"]})
    options = IngestOptions(blocked_domains=frozenset({"example.com"}))
    _, rejected = normalise_rows(table, options, "t.parquet")
    assert rejected.column("reason").to_pylist() == [Reason.NOT_HTTP_URL, Reason.BLOCKED_DOMAIN]
