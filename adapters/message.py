"""The ``message.send`` tool: a message to people through a channel the operator
configured (docs/agent-tools.md): email over SMTP (STARTTLS, implicit TLS or plain, with
authentication) or a webhook (planrun's JSON, or Slack's ``{"text": ...}``).

The plan names the channel, the recipients, a subject and a body; the server, the
account and the URL are the operator's (``adapters.tool_config``). Before anything is
sent: recipients are checked (email-validator), sizes held to the operator's limits, the
subject kept to one line (no header injection), and the content filter applied
(``adapters.content_filter``, category ``configuration``). Each message of a step has an
idempotency key (``adapters.delivery_log``): an attempt after a delivered one returns the
recorded confirmation (``replayed: true``) and sends nothing; webhooks also get it as the
``Idempotency-Key`` header. Errors: a connection failure, a timeout, an SMTP 4xx reply or
an HTTP 5xx is ``transient``; rejected credentials (SMTP 535, HTTP 401/403)
``permission``; HTTP 429 ``resource``; an SMTP 5xx reply or another HTTP 4xx
``configuration``. The SMTP side (the message, the guarded client, its errors) is
``adapters/smtp.py``.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import httpx
from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field

from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.content_filter import refusal
from planrun.adapters.delivery_log import DeliveryLog, idempotency_key
from planrun.adapters.http import parse_retry_after
from planrun.adapters.netguard import (
    check_url,
    guarded_transport,
    literal_problem,
    tls_context,
)
from planrun.adapters.smtp import bracketed, email_message, smtp_error, smtp_send
from planrun.adapters.tool_config import (
    DOC,
    EmailChannel,
    Endpoint,
    ToolsConfig,
    WebhookChannel,
    load_tools_config,
    operator_secret,
)
from planrun.errors import (
    AccessError,
    ConfigurationError,
    ResourceError,
    StepError,
    TransientError,
)
from planrun.policy import LevelPolicy, Trust, current_trust, load_policy
from planrun.redact import Redactor

Recipients = list[str]
#: Records a delivery's confirmation and returns it.
Confirm = Callable[[dict[str, Any]], dict[str, Any]]


def _one_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("the subject must be one line (no CR or LF)")
    return value


class MessageParams(Params):
    channel: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", max_length=63,
                         description="A channel the operator configured (tools.yaml); "
                                     "'email' or 'webhook' names the only one of that type.")
    to: Recipients = Field(default_factory=list, max_length=1000,
                           description="Recipients: email addresses for an email channel; "
                                       "passed on in a webhook's JSON.")
    subject: Annotated[str, AfterValidator(_one_line)] = Field(
        default="", max_length=255, description="One line.")
    body: str = Field(min_length=1, description="The message text.")


class MessageSend(Adapter[MessageParams]):
    """Delivers one message: ``{"channel", "type", "delivered", "idempotency_key",
    "replayed", ...}`` with ``accepted`` and ``refused`` recipients (email) or the
    webhook's ``status``. ``transport`` lets tests inject an httpx fake; ``log`` a
    delivery log file of their own."""

    name = "message.send"
    Params = MessageParams
    summary = "send a message (email over SMTP, a webhook)"
    default_estimate_s = 1.0
    default_timeout_s = 120.0

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None,
                 log: DeliveryLog | None = None) -> None:
        self._transport = transport
        self._log = log

    def call_host(self, params: Mapping[str, Any]) -> str | None:
        """The channel's SMTP server or webhook host: ``limits.hosts`` limits it."""
        try:
            channel = load_tools_config().channel(str(params.get("channel")))
        except ConfigurationError:
            return None
        if isinstance(channel, EmailChannel):
            return channel.host
        if isinstance(channel, WebhookChannel) and channel.url:
            return httpx.URL(channel.url).host
        return None

    async def execute(self, params: MessageParams, ctx: StepContext) -> dict[str, Any]:
        config = load_tools_config()
        channel = config.channel(params.channel)
        to = _recipients(params, channel, config)
        secrets = await _channel_secrets(channel)
        _check_content(params, config, list(secrets.values()))
        log = self._log or DeliveryLog()
        key = idempotency_key(ctx.run_id, ctx.step_id, params.channel, to, params.subject,
                              params.body)
        recorded = log.delivered(key)
        if recorded is not None:
            ctx.logger.info("message.send: already delivered by an earlier attempt (%s)",
                            key[:12])
            return {**recorded, "replayed": True}
        scrub = Redactor(list(secrets.values()))
        policy = _endpoint_policy(channel, ctx.policy)
        base = {"channel": params.channel, "type": channel.type, "delivered": True,
                "idempotency_key": key}

        def confirm(result: dict[str, Any]) -> dict[str, Any]:
            # Recorded the moment the server said yes: a timeout or a cancel that strikes
            # later (while the SMTP session says QUIT) cannot make a retry send it again.
            confirmation = {**base, **result}
            log.record(key, confirmation)
            return confirmation

        try:
            if isinstance(channel, EmailChannel):
                confirmation = await self._email(channel, policy, ctx.trust, params, to, key,
                                                 secrets.get("password"), confirm)
            else:
                confirmation = confirm(await self._webhook(
                    channel, policy, ctx.trust, params, to, key,
                    secrets.get("url") or channel.url or ""))
        except StepError as exc:
            raise scrub.scrub_error(exc) from exc.__cause__
        except Exception as exc:  # noqa: BLE001 - the edge: translated, secrets scrubbed
            raise scrub.scrub_error(self.classify(exc)) from exc
        return {**confirmation, "replayed": False}

    # -- email ---------------------------------------------------------------------------

    async def _email(self, channel: EmailChannel, policy: LevelPolicy, trust: Trust,
                     params: MessageParams, to: list[str], key: str, password: str | None,
                     confirm: Confirm) -> dict[str, Any]:
        port = channel.default_port()
        addresses = await check_url(f"smtp://{bracketed(channel.host)}:{port}", policy, trust)
        message = email_message(channel, params.subject, params.body, to, key)

        def sent(refused: dict[str, tuple[int, bytes]]) -> dict[str, Any]:
            return confirm({
                "server": f"{channel.host}:{port}", "message_id": message["Message-ID"],
                "accepted": [a for a in to if a not in refused],
                "refused": {a: f"{code} {text.decode(errors='replace')}"
                            for a, (code, text) in refused.items()}})

        return await asyncio.to_thread(smtp_send, channel, port, addresses, password,
                                       message, to, sent)

    # -- webhooks ------------------------------------------------------------------------

    async def _webhook(self, channel: WebhookChannel, policy: LevelPolicy, trust: Trust,
                       params: MessageParams, to: list[str], key: str,
                       url: str) -> dict[str, Any]:
        payload: dict[str, Any] = (
            {"text": f"*{params.subject}*\n{params.body}" if params.subject else params.body}
            if channel.format == "slack" else
            {"channel": params.channel, "to": to, "subject": params.subject,
             "body": params.body, "idempotency_key": key})
        transport = self._transport or guarded_transport(policy, trust)
        async with httpx.AsyncClient(transport=transport, verify=tls_context(),
                                     timeout=channel.timeout_s,
                                     follow_redirects=False) as client:
            response = await client.post(url, json=payload, headers={"Idempotency-Key": key})
        if not 200 <= response.status_code < 300:
            raise _webhook_error(response)
        return {"status": response.status_code}

    def classify(self, exc: Exception) -> StepError:
        if isinstance(exc, StepError):
            return exc
        replied = smtp_error(exc)
        if replied is not None:
            return replied
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ConfigurationError(f"message.send: the server's certificate is not "
                                      f"trusted: {exc.verify_message}",
                                      hint=f"check the channel's host, or its ca_file ({DOC})")
        if isinstance(exc, httpx.TimeoutException | TimeoutError | socket.timeout):
            return TransientError(f"message.send: the server did not answer in time "
                                  f"({type(exc).__name__})",
                                  hint="the server is slow or unreachable; it was retried")
        if isinstance(exc, httpx.TransportError | smtplib.SMTPException | OSError):
            return TransientError(f"message.send: cannot reach the server: "
                                  f"{type(exc).__name__}: {exc}",
                                  hint="check that the channel's server is up; it was retried")
        return super().classify(exc)

    async def health(self) -> Health:
        """Healthy when the configuration reads and names a channel whose server the
        policy of this trust level does not refuse by its address or name; the refused
        ones are named (whether a server answers is the breaker's business: a check must
        not send mail)."""
        try:
            config = load_tools_config()
        except ConfigurationError as exc:
            return Health(ok=False, detail=exc.message)
        if not config.channels:
            return Health(ok=False, detail=f"no channel is configured (tools.yaml channels:, "
                                           f"{DOC})")
        trust = current_trust()
        level = load_policy().level(trust)
        refused = {name: problem for name, channel in sorted(config.channels.items())
                   if (problem := _channel_problem(channel, _endpoint_policy(channel, level),
                                                   trust))}
        words = "; ".join(f"channel {name}: {problem}" for name, problem in refused.items())
        if len(refused) == len(config.channels):  # one refused channel spoils no other
            return Health(ok=False, detail=words)
        names = ", ".join(f"{n} ({c.type})" for n, c in sorted(config.channels.items())
                          if n not in refused)
        return Health(ok=True, detail=f"channels: {names}" + (f"; {words}" if words else ""))


# -- checks before sending ---------------------------------------------------------------

def _recipients(params: MessageParams, channel: EmailChannel | WebhookChannel,
                config: ToolsConfig) -> list[str]:
    if len(params.to) > config.message.max_recipients:
        raise ConfigurationError(
            f"message.send: {len(params.to)} recipients, over the operator's limit of "
            f"{config.message.max_recipients}", hint="send to fewer people at once")
    size = len(params.body.encode())
    if size > config.message.max_body_bytes:
        raise ConfigurationError(
            f"message.send: the body is {size} bytes, over the operator's limit of "
            f"{config.message.max_body_bytes}", hint="send a shorter message or a link")
    if isinstance(channel, WebhookChannel):
        return list(params.to)
    if not params.to:
        raise ConfigurationError("message.send: an email needs at least one recipient in 'to'",
                                 hint="list the addresses in the step's 'to:'")
    return [_address(a) for a in params.to]


def _address(text: str) -> str:
    try:
        return str(validate_email(text, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise ConfigurationError(f"message.send: {text!r} is not an email address: {exc}",
                                 hint="write each recipient as name@example.org") from None


def _check_content(params: MessageParams, config: ToolsConfig, own: list[str]) -> None:
    problem = refusal([params.subject, params.body, *params.to], config.message.block, own)
    if problem is not None:
        raise problem


async def _channel_secrets(channel: EmailChannel | WebhookChannel) -> dict[str, str]:
    found = {}
    if isinstance(channel, EmailChannel) and channel.password_secret:
        found["password"] = await operator_secret(channel.password_secret, "message.send")
    if isinstance(channel, WebhookChannel):
        if channel.url_secret:
            found["url"] = await operator_secret(channel.url_secret, "message.send")
        elif not channel.url:
            raise ConfigurationError("message.send: the webhook channel has no url",
                                     hint=f"the operator sets url or url_secret ({DOC})")
    return found


def _channel_problem(channel: EmailChannel | WebhookChannel, policy: LevelPolicy,
                     trust: Trust) -> str | None:
    """What the policy says of the channel's server from its address or name alone."""
    if isinstance(channel, EmailChannel):
        url = f"http://{bracketed(channel.host)}:{channel.default_port()}"
    elif channel.url:
        url = channel.url
    else:
        return None  # a URL from a secret: checked where the step runs
    return literal_problem(url, policy, trust)


def _endpoint_policy(channel: Endpoint, policy: LevelPolicy) -> LevelPolicy:
    if channel.allow_private and not policy.allow_private:
        return policy.model_copy(update={"allow_private": True})
    return policy


# -- webhooks ------------------------------------------------------------------------------

def _webhook_error(response: httpx.Response) -> StepError:
    status = response.status_code
    said = f"message.send: the webhook answered {status} {response.reason_phrase}: " \
           f"{response.text[:200]}"
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return ResourceError(said, retry_after=retry_after,
                             hint="the receiver is rate limiting; the retry waits as asked")
    if status == 408 or status >= 500:
        return TransientError(said, hint="the receiver failed; it was retried")
    if status in (401, 403):
        return AccessError(said, hint=f"the operator must check the webhook's URL or token "
                                      f"({DOC})")
    if 300 <= status < 400:
        return ConfigurationError(said, hint="the webhook URL redirects; configure the final "
                                             "URL")
    return ConfigurationError(said, hint="the receiver refused the message: check the "
                                         "channel's URL and format")
