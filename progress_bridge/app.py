"""The bridge's FastAPI app: streams (WebSocket, SSE), health and metrics.

Run control (``POST /v1/runs``, ``GET /v1/runs/{id}``, pause/resume/cancel/retry,
approvals, the live page) belongs in routers of their own, included in :data:`ROUTERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from fastapi import APIRouter, FastAPI

from progress_bridge import control, ops, sse, view, ws
from progress_bridge.hub import Hub, Subscription
from progress_bridge.metrics import Metrics
from progress_bridge.publisher import Publisher
from progress_bridge.state import BridgeState, Settings, Submit
from progress_bridge.store import MessageStore

ROUTERS: tuple[APIRouter, ...] = (ws.router, sse.router, ops.router, control.router,
                                  view.router)
Upstream = Callable[[BridgeState], Awaitable[None]]


def create_app(store: MessageStore, hub: Hub, token: str | None = None, *,
               allowed_origins: Iterable[str] = (), heartbeat_s: float = 15.0,
               max_frame_bytes: int = 4096, close_timeout_s: float = 30.0,
               upstream: Upstream | None = None, submit: Submit | None = None,
               freeze_gc: bool = True) -> FastAPI:
    """A bridge app serving ``store`` and ``hub``; the caller owns and closes the store.

    ``token`` defaults to ``$PLANRUN_TOKEN``; empty or unset means no authentication.
    ``upstream``, if given, runs for the app's lifetime with the app's
    :class:`BridgeState` and is cancelled at shutdown; ``submit`` starts the runs
    ``POST /v1/runs`` asks for. ``freeze_gc`` moves start-up objects out of the
    collector's reach, which took the worst fan-out latency from ≈ 200 ms to ≈ 50 ms
    (MEASURED.md).
    """
    metrics = Metrics()
    hub.on_slow(lambda _sub: _count_slow(metrics, _sub))
    token = token if token is not None else os.environ.get("PLANRUN_TOKEN")
    settings = Settings(token=token or None,
                        allowed_origins=frozenset(allowed_origins), heartbeat_s=heartbeat_s,
                        max_frame_bytes=max_frame_bytes, close_timeout_s=close_timeout_s)
    state = BridgeState(store, hub, metrics, Publisher(store, hub, metrics), settings,
                        submit=submit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(upstream(state)) if upstream else None
        if freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            hub.close_all("the bridge is stopping")
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="planrun progress bridge", version="1", lifespan=lifespan)
    app.state.bridge = state
    for router in ROUTERS:
        app.include_router(router)
    return app


def _count_slow(metrics: Metrics, _sub: Subscription) -> None:
    metrics.slow_disconnects.inc()
    metrics.dropped.inc()
