"""Who may talk to the bridge: the right ``Host``, an allowed ``Origin`` and the token.

:class:`Guard` checks all three once, as ASGI middleware, for every HTTP request and
every WebSocket, before any route runs; only ``GET /healthz`` goes without the token.
``Host`` must name the bridge (``127.0.0.1``, ``localhost`` or ``[::1]`` at its port,
or a configured host), which defeats DNS rebinding; ``Origin``, when a browser sends
one, must be the bridge's own or a configured one, which defeats cross-site requests.
See docs/http-api.md, "Authentication and origins".
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

POLICY_VIOLATION = 1008
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
OPEN_PATHS = frozenset({"/healthz"})  # GET only: liveness probes carry no token


def token_ok(expected: str, conn: HTTPConnection) -> bool:
    """True when ``conn`` presents ``expected`` as ``Authorization: Bearer`` or as
    ``?token=`` (browsers cannot set headers on WebSockets and EventSource); compared in
    constant time."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else conn.query_params.get("token")
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Hosts:
    """The names the bridge answers to: loopback at its own port, and ``extra`` entries
    (``name`` for any port the bridge listens on, ``name:port`` for that port only)."""

    extra: frozenset[str] = frozenset()

    @classmethod
    def of(cls, extra: Iterable[str]) -> Hosts:
        return cls(frozenset(h.strip().lower() for h in extra if h.strip()))

    def allows(self, host: str, port: int | None) -> bool:
        """True when a ``Host`` header value (``name[:port]``) names this bridge."""
        host = host.strip().lower()
        if host in self.extra:
            return True
        name, port_given = _split(host)
        if port_given is None or port_given != port:
            return False
        return name in LOOPBACK_NAMES or name in self.extra


def origin_ok(origin: str, hosts: Hosts, port: int | None,
              allowed_origins: frozenset[str]) -> bool:
    """True for the bridge's own origin (an allowed host, over http or https) and for
    ``allowed_origins``; ``null`` and every other origin are foreign."""
    if origin.lower() in allowed_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and hosts.allows(parts.netloc, port)


class Guard:
    """ASGI middleware: 403 for a foreign ``Host`` or ``Origin``, 401 without the token;
    a refused WebSocket is accepted, then closed with 1008 and the reason."""

    def __init__(self, app: ASGIApp, *, token: str, hosts: Hosts,
                 allowed_origins: frozenset[str]) -> None:
        if not token:
            raise ValueError("the bridge needs a token")
        self.app, self.token, self.hosts = app, token, hosts
        self.allowed_origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(HTTPConnection(scope))
        if refusal is None:
            await self.app(scope, receive, _no_referrer(send))
        else:
            await refuse(scope, receive, send, *refusal)

    def refusal(self, conn: HTTPConnection) -> tuple[int, str, dict[str, str]] | None:
        """Why ``conn`` is refused (status, reason, headers), or None to let it in."""
        server = conn.scope.get("server")
        port = server[1] if server else None
        if not self.hosts.allows(conn.headers.get("host", ""), port):
            return 403, "host not allowed: use the bridge's own address", {}
        origin = conn.headers.get("origin")
        if origin is not None and not origin_ok(origin, self.hosts, port, self.allowed_origins):
            return 403, "origin not allowed", {}
        if conn.url.path in OPEN_PATHS and conn.scope.get("method") in ("GET", "HEAD"):
            return None
        if not token_ok(self.token, conn):
            return 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
        return None


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, reason: str,
                 headers: dict[str, str], ws_code: int = POLICY_VIOLATION) -> None:
    """Answer ``status`` with ``{"detail": reason}``; a WebSocket is closed with
    ``ws_code`` and ``reason`` instead, so a browser's script can read why."""
    if scope["type"] == "http":
        response = JSONResponse({"detail": reason}, status_code=status,
                                headers={**headers, "Referrer-Policy": "no-referrer"})
        await response(scope, receive, send)
        return
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": ws_code, "reason": reason})


def _no_referrer(send: Send) -> Send:
    # Pages of the bridge carry ?token= in their address (the live page, /docs): no
    # request they make may tell another origin that address.
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"referrer-policy" for name, _ in headers):
                headers.append((b"referrer-policy", b"no-referrer"))
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _split(host: str) -> tuple[str, int | None]:
    """``name:port`` (``[v6]:port`` too) → (name, port); without a port, port 80 (what a
    browser leaves out); a malformed port → (host, None)."""
    name, sep, port = host.rpartition(":")
    if not sep or (":" in name and not name.endswith("]")):
        return host, 80
    return (name, int(port)) if port.isdigit() else (host, None)
