import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from curation.image_server import ImageServer, Response, dict_resolver

JPEG_BODY = b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"
ROUTES = {
    "/photo.jpg": Response(200, JPEG_BODY, "image/jpeg"),
    "/moved.jpg": Response(302, headers=(("Location", "http://127.0.0.2:9/photo.jpg"),)),
    "/opt-out.jpg": Response(200, JPEG_BODY, "image/jpeg", (("X-Robots-Tag", "noai"),)),
}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# Proxies off: an environment's http_proxy must not see (or swallow) requests to 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NO_REDIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


@pytest.fixture
def server():
    with ImageServer(dict_resolver(ROUTES)) as running:
        yield running


def _fetch(url: str, method: str = "GET", opener=OPENER):
    with opener.open(urllib.request.Request(url, method=method), timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def _error(url: str, opener=OPENER) -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _fetch(url, opener=opener)
    caught.value.close()
    return caught.value


def test_get_answers_body_content_type_and_length(server):
    status, headers, body = _fetch(f"{server.base_url}/photo.jpg")
    assert (status, body) == (200, JPEG_BODY)
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Length"] == str(len(JPEG_BODY))


def test_query_string_is_not_part_of_the_path(server):
    assert _fetch(f"{server.base_url}/photo.jpg?size=large")[2] == JPEG_BODY


def test_base_url_names_loopback_and_the_bound_port(server):
    assert server.port > 0
    assert server.base_url == f"http://127.0.0.1:{server.port}"


def test_unknown_path_is_404(server):
    assert _error(f"{server.base_url}/nowhere.jpg").code == 404


def test_redirect_carries_location(server):
    error = _error(f"{server.base_url}/moved.jpg", opener=NO_REDIRECT_OPENER)
    assert error.code == 302
    assert error.headers["Location"] == "http://127.0.0.2:9/photo.jpg"


def test_extra_headers_are_sent(server):
    _, headers, body = _fetch(f"{server.base_url}/opt-out.jpg")
    assert headers["X-Robots-Tag"] == "noai"
    assert body == JPEG_BODY


def test_head_sends_headers_without_body(server):
    status, headers, body = _fetch(f"{server.base_url}/photo.jpg", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(JPEG_BODY))


def test_resolver_exception_is_500_and_logged(caplog):
    def failing(path: str) -> Response:
        raise ValueError(f"cannot resolve {path}")

    with ImageServer(failing) as running, caplog.at_level(logging.ERROR, logger="curation.image_server"):
        assert _error(f"{running.base_url}/any.jpg").code == 500
    assert "cannot resolve /any.jpg" in caplog.text


def test_request_counter_counts_every_answer(server):
    assert server.requests == 0
    _fetch(f"{server.base_url}/photo.jpg")
    _error(f"{server.base_url}/nowhere.jpg")
    _fetch(f"{server.base_url}/photo.jpg", method="HEAD")
    assert server.requests == 3


def test_concurrent_fetches_all_succeed(server):
    fetches = 256
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda _: _fetch(f"{server.base_url}/photo.jpg"), range(fetches)))
    assert all(status == 200 and body == JPEG_BODY for status, _, body in results)
    assert server.requests == fetches


def test_port_is_free_again_after_exit():
    with ImageServer(dict_resolver(ROUTES)) as first:
        port = first.port
    with pytest.raises(RuntimeError):
        _ = first.port
    with ImageServer(dict_resolver(ROUTES), port=port) as second:
        assert _fetch(f"{second.base_url}/photo.jpg")[2] == JPEG_BODY
