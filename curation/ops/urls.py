"""URL normalisation for exact URL dedup (`dedup_exact`, DESIGN.md section 1).

Two URLs that differ only in ways no web server can observe should be one dedup key. The rules,
from RFC 3986 section 6.2.2-6.2.3 (syntax- and scheme-based normalisation), with the authority of an http(s) URL
read as the WHATWG URL Standard reads it (`curation.ops.url_host`), the same host the domain blocklist checks:

- the fragment (everything from the first ``#``) is dropped: it is never sent to the server;
- the scheme is lowercased; for http(s), the host is the WHATWG host: percent-decoded, UTS #46-mapped (so
  lowercased) and written in punycode, an IPv4 address in any number form written as a dotted quad, without the
  trailing dot of a fully qualified name (``example.com.`` and ``example.com`` are one name to DNS); leading C0
  controls and spaces and trailing ones (before the fragment) are stripped and tab, CR and LF removed anywhere, as
  every URL parser does before reading, and ``http:\\host`` is ``http://host``;
- a default port is dropped: ``:80`` for ``http``, ``:443`` for ``https`` (compared as numbers, so
  ``:0080`` counts too), and an empty port (``http://host:/``) is dropped for every scheme; another port is
  written as a number (``:08080`` is ``:8080``);
- everything else is kept exactly: userinfo, path, query (parameter order and percent-encoding
  included), an empty path versus ``/``. Those can change what a server returns, so they are not ours
  to rewrite.

Malformed input never raises. Another scheme, and an http(s) URL the WHATWG parser rejects, are normalised as
RFC 3986 alone says: scheme and host lowercased (an internationalised host stays Unicode), fragment and default
port dropped. A string that does not start with ``scheme://`` or ``//`` then only has its scheme (if any)
lowercased and its fragment dropped; an authority that cannot be split into userinfo, host and a numeric port (two
colons outside brackets, an unclosed ``[``, a port with letters) is kept as it is.
"""

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.ops.url_host import parse_authority

__all__ = ["normalise_url", "normalise_urls"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Nearly every real image URL is already normal: lowercase http(s) scheme, a lowercase host of letters, digits,
# '-', '_' and dots whose last label starts with a letter (not an IPv4 number, no trailing dot), without userinfo
# or port, no fragment, tab or newline, no trailing space or control. Arrow finds those rows in bulk and
# `normalise_url` sees only the rest, so the vectorised result equals the row-by-row one by construction.
_ALREADY_NORMAL = (
    r"^https?://(?:[a-z0-9_-]*\.)*[a-z_-][a-z0-9_-]*(?:[/?](?:[^#\t\n\r]*[^#\x00-\x20])?)?$"
)


def normalise_url(url: str) -> str:
    """Return `url` normalised by the rules in the module docstring (never raises)."""
    without_fragment = url.split("#", 1)[0]
    authority = parse_authority(without_fragment)
    if authority is not None:
        host = authority.host.rstrip(".") or authority.host
        userinfo = "" if authority.userinfo is None else authority.userinfo + "@"
        port = "" if authority.port is None else f":{authority.port}"
        return f"{authority.scheme}://{userinfo}{host}{port}{authority.rest}"
    scheme_match = _SCHEME.match(without_fragment)
    scheme = scheme_match.group(0).lower() if scheme_match else ""
    remainder = without_fragment[len(scheme) :]
    if not remainder.startswith("//"):
        return scheme + remainder
    after_slashes = remainder[2:]
    authority_end = len(after_slashes)
    for delimiter in "/?":
        position = after_slashes.find(delimiter)
        if position != -1:
            authority_end = min(authority_end, position)
    authority = _normalise_authority(after_slashes[:authority_end], scheme[:-1])
    return scheme + "//" + authority + after_slashes[authority_end:]


def _normalise_authority(authority: str, scheme: str) -> str:
    userinfo, at_sign, host_port = authority.rpartition("@")
    if host_port.startswith("["):
        closing = host_port.find("]")
        if closing == -1:
            return authority
        host, after_host = host_port[: closing + 1], host_port[closing + 1 :]
        if after_host and not after_host.startswith(":"):
            return authority
        has_port, port = bool(after_host), after_host[1:]
    else:
        if host_port.count(":") > 1:
            return authority
        host, colon, port = host_port.partition(":")
        has_port = bool(colon)
    if has_port and port and not (port.isascii() and port.isdigit()):
        return authority
    if has_port and port and int(port) != _DEFAULT_PORTS.get(scheme):
        host_port = host.lower() + ":" + port
    else:
        host_port = host.lower()
    return userinfo + at_sign + host_port


def normalise_urls(urls: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Vectorised `normalise_url` over a string array; nulls stay null and the type is kept."""
    if isinstance(urls, pa.ChunkedArray):
        return pa.chunked_array([normalise_urls(chunk) for chunk in urls.chunks], type=urls.type)
    if not (pa.types.is_string(urls.type) or pa.types.is_large_string(urls.type)):
        raise TypeError(f"normalise_urls expects a string or large_string array, got {urls.type}")
    unchanged = pc.match_substring_regex(urls, _ALREADY_NORMAL)
    needs_work = pc.invert(pc.fill_null(unchanged, True))
    rows = np.flatnonzero(needs_work.to_numpy(zero_copy_only=False))
    if len(rows) == 0:
        return urls
    normalised = pa.array([normalise_url(url) for url in urls.take(rows).to_pylist()], type=urls.type)
    return pc.replace_with_mask(urls, needs_work, normalised)
