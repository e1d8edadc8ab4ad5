"""Real servers on 127.0.0.1 for the agent tools' tests: a search API speaking SearXNG's
and Brave's JSON (fixtures in tests/fixtures/search/, in the providers' documented
formats) and a webhook receiver, with failure modes. Each counts what it received. The
SMTP server and the HTTP server they are built on are the examples' own
(examples/local_servers.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from examples import local_servers
from examples.local_servers import (
    SMTP_PASSWORD,
    SMTP_USER,
    JsonHandler,
    LocalServer,
    Mailbox,
    free_port,
    smtp_server,
)

__all__ = ["BRAVE_KEY", "BRAVE_PATH", "SMTP_PASSWORD", "SMTP_USER", "Behaviour", "Mailbox",
           "SearchHandler", "WebhookHandler", "brave_error", "free_port", "serving",
           "smtp_server"]

FIXTURES = Path(__file__).parent / "fixtures" / "search"
BRAVE_PATH = "/res/v1/web/search"
BRAVE_KEY = "brave-test-subscription-token"


@dataclass
class Behaviour:
    """What the search server does next: ``fail`` holds (status, headers, body) answers
    given before the normal one; ``slow`` blocks answers until ``release`` is set."""

    fail: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    slow: bool = False
    release: threading.Event = field(default_factory=threading.Event)


class _Server(LocalServer):
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(handler)
        self.behaviour = Behaviour()

    def closing(self) -> None:
        self.behaviour.release.set()


class _Handler(JsonHandler):
    server: _Server


class SearchHandler(_Handler):
    """``GET /search?q=&format=json`` (SearXNG) and ``GET /res/v1/web/search?q=&count=``
    with ``X-Subscription-Token`` (Brave)."""

    def do_HEAD(self) -> None:
        self._send(200, b"")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.record({"path": url.path, "query": query,
                            "token": self.headers.get("X-Subscription-Token")})
        behaviour = self.server.behaviour
        if behaviour.slow:
            behaviour.release.wait(30)
        if behaviour.fail:
            status, headers, body = behaviour.fail.pop(0)
            return self._send(status, body, headers)
        if url.path == "/search":
            if query.get("format") != "json":
                return self._send(403, b"Forbidden", content_type="text/html")
            return self._send(200, (FIXTURES / "searxng.json").read_bytes())
        if url.path == BRAVE_PATH:
            if self.headers.get("X-Subscription-Token") != BRAVE_KEY:
                return self._send(401, brave_error(401, "SUBSCRIPTION_TOKEN_INVALID",
                                                   "The provided subscription token is "
                                                   "invalid."))
            return self._send(200, (FIXTURES / "brave.json").read_bytes())
        self._send(404, b"{}")


def brave_error(status: int, code: str, detail: str) -> bytes:
    """Brave Search's documented error body."""
    return json.dumps({"type": "ErrorResponse", "error": {
        "id": "2f1d4e3a-0000-4000-8000-000000000000", "status": status, "code": code,
        "detail": detail, "meta": {}}, "time": 1714000000}).encode()


class WebhookHandler(_Handler):
    """Accepts JSON POSTs on any path and records them (``behaviour.fail`` answers come
    first); paths under ``/slack`` answer ``ok`` as Slack does."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        behaviour = self.server.behaviour
        if behaviour.fail:
            status, headers, payload = behaviour.fail.pop(0)
            self.server.record({"path": self.path, "body": body, "status": status})
            return self._send(status, payload, headers)
        self.server.record({"path": self.path, "body": body, "status": 200,
                            "content_type": self.headers.get("Content-Type"),
                            "idempotency_key": self.headers.get("Idempotency-Key")})
        if self.path.startswith("/slack"):
            return self._send(200, b"ok", content_type="text/plain")
        self._send(200, b'{"received": true}')


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[_Server]:
    """A server with ``handler`` on a free port of 127.0.0.1, for the ``with`` body."""
    with local_servers.serving(handler, _Server) as server:
        assert isinstance(server, _Server)
        yield server
