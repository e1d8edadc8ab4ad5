#!/usr/bin/env python3
"""Run examples/agent-tools/plan.yaml offline: start the servers it talks to on
127.0.0.1, configure the tools for them, run the plan, show what the servers received.

- a search server speaking SearXNG's JSON API (``GET /search?q=...&format=json``), with
  results in SearXNG's format (one of them with markup and a ``javascript:`` URL, which
  search.web cleans and drops);
- an SMTP server (aiosmtpd, from the test extras: ``scripts/install --test``) that
  requires a login;
- a webhook receiver taking Slack's ``{"text": ...}`` payload.

Usage: ``.venv/bin/python examples/agent-tools/run.py [planrun run options...]``, e.g.
``--json``, ``--input topic="prefect flows"``. The exit code is ``planrun run``'s. What the
servers received is printed on stderr at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
SMTP_USER, SMTP_PASSWORD = "planrun", "example-smtp-password"
received: dict[str, list[Any]] = {"search": [], "mail": [], "chat": []}


def searxng_results(query: str) -> dict[str, Any]:
    """An answer in SearXNG's JSON format."""
    words = query.replace(" ", "+")
    return {"query": query, "number_of_results": 0, "answers": [], "corrections": [],
            "infoboxes": [], "suggestions": [], "unresponsive_engines": [], "results": [
                {"url": "https://www.prefect.io/pricing", "title": "Pricing | <b>Prefect</b>",
                 "content": "Plans for every team.<script>alert(1)</script>",
                 "engine": "duckduckgo", "engines": ["duckduckgo"], "score": 3.0,
                 "category": "general", "publishedDate": None},
                {"url": "https://docs.prefect.io/v3/get-started", "title": "Get started",
                 "content": "Install Prefect and run your <em>first flow</em>.",
                 "engine": "bing", "engines": ["bing"], "score": 2.0, "category": "general",
                 "publishedDate": "2024-05-01T00:00:00"},
                {"url": "https://WWW.prefect.io/pricing/", "title": "Prefect pricing",
                 "content": "", "engine": "brave", "engines": ["brave"], "score": 1.0,
                 "category": "general"},
                {"url": "javascript:alert(document.cookie)", "title": "a trap",
                 "content": "dropped", "engine": "evil", "engines": ["evil"], "score": 0.1,
                 "category": "general"},
                {"url": f"https://example.org/search?q={words}", "title": f"More on {query}",
                 "content": "A page about &quot;" + query + "&quot;.", "engine": "google",
                 "engines": ["google"], "score": 0.5, "category": "general"}]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._send(200, b"")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/search" or query.get("format") != "json":
            return self._send(403, b"Forbidden", "text/html")
        received["search"].append(query["q"])
        self._send(200, json.dumps(searxng_results(query["q"])).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        received["chat"].append(json.loads(body))
        self._send(200, b"ok", "text/plain")


class Mailbox:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        received["mail"].append(envelope)
        return "250 Message accepted for delivery"


def login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(data, LoginPassword) and data.login == SMTP_USER.encode() \
        and data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(args: list[str]) -> int:
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        print("this example needs aiosmtpd: scripts/install --test", file=sys.stderr)
        return 2
    web = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    smtp_port = free_port()
    warnings.filterwarnings("ignore", "Session.login_data is deprecated")  # aiosmtpd's own
    # A local relay over plain SMTP: AUTH offered and checked, not required (aiosmtpd
    # warns about requiring it without TLS).
    smtp = Controller(Mailbox(), hostname="127.0.0.1", port=smtp_port,
                      authenticator=login, auth_require_tls=False)
    smtp.start()
    try:
        with tempfile.TemporaryDirectory(prefix="planrun-agent-tools-") as folder:
            tools = Path(folder) / "tools.yaml"
            tools.write_text(json.dumps({
                "search": {"provider": "searxng", "url": base, "cache_ttl_s": 0},
                "channels": {
                    "team-email": {"type": "email", "host": "127.0.0.1", "port": smtp_port,
                                   "security": "plain", "username": SMTP_USER,
                                   "password_secret": "EXAMPLE_SMTP_PASSWORD",
                                   "from": "planrun@example.org"},
                    "chat": {"type": "webhook", "url": f"{base}/slack/T0/B0/example",
                             "format": "slack"}}}))
            env = {**os.environ, "PLANRUN_TOOLS": str(tools),
                   "PLANRUN_SECRET_EXAMPLE_SMTP_PASSWORD": SMTP_PASSWORD}
            code = subprocess.call([sys.executable, "-m", "planrun.cli", "run",
                                    str(HERE / "plan.yaml"), *args], env=env)
    finally:
        smtp.stop()
        web.shutdown()
    for envelope in received["mail"]:
        print(f"mail to {', '.join(envelope.rcpt_tos)}: {len(envelope.content)} bytes",
              file=sys.stderr)
    for payload in received["chat"]:
        print(f"chat: {payload['text']}", file=sys.stderr)
    print(f"searches: {len(received['search'])}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
