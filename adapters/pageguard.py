"""The policy on every request of a page ``browser.open`` opens (docs/browser.md, "The
policy on every request").

``RequestGuard`` is installed on the step's browser context: each request the page makes
(the page itself, subresources, fetches) is made by httpx through the network guard of
``http.request`` (``adapters/netguard.py``: resolved once, every address checked, connected
to a checked address), and each WebSocket is checked before it connects. A refused request
never leaves; the guard remembers it, and the step fails with category ``configuration``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import httpx

from planrun.adapters.netguard import check_url, guarded_transport
from planrun.errors import StepError
from planrun.policy import LevelPolicy, Trust
from planrun.redact import redact_url

__all__ = ["MAX_RESPONSE_BYTES", "RequestGuard", "quietly"]

#: A response larger than this is not handed to the page (guarded requests are buffered).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Request headers httpx sets itself: it asks only for the encodings it can decode.
_NOT_FORWARDED = {"host", "content-length", "accept-encoding", "connection"}
#: Response headers httpx has already dealt with (it decodes the body).
_DROPPED_HEADERS = {"content-encoding", "content-length", "transfer-encoding", "connection",
                    "keep-alive"}


@dataclass
class RequestGuard:
    """Makes each request of the page through httpx with the network guard's transport, so
    that only checked addresses are reached, and remembers every refusal. The step's own
    page stops at a redirect, whose target is checked and then opened by the step as a new
    request (``redirect_to``); other requests have their redirects followed by httpx, each
    one checked. ``timeout_s`` bounds each request's reads."""

    policy: LevelPolicy
    trust: Trust
    timeout_s: float = 30.0
    blocked: list[StepError] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: Whether the next main-frame navigation is the step's own.
    expecting: bool = False
    #: Where the step's page redirected (checked): the step opens it next.
    redirect_to: str | None = None

    async def install(self, context: Any) -> None:
        self.client = httpx.AsyncClient(transport=guarded_transport(self.policy, self.trust),
                                        follow_redirects=False,
                                        timeout=httpx.Timeout(self.timeout_s,
                                                              connect=min(self.timeout_s, 10)))
        await context.route("**/*", self.handle)
        await context.route_web_socket("**/*", self.handle_socket)

    async def close(self) -> None:
        await self.client.aclose()

    def expect_page(self) -> None:
        """The next main-frame navigation is the step's own (``page.goto``)."""
        self.expecting, self.redirect_to = True, None

    async def handle(self, route: Any, request: Any) -> None:
        ours = self.expecting and request.is_navigation_request() and _main_frame(request)
        if ours:
            self.expecting = False
        try:
            headers = {k: v for k, v in (await request.all_headers()).items()
                       if not k.startswith(":") and k.lower() not in _NOT_FORWARDED}
            # The step's page stops at a redirect, which the step then opens itself (a new
            # request, checked in turn: Playwright does not route redirects); anything
            # else has its redirects followed here, each one checked.
            response = await self.client.request(
                request.method, request.url, headers=headers,
                content=request.post_data_buffer, follow_redirects=not ours)
            location = response.headers.get("location")
            if ours and response.is_redirect and location:
                target = str(response.url.join(location))
                await check_url(target, self.policy, self.trust)
                self.redirect_to = target
                await quietly(route.abort("aborted"))
                return
        except StepError as exc:  # the network guard's refusal
            self.blocked.append(exc)
            await quietly(route.abort("blockedbyclient"))
            return
        except httpx.HTTPError as exc:
            self.failed.append(f"{redact_url(request.url)}: {type(exc).__name__}: {exc}")
            await quietly(route.abort(_abort_code(exc)))
            return
        if len(response.content) > MAX_RESPONSE_BYTES:
            self.failed.append(f"{redact_url(request.url)}: larger than "
                               f"{MAX_RESPONSE_BYTES} bytes")
            await quietly(route.abort("failed"))
            return
        await quietly(route.fulfill(status=response.status_code, body=response.content,
                                     headers=_fulfilled_headers(response.headers)))

    async def handle_socket(self, socket: Any) -> None:
        try:
            await check_url(_http_form(socket.url), self.policy, self.trust)
        except StepError as exc:
            self.blocked.append(exc)
            await quietly(socket.close(code=1008, reason="blocked by policy"))
            return
        socket.connect_to_server()


def _main_frame(request: Any) -> bool:
    try:
        return request.frame.parent_frame is None
    except Exception:  # noqa: BLE001 - a worker's request has no frame
        return False


def _http_form(url: str) -> str:
    return "http" + url[2:] if url.startswith("ws") else url


def _abort_code(exc: httpx.HTTPError) -> str:
    text = str(exc).lower()
    if "resolve" in text or "name or service" in text:
        return "namenotresolved"
    if "ssl" in text or "certificate" in text:
        return "connectionfailed"
    if isinstance(exc, httpx.ConnectError):
        return "connectionrefused"
    if isinstance(exc, httpx.TimeoutException):
        return "timedout"
    return "failed"


def _fulfilled_headers(headers: httpx.Headers) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in headers.multi_items():
        name = name.lower()
        if name in _DROPPED_HEADERS:
            continue
        kept[name] = f"{kept[name]}\n{value}" if name in kept else value
    return kept


async def quietly(action: Awaitable[Any]) -> None:
    """Await ``action`` of a page or a route, which may fail only because it is gone."""
    with contextlib.suppress(Exception):  # the page may be gone already (the step ended)
        await action
