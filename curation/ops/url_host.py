"""The host of an http(s) URL as the WHATWG URL Standard (https://url.spec.whatwg.org/) parses it, and whether
urllib, which downloads our images, reads the same host.

A blocklist or a dedup key that reads the host with a laxer parser than browsers and HTTP clients can be walked
around: ``http://%65vil.example/`` is ``evil.example`` to a browser (and to ``urllib.request``, which percent-decodes
the host) but ``%65vil.example`` to ``urllib.parse.urlsplit``; ``http://evil.example\\@good.example/`` is
``evil.example`` to a browser (a backslash ends the authority) but ``good.example`` to ``urlsplit``. So the host
every op uses is the WHATWG one, for the special schemes http and https:

- leading and trailing C0 controls and spaces are stripped, tab, LF and CR are removed anywhere;
- any run of ``/`` and ``\\`` after ``http:`` is skipped, and the authority ends at ``/``, ``\\``, ``?`` or ``#``;
- the userinfo runs to the last ``@`` of the authority; a port is digits only, at most 65535;
- the host is percent-decoded, mapped by UTS #46 (non-transitional: lowercase, full-width and ideographic dots
  become ``.``, ``ß`` stays) and written in punycode; a host with a forbidden code point (space, ``%``, ``<``,
  ``|``, a control ...) or an ``xn--`` label that is not valid punycode does not parse;
- a host whose last label is a number is an IPv4 address in any of its forms (``0x7f.1``, ``017700000001``,
  ``2130706433``) and is written as a dotted quad; ``[...]`` is an IPv6 address, written compressed.

Where urllib reads another host (`host_disagreement`) the URL is ambiguous: which server it names depends on who
reads it, so no blocklist can vouch for it.

Not implemented (the URL then parses here where a browser would refuse it, with the same host): the UTS #46 bidi and
joiner rules (CheckBidi, CheckJoiners).
"""

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

import idna
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["WhatwgAuthority", "host_disagreement", "host_disagreements", "parse_authority",
           "parse_host", "whatwg_host", "whatwg_hosts"]

_DEFAULT_PORTS = {"http": 80, "https": 443}

_C0_CONTROL_OR_SPACE = "".join(chr(code) for code in range(0x21))
_TAB_OR_NEWLINE = str.maketrans("", "", "\t\n\r")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_AUTHORITY_END = re.compile(r"[/\\?#]")
_FORBIDDEN_DOMAIN_CODE_POINTS = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]")
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: frozenset("0123456789abcdefABCDEF")}

# Nearly every real image URL has a plain host: letters, digits, '-', '_' and dots, the last label starting with a
# letter (so no IPv4 number), right after "http(s)://" and ended by '/', '?', '#' or the end. Its WHATWG host is the
# host lowercased, and urlsplit reads the same one; Arrow finds those rows in bulk and only the rest are parsed here
# one by one, so the vectorised results equal the row-by-row ones by construction.
_PLAIN_HOST = r"^[hH][tT][tT][pP][sS]?://(?P<host>(?:[a-zA-Z0-9_-]*\.)*[a-zA-Z_-][a-zA-Z0-9_-]*)(?:[/?#]|$)"


@dataclass(frozen=True, slots=True)
class WhatwgAuthority:
    """The parts of an http(s) URL around its host, as WHATWG splits them: `scheme` (lowercased), `userinfo` (as
    written, without its '@'; None when absent), `host` (serialised), `port` (None when absent, empty or the
    scheme's default) and `rest` (from the end of the authority on, as written)."""

    scheme: str
    userinfo: str | None
    host: str
    port: int | None
    rest: str


def parse_authority(url: str) -> WhatwgAuthority | None:
    """`url` split as the WHATWG URL parser splits an http(s) URL; None for another scheme or a URL it rejects."""
    url = url.strip(_C0_CONTROL_OR_SPACE).translate(_TAB_OR_NEWLINE)
    scheme_match = _SCHEME.match(url)
    if not scheme_match or scheme_match.group(0)[:-1].lower() not in _DEFAULT_PORTS:
        return None
    scheme = scheme_match.group(0)[:-1].lower()
    after_scheme = url[scheme_match.end() :].lstrip("/\\")
    end_match = _AUTHORITY_END.search(after_scheme)
    end = end_match.start() if end_match else len(after_scheme)
    authority, rest = after_scheme[:end], after_scheme[end:]
    userinfo, at_sign, host_and_port = authority.rpartition("@")
    host_text, port_text = _split_port(host_and_port)
    if not host_text or port_text is not None and not _is_port(port_text):
        return None
    host = parse_host(host_text)
    if host is None:
        return None
    port = int(port_text) if port_text else None
    if port == _DEFAULT_PORTS[scheme]:
        port = None
    return WhatwgAuthority(scheme, userinfo if at_sign else None, host, port, rest)


def whatwg_host(url: str) -> str | None:
    """The serialised WHATWG host of an http(s) `url`; None for another scheme or a URL the standard rejects."""
    authority = parse_authority(url)
    return authority.host if authority else None


def host_disagreement(url: str) -> str | None:
    """Why urllib and the WHATWG parser would send `url` to different hosts (or one of them cannot read it); None
    when they agree.

    urllib's host (`urllib.parse.urlsplit`, which reads the authority as RFC 3986 does; `urllib.request` fetches
    from the same authority but percent-decodes it) is compared as DNS is asked for it: lowercased and, when not
    ASCII, IDNA-encoded the way `socket.getaddrinfo` and `http.client` do, but neither percent-decoded nor read as
    an IPv4 number. So ``%65vil.example``, ``0x7f.1``, a backslash or '@' trick and ``straße`` (IDNA 2003
    ``strasse``, UTS #46 ``xn--strae-oqa``) disagree; case and Unicode that both map alike do not.
    """
    whatwg = whatwg_host(url)
    if whatwg is None:
        return "not a URL by the WHATWG URL Standard"
    try:
        split_host = urlsplit(url).hostname
    except ValueError as error:
        return f"urllib cannot split it ({error})"
    if not split_host:
        return f"urllib finds no host where the WHATWG URL Standard finds {whatwg!r}"
    if _as_urllib_resolves(split_host) != whatwg:
        return f"hosts differ: WHATWG URL Standard {whatwg!r}, urllib {split_host!r}"
    return None


def whatwg_hosts(urls: pa.Array) -> pa.Array:
    """`whatwg_host` of every entry of a string array, as a string array (null for null or unparsable urls)."""
    plain_hosts, slow = _plain_hosts(urls)
    if len(slow) == 0:
        return plain_hosts
    parsed = pa.array([whatwg_host(url) for url in urls.take(slow).to_pylist()], type=plain_hosts.type)
    mask = np.zeros(len(urls), dtype=bool)
    mask[slow] = True
    return pc.replace_with_mask(plain_hosts, pa.array(mask), parsed)


def host_disagreements(urls: pa.Array) -> np.ndarray:
    """`host_disagreement` of every non-null entry of a string array, as an object array (None where they agree
    and for null entries)."""
    # a match without the capture is cheaper than `_plain_hosts`, and ingest asks this of every row
    plain = pc.match_substring_regex(urls, _PLAIN_HOST)
    needs_parsing = pc.or_kleene(pc.invert(plain), pc.match_substring(urls, "xn--", ignore_case=True))
    slow = np.flatnonzero(pc.and_kleene(needs_parsing, pc.is_valid(urls)).to_numpy(zero_copy_only=False))
    reasons = np.full(len(urls), None, dtype=object)
    reasons[slow] = [host_disagreement(url) for url in urls.take(slow).to_pylist()]
    return reasons


def _plain_hosts(urls: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(the plain host of each url, lowercased, or null; the rows with a url that need `whatwg_host`): those
    without a plain host, and those with an xn-- label, whose punycode must be checked."""
    hosts = pc.ascii_lower(pc.struct_field(pc.extract_regex(urls, _PLAIN_HOST), "host"))
    needs_parsing = pc.or_kleene(pc.is_null(hosts), pc.match_substring(hosts, "xn--"))
    needs_parsing = pc.and_kleene(needs_parsing, pc.is_valid(urls))
    return hosts, np.flatnonzero(needs_parsing.to_numpy(zero_copy_only=False))


def _split_port(host_and_port: str) -> tuple[str, str | None]:
    """(host, port text or None) at the first ':' outside brackets."""
    inside_brackets = False
    for position, character in enumerate(host_and_port):
        if character == "[":
            inside_brackets = True
        elif character == "]":
            inside_brackets = False
        elif character == ":" and not inside_brackets:
            return host_and_port[:position], host_and_port[position + 1 :]
    return host_and_port, None


def _is_port(text: str) -> bool:
    return text == "" or set(text) <= _DIGITS[10] and int(text) <= 65535


def parse_host(text: str) -> str | None:
    """The serialised WHATWG host of an http(s) url's host text (`[...]`, a domain, an IPv4 number); None when the
    standard rejects it."""
    if text.startswith("["):
        return _parse_ipv6(text[1:-1]) if text.endswith("]") else None
    domain = unquote_to_bytes(text).decode("utf-8", errors="replace")
    ascii_domain = _domain_to_ascii(domain)
    if ascii_domain is None or _FORBIDDEN_DOMAIN_CODE_POINTS.search(ascii_domain):
        return None
    if _ends_in_a_number(ascii_domain):
        return _parse_ipv4(ascii_domain)
    return ascii_domain


def _parse_ipv6(text: str) -> str | None:
    # ipaddress also reads a scope ("fe80::1%eth0"), which the standard does not
    if "%" in text:
        return None
    try:
        return f"[{ipaddress.IPv6Address(text).compressed}]"
    except ValueError:
        return None


def _domain_to_ascii(domain: str) -> str | None:
    """UTS #46 ToASCII as the URL Standard calls it (non-transitional, no STD3 rules, no DNS length check)."""
    if domain.isascii():
        mapped = domain.lower()
    else:
        try:
            mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
        except idna.IDNAError:
            return None
    labels = []
    for label in mapped.split("."):
        if label.startswith("xn--"):
            if not _is_valid_punycode_label(label):
                return None
            labels.append(label)
        elif label.isascii():
            labels.append(label)
        else:
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
    return ".".join(labels) or None


def _is_valid_punycode_label(label: str) -> bool:
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return False
    if not decoded or decoded.isascii():
        return False
    try:
        return idna.uts46_remap(decoded, std3_rules=False, transitional=False) == decoded
    except idna.IDNAError:
        return False


def _ends_in_a_number(domain: str) -> bool:
    labels = domain.split(".")
    if labels[-1] == "":
        if len(labels) == 1:
            return False
        labels.pop()
    last = labels[-1]
    return bool(last) and set(last) <= _DIGITS[10] or _ipv4_number(last) is not None


def _ipv4_number(text: str) -> int | None:
    if not text:
        return None
    radix = 10
    if text[:2] in ("0x", "0X"):
        text, radix = text[2:], 16
    elif len(text) > 1 and text[0] == "0":
        text, radix = text[1:], 8
    if not text:
        return 0
    return int(text, radix) if set(text) <= _DIGITS[radix] else None


def _parse_ipv4(domain: str) -> str | None:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    numbers = [_ipv4_number(part) for part in parts]
    if len(numbers) > 4 or None in numbers or any(number > 255 for number in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    address = numbers[-1] + sum(number * 256 ** (3 - index) for index, number in enumerate(numbers[:-1]))
    return str(ipaddress.IPv4Address(address))


def _as_urllib_resolves(host: str) -> str:
    """`urlsplit`'s host as the resolver is asked for it (an IPv6 literal in the WHATWG form, to compare)."""
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return host
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host
