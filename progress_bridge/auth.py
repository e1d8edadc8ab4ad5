"""Who may connect: the optional bearer token and, for WebSockets, the browser origin."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.requests import HTTPConnection, Request

from progress_bridge.state import state_of


def token_ok(expected: str | None, conn: HTTPConnection) -> bool:
    """True when no token is required or ``conn`` presents it, as ``Authorization: Bearer``
    or as ``?token=`` (browsers cannot set headers on WebSockets and EventSource)."""
    if expected is None:
        return True
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else conn.query_params.get("token")
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def origin_ok(allowed: frozenset[str], conn: HTTPConnection) -> bool:
    """True for non-browser clients (no ``Origin``), the bridge's own host, and ``allowed``."""
    origin = conn.headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()


def require_token(request: Request) -> None:
    """FastAPI dependency of the HTTP routes under /v1: 401 without the right token."""
    if not token_ok(state_of(request).settings.token, request):
        raise HTTPException(401, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
