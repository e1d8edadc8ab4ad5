"""Email over SMTP for ``message.send``: the message, a client that connects only to an
address the network guard checked (TLS and the greeting keep the host name), the login,
and the SMTP server's refusals as planrun's errors (a 4xx reply ``transient``, a 5xx
``configuration``, rejected credentials ``permission``).
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from planrun.adapters.netguard import Address
from planrun.adapters.tool_config import DOC, EmailChannel
from planrun.errors import AccessError, ConfigurationError, StepError, TransientError


def email_message(channel: EmailChannel, subject: str, body: str, to: list[str],
                  key: str) -> EmailMessage:
    """The email of one message; its Message-ID comes from the idempotency ``key``."""
    message = EmailMessage()
    message["From"] = channel.sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = channel.sender.rpartition("@")[2] or "planrun"
    message["Message-ID"] = f"<planrun.{key[:32]}@{domain}>"  # the same on every attempt
    message.set_content(body)
    return message


class _GuardedSMTP(smtplib.SMTP):
    """smtplib's client connecting to an address the network guard checked, while TLS
    and the greeting keep the host name."""

    address = ""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((self.address, port), timeout, self.source_address)


class _GuardedSMTPSSL(smtplib.SMTP_SSL):
    address = ""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.address, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]


def smtp_send(channel: EmailChannel, port: int, addresses: list[Address],
              password: str | None, message: EmailMessage, to: list[str],
              sent: Callable[[dict[str, tuple[int, bytes]]], dict[str, Any]],
              ) -> dict[str, Any]:
    """Hand ``message`` to the server (the first checked address that connects) and pass
    the recipients it refused to ``sent`` before saying QUIT (all refused raises
    SMTPRecipientsRefused); what ``sent`` returns."""
    context = ssl.create_default_context(cafile=channel.ca_file)
    error: OSError | None = None
    for address in addresses:
        client: smtplib.SMTP = (
            _GuardedSMTPSSL(local_hostname=socket.gethostname(), timeout=channel.timeout_s,
                            context=context) if channel.security == "ssl" else
            _GuardedSMTP(local_hostname=socket.gethostname(), timeout=channel.timeout_s))
        client.address = str(address)  # type: ignore[attr-defined]
        client._host = channel.host  # type: ignore[attr-defined]  # TLS checks the name
        try:
            client.connect(channel.host, port)
        except (ConnectionRefusedError, TimeoutError) as exc:
            error = exc
            continue
        with client:
            if channel.security == "starttls":
                client.starttls(context=context)
            if channel.username:
                _login(client, channel.username, password or "")
            return sent(client.send_message(message, to_addrs=to))
    assert error is not None
    raise error


def _login(client: smtplib.SMTP, username: str, password: str) -> None:
    """Log in with PLAIN when offered (one try: smtplib's ``login`` goes on to the next
    mechanism after a refusal), else as smtplib chooses."""
    client.ehlo_or_helo_if_needed()
    if "PLAIN" not in client.esmtp_features.get("auth", "").upper().split():
        client.login(username, password)
        return
    client.user, client.password = username, password
    code, reply = client.auth("PLAIN", client.auth_plain)
    if code not in (235, 503):
        raise smtplib.SMTPAuthenticationError(code, reply)


def bracketed(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _first_reply(recipients: dict[str, tuple[int, bytes]]) -> tuple[int, bytes]:
    return next(iter(recipients.values()), (550, b"refused"))


def _smtp_reply_error(what: str, code: int, text: bytes | str) -> StepError:
    said = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    message = f"message.send: the SMTP server {what}: {code} {said}"
    if 400 <= code < 500:
        return TransientError(message, hint="the server deferred the message; it was retried")
    return ConfigurationError(message, hint="the server rejected the message or a recipient: "
                                            "check the addresses and the content")


def smtp_error(exc: Exception) -> StepError | None:
    """smtplib's error as planrun's, most specific first; None for one not of SMTP."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return AccessError(f"message.send: the SMTP server refused the login "
                           f"({exc.smtp_code})",
                           hint=f"the operator must check the channel's username and "
                                f"password secret ({DOC})")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _smtp_reply_error("refused every recipient", *_first_reply(exc.recipients))
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return ConfigurationError(f"message.send: the SMTP server does not support "
                                  f"what the channel asks: {exc}",
                                  hint=f"check the channel's security and login ({DOC})")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _smtp_reply_error("answered", exc.smtp_code, exc.smtp_error)
    return None
