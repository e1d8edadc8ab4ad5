#!/usr/bin/env python3
"""Run examples/agent-mode/plan.yaml offline: start on 127.0.0.1 what it talks to,
configure the tools for them, run the plan, say where to look.

- a search server speaking SearXNG's JSON API, whose top result is the page below;
- the web page, served from site/ (browser.open opens it in headless Chromium);
- an SMTP server (aiosmtpd, from the test extras: ``scripts/install --test``) that checks
  a login.

Usage: ``.venv/bin/python examples/agent-mode/run.py [planrun run options...]``, e.g.
``--json`` (the run report on stdout), ``--input question="ferry to the island"``,
``--workspace DIR``. The exit code is ``planrun run``'s. At the end it prints on stderr
what each server received, where the screenshot is, where the mail the SMTP server
received is saved (an .eml file in the workspace) and the run's page in the Prefect UI,
whose Artifacts tab shows the screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from email import message_from_bytes
from email.policy import default as email_policy
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/local_servers.py

from local_servers import (  # noqa: E402 - after the path it is found on
    SMTP_PASSWORD,
    SMTP_USER,
    LocalServer,
    Mailbox,
    SearxngHandler,
    serving,
    site,
    smtp_server,
)

PAGE = "ferry.html"
SECRET = "AGENT_MODE_SMTP_PASSWORD"  # the channel's password_secret


def search_results(page_url: str) -> list[dict[str, Any]]:
    """What the search server finds, best first: the local page, then pages on the
    internet that the plan does not open."""
    return [
        {"url": page_url, "title": "Harbour ferry: <b>today's sailings</b>",
         "content": "Sailings from the north quay, filled in every morning.",
         "engine": "duckduckgo"},
        {"url": "https://www.example.org/ferries/timetable", "title": "Ferry timetables",
         "content": "Timetables of the island ferries, by season.", "engine": "bing"},
        {"url": "https://www.example.org/harbour/weather", "title": "Harbour weather",
         "content": "Wind and swell at the harbour mouth.", "engine": "brave"},
    ]


def tools_config(search_url: str, smtp_port: int) -> dict[str, Any]:
    """The operator's tools.yaml for the local servers (docs/agent-tools.md)."""
    return {
        "search": {"provider": "searxng", "url": search_url, "cache_ttl_s": 0,
                   "allow_private": True},
        "channels": {"harbour-mail": {
            "type": "email", "host": "127.0.0.1", "port": smtp_port, "security": "plain",
            "username": SMTP_USER, "password_secret": SECRET, "allow_private": True,
            "from": "planrun@example.org"}}}


def workspace(args: list[str]) -> Path:
    """The workspace the run uses: ``--workspace``, else ``$PLANRUN_WORKSPACE``, else
    ./workspace (as ``planrun run`` decides)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workspace")
    known, _ = parser.parse_known_args(args)
    return Path(known.workspace or os.environ.get("PLANRUN_WORKSPACE") or "workspace").resolve()


def run_plan(args: list[str], env: dict[str, str]) -> tuple[int, dict[str, Any] | None, str]:
    """``planrun run plan.yaml --json ARGS``: its live progress on this terminal, its report."""
    extra = [a for a in args if a != "--json"]
    proc = subprocess.run([sys.executable, "-m", "planrun.cli", "run",
                           str(HERE / "plan.yaml"), "--json", *extra],
                          stdout=subprocess.PIPE, text=True, env=env)
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stdout
    except json.JSONDecodeError:  # usage errors: planrun said why on stderr
        return proc.returncode, None, proc.stdout


def save_mail(mailbox: Mailbox, folder: Path, run_id: str) -> list[Path]:
    """Each message the SMTP server accepted, as an .eml file in ``folder``."""
    saved = []
    for number, envelope in enumerate(mailbox.messages, 1):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}-{number}.eml"
        path.write_bytes(envelope.content)
        saved.append(path)
    return saved


def show(report: dict[str, Any] | None, search: LocalServer, web: LocalServer,
         smtp_port: int, mails: list[Path], ws: Path) -> None:
    def say(line: str) -> None:
        print(line, file=sys.stderr)

    say("")
    queries = [r["query"].get("q", "") for r in search.requests if r["path"] == "/search"]
    say(f"search server {search.url}: {len(queries)} search(es) {queries}")
    pages = [r["path"] for r in web.requests]
    say(f"web page {web.url}/{PAGE}: {len(pages)} request(s) {pages}")
    for path in mails:
        mail = message_from_bytes(path.read_bytes(), policy=email_policy)
        say(f"SMTP server 127.0.0.1:{smtp_port}: mail to {mail['To']}, "
            f"subject {str(mail['Subject'])!r}, saved as {path}")
    if not mails:
        say(f"SMTP server 127.0.0.1:{smtp_port}: no mail received")
    if report is None:
        return
    shot = (report["steps"].get("read_top", {}).get("output") or {}).get("screenshot")
    if shot:
        say(f"screenshot: {ws / shot}")
    if report.get("prefect_url"):
        say(f"the run in the Prefect UI: {report['prefect_url']} "
            "(its Artifacts tab shows the screenshot)")
    say(f"run {report['run_id']} {report['status']}")


def main(args: list[str]) -> int:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        print("this example needs aiosmtpd: scripts/install --test", file=sys.stderr)
        return 2
    ws = workspace(args)
    with site(HERE / "site") as web, serving(SearxngHandler) as search, \
            smtp_server("plain") as (mailbox, smtp_port), \
            tempfile.TemporaryDirectory(prefix="planrun-agent-mode-") as folder:
        search.results = search_results(f"{web.url}/{PAGE}")
        tools = Path(folder) / "tools.yaml"
        tools.write_text(json.dumps(tools_config(search.url, smtp_port), indent=2))
        env = {**os.environ, "PLANRUN_TOOLS": str(tools), "PLANRUN_WORKSPACE": str(ws),
               f"PLANRUN_SECRET_{SECRET}": SMTP_PASSWORD}
        code, report, stdout = run_plan(args, env)
    if "--json" in args:
        sys.stdout.write(stdout)
    mails = save_mail(mailbox, ws / "received-mail", report["run_id"] if report else "run")
    show(report, search, web, smtp_port, mails, ws)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
