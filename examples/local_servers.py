"""Stand-ins for the internet on 127.0.0.1, for the offline examples and for the tests: a
search server speaking SearXNG's JSON API, a static web site, a Slack-style webhook, and an
SMTP server that asks for a login. Each records what it received.

The SMTP server is aiosmtpd, which comes with the test extras (``scripts/install --test``).
The examples import this module by adding ``examples/`` to ``sys.path``; the tests import
it as ``examples.local_servers``.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["SMTP_PASSWORD", "SMTP_USER", "JsonHandler", "LocalServer", "Mailbox",
           "SearxngHandler", "SlackHandler", "free_port", "searxng_answer", "serving", "site",
           "smtp_server"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- HTTP --------------------------------------------------------------------------------------

class LocalServer(ThreadingHTTPServer):
    """An HTTP server on a free port of 127.0.0.1 that records its requests.

    ``results`` is what a ``SearxngHandler`` answers with (SearXNG's result objects)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)

    def results_for(self, query: str) -> list[dict[str, Any]]:
        """The results a ``SearxngHandler`` answers ``query`` with: ``results`` (set
        another function here for answers that depend on the query)."""
        return self.results

    def closing(self) -> None:
        """Called before the server stops: let blocked answers go (subclasses)."""


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet handler with one way to answer."""

    server: LocalServer
    # Buffered: the headers and the body leave in one segment when the answer is done.
    # Unbuffered (the default), the body waited for the client's delayed ACK of the
    # headers (Nagle): ≈ 200 ms an answer here.
    wbufsize = 1 << 16

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


def searxng_answer(query: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """SearXNG's answer to ``GET /search?q=...&format=json``: ``results`` (each with at
    least ``url``, ``title``, ``content`` and ``engine``) completed as SearXNG sends them."""
    return {"query": query, "number_of_results": 0, "answers": [], "corrections": [],
            "infoboxes": [], "suggestions": [], "unresponsive_engines": [],
            "results": [{"engines": [r["engine"]], "score": 1.0 / (i + 1),
                         "category": "general", "template": "default.html",
                         "publishedDate": None, "positions": [i + 1], **r}
                        for i, r in enumerate(results)]}


class SearxngHandler(JsonHandler):
    """SearXNG's JSON API: ``GET /search?q=&format=json`` answers the server's
    ``results_for(q)``; without ``format=json`` it answers 403, as an instance that has not
    enabled the format does. ``HEAD`` (the health check) answers 200."""

    def do_HEAD(self) -> None:
        self._send(200, b"")

    def do_GET(self) -> None:
        import json

        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.record({"path": url.path, "query": query})
        if url.path != "/search" or query.get("format") != "json":
            return self._send(403, b"Forbidden", content_type="text/html")
        asked = query.get("q", "")
        answer = searxng_answer(asked, self.server.results_for(asked))
        self._send(200, json.dumps(answer).encode())


class SlackHandler(JsonHandler):
    """A Slack-style incoming webhook: records each JSON ``POST`` body and answers ``ok``
    as Slack does."""

    def do_POST(self) -> None:
        import json

        length = int(self.headers.get("Content-Length") or 0)
        self.server.record({"path": self.path, "body": json.loads(self.rfile.read(length)),
                            "idempotency_key": self.headers.get("Idempotency-Key")})
        self._send(200, b"ok", content_type="text/plain")


class _SiteHandler(SimpleHTTPRequestHandler):
    server: LocalServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.record({"path": self.path,
                            "user_agent": self.headers.get("User-Agent", "")})
        super().do_GET()


@contextmanager
def serving(handler: Any, server_class: type[LocalServer] = LocalServer
            ) -> Iterator[LocalServer]:
    """A server answering with ``handler`` on a free port of 127.0.0.1, for the ``with``
    body; stopped after it."""
    server = server_class(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing()
        server.shutdown()
        server.server_close()
        thread.join(5)


def site(directory: Path) -> Any:
    """``serving`` the files of ``directory`` (``with site(folder) as web: web.url``)."""
    return serving(functools.partial(_SiteHandler, directory=str(directory)))


# -- SMTP (aiosmtpd) ---------------------------------------------------------------------------

SMTP_USER = "planrun"
SMTP_PASSWORD = "smtp-pass-Xy7-long"  # a local server's, known to everyone: not a secret


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


class _NotDeprecated(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # aiosmtpd's own authenticator path reads its deprecated Session.login_data and
        # logs a warning for each login; nothing the user can act on.
        return "login_data is deprecated" not in record.getMessage()


_NOT_DEPRECATED = _NotDeprecated()  # one instance: adding it again changes nothing


@contextmanager
def smtp_server(security: str = "plain", tls: Any = None) -> Iterator[tuple[Mailbox, int]]:
    """aiosmtpd on 127.0.0.1 checking the login ``SMTP_USER``/``SMTP_PASSWORD``:
    ``plain``, ``starttls`` (required) or ``ssl`` (implicit TLS), with ``tls`` the
    server's ssl.SSLContext. Yields the mailbox and the port."""
    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").addFilter(_NOT_DEPRECATED)
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
