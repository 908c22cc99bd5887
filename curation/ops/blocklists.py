"""Domain and URL blocklists applied at ingest (a data owner's standing opt-out, before anything is fetched).

A blocklist file is UTF-8 text, one entry a line; blank lines and lines starting with '#' are ignored. A domain
entry blocks that host and every subdomain of it (`example.com` blocks `img.example.com`, not `badexample.com`);
a leading `*.` or `.` is accepted and means the same. The host of a url is its WHATWG host (`curation.ops.url_host`:
percent-decoded, UTS #46-mapped, punycode, an IPv4 number as a dotted quad), as a browser or urllib.request would
contact it, and an entry is read the same way, so `%65vil.example`, `EVIL.example.` (a trailing dot is dropped on
both sides), `evil。example` and `bücher.de` against `xn--bcher-kva.de` cannot slip past; an IPv4 entry blocks
that address however the url writes it. A URL entry blocks exactly that URL after the same
normalisation `dedup_exact` uses (`curation.ops.urls`), so case in the scheme and host, a default port or a
fragment do not let a blocked URL through. In a URL list anything after the first whitespace of a line is a comment
(`http://example.com/a.jpg  # request 42`, as in the uid and image-hash lists): a valid URL holds no raw whitespace,
and a note kept in the entry would make it match nothing, silently. A domain line is the domain alone (trailing text
is an error).
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.ops.url_host import parse_host, whatwg_hosts
from curation.ops.urls import normalise_url, normalise_urls

# A DNS label is 1 to 63 octets (RFC 1035); an entry outside that can never match a host that resolves.
_MAX_LABEL_LENGTH = 63


class BlocklistError(ValueError):
    """A blocklist file that cannot be used; the message names the file and line."""


def _entries(path: Path) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BlocklistError(f"cannot read blocklist {path}: {error}") from error
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]


def load_domain_blocklist(path: Path) -> frozenset[str]:
    """The domains of a domain blocklist file, as WHATWG hosts without a trailing dot."""
    domains = set()
    for number, entry in _entries(path):
        text = entry.removeprefix("*.").lstrip(".")
        if not text or any(c in text for c in "/:@ \t"):
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a domain (write e.g. example.com)")
        host = parse_host(text)
        domain = host.rstrip(".") if host else ""
        if not domain or any(not 0 < len(label) <= _MAX_LABEL_LENGTH for label in domain.split(".")):
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a valid "
                                 f"{'' if text.isascii() else 'internationalised '}domain name")
        if "." not in domain and domain != "localhost":
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a domain (write e.g. example.com)")
        domains.add(domain)
    return frozenset(domains)


def load_url_blocklist(path: Path) -> frozenset[str]:
    """The normalised URLs of a URL blocklist file (the first word of each line; the rest is a comment)."""
    urls = set()
    for number, line in _entries(path):
        entry = line.split(None, 1)[0]
        if "://" not in entry:
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a URL (write it with its scheme)")
        urls.add(normalise_url(entry))
    return frozenset(urls)


def blocked_masks(urls: pa.Array, domains: frozenset[str], blocked_urls: frozenset[str]) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """(rows whose host is on `domains` or a subdomain of one, rows whose normalised url is on `blocked_urls`) for a
    string array; null urls and urls without a WHATWG host are on neither."""
    by_domain = _on_domain_list(whatwg_hosts(urls), domains) if domains else np.zeros(len(urls), dtype=bool)
    if blocked_urls:
        by_url = _filled(pc.is_in(normalise_urls(urls), value_set=pa.array(list(blocked_urls), type=urls.type)))
    else:
        by_url = np.zeros(len(urls), dtype=bool)
    return by_domain, by_url


def _on_domain_list(hosts: pa.Array, domains: frozenset[str]) -> np.ndarray:
    """Whether each host, or a parent domain of it, is in `domains`: the host and then each parent in turn (cut at
    its first '.') is looked up, all rows at once, until no row has a parent left."""
    value_set = pa.array(list(domains), type=hosts.type)
    candidates = pc.utf8_rtrim(hosts, characters=".")
    blocked = np.zeros(len(hosts), dtype=bool)
    while candidates.null_count < len(candidates):
        blocked |= _filled(pc.is_in(candidates, value_set=value_set))
        candidates = pc.struct_field(pc.extract_regex(candidates, r"^[^.]*\.(?P<parent>.+)$"), "parent")
    return blocked


def _filled(mask: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
