"""A plan that searches and tells people, run with ``planrun run`` against a SearXNG-API
server, aiosmtpd and a webhook receiver on 127.0.0.1 (a local plan may reach loopback:
docs/policy.md)."""

from __future__ import annotations

import json
import textwrap
import uuid
from email import message_from_bytes
from pathlib import Path

from tests.agent_servers import (
    SMTP_PASSWORD,
    SMTP_USER,
    SearchHandler,
    WebhookHandler,
    serving,
    smtp_server,
)
from tests.helpers import cli_json

PLAN = """
    version: 1
    name: agent-tools-e2e
    inputs:
      topic: {type: string}
    steps:
      - id: search
        tool: search.web
        with: {query: "{{ inputs.topic }}", max_results: 3}
      - id: mail
        tool: message.send
        needs: [search]
        retry: {max_attempts: 2, initial_delay: 100ms}
        with:
          channel: ops
          to: [team@example.org]
          subject: "Results for {{ inputs.topic }}"
          body: "{{ steps.search.output.results[0].title }} {{ steps.search.output.results[0].url }}"
      - id: notify
        tool: message.send
        needs: [search]
        with: {channel: alerts, body: "{{ steps.search.output.count }} results"}
"""


def test_a_plan_searches_then_mails_and_posts_once_each(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(PLAN))
    topic = f"prefect pricing {uuid.uuid4().hex[:8]}"  # a query no other run has cached
    with serving(SearchHandler) as search, serving(WebhookHandler) as hook, \
            smtp_server("plain") as (mailbox, port):
        mailbox.defer_data = 1  # the first attempt is deferred: 451
        tools = tmp_path / "tools.yaml"
        tools.write_text(json.dumps({
            "search": {"provider": "searxng", "url": search.url},
            "channels": {
                "ops": {"type": "email", "host": "127.0.0.1", "port": port,
                        "security": "plain", "username": SMTP_USER,
                        "password_secret": "SMTP_PASSWORD", "from": "planrun@example.org"},
                "alerts": {"type": "webhook", "url": hook.url + "/slack/T0/B0/X",
                           "format": "slack"}}}))
        code, report = cli_json("run", str(plan), "--input", f"topic={topic}", env={
            "PLANRUN_TOOLS": str(tools), "PLANRUN_SECRET_SMTP_PASSWORD": SMTP_PASSWORD,
            "PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    assert (code, report["status"]) == (0, "completed"), report
    steps = report["steps"]
    assert steps["search"]["output"]["count"] == 2 and len(search.requests) == 1
    assert steps["mail"]["attempts"] == 2
    assert steps["mail"]["output"]["accepted"] == ["team@example.org"]
    [envelope] = mailbox.messages
    mail = message_from_bytes(envelope.content)
    assert mail["Subject"] == f"Results for {topic}"
    assert mail.get_payload().strip() == "Pricing | Prefect https://www.prefect.io/pricing"
    assert [r["body"] for r in hook.requests] == [{"text": "2 results"}]
    assert steps["notify"]["output"]["status"] == 200
