"""message.send against aiosmtpd and a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.delivery_log import DeliveryLog
from planrun.adapters.message import MessageSend
from planrun.errors import AccessError, ConfigurationError, ResourceError, TransientError
from planrun.policy import LevelPolicy, Trust, trusted_as
from planrun.redact import Redactor, watch_logs
from tests.agent_servers import (
    SMTP_PASSWORD,
    SMTP_USER,
    WebhookHandler,
    serving,
    smtp_server,
)


@pytest.fixture
def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``configure(channels, **message)`` writes the operator's tools.yaml."""
    monkeypatch.setenv("PLANRUN_SECRET_SMTP_PASSWORD", SMTP_PASSWORD)

    def write(channels: dict[str, Any], **message: Any) -> None:
        file = tmp_path / "tools.yaml"
        file.write_text(json.dumps({"channels": channels, "message": message}))
        monkeypatch.setenv("PLANRUN_TOOLS", str(file))
    return write


def email_channel(port: int, security: str = "plain", **fields: Any) -> dict[str, Any]:
    return {"type": "email", "host": "127.0.0.1", "port": port, "security": security,
            "username": SMTP_USER, "password_secret": "SMTP_PASSWORD",
            "from": "planrun@example.org", **fields}


@pytest.fixture
def tool(tmp_path: Path) -> MessageSend:
    return MessageSend(log=DeliveryLog(tmp_path / "messages.sqlite3"))


@pytest.fixture
def ctx(make_ctx: Any) -> StepContext:
    return make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True,
                                                           hosts=["127.0.0.1"]))


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for 127.0.0.1 from a new CA, and the CA file."""
    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, str(ca_file)


@pytest.fixture
def webhook() -> Iterator[Any]:
    with serving(WebhookHandler) as running:
        yield running


def send(tool: MessageSend, ctx: StepContext, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(tool.run(params, ctx, 20))
    return result


def test_an_email_over_plain_smtp_with_a_login_is_delivered_and_confirmed(
        configure: Any, tool: MessageSend, ctx: StepContext) -> None:
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)})
        out = send(tool, ctx, channel="ops", to=["Ann@Example.org", "bob@example.org"],
                   subject="Brief ready", body="The market brief is in the workspace.")
    assert out["delivered"] is True and out["replayed"] is False
    assert out["accepted"] == ["Ann@example.org", "bob@example.org"] and out["refused"] == {}
    [envelope] = mailbox.messages
    assert envelope.rcpt_tos == ["Ann@example.org", "bob@example.org"]
    mail = message_from_bytes(envelope.content)
    assert mail["Subject"] == "Brief ready" and mail["From"] == "planrun@example.org"
    assert mail["Message-ID"] == out["message_id"]
    assert mail.get_payload().strip() == "The market brief is in the workspace."


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_an_email_over_tls_verifies_the_server_and_logs_in(
        security: str, configure: Any, tool: MessageSend, ctx: StepContext,
        tls: tuple[ssl.SSLContext, str]) -> None:
    server_context, ca_file = tls
    with smtp_server(security, server_context) as (mailbox, port):
        configure({"ops": email_channel(port, security, ca_file=ca_file)})
        out = send(tool, ctx, channel="ops", to=["ann@example.org"], subject="s", body="b")
        assert out["accepted"] == ["ann@example.org"] and len(mailbox.messages) == 1
        configure({"ops": email_channel(port, security)})  # the system CAs: not trusted
        with pytest.raises(ConfigurationError, match="certificate is not trusted"):
            send(tool, ctx, channel="ops", to=["ann@example.org"], subject="s", body="b2")
    assert len(mailbox.messages) == 1


def test_a_wrong_password_is_a_permission_error_without_the_password(
        configure: Any, tool: MessageSend, ctx: StepContext,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)})
        monkeypatch.setenv("PLANRUN_SECRET_SMTP_PASSWORD", "not-the-password-1")
        with pytest.raises(AccessError) as caught:
            send(tool, ctx, channel="ops", to=["ann@example.org"], body="b")
    assert "535" in caught.value.message and mailbox.messages == []
    assert "not-the-password-1" not in repr((caught.value.message, caught.value.hint))


def test_a_deferred_message_is_retried_and_delivered_exactly_once(
        configure: Any, tool: MessageSend, make_ctx: Any) -> None:
    policy = LevelPolicy(allow_private=True)
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)})
        mailbox.defer_data = 1
        with pytest.raises(TransientError, match="451"):
            send(tool, make_ctx(trust=Trust.LOCAL, policy=policy), channel="ops",
                 to=["ann@example.org"], body="once")
        second = send(tool, make_ctx(trust=Trust.LOCAL, policy=policy, attempt=2),
                      channel="ops", to=["ann@example.org"], body="once")
        third = send(tool, make_ctx(trust=Trust.LOCAL, policy=policy, attempt=3),
                     channel="ops", to=["ann@example.org"], body="once")
    assert mailbox.data_commands == 2 and len(mailbox.messages) == 1
    assert second["replayed"] is False and third["replayed"] is True
    assert third["message_id"] == second["message_id"]


def test_an_attempt_cut_short_after_the_server_accepted_is_not_sent_again(
        configure: Any, tool: MessageSend, make_ctx: Any) -> None:
    policy = LevelPolicy(allow_private=True)
    with smtp_server("plain") as (mailbox, port):
        # The client gives up waiting for the QUIT reply after 2 s (asyncio.run waits for
        # its thread before returning).
        configure({"ops": email_channel(port, timeout_s=2)})
        mailbox.quit_gate = threading.Event()  # the server accepts DATA, then hangs
        ctx = make_ctx(trust=Trust.LOCAL, policy=policy)
        with pytest.raises(TransientError, match="did not finish within its timeout"):
            asyncio.run(tool.run({"channel": "ops", "to": ["a@example.org"], "body": "b"},
                                 ctx, 1.0))
        mailbox.quit_gate.set()
        retry = send(tool, make_ctx(trust=Trust.LOCAL, policy=policy, attempt=2),
                     channel="ops", to=["a@example.org"], body="b")
    assert retry["replayed"] is True and retry["accepted"] == ["a@example.org"]
    assert mailbox.data_commands == 1 and len(mailbox.messages) == 1


def test_refused_recipients_are_reported_and_all_refused_is_configuration(
        configure: Any, tool: MessageSend, ctx: StepContext) -> None:
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)})
        out = send(tool, ctx, channel="ops", to=["ann@example.org", "refused-x@example.org"],
                   body="b")
        with pytest.raises(ConfigurationError, match="refused every recipient: 550"):
            send(tool, ctx, channel="ops", to=["refused-y@example.org"], body="b")
    assert out["accepted"] == ["ann@example.org"]
    assert out["refused"] == {"refused-x@example.org": "550 5.1.1 mailbox unavailable"}
    assert [m.rcpt_tos for m in mailbox.messages] == [["ann@example.org"]]


@pytest.mark.parametrize(("params", "problem"), [
    ({"to": ["not an address"]}, "is not an email address"),
    ({"to": []}, "at least one recipient"),
    ({"subject": "hi\r\nBcc: all@example.org"}, "one line"),
    ({"body": "x" * 2000}, "over the operator's limit of 1000"),
    ({"to": [f"p{i}@example.org" for i in range(4)]}, "4 recipients"),
    ({"channel": "pager"}, "no channel named 'pager' (configured: ops)"),
])
def test_what_cannot_be_sent_is_refused_before_connecting(
        params: dict[str, Any], problem: str, configure: Any, tool: MessageSend,
        ctx: StepContext) -> None:
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)}, max_body_bytes=1000, max_recipients=3)
        with pytest.raises(ConfigurationError, match=re.escape(problem)):
            send(tool, ctx, **{"channel": "ops", "to": ["a@example.org"], "body": "b",
                               **params})
    assert mailbox.messages == [] and mailbox.data_commands == 0


@pytest.mark.parametrize(("body", "why"), [
    ("the INTERNAL ONLY numbers", "block rule 1"),
    ("key AKIAIOSFODNN7EXAMPLE here", "an AWS access key id"),
    ("use password: hunter2hunter2", "a password or key assignment"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc", "a private key"),
    ("token ghp_" + "a" * 36, "a GitHub token"),
    (f"the relay password is {SMTP_PASSWORD}", "a secret value"),
    ("the run's value run-secret-value-42", "a secret value"),
])
def test_the_content_filter_refuses_blocked_text_and_credentials(
        body: str, why: str, configure: Any, tool: MessageSend, ctx: StepContext) -> None:
    watch_logs(Redactor(["run-secret-value-42"]))  # a run of this process has this secret
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)}, block=["internal only"])
        with pytest.raises(ConfigurationError, match="content filter") as caught:
            send(tool, ctx, channel="ops", to=["a@example.org"], body=body)
    assert why in caught.value.message and mailbox.data_commands == 0
    assert "hunter2" not in caught.value.message and SMTP_PASSWORD not in caught.value.message


def test_email_and_webhook_name_the_only_channel_of_that_type(
        configure: Any, tool: MessageSend, ctx: StepContext, webhook: Any) -> None:
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port),
                   "hook": {"type": "webhook", "url": webhook.url + "/a"},
                   "hook2": {"type": "webhook", "url": webhook.url + "/b"}})
        assert send(tool, ctx, channel="email", to=["a@example.org"], body="b")["delivered"]
        with pytest.raises(ConfigurationError, match="2 are of type webhook: name one"):
            send(tool, ctx, channel="webhook", body="b")
    assert len(mailbox.messages) == 1 and webhook.requests == []


def test_a_json_webhook_gets_the_message_and_its_idempotency_key(
        configure: Any, tool: MessageSend, ctx: StepContext, webhook: Any) -> None:
    configure({"hook": {"type": "webhook", "url": webhook.url + "/planrun"}})
    out = send(tool, ctx, channel="hook", to=["team"], subject="Done", body="All good.")
    again = send(tool, ctx, channel="hook", to=["team"], subject="Done", body="All good.")
    [received] = webhook.requests
    assert received["body"] == {"channel": "hook", "to": ["team"], "subject": "Done",
                                "body": "All good.", "idempotency_key": out["idempotency_key"]}
    assert received["idempotency_key"] == out["idempotency_key"]
    assert out["status"] == 200 and again["replayed"] is True


def test_a_slack_webhook_gets_slacks_text_payload(
        configure: Any, tool: MessageSend, ctx: StepContext, webhook: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_SECRET_SLACK_URL", webhook.url + "/slack/T000/B000/XXXX")
    configure({"alerts": {"type": "webhook", "url_secret": "SLACK_URL", "format": "slack"}})
    out = send(tool, ctx, channel="alerts", subject="Brief", body="ready")
    assert webhook.requests[0]["body"] == {"text": "*Brief*\nready"}
    assert out["status"] == 200 and "XXXX" not in json.dumps(out)


def test_webhook_failures_map_to_categories_and_a_5xx_is_retried_once_delivered(
        configure: Any, tool: MessageSend, make_ctx: Any, webhook: Any) -> None:
    configure({"hook": {"type": "webhook", "url": webhook.url + "/in"}})
    fail = webhook.behaviour.fail
    fail.extend([(503, {}, b"busy"), (429, {"Retry-After": "3"}, b"slow down"),
                 (403, {}, b"invalid_token"), (404, {}, b"no_service")])
    expected = [TransientError, ResourceError, AccessError, ConfigurationError]
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True))
    for category in expected:
        with pytest.raises(category) as caught:
            send(tool, ctx, channel="hook", body="b")
        if category is ResourceError:
            assert caught.value.retry_after == 3.0
    out = send(tool, ctx, channel="hook", body="b")
    assert out["status"] == 200
    assert [r["status"] for r in webhook.requests] == [503, 429, 403, 404, 200]


def test_a_submitted_plan_reaches_a_loopback_channel_only_if_the_operator_allows_it(
        configure: Any, tool: MessageSend, make_ctx: Any) -> None:
    ctx = make_ctx(trust=Trust.SUBMITTED, policy=LevelPolicy())
    with smtp_server("plain") as (mailbox, port):
        configure({"ops": email_channel(port)})
        with pytest.raises(ConfigurationError, match="blocked by policy"):
            send(tool, ctx, channel="ops", to=["a@example.org"], body="b")
        configure({"ops": email_channel(port, allow_private=True)})
        assert send(tool, ctx, channel="ops", to=["a@example.org"], body="b")["delivered"]
    assert len(mailbox.messages) == 1


def test_health_names_the_channels_and_the_channel_host_is_limited(
        configure: Any, tool: MessageSend) -> None:
    configure({})
    assert not asyncio.run(tool.health()).ok
    configure({"ops": email_channel(25), "hook": {"type": "webhook",
                                                  "url": "https://Hooks.Example.org/x"}})
    with trusted_as(Trust.LOCAL):
        health = asyncio.run(tool.health())
    assert health.ok and health.detail == "channels: hook (webhook), ops (email)"
    assert tool.call_host({"channel": "ops"}) == "127.0.0.1"
    assert tool.call_host({"channel": "hook"}) == "hooks.example.org"
    with trusted_as(Trust.SUBMITTED):  # 127.0.0.1 without the channel's allow_private
        health = asyncio.run(tool.health())
    assert health.ok and health.detail.startswith(
        "channels: hook (webhook); channel ops: blocked by policy: 127.0.0.1 is a loopback")
    configure({"ops": email_channel(25)})
    with trusted_as(Trust.SUBMITTED):
        health = asyncio.run(tool.health())
    assert not health.ok and health.detail.startswith("channel ops: blocked by policy")


def test_the_example_tools_configuration_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from planrun.adapters.tool_config import load_tools_config
    from tests.helpers import ROOT

    monkeypatch.setenv("PLANRUN_TOOLS", str(ROOT / "examples" / "tools.yaml"))
    for name in ("PLANRUN_SEARCH_PROVIDER", "PLANRUN_SEARCH_URL", "PLANRUN_SEARCH_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    config = load_tools_config()
    assert config.search is not None and config.search.endpoint() == \
        "https://api.search.brave.com/res/v1/web/search"
    assert sorted(config.channels) == ["audit", "chat", "team-email"]
