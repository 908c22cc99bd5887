"""Tests for `curation.ops.safe_http`: address classification, allow lists, and a real server on 127.0.0.1.

Offline by construction: `socket.getaddrinfo` is replaced by a fake that answers IP literals numerically and a few
made-up names from a table (never DNS), and `socket.socket.connect` by a recorder that refuses, without sending
anything, every address outside 127.0.0.0/8. The recorder also lets tests assert where connections were attempted.
"""

import http.server
import ipaddress
import os
import socket
import socketserver
import ssl
import threading
import urllib.error
import urllib.request

import pytest

from curation.ops import safe_http
from curation.ops.safe_http import (
    REFUSED_MARKER,
    RefusedURL,
    blocked_category,
    install_safe_opener,
    parse_allow_hosts,
    safe_opener,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

BODY = b"\x89PNG fake image bytes"
TIMEOUT = 5


# --- classification ------------------------------------------------------------------------------------------------

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", "shared"),
    ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "category"), BLOCKED)
def test_blocked_addresses_are_classified(address, category):
    assert blocked_category(address) == category


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_not_blocked(address):
    assert blocked_category(address) is None


def test_blocked_category_rejects_non_addresses():
    with pytest.raises(ValueError):
        blocked_category("example.com")


def test_refused_url_is_a_url_error_carrying_the_marker():
    err = RefusedURL("127.0.0.2 is a loopback address")
    assert isinstance(err, urllib.error.URLError)
    assert err.reason == f"{REFUSED_MARKER}: 127.0.0.2 is a loopback address"
    assert REFUSED_MARKER in str(err)


# --- allow lists ---------------------------------------------------------------------------------------------------


def test_parse_allow_hosts_accepts_names_ipv4_and_bracketed_ipv6():
    entries = ["127.0.0.1:8000", "LocalHost:80", "[::1]:443", " images.example:65535 ", "[::0001]:1"]
    assert parse_allow_hosts(entries) == frozenset(
        {("127.0.0.1", 8000), ("localhost", 80), ("::1", 443), ("images.example", 65535), ("::1", 1)}
    )
    assert parse_allow_hosts([]) == frozenset()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("127.0.0.1", "must be 'host:port'"),
        (":80", "must be 'host:port'"),
        ("host:", "port must be a number from 1 to 65535"),
        ("host:0", "port must be a number from 1 to 65535"),
        ("host:65536", "port must be a number from 1 to 65535"),
        ("host:-1", "port must be a number from 1 to 65535"),
        ("host:http", "port must be a number from 1 to 65535"),
        ("::1:80", "write an IPv6 host in brackets"),
        ("[::1:80", "unclosed or empty"),
        ("[]:80", "unclosed or empty"),
        ("[images.example]:80", "is not an IPv6 address"),
    ],
)
def test_parse_allow_hosts_rejects_malformed_entries(entry, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        parse_allow_hosts([entry])
    assert repr(entry) in str(excinfo.value)


def test_parse_allow_hosts_rejects_a_lone_string():
    with pytest.raises(TypeError):
        parse_allow_hosts("127.0.0.1:80")


# --- network fakes -------------------------------------------------------------------------------------------------


class FakeResolver:
    """Stands in for `socket.getaddrinfo`: IP literals are answered numerically, names from `names`, never DNS."""

    def __init__(self, real):
        self.real = real
        self.names: dict[str, list[list[str]]] = {}  # host -> successive answers (the last one repeats)
        self.calls: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.calls.append(host)
        if host.lower() in self.names:  # DNS names are case-insensitive
            answers = self.names[host.lower()]
            addresses = answers.pop(0) if len(answers) > 1 else answers[0]
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses
            ]
        return self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)


@pytest.fixture(autouse=True)
def resolver(monkeypatch):
    fake = FakeResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture(autouse=True)
def connects(monkeypatch):
    """Every address a client socket tried to connect to; anything outside 127.0.0.0/8 is refused unsent."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def recording_connect(sock, address):
        attempts.append(address[0])
        if not (
            sock.family == socket.AF_INET and ipaddress.ip_address(address[0]) in ipaddress.ip_network("127.0.0.0/8")
        ):
            raise ConnectionRefusedError(f"test guard: no traffic to {address[0]}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    return attempts


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.headers.get("Host"), self.path))
        port = self.server.server_address[1]
        redirects = {
            "/to-127-0-0-2": f"http://127.0.0.2:{port}/ok",
            "/to-file": "file:///etc/passwd",
            "/to-ftp": f"ftp://127.0.0.1:{port}/ok",
            "/same-host": "/ok",
        }
        if self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, format, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind would call socket.getfqdn (a reverse DNS lookup); the name is not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


@pytest.fixture
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(TIMEOUT)


def fetch(opener, url):
    with opener.open(url, timeout=TIMEOUT) as response:
        return response.read()


# --- the opener against a real server ------------------------------------------------------------------------------


def test_loopback_is_refused_before_connecting(server, connects):
    port = server.server_address[1]
    with pytest.raises(RefusedURL, match=r"127\.0\.0\.1 is a loopback address") as excinfo:
        fetch(safe_opener(), f"http://127.0.0.1:{port}/ok")
    assert excinfo.value.reason.startswith(f"{REFUSED_MARKER}: ")
    assert connects == []
    assert server.requests == []


def test_allow_listed_server_is_fetched(server):
    port = server.server_address[1]
    assert fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://127.0.0.1:{port}/ok") == BODY
    assert server.requests == [(f"127.0.0.1:{port}", "/ok")]


def test_same_host_redirect_is_followed(server):
    port = server.server_address[1]
    assert fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://127.0.0.1:{port}/same-host") == BODY
    assert [path for _, path in server.requests] == ["/same-host", "/ok"]


def test_redirect_to_another_loopback_address_is_refused_without_connecting(server, connects):
    port = server.server_address[1]
    with pytest.raises(RefusedURL, match=r"127\.0\.0\.2 is a loopback address"):
        fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://127.0.0.1:{port}/to-127-0-0-2")
    assert connects == ["127.0.0.1"]
    assert [path for _, path in server.requests] == ["/to-127-0-0-2"]


@pytest.mark.parametrize(("path", "scheme"), [("/to-file", "file"), ("/to-ftp", "ftp")])
def test_redirect_to_other_schemes_is_refused(server, path, scheme):
    port = server.server_address[1]
    with pytest.raises(RefusedURL, match=f"scheme {scheme} is not http or https"):
        fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://127.0.0.1:{port}{path}")
    assert [p for _, p in server.requests] == [path]


def test_allow_list_entry_for_another_port_does_not_allow_this_one(server, connects):
    port = server.server_address[1]
    other = 1 if port != 1 else 2
    with pytest.raises(RefusedURL, match="loopback"):
        fetch(safe_opener([f"127.0.0.1:{other}"]), f"http://127.0.0.1:{port}/ok")
    assert connects == []
    assert server.requests == []


def test_name_resolving_to_a_private_address_is_refused_before_connecting(resolver, connects):
    resolver.names["internal.example"] = [["10.0.0.1"]]
    with pytest.raises(RefusedURL, match=r"internal\.example .* resolves to 10\.0\.0\.1, which is a private address"):
        fetch(safe_opener(), "http://internal.example/metadata")
    assert resolver.calls == ["internal.example"]
    assert connects == []


def test_name_with_any_blocked_address_is_refused(resolver, connects):
    resolver.names["mixed.example"] = [["93.184.216.34", "169.254.169.254"]]
    with pytest.raises(RefusedURL, match="link-local"):
        fetch(safe_opener(), "https://mixed.example/a.jpg")
    assert connects == []


def test_connects_to_the_checked_address_without_resolving_again(server, resolver, connects):
    """DNS rebinding: a public first answer and a loopback second one must not reach the local server."""
    port = server.server_address[1]
    resolver.names["rebind.example"] = [["93.184.216.34"], ["127.0.0.1"]]
    with pytest.raises(urllib.error.URLError, match="test guard"):
        fetch(safe_opener(), f"http://rebind.example:{port}/ok")
    assert resolver.calls == ["rebind.example"]
    assert connects == ["93.184.216.34"]  # refused unsent by the `connects` guard
    assert server.requests == []


def test_localhost_is_allowed_only_when_listed_by_name(server, resolver):
    port = server.server_address[1]
    resolver.names["localhost"] = [["127.0.0.1"]]
    with pytest.raises(RefusedURL, match=r"localhost .* resolves to 127\.0\.0\.1, which is a loopback address"):
        fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://localhost:{port}/ok")
    assert server.requests == []
    assert fetch(safe_opener([f"localhost:{port}"]), f"http://LocalHost:{port}/ok") == BODY
    assert fetch(safe_opener([f"LOCALHOST:{port}"]), f"http://localhost:{port}/ok") == BODY
    with pytest.raises(RefusedURL, match="loopback"):
        fetch(safe_opener([f"localhost:{port}"]), f"http://127.0.0.1:{port}/ok")


@pytest.mark.parametrize(
    ("url", "category"),
    [
        ("http://[::1]:8080/ok", "loopback"),
        ("http://[::ffff:127.0.0.1]:8080/ok", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("https://127.0.0.1:8443/ok", "loopback"),
    ],
)
def test_literal_blocked_addresses_are_refused(url, category, connects):
    with pytest.raises(RefusedURL, match=f"is a {category} address"):
        fetch(safe_opener(), url)
    assert connects == []


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("file:///etc/passwd", "file"),
        ("ftp://127.0.0.1/pub/a.jpg", "ftp"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
        ("javascript:alert(1)", "javascript"),
    ],
)
def test_other_schemes_are_refused(url, scheme, connects):
    with pytest.raises(RefusedURL, match=f"scheme {scheme} is not http or https"):
        fetch(safe_opener(), url)
    assert connects == []


def test_proxy_environment_is_ignored(server, monkeypatch, connects):
    port = server.server_address[1]
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://10.9.9.9:3128")
    assert fetch(safe_opener([f"127.0.0.1:{port}"]), f"http://127.0.0.1:{port}/ok") == BODY
    assert connects == ["127.0.0.1"]


class _PlainTextTLS:
    """An `ssl.SSLContext` stand-in that records the SNI name and leaves the socket plain, so HTTPS can be exercised
    against the plain-HTTP test server."""

    verify_mode = ssl.CERT_REQUIRED
    check_hostname = True
    post_handshake_auth = None

    def __init__(self):
        self.server_hostnames: list[str] = []

    def wrap_socket(self, sock, server_hostname=None, **kwargs):
        self.server_hostnames.append(server_hostname)
        # Takes the connection over as ssl.SSLSocket does, with a handshake that has nothing to negotiate.
        return _PlainTextSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())


class _PlainTextSocket(socket.socket):
    def do_handshake(self):
        pass


def test_https_keeps_the_url_host_name_for_sni_and_connects_to_the_checked_address(server, resolver, connects):
    port = server.server_address[1]
    resolver.names["images.example"] = [["127.0.0.1"]]
    context = _PlainTextTLS()
    opener = safe_opener([f"images.example:{port}"], context=context)
    assert fetch(opener, f"https://images.example:{port}/ok") == BODY
    assert context.server_hostnames == ["images.example"]
    assert connects == ["127.0.0.1"]
    assert server.requests == [(f"images.example:{port}", "/ok")]


def test_https_verifies_certificates_by_default():
    connection = safe_http._SafeHTTPSConnection("images.example", allow_hosts=frozenset())
    assert connection._context.verify_mode == ssl.CERT_REQUIRED
    assert connection._context.check_hostname


# --- the process-wide opener and img2dataset -----------------------------------------------------------------------


@pytest.fixture
def global_opener():
    """Restores urllib's process-wide opener, so other tests never see ours."""
    saved = urllib.request._opener
    yield
    urllib.request.install_opener(saved)


def test_install_safe_opener_is_idempotent_for_the_same_allow_list(global_opener):
    install_safe_opener(["127.0.0.1:8000"])
    first = urllib.request._opener
    install_safe_opener(["127.0.0.1:8000"])
    assert urllib.request._opener is first
    install_safe_opener([])
    assert urllib.request._opener is not first
    urllib.request.install_opener(None)
    install_safe_opener([])
    assert isinstance(urllib.request._opener, urllib.request.OpenerDirector)


def test_img2dataset_download_is_refused_then_allowed(server, global_opener):
    from img2dataset.downloader import download_image

    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/ok"
    install_safe_opener([])
    key, stream, error = download_image(
        (0, url), timeout=TIMEOUT, user_agent_token=None, disallowed_header_directives=None
    )
    assert (key, stream) == (0, None)
    assert REFUSED_MARKER in error and "loopback" in error
    assert server.requests == []

    install_safe_opener([f"127.0.0.1:{port}"])
    key, stream, error = download_image(
        (1, url), timeout=TIMEOUT, user_agent_token=None, disallowed_header_directives=None
    )
    assert (key, error) == (1, None)
    assert stream.read() == BODY
