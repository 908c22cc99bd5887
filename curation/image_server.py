"""A small threaded HTTP server that answers GET and HEAD from a resolver function.

The demo serves its generated images from 127.0.0.1 so that img2dataset downloads them without any network,
and tests use the same server to exercise downloads, redirects and opt-out headers. A resolver maps the URL
path (query string removed) to a `Response`; paths it does not know are its own business (typically 404).
"""

from __future__ import annotations

import http.server
import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["INTERNAL_ERROR", "NOT_FOUND", "ImageServer", "Resolver", "Response", "dict_resolver"]

logger = logging.getLogger(__name__)

# img2dataset opens up to a few hundred connections at once; the default backlog of 5 would refuse most of them.
REQUEST_QUEUE_SIZE = 1024
# How often the serving loop checks for `stop`; the default half second would make every stop that slow.
SHUTDOWN_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Response:
    """What the server answers for one path; ``headers`` are extra ones, e.g. ``(("Location", url),)``."""

    status: int
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()


Resolver = Callable[[str], Response]

NOT_FOUND = Response(404, b"not found\n", "text/plain; charset=utf-8")
INTERNAL_ERROR = Response(500, b"internal server error\n", "text/plain; charset=utf-8")


def dict_resolver(routes: Mapping[str, Response]) -> Resolver:
    """A resolver answering the fixed ``routes`` (path -> response) and 404 for any other path."""
    table = dict(routes)

    def resolve(path: str) -> Response:
        return table.get(path, NOT_FOUND)

    return resolve


class _ResolverHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(self, address: tuple[str, int], resolver: Resolver, count_answer: Callable[[], None]) -> None:
        self.resolver = resolver
        self.count_answer = count_answer
        super().__init__(address, _ResolverHandler)

    def handle_error(self, request, client_address) -> None:
        # Clients that time out or hang up mid-body (img2dataset does both) are routine, not worth a traceback
        # on stderr, which is what the base class prints.
        logger.debug("request from %s failed", client_address, exc_info=True)


class _ResolverHandler(http.server.BaseHTTPRequestHandler):
    server: _ResolverHTTPServer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            response = self.server.resolver(path)
        except Exception:
            logger.exception("resolver failed for %s", path)
            response = INTERNAL_ERROR
        # Counted before anything is sent, so a client that has its answer always sees it counted.
        self.server.count_answer()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class ImageServer:
    """Serve ``resolver`` over HTTP on ``host:port`` (port 0: any free port) from a background thread.

    Use as a context manager (or `start` / `stop`); `serve_forever` blocks instead, for a CLI command.
    """

    def __init__(self, resolver: Resolver, host: str = "127.0.0.1", port: int = 0) -> None:
        self._resolver = resolver
        self._host = host
        self._requested_port = port
        self._server: _ResolverHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._answered = 0
        self._answered_lock = threading.Lock()

    def _count_answer(self) -> None:
        with self._answered_lock:
            self._answered += 1

    def _bind(self) -> _ResolverHTTPServer:
        if self._server is not None:
            raise RuntimeError("the image server is already running")
        self._server = _ResolverHTTPServer((self._host, self._requested_port), self._resolver, self._count_answer)
        return self._server

    def start(self) -> ImageServer:
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name=f"image-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("image server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._thread = None
        self._server = None

    def serve_forever(self) -> None:
        """Bind and answer requests in the calling thread until interrupted (KeyboardInterrupt propagates)."""
        server = self._bind()
        logger.info("serving images at %s", self.base_url)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            self._server = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the image server is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def requests(self) -> int:
        """How many requests were answered so far, across restarts."""
        with self._answered_lock:
            return self._answered
