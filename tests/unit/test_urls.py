import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.ops.urls import normalise_url, normalise_urls

CASES = [
    # scheme and host are lowercased, path and query kept exactly
    ("HTTP://Example.COM/Path/File.JPG?B=2&a=1", "http://example.com/Path/File.JPG?B=2&a=1"),
    ("https://EXAMPLE.com", "https://example.com"),
    ("http://example.com/", "http://example.com/"),
    ("http://example.com/a%2Fb?q=%41", "http://example.com/a%2Fb?q=%41"),
    ("http://example.com?Z=1&a=2&Z=0", "http://example.com?Z=1&a=2&Z=0"),
    # fragments are dropped, from the first '#'
    ("http://example.com/a.jpg#Frag", "http://example.com/a.jpg"),
    ("http://example.com/a.jpg?x=1#f#g", "http://example.com/a.jpg?x=1"),
    ("http://example.com#", "http://example.com"),
    # default ports only
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("HTTPS://Example.com:443", "https://example.com"),
    ("http://example.com:0080/a", "http://example.com/a"),
    ("http://example.com:/a", "http://example.com/a"),
    ("http://example.com:443/a", "http://example.com:443/a"),
    ("https://example.com:80/a", "https://example.com:80/a"),
    ("http://example.com:8080/a", "http://example.com:8080/a"),
    ("ftp://FTP.example.com:80/a", "ftp://ftp.example.com:80/a"),
    # userinfo kept as it is, host still lowercased
    ("http://User:PassWord@Example.com:80/a", "http://User:PassWord@example.com/a"),
    ("http://a@b@Example.com/", "http://a@b@example.com/"),
    # IPv6 literals
    ("http://[FE80::1]:80/a", "http://[fe80::1]/a"),
    ("http://[FE80::1]:8080/a", "http://[fe80::1]:8080/a"),
    # http(s) hosts are WHATWG hosts: punycode, percent-decoded, IPv4 numbers as dotted quads, no trailing dot
    ("http://BÜCHER.Example/Ä.jpg", "http://xn--bcher-kva.example/Ä.jpg"),
    ("https://ПРИМЕР.рф/Путь", "https://xn--e1afmkfd.xn--p1ai/Путь"),
    ("http://xn--bcher-kva.example/a", "http://xn--bcher-kva.example/a"),
    ("http://%65vil.example/a.jpg", "http://evil.example/a.jpg"),
    ("http://evil%2Eexample/a.jpg", "http://evil.example/a.jpg"),
    ("http://ｅｖｉｌ．example/a.jpg", "http://evil.example/a.jpg"),
    ("http://evil。example。/a.jpg", "http://evil.example/a.jpg"),
    ("http://Evil.Example./a.jpg", "http://evil.example/a.jpg"),
    ("http://0x7f.1/a", "http://127.0.0.1/a"),
    ("http://2130706433:8080/a", "http://127.0.0.1:8080/a"),
    ("http://example.com:08080/a", "http://example.com:8080/a"),
    # what every parser strips before reading: C0 and space at the ends, tab and newline anywhere
    (" http://Example.com", "http://example.com"),
    ("\thttp://exa\tmple.com/a\nb.jpg \x01", "http://example.com/ab.jpg"),
    ("http://example.com/a.jpg #frag", "http://example.com/a.jpg"),
    # a backslash ends the authority; slashes after the scheme are skipped
    ("http://evil.example\\@good.example/a.jpg", "http://evil.example\\@good.example/a.jpg"),
    ("HTTP://EVIL.example\\a.jpg", "http://evil.example\\a.jpg"),
    ("http:\\\\Evil.example/a.jpg", "http://evil.example/a.jpg"),
    ("http:///path", "http://path"),
    # another scheme or an http url WHATWG rejects: RFC 3986 rules alone (an IDN host stays Unicode)
    ("ftp://BÜCHER.Example/a", "ftp://bücher.example/a"),
    ("http://Xn--A.com/a", "http://xn--a.com/a"),
    ("http://Exa mple.com/a", "http://exa mple.com/a"),
    # scheme-relative and non-hierarchical
    ("//Example.com:80/a#x", "//example.com:80/a"),
    ("MAILTO:Someone@Example.com", "mailto:Someone@Example.com"),
    ("DATA:image/png;base64,AAAA", "data:image/png;base64,AAAA"),
    # malformed: unchanged apart from what is safe
    ("", ""),
    ("not a url", "not a url"),
    ("not a url #hashtag", "not a url "),
    ("www.Example.com/a.jpg", "www.Example.com/a.jpg"),
    ("http://[::1", "http://[::1"),
    ("http://[::1]x/a", "http://[::1]x/a"),
    ("http://Host:abc/a", "http://Host:abc/a"),
    ("http://A:B:C/", "http://A:B:C/"),
    ("1http://Example.com", "1http://Example.com"),
]


@pytest.mark.parametrize(("url", "expected"), CASES)
def test_normalise_url(url, expected):
    assert normalise_url(url) == expected


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string()])
def test_normalise_urls_matches_normalise_url_and_keeps_nulls_and_type(string_type):
    urls = [url for url, _ in CASES] + [None]
    result = normalise_urls(pa.array(urls, type=string_type))
    assert result.type == string_type
    assert result.to_pylist() == [expected for _, expected in CASES] + [None]


def test_normalise_urls_chunked_and_empty():
    chunked = pa.chunked_array([["HTTP://A.com/#x"], [], [None, "http://b.com:80/"]])
    result = normalise_urls(chunked)
    assert isinstance(result, pa.ChunkedArray) and result.num_chunks == 3
    assert result.to_pylist() == ["http://a.com/", None, "http://b.com/"]
    assert normalise_urls(pa.array([], type=pa.string())).to_pylist() == []
    assert normalise_urls(pa.nulls(2, type=pa.string())).to_pylist() == [None, None]


def test_normalise_urls_rejects_non_strings():
    with pytest.raises(TypeError):
        normalise_urls(pa.array([1, 2]))


def test_normalise_urls_on_real_urls(shared_data):
    urls = pq.read_table(shared_data / "captions_cc3m" / "cc3m_validation.parquet", columns=["url"]).column("url")
    urls = urls.combine_chunks()
    expected = [normalise_url(url) for url in urls.to_pylist()]
    assert normalise_urls(urls).to_pylist() == expected
    # The same URLs disguised as a careless crawler would write them normalise back to the originals.
    plain = [url for url in expected if re.match(r"https?://[^/:@]+/", url)][:3000]
    disguised = [re.sub(r"^(https?)://([^/]+)", _disguise, url) + "#top" for url in plain]
    assert disguised[0] != plain[0]
    assert normalise_urls(pa.array(disguised)).to_pylist() == plain


def _disguise(match: re.Match) -> str:
    scheme, host = match.group(1), match.group(2)
    return f"{scheme.upper()}://{host.upper()}:{80 if scheme == 'http' else 443}"


URL_ALPHABET = st.sampled_from(
    list("aAzZ09.-_~:/?#[]@!$&'()*+,;=% \tÜü東\\。ßＡ\x01")
    + ["http://", "HTTPS://", ":80", ":443", "//", "%2e", "%41", "0x", "xn--", "xn--bcher-kva"]
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.lists(URL_ALPHABET, max_size=20).map("".join) | st.text(max_size=30))
def test_normalisation_never_raises_is_idempotent_and_vectorises_exactly(url):
    once = normalise_url(url)
    assert normalise_url(once) == once
    assert normalise_urls(pa.array([url, None])).to_pylist() == [once, None]
