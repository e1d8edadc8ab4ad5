"""The ``http.request`` tool: one HTTP request through httpx, the answer mapped to categories.

Status codes map to the error categories of docs/errors.md: 2xx and 3xx succeed; 408 and
5xx are ``transient``; 429 is ``resource`` (with the server's Retry-After); 401 and 403 are
``permission``; any other 4xx is ``configuration``. Credentials (Authorization, Cookie, a
URL's password, token-like query parameters) never appear in an error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal

import httpx
from pydantic import AfterValidator, Field, model_validator

from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.netguard import guarded_transport, tls_context
from planrun.errors import (
    AccessError,
    ConfigurationError,
    ResourceError,
    StepError,
    TransientError,
)
from planrun.policy import current_trust, load_policy
from planrun.redact import Redactor, redact_headers, redact_url, request_credentials

__all__ = ["HttpRequest", "parse_retry_after", "redact_url"]

MIB = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^\s/?#]+"
SNIPPET_CHARS = 500

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
QueryValue = str | int | float | bool | list[str | int | float | bool]


def _check_url(value: str) -> str:
    if "{{" in value or "{%" in value:
        return value  # checked once the template is rendered
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if not url.host or any(c.isspace() for c in value):
        raise ValueError("the URL needs a host name and no spaces, like https://example.org/x")
    return value


HttpUrlText = Annotated[str, AfterValidator(_check_url),
                        Field(json_schema_extra={"pattern": URL_PATTERN, "format": "uri"})]


class HttpParams(Params):
    method: Method = Field(default="GET", description="The HTTP method.")
    url: HttpUrlText = Field(description="An http:// or https:// URL.")
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers.")
    params: dict[str, QueryValue] = Field(
        default_factory=dict, description="Query parameters added to the URL.")
    json_body: Any = Field(default=None, alias="json",
                           description="A JSON request body (sets Content-Type).")
    body: str | None = Field(default=None, description="A text request body.")
    max_bytes: int = Field(
        default=MIB, ge=0, le=64 * MIB,
        description="Keep at most this many bytes of the response body (truncated: true).")
    follow_redirects: bool = Field(default=True, description="Follow 3xx redirects.")

    @model_validator(mode="after")
    def _one_body(self) -> HttpParams:
        if "json_body" in self.model_fields_set and self.body is not None:
            raise ValueError("give either 'json' or 'body', not both")
        return self


class HttpRequest(Adapter[HttpParams]):
    """Sends one request: ``{"status", "url", "headers", "json", "text", "truncated"}``.

    ``json`` is the parsed body when the server says it is JSON (and it parses, whole);
    otherwise the body is in ``text``. Every connection (redirects too) goes through the
    network guard of the step's policy (``adapters.netguard``); ``transport`` lets tests
    inject an httpx fake instead. The policy's ``output_bytes`` ceiling caps ``max_bytes``.
    """

    name = "http.request"
    Params = HttpParams
    summary = "send an HTTP request"
    default_timeout_s = 120.0  # a server that never answers must not hold the run forever

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    async def execute(self, params: HttpParams, ctx: StepContext) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if "json_body" in params.model_fields_set:
            body["json"] = params.json_body
        elif params.body is not None:
            body["content"] = params.body.encode("utf-8")
        transport = self._transport or guarded_transport(ctx.policy, ctx.trust)
        cap = min(params.max_bytes, ctx.policy.ceilings.output_bytes or params.max_bytes)
        try:
            async with httpx.AsyncClient(
                transport=transport, verify=tls_context(),
                follow_redirects=params.follow_redirects,
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            ) as client, client.stream(
                params.method, params.url, headers=params.headers,
                params=params.params or None, **body,
            ) as response:
                content, truncated = await _read_capped(response, cap)
        except Exception as exc:  # noqa: BLE001 - translated here so secrets can be scrubbed
            raise _scrubbed(self.classify(exc), _secrets(params)) from exc
        if response.status_code >= 400:
            raise _scrubbed(_status_error(params, response, content), _secrets(params))
        return _output(response, content, truncated)

    def classify(self, exc: Exception) -> StepError:
        if isinstance(exc, StepError):  # the network guard's refusal
            return exc
        where = _where(exc)
        if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
            return ConfigurationError(f"http.request: invalid URL{where}: {exc}",
                                      hint="use an http:// or https:// URL with a host name")
        if isinstance(exc, httpx.TooManyRedirects):
            return ConfigurationError(
                f"http.request: too many redirects{where}",
                hint="the URL redirects in a loop; check it, or set follow_redirects: false")
        if isinstance(exc, httpx.LocalProtocolError):
            return ConfigurationError(f"http.request: the request is malformed{where}: {exc}",
                                      hint="check the step's headers and body")
        if isinstance(exc, httpx.TimeoutException):
            return TransientError(f"http.request: timed out{where} ({type(exc).__name__})",
                                  hint="the server is slow or unreachable; it was retried - "
                                       "check the service, or raise the step's timeout")
        if isinstance(exc, httpx.ConnectError):
            return TransientError(
                f"http.request: could not connect{where}: {exc}",
                hint="check the host name and port in the URL and that the service is up")
        if isinstance(exc, httpx.TransportError | httpx.DecodingError):
            return TransientError(
                f"http.request: the connection failed{where}: {type(exc).__name__}: {exc}",
                hint="a network or server problem; it was retried - try again later")
        if isinstance(exc, UnicodeEncodeError):
            return ConfigurationError(f"http.request: a header is not ASCII: {exc.reason}",
                                      hint="header names and values must be plain ASCII")
        return super().classify(exc)

    async def health(self) -> Health:
        """Whether requests can leave at all: the policy of this trust level lets them
        reach some host, and the system resolver answers (and resolves a configured proxy).
        Whether one service answers is its per-host breaker's business (flows/breakers.py)."""
        policy = load_policy().level(current_trust())
        if policy.hosts == []:
            return Health(ok=False, detail="the policy allows no host (hosts: [])")
        proxy = httpx.URL(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
                          or "http://localhost")
        try:
            await asyncio.to_thread(socket.getaddrinfo, proxy.host, proxy.port or 80)
        except OSError as exc:
            return Health(ok=False, detail=f"the resolver cannot resolve {proxy.host}: {exc}")
        reach = "every public host" if policy.hosts is None else \
            f"{len(policy.hosts)} host rule(s)"
        private = " and private addresses" if policy.allow_private else ""
        return Health(ok=True, detail=f"httpx {httpx.__version__}; may reach {reach}{private}")


async def _read_capped(response: httpx.Response, cap: int) -> tuple[bytes, bool]:
    kept = bytearray()
    async for chunk in response.aiter_bytes():
        room = cap - len(kept)
        kept += chunk[:max(room, 0)]
        if len(chunk) > room:
            return bytes(kept), True  # stop reading; closing the stream drops the rest
    return bytes(kept), False


def _output(response: httpx.Response, content: bytes, truncated: bool) -> dict[str, Any]:
    parsed, text = None, None
    if _is_json(response) and not truncated and content:
        try:
            parsed = json.loads(content)
        except ValueError:
            text = _decode(response, content)
    else:
        text = _decode(response, content)
    return {"status": response.status_code, "url": redact_url(str(response.url)),
            "headers": dict(response.headers.items()), "json": parsed, "text": text,
            "truncated": truncated}


def _is_json(response: httpx.Response) -> bool:
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _decode(response: httpx.Response, content: bytes) -> str:
    try:
        return content.decode(response.charset_encoding or "utf-8", "replace")
    except LookupError:
        return content.decode("utf-8", "replace")


# -- status codes -------------------------------------------------------------------------------

def _status_error(params: HttpParams, response: httpx.Response, content: bytes) -> StepError:
    status = response.status_code
    said = (f"the server answered {status} {response.reason_phrase} for "
            f"{params.method} {redact_url(str(response.request.url))}")
    details = {"status": status, "method": params.method,
               "url": redact_url(str(response.request.url)),
               "request_headers": redact_headers(params.headers),
               "response_snippet": _decode(response, content[:SNIPPET_CHARS])}
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        wait = f" (it asked to wait {retry_after:g}s)" if retry_after is not None else ""
        return ResourceError(f"{said}: too many requests{wait}", retry_after=retry_after,
                             hint="the server is rate limiting: wait, then send fewer "
                                  "requests (the retry honours Retry-After)", details=details)
    if status == 408 or status >= 500:
        return TransientError(f"{said}: a server-side failure", retry_after=retry_after,
                              hint="the server failed or is overloaded; it was retried - "
                                   "check the service's status if it persists",
                              details=details)
    if status in (401, 403):
        return AccessError(f"{said}: check the credentials",
                           hint="check the step's credentials (Authorization header or "
                                "token) and that they allow this request", details=details)
    advice = {404: "check the URL", 410: "check the URL",
              405: "check the method", 415: "check the Content-Type and the body"}
    return ConfigurationError(
        f"{said}: {advice.get(status, 'check the request')}",
        hint="correct the step's URL, method, parameters or body; the server refused them",
        details=details)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# -- redaction (planrun.redact) ------------------------------------------------------------

def _secrets(params: HttpParams) -> list[str]:
    return request_credentials(params.url, params.headers, params.params)


def _scrubbed(error: StepError, secrets: list[str]) -> StepError:
    """``error`` with every secret value cut out of its message, hint and details."""
    return Redactor(secrets).scrub_error(error)


def _where(exc: Exception) -> str:
    try:
        request = exc.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return ""
    return f" for {request.method} {redact_url(str(request.url))}"
