"""The WHATWG host of an http(s) url, and where urllib reads another host (issue 17 case 11)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops.url_host import host_disagreement, host_disagreements, parse_authority, whatwg_host, whatwg_hosts

HOSTS = [
    # the two urls: a percent-encoded host, and a backslash that ends the authority
    ("http://%65vil.example/a.jpg", "evil.example"),
    ("http://evil.example\\@good.example/a.jpg", "evil.example"),
    # case, trailing dot (kept by WHATWG; the blocklist and normalisation drop it), full-width and ideographic dots
    ("HTTP://EVIL.Example/a", "evil.example"),
    ("http://evil.example./a", "evil.example."),
    ("http://evil\u3002example/a", "evil.example"),
    ("http://ｅｖｉｌ．ｅｘａｍｐｌｅ/a", "evil.example"),
    ("http://evil%2eexample/a", "evil.example"),
    ("http://ev\u00adil.example/a", "evil.example"),
    # tab and newline removed anywhere, C0 and space stripped at the ends, slashes after the scheme skipped
    ("http://ev\til.exa\nmple/a", "evil.example"),
    ("\x00 http://evil.example/a \x1f", "evil.example"),
    ("http:\\\\evil.example\\a", "evil.example"),
    ("https:evil.example/a", "evil.example"),
    # userinfo runs to the last '@' of the authority; '#' and '?' end the authority first
    ("http://user:pw@good.example:80@evil.example/a", "evil.example"),
    ("http://good.example#@evil.example/a", "good.example"),
    ("http://good.example?@evil.example/a", "good.example"),
    # IPv4 in every number form, IPv6 compressed
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://0177.0.0.01/", "127.0.0.1"),
    ("http://2130706433/", "127.0.0.1"),
    ("http://127.1./", "127.0.0.1"),
    ("http://0x7F000001/", "127.0.0.1"),
    ("http://[0:0:0:0:0:0:0:1]:8080/", "[::1]"),
    ("http://[::FFFF:127.0.0.1]/", "[::ffff:7f00:1]"),
    # IDNA: UTS 46 non-transitional, punycode
    ("http://BÜCHER.de/", "xn--bcher-kva.de"),
    ("http://straße.de/", "xn--strae-oqa.de"),
    ("http://xn--bcher-kva.de/", "xn--bcher-kva.de"),
    ("http://a_b.example/", "a_b.example"),
    ("http://1x.example/", "1x.example"),
    # what the standard rejects
    ("http://0x100000000/", None),
    ("http://256.256.256.256/", None),
    ("http://1.2.3.4.5/", None),
    ("http://09.1/", None),
    ("http://a.0x/", None),
    ("http://xn--a.example/", None),
    ("http://%ff.example/", None),
    ("http://exa mple.com/", None),
    ("http://a<b.example/", None),
    ("http://evil.example%/", None),
    ("http://[fe80::1%25eth0]/", None),
    ("http://[::1/", None),
    ("http://example.com:99999/", None),
    ("http://example.com:8o/", None),
    ("http://user@/", None),
    ("http:///", None),
    # not http(s)
    ("ftp://evil.example/", None),
    ("javascript:alert(1)", None),
    ("evil.example/a.jpg", None),
]


@pytest.mark.parametrize(("url", "host"), HOSTS)
def test_whatwg_host(url, host):
    assert whatwg_host(url) == host


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string()])
def test_whatwg_hosts_matches_whatwg_host(string_type):
    urls = [url for url, _ in HOSTS] + [None, "http://Plain.example/a", "https://xn--a.example/"]
    assert whatwg_hosts(pa.array(urls, type=string_type)).to_pylist() == [whatwg_host(u) if u else None for u in urls]


def test_parse_authority_splits_userinfo_port_and_rest():
    authority = parse_authority("HTTPS://u:p@x@Example.COM:0443\\a/b?c")
    assert (authority.scheme, authority.userinfo, authority.host, authority.port, authority.rest) == (
        "https", "u:p@x", "example.com", None, "\\a/b?c")
    assert parse_authority("http://example.com:8080").port == 8080
    assert parse_authority("http://example.com:").port is None


DISAGREEMENTS = [
    ("http://%65vil.example/a.jpg", "'evil.example', urllib '%65vil.example'"),
    ("http://evil.example\\@good.example/a.jpg", "'evil.example', urllib 'good.example'"),
    ("http://evil%2eexample/a", "urllib 'evil%2eexample'"),
    ("http://0x7f.1/", "'127.0.0.1', urllib '0x7f.1'"),
    ("http://127.1/", "urllib '127.1'"),
    # Python's IDNA 2003 codec (what http.client and getaddrinfo use) maps ß to ss; UTS 46 keeps it
    ("http://straße.de/", "'xn--strae-oqa.de', urllib 'straße.de'"),
    ("http://evil.example ", "urllib 'evil.example '"),
    ("http:\\\\evil.example/a", "urllib finds no host"),
    ("http://[::1/", "not a URL by the WHATWG URL Standard"),
    ("http://a<b.example/", "not a URL by the WHATWG URL Standard"),
]


@pytest.mark.parametrize(("url", "why"), DISAGREEMENTS)
def test_a_url_whose_host_depends_on_the_parser_is_named(url, why):
    assert why in host_disagreement(url)


AGREEMENTS = [
    "http://EVIL.example/a", "http://evil.example./a", "http://evil\u3002example/a", "http://ｅｖｉｌ．example/a",
    "http://BÜCHER.de/", "http://xn--bcher-kva.de/", "http://user:pw@good.example:8080/a", "http://[::1]:80/",
    "http://127.0.0.1/", "http://ev\til.example/", "http://good.example#@evil.example/",
]


@pytest.mark.parametrize("url", AGREEMENTS)
def test_parsers_agree_on_case_dots_idn_and_userinfo(url):
    assert host_disagreement(url) is None


def test_host_disagreements_matches_host_disagreement_and_skips_nulls():
    urls = [url for url, _ in DISAGREEMENTS] + AGREEMENTS + [None, "http://plain.example/a"]
    assert host_disagreements(pa.array(urls)).tolist() == [host_disagreement(u) if u else None for u in urls]


def test_real_urls_have_plain_hosts_both_parsers_agree_on(shared_data):
    urls = pq.read_table(shared_data / "captions_cc3m" / "cc3m_validation.parquet", columns=["url"]).column("url")
    urls = urls.combine_chunks()
    assert whatwg_hosts(urls).to_pylist() == [whatwg_host(url) for url in urls.to_pylist()]
    assert [url for url, why in zip(urls.to_pylist(), host_disagreements(urls), strict=True) if why] == []


URL_PIECES = st.sampled_from(
    list("aZ0.-_:/\\?#[]@%\t 。ß東") + ["http://", "HTTPS:", "0x", "xn--", "%2e", "%41", "::1"]
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.lists(URL_PIECES, max_size=16).map("".join) | st.text(max_size=30))
def test_host_parsing_never_raises_and_vectorises_exactly(url):
    assert whatwg_hosts(pa.array([url, None])).to_pylist() == [whatwg_host(url), None]
    assert host_disagreements(pa.array([url])).tolist() == [host_disagreement(url)]
