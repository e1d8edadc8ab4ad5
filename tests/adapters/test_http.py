"""http.request against a real HTTP server on 127.0.0.1, and httpx fakes for network faults."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from jsonschema import Draft202012Validator

from planrun.adapters.base import StepContext
from planrun.adapters.http import HttpRequest, parse_retry_after, redact_url
from planrun.errors import (
    AccessError,
    ConfigurationError,
    ResourceError,
    StepError,
    TransientError,
)
from planrun.policy import LevelPolicy, Trust

SECRET = "s3cr3t-token-value"


@pytest.fixture
def ctx(make_ctx: Any) -> StepContext:
    """A local run whose policy grants only 127.0.0.1: every request here still goes
    through the network guard's transport (tests/adapters/test_netguard.py tests its rules)."""
    return make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True,
                                                           hosts=["127.0.0.1"]))


class Handler(BaseHTTPRequestHandler):
    """Answers by path; ``server.release`` ends the slow endpoint."""

    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, **kw: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", **kw)

    def _route(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        retry_date = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        routes = {
            "/json": lambda: self._json(200, {"ok": True, "items": [1, 2]}),
            "/problem+json": lambda: self._send(200, b'{"a": 1}', "application/problem+json"),
            "/badjson": lambda: self._send(200, b"{not json", "application/json"),
            "/text": lambda: self._send(200, "héllo".encode(), "text/plain; charset=utf-8"),
            "/odd-charset": lambda: self._send(200, "héllo".encode(),
                                               "text/plain; charset=no-such-charset"),
            "/echo": lambda: self._json(200, {
                "method": self.command, "path": self.path, "body": body.decode(),
                "headers": {k.lower(): v for k, v in self.headers.items()}}),
            "/redirect": lambda: self._send(302, headers={"Location": "/json"}),
            "/big": lambda: self._send(200, b"x" * (2 * 1024 * 1024)),
            "/missing": lambda: self._send(404, b"nothing here"),
            "/bad": lambda: self._json(400, {"error": "bad field"}),
            "/unprocessable": lambda: self._send(422),
            "/limited": lambda: self._send(429, headers={"Retry-After": "7"}),
            "/limited-date": lambda: self._send(429, headers={"Retry-After": retry_date}),
            "/boom": lambda: self._send(500, b"stack trace"),
            "/unavailable": lambda: self._send(503, headers={"Retry-After": "3"}),
            "/request-timeout": lambda: self._send(408),
            "/auth": lambda: self._send(401, f"bad token {self.headers.get('Authorization')}"
                                        .encode()),
            "/forbidden": lambda: self._send(403),
            "/slow": self._slow,
        }
        routes.get(path, lambda: self._send(404))()

    def _slow(self) -> None:
        self.server.slow_started.set()
        self.server.release.wait(30)
        self._send(200, b"finally")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _route


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.release = threading.Event()
        self.slow_started = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (timeout tests) is expected

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def request(ctx: StepContext, timeout: float = 10, adapter: HttpRequest | None = None,
            **params: Any) -> Any:
    return asyncio.run((adapter or HttpRequest()).run(params, ctx, timeout=timeout))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- successful answers ---------------------------------------------------------------------

def test_a_json_answer_is_parsed(ctx: StepContext, server: Server) -> None:
    out = request(ctx, url=server.url("/json"))
    assert out["status"] == 200
    assert out["json"] == {"ok": True, "items": [1, 2]}
    assert out["text"] is None
    assert out["truncated"] is False
    assert out["headers"]["content-type"] == "application/json"
    assert out["url"] == server.url("/json")


def test_a_plus_json_media_type_is_parsed(ctx: StepContext, server: Server) -> None:
    assert request(ctx, url=server.url("/problem+json"))["json"] == {"a": 1}


def test_json_that_does_not_parse_comes_back_as_text(ctx: StepContext, server: Server) -> None:
    out = request(ctx, url=server.url("/badjson"))
    assert out["json"] is None
    assert out["text"] == "{not json"


def test_a_text_answer_is_decoded(ctx: StepContext, server: Server) -> None:
    out = request(ctx, url=server.url("/text"))
    assert out["text"] == "héllo"
    assert out["json"] is None


def test_method_headers_query_and_json_body_are_sent(ctx: StepContext, server: Server) -> None:
    out = request(ctx, method="POST", url=server.url("/echo"), headers={"X-Trace": "t1"},
                  params={"q": "prefect", "n": 5}, json={"a": [1, 2]})
    seen = out["json"]
    assert seen["method"] == "POST"
    assert seen["path"] == "/echo?q=prefect&n=5"
    assert json.loads(seen["body"]) == {"a": [1, 2]}
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["x-trace"] == "t1"


def test_a_text_body_is_sent(ctx: StepContext, server: Server) -> None:
    out = request(ctx, method="PUT", url=server.url("/echo"), body="plain words")
    assert out["json"]["method"] == "PUT"
    assert out["json"]["body"] == "plain words"


def test_head_returns_no_body(ctx: StepContext, server: Server) -> None:
    out = request(ctx, method="HEAD", url=server.url("/text"))
    assert out["status"] == 200
    assert out["text"] == ""


def test_redirects_are_followed_unless_turned_off(ctx: StepContext, server: Server) -> None:
    out = request(ctx, url=server.url("/redirect"))
    assert (out["status"], out["url"]) == (200, server.url("/json"))
    out = request(ctx, url=server.url("/redirect"), follow_redirects=False)
    assert out["status"] == 302
    assert out["headers"]["location"] == "/json"


def test_a_large_answer_is_cut_at_max_bytes(ctx: StepContext, server: Server) -> None:
    out = request(ctx, url=server.url("/big"), max_bytes=1000)
    assert out["truncated"] is True
    assert out["text"] == "x" * 1000


# -- status codes → categories --------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected", "status"), [
    ("/missing", ConfigurationError, 404),
    ("/bad", ConfigurationError, 400),
    ("/unprocessable", ConfigurationError, 422),
    ("/limited", ResourceError, 429),
    ("/boom", TransientError, 500),
    ("/unavailable", TransientError, 503),
    ("/request-timeout", TransientError, 408),
    ("/auth", AccessError, 401),
    ("/forbidden", AccessError, 403),
])
def test_status_codes_map_to_categories(ctx: StepContext, server: Server, path: str,
                                        expected: type[StepError], status: int) -> None:
    with pytest.raises(expected) as caught:
        request(ctx, url=server.url(path))
    assert type(caught.value) is expected
    assert caught.value.details["status"] == status
    assert f"answered {status}" in caught.value.message


def test_a_404_says_what_to_do(ctx: StepContext, server: Server) -> None:
    with pytest.raises(ConfigurationError) as caught:
        request(ctx, url=server.url("/missing"))
    assert caught.value.message == (
        f"the server answered 404 Not Found for GET {server.url('/missing')}: check the URL")
    assert caught.value.hint
    assert caught.value.details["response_snippet"] == "nothing here"


def test_429_carries_retry_after_in_seconds(ctx: StepContext, server: Server) -> None:
    with pytest.raises(ResourceError) as caught:
        request(ctx, url=server.url("/limited"))
    assert caught.value.retry_after == 7
    assert "wait 7s" in caught.value.message


def test_429_carries_retry_after_from_an_http_date(ctx: StepContext, server: Server) -> None:
    with pytest.raises(ResourceError) as caught:
        request(ctx, url=server.url("/limited-date"))
    assert caught.value.retry_after is not None
    assert 20 <= caught.value.retry_after <= 31


def test_503_passes_its_retry_after_on(ctx: StepContext, server: Server) -> None:
    with pytest.raises(TransientError) as caught:
        request(ctx, url=server.url("/unavailable"))
    assert caught.value.retry_after == 3


# -- secrets --------------------------------------------------------------------------------

def _everything(error: StepError) -> str:
    return " ".join([str(error), error.message, error.hint, json.dumps(error.details)])


def test_credentials_never_appear_in_an_error(ctx: StepContext, server: Server) -> None:
    url = server.url("/auth").replace("http://", f"http://user:{SECRET}@") + f"?api_key={SECRET}"
    with pytest.raises(AccessError) as caught:
        request(ctx, url=url, headers={"Authorization": f"Bearer {SECRET}",
                                       "Cookie": f"session={SECRET}"})
    text = _everything(caught.value)
    assert SECRET not in text  # the server even echoed the token back in its body
    assert "***" in text
    assert caught.value.details["request_headers"]["Authorization"] == "***"


def test_a_malformed_header_is_a_configuration_error_without_the_secret(
        ctx: StepContext, server: Server) -> None:
    with pytest.raises(ConfigurationError) as caught:
        request(ctx, url=server.url("/json"), headers={"Authorization": f"{SECRET}\nX: y"})
    assert SECRET not in _everything(caught.value)


def test_redact_url() -> None:
    assert redact_url("https://u:pw@h.example/p?token=abc&q=1") == (
        "https://u:redacted@h.example/p?token=redacted&q=1")
    assert redact_url("https://h.example/p?q=1") == "https://h.example/p?q=1"


# -- network faults -------------------------------------------------------------------------

def test_a_refused_connection_is_transient(ctx: StepContext) -> None:
    url = f"http://127.0.0.1:{_free_port()}/x"
    with pytest.raises(TransientError, match="could not connect") as caught:
        request(ctx, url=url)
    assert url in caught.value.message


def test_a_slow_server_hits_the_step_timeout(ctx: StepContext, server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(TransientError, match="timeout of 0.5s"):
        request(ctx, url=server.url("/slow"), timeout=0.5)
    assert server.slow_started.is_set()
    assert time.monotonic() - started < 5


def test_a_cancel_stops_the_request(ctx: StepContext, server: Server) -> None:
    async def scenario() -> None:
        task = asyncio.ensure_future(
            HttpRequest().run({"url": server.url("/slow")}, ctx, timeout=None))
        await asyncio.to_thread(server.slow_started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert server.slow_started.is_set()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("fault", "expected"), [
    (httpx.ReadError("connection reset"), TransientError),
    (httpx.RemoteProtocolError("server hung up"), TransientError),
    (httpx.ReadTimeout("read timed out"), TransientError),
    (httpx.ConnectTimeout("connect timed out"), TransientError),
    (httpx.ConnectError("name resolution failed"), TransientError),
    (httpx.UnsupportedProtocol("no such protocol"), ConfigurationError),
    (httpx.TooManyRedirects("loop"), ConfigurationError),
])
def test_transport_faults_map_to_categories(ctx: StepContext, fault: Exception,
                                            expected: type[StepError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise fault

    fake = HttpRequest(transport=httpx.MockTransport(handler))
    with pytest.raises(expected) as caught:
        request(ctx, adapter=fake, url="https://api.example/v1")
    assert type(caught.value) is expected
    assert isinstance(caught.value.__cause__, type(fault))
    assert caught.value.hint


def test_invalid_url_exceptions_are_configuration_errors() -> None:
    assert isinstance(HttpRequest().classify(httpx.InvalidURL("bad")), ConfigurationError)


# -- parameters -----------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["ftp://example.org/x", "example.org", "http://", "file:///etc/passwd"])
def test_non_http_urls_fail_validation(url: str) -> None:
    with pytest.raises(ConfigurationError, match="url"):
        HttpRequest().validate({"url": url})


def test_the_schema_rejects_non_http_urls_statically() -> None:
    validator = Draft202012Validator(HttpRequest.parameter_schema())
    assert list(validator.iter_errors({"url": "ftp://example.org"}))
    assert not list(validator.iter_errors({"url": "https://example.org", "json": {"a": 1}}))


def test_templated_urls_pass_the_static_check() -> None:
    url = "{{ steps.search.output.url }}"
    assert HttpRequest().validate({"url": url}).url == url


@pytest.mark.parametrize("params", [
    {"url": "https://example.org", "method": "TRACE"},
    {"url": "https://example.org", "json": {"a": 1}, "body": "b"},
    {"url": "https://example.org", "unknown": 1},
])
def test_bad_parameters_fail_validation(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="invalid parameters for http.request"):
        HttpRequest().validate(params)


@pytest.mark.parametrize(("header", "seconds"), [
    ("7", 7.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("", None), (None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_of_a_future_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now=now) == 60.0


def test_health_is_ok() -> None:
    assert asyncio.run(HttpRequest().health()).ok


def test_a_text_answer_in_an_unknown_charset_is_read_as_utf8(
        ctx: StepContext, server: Server) -> None:
    assert request(ctx, url=server.url("/odd-charset"))["text"] == "héllo"


def test_a_url_httpx_cannot_parse_is_a_configuration_error(ctx: StepContext) -> None:
    with pytest.raises(ConfigurationError, match="not a valid URL"):
        request(ctx, url="http://[::1")


def test_a_header_that_is_not_ascii_is_a_configuration_error(
        ctx: StepContext, server: Server) -> None:
    with pytest.raises(ConfigurationError, match="a header is not ASCII") as caught:
        request(ctx, url=server.url("/echo"), headers={"X-Name": "h\u00e9llo \u2603"})
    assert caught.value.hint == "header names and values must be plain ASCII"


def test_retry_after_as_a_date_without_a_zone_is_read_as_utc() -> None:
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 -0000", now) == 30.0
    assert parse_retry_after("not a date", now) is None
