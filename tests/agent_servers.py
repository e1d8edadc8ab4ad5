"""Real servers on 127.0.0.1 for the agent tools' tests: a search API speaking SearXNG's
and Brave's JSON (fixtures in tests/fixtures/search/, in the providers' documented
formats) and a webhook receiver. Each counts what it received."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[dict[str, Any]] = []
        self.behaviour = Behaviour()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


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
    server = _Server(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.behaviour.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- SMTP (aiosmtpd) -----------------------------------------------------------------------

SMTP_USER = "planrun"
SMTP_PASSWORD = "smtp-pass-Xy7-long"


class Mailbox:
    """An aiosmtpd handler: keeps what it accepts; ``defer_data`` answers that many DATA
    commands ``451`` first; addresses starting ``refused`` are refused (550)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.defer_data = 0
        self.data_commands = 0
        #: Set: QUIT is answered only once it is set (a server that hangs after DATA).
        self.quit_gate: threading.Event | None = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("refused"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        if self.quit_gate is not None:
            await asyncio.to_thread(self.quit_gate.wait, 30)
        return "221 Bye"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_commands += 1
        if self.defer_data:
            self.defer_data -= 1
            return "451 4.3.0 try again later"
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(auth_data, LoginPassword) and auth_data.login == SMTP_USER.encode() \
        and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def smtp_server(security: str = "plain", tls: Any = None) -> Iterator[tuple[Mailbox, int]]:
    """aiosmtpd on 127.0.0.1 requiring a login: ``plain``, ``starttls`` (required) or
    ``ssl`` (implicit TLS), with ``tls`` the server's ssl.SSLContext."""
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    port = free_port()
    # Over plain SMTP, AUTH is offered (and checked) but not required: aiosmtpd warns
    # about requiring it without TLS. Over implicit TLS, aiosmtpd does not count the
    # session as TLS (only STARTTLS), so it must not require TLS for AUTH either.
    starttls = security == "starttls"
    options: dict[str, Any] = {"authenticator": _authenticate, "auth_required": starttls,
                               "auth_require_tls": starttls}
    if security == "starttls":
        options.update(tls_context=tls, require_starttls=True)
    if security == "ssl":
        options["ssl_context"] = tls
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()
