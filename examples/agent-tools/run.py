#!/usr/bin/env python3
"""Run examples/agent-tools/plan.yaml offline: start the servers it talks to on
127.0.0.1, configure the tools for them, run the plan, show what the servers received.

- a search server speaking SearXNG's JSON API (``GET /search?q=...&format=json``), with
  results in SearXNG's format (one of them with markup and a ``javascript:`` URL, which
  search.web cleans and drops);
- an SMTP server (aiosmtpd, from the test extras: ``scripts/install --test``) that
  checks a login;
- a webhook receiver taking Slack's ``{"text": ...}`` payload.

The servers are examples/local_servers.py's. Usage: ``.venv/bin/python
examples/agent-tools/run.py [planrun run options...]``, e.g. ``--json``, ``--input
topic="prefect flows"``. The exit code is ``planrun run``'s. What the servers received is
printed on stderr at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/local_servers.py

from local_servers import (  # noqa: E402 - after the path it is found on
    SMTP_PASSWORD,
    SMTP_USER,
    SearxngHandler,
    SlackHandler,
    serving,
    smtp_server,
)


def search_results(query: str) -> list[dict[str, Any]]:
    """What the search server finds, in SearXNG's format, with what search.web cleans up:
    markup, a duplicate URL spelled differently, a ``javascript:`` URL."""
    words = query.replace(" ", "+")
    return [
        {"url": "https://www.prefect.io/pricing", "title": "Pricing | <b>Prefect</b>",
         "content": "Plans for every team.<script>alert(1)</script>", "engine": "duckduckgo"},
        {"url": "https://docs.prefect.io/v3/get-started", "title": "Get started",
         "content": "Install Prefect and run your <em>first flow</em>.", "engine": "bing",
         "publishedDate": "2024-05-01T00:00:00"},
        {"url": "https://WWW.prefect.io/pricing/", "title": "Prefect pricing", "content": "",
         "engine": "brave"},
        {"url": "javascript:alert(document.cookie)", "title": "a trap", "content": "dropped",
         "engine": "evil"},
        {"url": f"https://example.org/search?q={words}", "title": f"More on {query}",
         "content": "A page about &quot;" + query + "&quot;.", "engine": "google"},
    ]


def main(args: list[str]) -> int:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        print("this example needs aiosmtpd: scripts/install --test", file=sys.stderr)
        return 2
    with serving(SearxngHandler) as search, serving(SlackHandler) as chat, \
            smtp_server("plain") as (mailbox, smtp_port), \
            tempfile.TemporaryDirectory(prefix="planrun-agent-tools-") as folder:
        search.results_for = search_results  # type: ignore[method-assign]
        tools = Path(folder) / "tools.yaml"
        tools.write_text(json.dumps({
            "search": {"provider": "searxng", "url": search.url, "cache_ttl_s": 0},
            "channels": {
                "team-email": {"type": "email", "host": "127.0.0.1", "port": smtp_port,
                               "security": "plain", "username": SMTP_USER,
                               "password_secret": "EXAMPLE_SMTP_PASSWORD",
                               "from": "planrun@example.org"},
                "chat": {"type": "webhook", "url": f"{chat.url}/slack/T0/B0/example",
                         "format": "slack"}}}))
        env = {**os.environ, "PLANRUN_TOOLS": str(tools),
               "PLANRUN_SECRET_EXAMPLE_SMTP_PASSWORD": SMTP_PASSWORD}
        code = subprocess.call([sys.executable, "-m", "planrun.cli", "run",
                                str(HERE / "plan.yaml"), *args], env=env)
    for envelope in mailbox.messages:
        print(f"mail to {', '.join(envelope.rcpt_tos)}: {len(envelope.content)} bytes",
              file=sys.stderr)
    for request in chat.requests:
        print(f"chat: {request['body']['text']}", file=sys.stderr)
    print(f"searches: {len(search.requests)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
