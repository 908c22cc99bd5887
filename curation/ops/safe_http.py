"""Safe-by-default HTTP(S) fetching for image downloads: refuse URLs that point inside the cluster.

The threat is server-side request forgery (SSRF). The download stage fetches URLs taken from a web crawl, so an
attacker controls them: an image URL (or a redirect from one) such as ``http://169.254.169.254/latest/meta-data/``,
``http://10.0.3.7:8080/admin`` or ``http://metrics.internal/`` makes our workers send requests to cloud metadata
endpoints and cluster-internal services, and whatever comes back may end up stored in the dataset. Plain
``urllib`` also follows redirects to ``ftp:`` and opens ``file:`` and ``data:`` URLs.

The design, in the order a request meets it:

- The opener is built by hand from a fixed set of handlers: HTTP, HTTPS, redirects, the default error handling and a
  catch-all that refuses every other scheme (``file:``, ``ftp:``, ``data:``, ``javascript:`` ...). There is no
  ``ProxyHandler``, so proxy environment variables are ignored on purpose: through a proxy the address check would
  vet the proxy's address, not the target's.
- Redirects are followed only to ``http`` and ``https``; each redirect target goes through the same opener, so it
  gets the same address check.
- The connection resolves the host once with ``getaddrinfo`` and refuses the request when ANY of the addresses is
  blocked (see `blocked_category`), before a single packet is sent to it. It then connects to exactly those checked
  addresses, never resolving again, so a DNS answer that changes between check and connect (DNS rebinding) cannot
  slip an internal address through. HTTPS still sends SNI for, and verifies the certificate against, the host name
  in the URL.
- ``allow_hosts`` is an explicit list of ``"host:port"`` strings exempt from the address check, matched against the
  host and port as written in the URL (``localhost:8000`` does not allow ``127.0.0.1:8000``). It exists so tests and
  local demos can fetch from their own server on 127.0.0.1; production leaves it empty.

img2dataset downloads with ``urllib.request.urlopen`` and so uses the process-global opener: `install_safe_opener`
puts this one there. It must run in every process that downloads (each Spark executor / worker process), because
the global opener is per process. A caller that passes ``context=`` or ``cafile=`` to ``urlopen`` bypasses the
global opener; img2dataset does not.

Every refusal raises `RefusedURL`, whose message contains `REFUSED_MARKER`; img2dataset turns exceptions into
error strings, and the download stage recognises refusals by that marker.

Each ``open`` (one image, its redirects included) also gets `ResponseLimits`: a total deadline and a byte cap. A
socket timeout only bounds one read, so a server trickling a byte per read interval could hold a download for
ever; here every read of the response (status line, headers, chunk framing and body) waits at most until the
deadline, as does the TLS handshake, and a response may not be longer than the cap (refused from its
Content-Length when it declares one). `TRANSFERS` records when this process last made progress (a response byte
received, a request ended), which the download stage's shard watchdog reads, and can abandon every download of the
process at once.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "REFUSED_MARKER",
    "TRANSFERS",
    "DeadlinePassed",
    "DownloadsAbandoned",
    "RefusedURL",
    "ResponseLimits",
    "ResponseTooLarge",
    "blocked_category",
    "install_safe_opener",
    "parse_allow_hosts",
    "safe_opener",
]

logger = logging.getLogger(__name__)

REFUSED_MARKER = "refused by curation"

_ALLOWED_SCHEMES = frozenset({"http", "https"})

# RFC 6598 carrier-grade NAT space: not global, yet `ipaddress` (3.11) reports it neither private nor reserved.
_SHARED_NETWORK = ipaddress.IPv4Network("100.64.0.0/10")
# RFC 6052 well-known NAT64 prefix: the low 32 bits are an IPv4 address that a NAT64 gateway will connect to.
_NAT64_NETWORK = ipaddress.IPv6Network("64:ff9b::/96")

AllowHosts = frozenset[tuple[str, int]]


class RefusedURL(urllib.error.URLError):
    """A URL the safe opener will not fetch; ``reason`` (and so ``str()``) always contains `REFUSED_MARKER`.

    A `urllib.error.URLError` so that callers which already handle download failures (img2dataset catches every
    exception and keeps ``str(err)``) handle this one too.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"{REFUSED_MARKER}: {detail}")
        self.detail = detail


class DeadlinePassed(TimeoutError):
    """The image's download (connect, redirects, headers and body together) went past its deadline."""


class ResponseTooLarge(OSError):
    """The response is, or says it is, longer than the byte cap."""


class DownloadsAbandoned(OSError):
    """`TRANSFERS.abandon` was called: every download of this process fails at its next connect or read."""


@dataclass(frozen=True)
class ResponseLimits:
    """What fetching one URL may cost: `deadline_seconds` for the whole exchange, redirects included, and
    `max_bytes` read from any one response of it."""

    deadline_seconds: float = 60.0
    max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.deadline_seconds > 0 or self.max_bytes < 1:
            raise ValueError(f"response limits must be positive, not {self}")


class TransferProgress:
    """When this process's downloads last made progress, and a switch that fails all of them.

    Progress is a response byte received or a request ended (either way): a stretch of dead links sends no byte but
    still moves on. Plain attribute writes, so the download threads never wait on a lock.
    """

    def __init__(self) -> None:
        self._last_progress = time.monotonic()
        self._abandoned_because: str | None = None

    def restart(self) -> None:
        self._abandoned_because = None
        self._last_progress = time.monotonic()

    def note(self) -> None:
        self._last_progress = time.monotonic()

    def idle_seconds(self) -> float:
        return time.monotonic() - self._last_progress

    def abandon(self, because: str) -> None:
        self._abandoned_because = because

    @property
    def abandoned_because(self) -> str | None:
        return self._abandoned_because

    def check(self) -> None:
        if self._abandoned_because is not None:
            raise DownloadsAbandoned(self._abandoned_because)


TRANSFERS = TransferProgress()


class _Budget:
    """The limits of one open() (one image and its redirects) and the deadline they set when it began."""

    def __init__(self, limits: ResponseLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.deadline_seconds

    def seconds_left(self) -> float:
        """Seconds until the deadline; raises DeadlinePassed (or DownloadsAbandoned) when there are none."""
        TRANSFERS.check()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed(f"the download took longer than its deadline of {self.limits.deadline_seconds:g} s")
        return left

    def wait_for_one_read(self, read_timeout: float | None) -> float:
        left = self.seconds_left()
        return left if read_timeout is None else min(read_timeout, left)


_this_thread = threading.local()


def _seconds_or_none(timeout: object) -> float | None:
    return None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout


class _BudgetedReads(io.RawIOBase):
    """The response's socket reads, each waiting at most until the deadline, counted against the byte cap."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, budget: _Budget, read_timeout: float | None) -> None:
        super().__init__()
        self._raw, self._sock, self._budget, self._read_timeout = raw, sock, budget, read_timeout
        self._received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(self._budget.wait_for_one_read(self._read_timeout))
        try:
            count = self._raw.readinto(buffer)
        except TimeoutError:
            self._budget.seconds_left()  # the deadline's error when it is the deadline that cut this read
            raise
        if count:
            TRANSFERS.note()
            self._received += count
            if self._received > self._budget.limits.max_bytes:
                raise ResponseTooLarge(f"the response is longer than the cap of {self._budget.limits.max_bytes} bytes")
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


class _LimitedResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, budget: _Budget, read_timeout: float | None, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        # Nothing is read yet, so swapping the buffered reader loses no byte.
        self.fp = io.BufferedReader(_BudgetedReads(self.fp.detach(), sock, budget, read_timeout))
        self._max_bytes = budget.limits.max_bytes

    def begin(self) -> None:
        super().begin()
        if self.length is not None and self.length > self._max_bytes:
            raise ResponseTooLarge(f"Content-Length {self.length} is above the cap of {self._max_bytes} bytes")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when traffic to it really goes to that IPv4 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64_NETWORK:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # 6to4 (2002::/16): a relay forwards to the embedded IPv4 address.
    return address.sixtofour


def blocked_category(address: str) -> str | None:
    """Why a literal IP address must not be fetched from, or None for a public address.

    Categories: "unspecified", "loopback", "link-local", "multicast", "shared" (100.64.0.0/10), "reserved",
    "private". An IPv4 address wrapped in IPv6 (``::ffff:127.0.0.1``, NAT64, 6to4) is judged by the IPv4 address,
    which is where the packets end up. Raises ValueError when `address` is not an IP address.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    # Order matters: `ipaddress` also calls most of these ranges "private", and the specific name is the useful one.
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED_NETWORK:
        return "shared"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    # Catch-all for ranges a newer Python classifies as non-global without one of the names above.
    if not ip.is_global:
        return "reserved"
    return None


def _normalise_host(host: str) -> str:
    """Lowercase a host name; write an IP literal in its canonical form, so ``::0001`` matches ``::1``."""
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_allow_hosts(entries: Iterable[str]) -> AllowHosts:
    """Parse ``"host:port"`` / ``"[v6]:port"`` strings into ``{(host, port)}`` (host lowercased).

    The port is mandatory: an allow-list entry opens exactly one service, never a whole machine. Raises ValueError
    naming the bad entry when one is malformed.
    """
    if isinstance(entries, str):
        # A lone string would otherwise be iterated character by character.
        raise TypeError(f"allow_hosts must be a list of 'host:port' strings, not the string {entries!r}")
    parsed: set[tuple[str, int]] = set()
    for entry in entries:
        text = entry.strip()
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"allow_hosts entry {entry!r} must be 'host:port' or '[ipv6]:port'")
        if host.startswith("["):
            if not host.endswith("]") or len(host) < 3:
                raise ValueError(f"allow_hosts entry {entry!r} has an unclosed or empty '[ipv6]' host")
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"allow_hosts entry {entry!r}: {host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"allow_hosts entry {entry!r}: write an IPv6 host in brackets, '[{host}]:port'")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"allow_hosts entry {entry!r}: port must be a number from 1 to 65535")
        parsed.add((_normalise_host(host), int(port_text)))
    return frozenset(parsed)


def _resolve_checked(host: str, port: int, allow_hosts: AllowHosts) -> list[tuple]:
    """Resolve `host` once and refuse, before any connect, if any of its addresses is blocked."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo returned no addresses for {host!r}")
    if (_normalise_host(host), port) in allow_hosts:
        return infos
    for *_, sockaddr in infos:
        address = sockaddr[0]
        try:
            category = blocked_category(address)
        except ValueError:
            # Not an IP we can judge (an unexpected address family): refuse rather than guess.
            category = "unrecognised"
        if category is not None:
            logger.debug("refusing %s:%s, which resolves to %s (%s)", host, port, address, category)
            if _normalise_host(host) == _normalise_host(address):
                raise RefusedURL(f"host {host} port {port}: {address} is a {category} address")
            raise RefusedURL(f"host {host} port {port} resolves to {address}, which is a {category} address")
    return infos


def _create_checked_connection(
    address: tuple[str, int],
    timeout: object = socket._GLOBAL_DEFAULT_TIMEOUT,
    source_address: tuple[str, int] | None = None,
    *,
    allow_hosts: AllowHosts,
) -> socket.socket:
    """`socket.create_connection`, except that it connects only to the addresses `_resolve_checked` vetted."""
    host, port = address
    last_error: OSError | None = None
    for family, socktype, proto, _canonname, sockaddr in _resolve_checked(host, port, allow_hosts):
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            last_error = err
            if sock is not None:
                sock.close()
    raise last_error or OSError(f"could not connect to {host}:{port}")


class _CheckedConnectMixin:
    """Swaps the connection's socket factory for the checked one and its response for one that reads within the
    open()'s budget; the rest of http.client is untouched."""

    def __init__(self, *args, allow_hosts: AllowHosts, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # http.client calls self._create_connection((self.host, self.port), ...) in connect(); the TLS step then
        # wraps the socket with server_hostname=self.host, so SNI and certificate checks keep the URL's host name.
        self._create_connection = functools.partial(_create_checked_connection, allow_hosts=allow_hosts)
        # Made inside the open() of this image (do_open runs in it), so the thread's budget is this image's; a
        # connection made outside our opener gets the default limits.
        self._budget: _Budget = getattr(_this_thread, "budget", None) or _Budget(ResponseLimits())
        self._read_timeout = _seconds_or_none(self.timeout)
        self.response_class = functools.partial(_LimitedResponse, budget=self._budget, read_timeout=self._read_timeout)

    def connect(self) -> None:
        """The TCP connection only (HTTPSConnection's TLS step is replaced by `_SafeHTTPSConnection.connect`)."""
        self.timeout = self._budget.wait_for_one_read(self._read_timeout)
        http.client.HTTPConnection.connect(self)


class _SafeHTTPConnection(_CheckedConnectMixin, http.client.HTTPConnection):
    pass


class _SafeHTTPSConnection(_CheckedConnectMixin, http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        _handshake_within(self.sock, self._budget, self._read_timeout)


def _handshake_within(tls: ssl.SSLSocket, budget: _Budget, read_timeout: float | None) -> None:
    """The TLS handshake, each wait bounded by the read timeout and the deadline. A blocking handshake bounds each
    read only, so a server trickling its certificate would hold the connection for ever."""
    tls.setblocking(False)
    with selectors.DefaultSelector() as selector:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                event = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                event = selectors.EVENT_WRITE
            selector.register(tls, event)
            ready = selector.select(budget.wait_for_one_read(read_timeout))
            selector.unregister(tls)
            if not ready:
                budget.seconds_left()
                raise TimeoutError("the TLS handshake timed out")
    tls.settimeout(read_timeout)


def _unwrap_refusal(open_function):
    """Re-raise a refusal as itself: ``do_open`` wraps every OSError from connect() in another URLError."""

    @functools.wraps(open_function)
    def wrapper(self, req):
        try:
            return open_function(self, req)
        except RefusedURL:
            raise
        except urllib.error.URLError as err:
            if isinstance(err.reason, RefusedURL):
                raise err.reason from None
            raise

    return wrapper


class _SafeHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_hosts: AllowHosts) -> None:
        super().__init__()
        self._allow_hosts = allow_hosts

    @_unwrap_refusal
    def http_open(self, req):
        return self.do_open(functools.partial(_SafeHTTPConnection, allow_hosts=self._allow_hosts), req)


class _SafeHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_hosts: AllowHosts, context=None) -> None:
        # context=None lets http.client build its default context: certificates and host names are verified.
        super().__init__(context=context)
        self._allow_hosts = allow_hosts

    @_unwrap_refusal
    def https_open(self, req):
        connection = functools.partial(_SafeHTTPSConnection, allow_hosts=self._allow_hosts)
        return self.do_open(connection, req, context=self._context)


def _refuse_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise RefusedURL(f"scheme {scheme or '(none)'} is not http or https (url {url!r})")


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s); the stock handler also follows ftp: and refuses others without our marker."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location.strip())
            try:
                _refuse_scheme(target)
            except RefusedURL:
                logger.debug("refusing redirect from %s to %s", req.full_url, target)
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        # Second gate on the final, joined URL that the stock handler is about to open.
        _refuse_scheme(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RefuseOtherSchemesHandler(urllib.request.BaseHandler):
    """Answers every scheme no other handler claimed (file:, ftp:, data:, ...) with a refusal."""

    def unknown_open(self, req):
        raise RefusedURL(f"scheme {req.type} is not http or https (url {req.full_url!r})")


class _LimitedOpener(urllib.request.OpenerDirector):
    """Gives each open() of a URL its own budget; a redirect is opened inside it and shares it."""

    def __init__(self, limits: ResponseLimits) -> None:
        super().__init__()
        self.limits = limits

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        if getattr(_this_thread, "budget", None) is not None:
            return super().open(fullurl, data, timeout)
        TRANSFERS.check()
        _this_thread.budget = _Budget(self.limits)
        try:
            return super().open(fullurl, data, timeout)
        finally:
            _this_thread.budget = None
            TRANSFERS.note()


def safe_opener(
    allow_hosts: Iterable[str] = (), *, context=None, limits: ResponseLimits = ResponseLimits()
) -> urllib.request.OpenerDirector:
    """An opener that fetches only http(s) URLs whose host resolves to public addresses (see the module docstring).

    Built by hand rather than with `urllib.request.build_opener`, which would add FTP, file and data handlers and a
    ``ProxyHandler`` reading the environment. Proxy environment variables (``http_proxy``, ``https_proxy`` ...)
    are deliberately ignored: through a proxy the address check would apply to the proxy, not to the target.

    `allow_hosts` lists ``"host:port"`` strings exempt from the address check (tests and local demos reaching their
    own server); `context` is an optional `ssl.SSLContext` for HTTPS (default: verify certificates and host names);
    `limits` bounds the time and bytes of each open() (a URL and its redirects).
    """
    allowed = parse_allow_hosts(allow_hosts)
    opener = _LimitedOpener(limits)
    for handler in (
        _SafeHTTPHandler(allowed),
        _SafeHTTPSHandler(allowed, context=context),
        _SafeRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _RefuseOtherSchemesHandler(),
    ):
        opener.add_handler(handler)
    return opener


# (allow list, limits, opener) of the last install, so a repeated install with the same settings keeps the opener.
_installed: tuple[AllowHosts, ResponseLimits, urllib.request.OpenerDirector] | None = None


def install_safe_opener(allow_hosts: Iterable[str] = (), limits: ResponseLimits = ResponseLimits()) -> None:
    """Make `safe_opener` the process-wide opener behind ``urllib.request.urlopen`` (and so img2dataset).

    Idempotent: calling it again with the same allow list and limits while our opener is still installed changes
    nothing. Call it in every process that downloads; the global opener does not cross process boundaries.
    """
    global _installed
    allowed = parse_allow_hosts(allow_hosts)
    current = getattr(urllib.request, "_opener", None)
    if _installed is not None and _installed[:2] == (allowed, limits) and current is _installed[2]:
        return
    opener = safe_opener(sorted(_format_allow_entry(host, port) for host, port in allowed), limits=limits)
    urllib.request.install_opener(opener)
    _installed = (allowed, limits, opener)
    logger.info("installed the safe URL opener (allow_hosts=%s, %s)", sorted(allowed) or "none", limits)


def _format_allow_entry(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
