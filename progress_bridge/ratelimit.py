"""Per-client request rate limit: a token bucket per client address.

:class:`RateLimit` (ASGI middleware) answers ``429 Too Many Requests`` with
``Retry-After`` to an HTTP client over its budget, and closes a WebSocket handshake over
it with 1013 (try again later). The default, 20 requests a second with bursts of 40, is
far above what a person, the CLI or the live page sends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from planrun.progress_bridge.auth import refuse

TRY_AGAIN_LATER = 1013
DEFAULT_PER_S = 20.0
DEFAULT_BURST = 40
MAX_CLIENTS = 10_000  # buckets kept; idle (full) ones are dropped beyond this


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """``per_s`` requests a second per key, with bursts of ``burst``; ``per_s <= 0``
    means no limit."""

    def __init__(self, per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self.clock = per_s, max(burst, 1), clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Spend one request of ``key``'s budget: 0 when allowed, else the seconds until
        the next request would be."""
        if self.per_s <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_s)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_s

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) < MAX_CLIENTS:
            return
        refill_s = self.burst / self.per_s
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < refill_s}
        if len(self._buckets) >= MAX_CLIENTS:  # all busy: start over rather than grow
            self._buckets.clear()


class RateLimit:
    """ASGI middleware: every HTTP request and WebSocket handshake spends one request of
    its client address's budget."""

    def __init__(self, app: ASGIApp, *, buckets: TokenBuckets) -> None:
        self.app, self.buckets = app, buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            wait_s = self.buckets.take(client[0] if client else "")
            if wait_s > 0:
                retry = max(1, math.ceil(wait_s))
                await refuse(scope, receive, send, 429,
                             f"too many requests: try again in {retry} s",
                             {"Retry-After": str(retry)}, ws_code=TRY_AGAIN_LATER)
                return
        await self.app(scope, receive, send)
