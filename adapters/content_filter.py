"""What ``message.send`` refuses to send (docs/agent-tools.md): text matching the
operator's block list, a secret of a run of this process, the tool's own credentials, and
strings that look like credentials (private keys, cloud and service tokens, passwords
written as ``password=...``). A refusal is a ConfigurationError naming the rule, never
the matched text."""

from __future__ import annotations

import re
from collections.abc import Iterable

from planrun.errors import ConfigurationError
from planrun.redact import holds_watched_secret

#: Credential-like strings, by what they are.
CREDENTIALS: dict[str, re.Pattern[str]] = {name: re.compile(pattern) for name, pattern in {
    "a private key": r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----",
    "an AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "a GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    "a Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "an API secret key (sk-...)": r"\bsk-(?:[A-Za-z]+-)?[A-Za-z0-9_-]{20,}",
    "a Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    "a JSON Web Token": r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    "a bearer token": r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{20,}",
    "a password or key assignment":
        r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)"
        r"\s*[:=]\s*['\"]?[^\s'\"]{6,}",
    "a URL with a password": r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",
}.items()}

HINT = ("the message was not sent: take the secret or the blocked text out of the message "
        "(a person can be sent where to find a secret, never the secret)")


def refusal(texts: Iterable[str], block: Iterable[str],
            own_secrets: Iterable[str] = ()) -> ConfigurationError | None:
    """The error for the first rule ``texts`` break, or None when they may be sent."""
    joined = "\n".join(texts)
    for index, pattern in enumerate(block, 1):
        if re.search(pattern, joined, re.IGNORECASE):
            return _refused(f"it matches the operator's block rule {index} (message.block)")
    if holds_watched_secret(joined) or any(s and s in joined for s in own_secrets):
        return _refused("it contains a secret value")
    for what, credential in CREDENTIALS.items():
        if credential.search(joined):
            return _refused(f"it contains what looks like {what}")
    return None


def _refused(why: str) -> ConfigurationError:
    return ConfigurationError(f"message.send: refused by the content filter: {why}",
                              hint=HINT)
