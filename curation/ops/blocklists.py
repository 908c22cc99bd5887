"""Domain and URL blocklists applied at ingest (a data owner's standing opt-out, before anything is fetched).

A blocklist file is UTF-8 text, one entry a line; blank lines and lines starting with '#' are ignored. A domain
entry blocks that host and every subdomain of it (`example.com` blocks `img.example.com`, not `badexample.com`);
a leading `*.` or `.` is accepted and means the same. A URL entry blocks exactly that URL after the same
normalisation `dedup_exact` uses (`curation.ops.urls`), so case in the scheme and host, a default port or a
fragment do not let a blocked URL through. In a URL list anything after the first whitespace of a line is a comment
(`http://example.com/a.jpg  # request 42`, as in the uid and image-hash lists): a valid URL holds no raw whitespace,
and a note kept in the entry would make it match nothing, silently. A domain line is the domain alone (trailing text
is an error).
"""

from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from curation.ops.urls import normalise_url, normalise_urls


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
    """The lowercased domains of a domain blocklist file."""
    domains = set()
    for number, entry in _entries(path):
        domain = entry.lower().removeprefix("*.").lstrip(".").rstrip(".")
        if not domain or any(c in domain for c in "/:@ \t") or "." not in domain and domain != "localhost":
            raise BlocklistError(f"{path}:{number}: {entry!r} is not a domain (write e.g. example.com)")
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError as error:
                raise BlocklistError(f"{path}:{number}: {entry!r} is not a valid internationalised domain "
                                     f"({error})") from error
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


def host_of(url: str) -> str | None:
    """The lowercased ASCII host of `url`, or None when it has none that parses."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return host.lower()


def is_blocked_host(host: str | None, domains: frozenset[str]) -> bool:
    """Whether `host` is one of `domains` or a subdomain of one."""
    if host is None or not domains:
        return False
    labels = host.split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


def blocked_masks(urls: pa.Array, domains: frozenset[str], blocked_urls: frozenset[str]) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """(rows whose host is on `domains`, rows whose normalised url is on `blocked_urls`) for a string array;
    null urls are on neither."""
    values = urls.to_pylist()
    by_domain = np.fromiter((url is not None and is_blocked_host(host_of(url), domains) for url in values),
                            dtype=bool, count=len(values)) if domains else np.zeros(len(values), dtype=bool)
    if blocked_urls:
        normalised = normalise_urls(urls).to_pylist()
        by_url = np.fromiter((url is not None and url in blocked_urls for url in normalised), dtype=bool,
                             count=len(values))
    else:
        by_url = np.zeros(len(values), dtype=bool)
    return by_domain, by_url
