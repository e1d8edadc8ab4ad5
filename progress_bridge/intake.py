"""What a request may carry: JSON bodies only, and no more than the bridge will read.

:class:`Intake` (ASGI middleware) refuses, before any route runs, a request whose body
is not ``application/json`` (415: the form and text types a page on any site may send
without asking are never accepted, body or not), and a body over ``max_bytes`` (413), as
soon as its ``Content-Length`` says so or, while it streams, as soon as the limit is
passed, without reading the rest. An accepted body is handed to the route as one
message, read already.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from planrun.progress_bridge.auth import refuse

JSON = "application/json"
_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyTooLarge(Exception):
    """The body passed the limit while it was read."""


class Intake:
    """ASGI middleware: 415 for a body that is not JSON, 413 for one over ``max_bytes``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        problem = self._header_problem(headers)
        if problem is not None:
            await refuse(scope, receive, send, *problem, {})
            return
        try:
            body = await self._read(receive)
        except BodyTooLarge:
            await refuse(scope, receive, send, 413, self._too_large(), {"Connection": "close"})
            return
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    def _header_problem(self, headers: dict[str, str]) -> tuple[int, str] | None:
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        length = headers.get("content-length", "").strip()
        if length and not length.isdigit():
            return 400, "Content-Length is not a number"
        has_body = "transfer-encoding" in headers or int(length or 0) > 0
        if (media_type or has_body) and media_type != JSON:
            shown = media_type or "none"
            return 415, f"request bodies must be sent as {JSON} (Content-Type: {shown})"
        if int(length or 0) > self.max_bytes:
            return 413, self._too_large()
        return None

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body; None when the client left before sending it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> str:
        return f"request bodies (plans) are limited to {self.max_bytes} bytes"


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first gives the whole ``body``, then the client's later messages
    (its disconnect, which streaming responses wait for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
