"""The operator's configuration of the agent tools: which search provider ``search.web``
calls and which channels ``message.send`` may deliver to (docs/agent-tools.md).

A plan names a query or a channel; the endpoints, keys and passwords are the operator's,
read from ``$PLANRUN_TOOLS`` (which must then exist), else ``tools.yaml`` in planrun's
data directory, else nothing is configured (both tools then say so in their health).
``PLANRUN_SEARCH_PROVIDER``, ``PLANRUN_SEARCH_URL`` and ``PLANRUN_SEARCH_KEY_SECRET``
override the file's ``search:`` fields. Credentials are never written in the file: it
names a secret (``api_key_secret: BRAVE_KEY``), read from the environment variable
``PLANRUN_SECRET_BRAVE_KEY`` or the Prefect Secret block ``brave-key`` (docs/secrets.md).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from planrun.errors import ConfigurationError
from planrun.home import data_dir

TOOLS_ENV = "PLANRUN_TOOLS"
FILE_NAME = "tools.yaml"
DOC = "docs/agent-tools.md"
BRAVE_URL = "https://api.search.brave.com/res/v1/web/search"
_SECRET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def _http_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def _secret_name(value: str) -> str:
    if not _SECRET_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a secret name like BRAVE_KEY")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
SecretName = Annotated[str, AfterValidator(_secret_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Model):
    """What every operator-chosen endpoint has: a timeout, and whether it may be on a
    private or loopback address (an instance next to planrun) for plans whose policy
    denies those addresses; the policy's ``hosts`` still apply."""

    #: Seconds for one call to the endpoint (connect, send, answer).
    timeout_s: float = Field(10.0, gt=0, le=600)
    #: Let this endpoint (only) be on a loopback, link-local or private address.
    allow_private: bool = False


class SearchConfig(Endpoint):
    """``search:``: one provider for every ``search.web`` call of this machine."""

    provider: Literal["searxng", "brave"]
    #: SearXNG: the instance's base URL (``/search`` is added); Brave: the API endpoint.
    url: HttpUrl | None = None
    #: Brave: the secret holding the subscription token (X-Subscription-Token).
    api_key_secret: SecretName | None = None
    #: How long a result list is reused for the same query, provider and endpoint; 0: never.
    cache_ttl_s: float = Field(3600.0, ge=0, le=30 * 86400)
    #: SearXNG: the ``language`` and ``safesearch`` parameters; Brave: ``country``.
    language: str | None = None
    safesearch: Literal[0, 1, 2] | None = None
    country: str | None = None

    def endpoint(self) -> str:
        """The URL every search is sent to."""
        if self.provider == "brave":
            return self.url or BRAVE_URL
        if self.url is None:
            raise ValueError("searxng needs the instance's url")
        return self.url.rstrip("/") + "/search"


class EmailChannel(Endpoint):
    """An SMTP server messages are handed to."""

    type: Literal["email"]
    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    #: ``starttls`` (port 587), ``ssl`` (implicit TLS, port 465) or ``plain`` (port 25;
    #: only for a relay on a trusted network).
    security: Literal["starttls", "ssl", "plain"] = "starttls"
    username: str | None = None
    password_secret: SecretName | None = None
    sender: str = Field(alias="from", min_length=3)
    #: Verify the server's certificate against this CA file instead of the system's.
    ca_file: str | None = None

    def default_port(self) -> int:
        return self.port or {"starttls": 587, "ssl": 465, "plain": 25}[self.security]


class WebhookChannel(Endpoint):
    """A URL messages are POSTed to as JSON: planrun's own fields (``json``) or Slack's
    incoming-webhook payload ``{"text": ...}`` (``slack``)."""

    type: Literal["webhook"]
    #: The URL itself, or (for URLs that carry a token, like Slack's) ``url_secret``.
    url: HttpUrl | None = None
    url_secret: SecretName | None = None
    format: Literal["json", "slack"] = "json"


Channel = Annotated[EmailChannel | WebhookChannel, Field(discriminator="type")]


class MessageConfig(_Model):
    """``message:``: limits and the content filter of every channel."""

    #: Regular expressions (case-insensitive); a subject or body matching one is refused.
    block: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(256 * 1024, ge=1, le=25 * 1024 * 1024)
    max_recipients: int = Field(50, ge=1, le=1000)


class ToolsConfig(_Model):
    """The whole file."""

    search: SearchConfig | None = None
    channels: dict[str, Channel] = Field(default_factory=dict)
    message: MessageConfig = Field(default_factory=lambda: MessageConfig.model_validate({}))

    def channel(self, name: str) -> EmailChannel | WebhookChannel:
        """The channel ``name``; else, for ``email`` or ``webhook``, the one channel of
        that type; else a ConfigurationError naming the configured ones."""
        if name in self.channels:
            return self.channels[name]
        of_type = [c for c in self.channels.values() if c.type == name]
        if len(of_type) == 1:
            return of_type[0]
        known = ", ".join(sorted(self.channels)) or "none"
        several = f"; {len(of_type)} are of type {name}: name one" if of_type else ""
        raise ConfigurationError(
            f"message.send: no channel named '{name}' (configured: {known}){several}",
            hint=f"use a channel the operator configured, or ask them to add it ({DOC})")


def config_file() -> Path | None:
    """``$PLANRUN_TOOLS`` (which must exist), else ``tools.yaml`` in the data directory
    when there is one."""
    named = os.environ.get(TOOLS_ENV, "").strip()
    if named:
        return Path(named)
    default = data_dir() / FILE_NAME
    return default if default.exists() else None


def load_tools_config() -> ToolsConfig:
    """The operator's tool configuration (the environment's search overrides applied);
    a missing named file or a malformed one is a ConfigurationError listing the problems.
    Read again when the file changes."""
    where = config_file()
    raw: dict[str, Any] = {}
    if where is not None:
        try:
            stat = where.stat()
        except OSError as exc:
            raise _invalid(str(where), [f"cannot read it: {exc.strerror or exc}"]) from None
        raw = _read(str(where), stat.st_mtime_ns, stat.st_size)
    return _validated(_with_env(raw), str(where or "the environment"))


@lru_cache(maxsize=8)
def _read(file: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise _invalid(file, [str(exc)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _invalid(file, ["the file must be a mapping (search:, channels:, message:)"])
    return data


def _with_env(raw: dict[str, Any]) -> dict[str, Any]:
    overrides = {field: os.environ[env] for field, env in (
        ("provider", "PLANRUN_SEARCH_PROVIDER"), ("url", "PLANRUN_SEARCH_URL"),
        ("api_key_secret", "PLANRUN_SEARCH_KEY_SECRET")) if os.environ.get(env)}
    if not overrides:
        return raw
    return {**raw, "search": {**(raw.get("search") or {}), **overrides}}


def _validated(raw: dict[str, Any], where: str) -> ToolsConfig:
    try:
        config = ToolsConfig.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(where, [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                               for e in exc.errors()]) from None
    problems = [f"channels.{n}: a channel name is lower case, like ops-email"
                for n in config.channels if not _CHANNEL_NAME.fullmatch(n)]
    problems += [f"message.block: {p!r} is not a regular expression: {e}"
                 for p, e in _bad_patterns(config.message.block)]
    if config.search is not None:
        try:
            config.search.endpoint()
        except ValueError as exc:
            problems.append(f"search: {exc}")
    if problems:
        raise _invalid(where, problems)
    return config


def _bad_patterns(patterns: list[str]) -> list[tuple[str, str]]:
    bad = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            bad.append((pattern, str(exc)))
    return bad


def _invalid(where: str, problems: list[str]) -> ConfigurationError:
    return ConfigurationError(
        f"the tools configuration {where} is invalid: " + "; ".join(problems),
        hint=f"the operator must correct it ({DOC})")


async def operator_secret(name: str, what: str) -> str:
    """The value of the secret ``name`` (``PLANRUN_SECRET_NAME``, else the Prefect Secret
    block), or a ConfigurationError saying ``what`` needs it."""
    from planrun.secrets import _block_value, block_name, env_name

    value = os.environ.get(env_name(name))
    if value is None:
        value = await _block_value(block_name(name))
    if not value:
        raise ConfigurationError(
            f"{what} needs the secret {name}, which is not set",
            hint=f"set {env_name(name)} or create the Prefect Secret block "
                 f"'{block_name(name)}' for the process that runs plans ({DOC})")
    return str(value)
