"""The bridge's FastAPI app: every route behind the checks of :func:`_guard`
(docs/http-api.md, "Authentication and origins").

Each group of routes is a router of its own, included in :data:`ROUTERS`: the streams
(``ws``, ``sse``: docs/stream.md), health and metrics (``ops``), submitting, reading and
controlling runs and answering approvals (``control``), and the live page (``view``);
``apidocs`` adds ``/docs`` and ``/redoc``. The routes are listed in docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import uvicorn
from fastapi import APIRouter, FastAPI

from planrun.adapters.registry import default_registry
from planrun.errors import PlanrunError
from planrun.loader import MAX_PLAN_BYTES
from planrun.progress_bridge import apidocs, control, ops, sse, view, ws
from planrun.progress_bridge.admission import Admission
from planrun.progress_bridge.auth import Guard, Hosts
from planrun.progress_bridge.flow_runs import FlowRuns, PrefectFlowRuns
from planrun.progress_bridge.frames import FanoutProtocol
from planrun.progress_bridge.hub import Hub, Subscription
from planrun.progress_bridge.intake import Intake
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.ratelimit import DEFAULT_BURST, DEFAULT_PER_S, RateLimit, TokenBuckets
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.state import BridgeState, Settings, Submit
from planrun.progress_bridge.store import MessageStore

ROUTERS: tuple[APIRouter, ...] = (ws.router, sse.router, ops.router, control.router,
                                  view.router)
Upstream = Callable[[BridgeState], Awaitable[None]]
log = logging.getLogger("planrun.bridge")


def create_app(store: MessageStore, hub: Hub, token: str, *,
               allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               rate_per_s: float = DEFAULT_PER_S, rate_burst: int = DEFAULT_BURST,
               max_body_bytes: int = MAX_PLAN_BYTES, heartbeat_s: float = 15.0,
               max_frame_bytes: int = 4096, close_timeout_s: float = 30.0,
               upstream: Upstream | None = None, submit: Submit | None = None,
               flow_runs: FlowRuns | None = None, admission: Admission | None = None,
               freeze_gc: bool = True,
               upstream_failed: Callable[[BaseException], None] | None = None) -> FastAPI:
    """A bridge app serving ``store`` and ``hub``; the caller owns and closes the store.

    Every route but ``GET /healthz`` requires ``token`` (not empty); ``Host`` and
    ``Origin`` are checked, bodies must be JSON and at most ``max_body_bytes``, and each
    client address may send ``rate_per_s`` requests a second (see :class:`Settings`).
    ``upstream``, if given, runs for the app's lifetime with the app's
    :class:`BridgeState` and is cancelled at shutdown; ``submit`` starts the runs
    ``POST /v1/runs`` asks for; ``flow_runs`` are the flow runs run control acts on
    (Prefect's, unless a test gives a fake); ``admission`` says when ``POST /v1/runs``
    answers 503 (the defaults of :class:`Admission`). ``freeze_gc`` moves start-up objects
    out of the collector's reach, which took the worst fan-out latency from ≈ 200 ms to ≈ 50 ms
    (docs/prefect-notes.md).
    """
    if not token:
        raise ValueError("the bridge needs a token (planrun.bridge_token.ensure())")
    metrics = Metrics()
    hub.on_slow(lambda _sub: _count_slow(metrics, _sub))
    settings = Settings(token=token, allowed_hosts=frozenset(allowed_hosts),
                        allowed_origins=frozenset(allowed_origins), rate_per_s=rate_per_s,
                        rate_burst=rate_burst, max_body_bytes=max_body_bytes,
                        heartbeat_s=heartbeat_s, max_frame_bytes=max_frame_bytes,
                        close_timeout_s=close_timeout_s)
    control = ControlService(flow_runs if flow_runs is not None else PrefectFlowRuns())
    state = BridgeState(store, hub, metrics, control, settings, submit=submit,
                        admission=admission or Admission())
    metrics.follow(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(upstream(state)) if upstream else None
        if task is not None:
            task.add_done_callback(lambda done: _upstream_ended(done, upstream_failed))
        stalls = asyncio.ensure_future(watch_loop())
        # The tools a plan is checked against, loaded now and off the loop: the first plan
        # submitted otherwise waited for their imports, the loop blocked (≈ 3 s under load).
        asyncio.get_running_loop().run_in_executor(None, _load_tools)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            hub.close_all("the bridge is stopping")
            for running in (task, stalls):
                if running is not None:
                    running.cancel()
                    # an upstream's error was told as it ended (_upstream_ended)
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await running

    app = FastAPI(title=apidocs.TITLE, version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.bridge = state
    for router in ROUTERS:
        app.include_router(router)
    apidocs.install(app)
    _guard(app, settings)
    return app


def _upstream_ended(task: asyncio.Task[None],
                    failed: Callable[[BaseException], None] | None) -> None:
    """The upstream follows Prefect for the bridge's lifetime: one that ended with an
    error left the bridge serving what it knew then. Say so, and tell ``failed``."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    assert error is not None
    log.error("the bridge stopped following Prefect: %s: %s", type(error).__name__, error,
              exc_info=error)
    if failed is not None:
        failed(error)


async def watch_loop(every_s: float = 0.5, warn_s: float = 2.0) -> None:
    """Log a warning whenever the event loop stood still for ``warn_s`` or more: no
    client was answered meanwhile. Either the machine gave the bridge no CPU, or something
    ran on the loop that belongs in a thread; the log says when, the operator's other logs
    say which."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(every_s)
        late = loop.time() - before - every_s
        if late >= warn_s:
            log.warning("the bridge's event loop stood still for %.1f s: no client was "
                        "answered meanwhile (a machine that gave the bridge no CPU, or "
                        "work on the loop that belongs in a thread)", late)


def _load_tools() -> None:
    """Load the registry of tools (a tool that cannot be loaded is named to the submit
    that needs it: the registry is loaded again then)."""
    with contextlib.suppress(PlanrunError):
        default_registry()


#: How long a stopping bridge waits for its clients to be told before uvicorn closes them.
CLOSE_WAIT_S = 2.0


class BridgeServer(uvicorn.Server):
    """uvicorn's server, stopping as the bridge should: its streams are closed first (a
    WebSocket with 1001 "the bridge is stopping", docs/stream.md), then uvicorn closes
    the connections (it would close a WebSocket with 1012, before the app's shutdown).
    WebSockets are served by :class:`~progress_bridge.frames.FanoutProtocol` unless the
    config names another protocol."""

    def __init__(self, config: uvicorn.Config) -> None:
        if config.ws == "auto":
            config.ws = FanoutProtocol
        super().__init__(config)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "bridge", None)
        if isinstance(state, BridgeState):
            await state.hub.close_all_and_wait("the bridge is stopping", CLOSE_WAIT_S)
        await super().shutdown(sockets)


def _guard(app: FastAPI, settings: Settings) -> None:
    """The checks every request passes before a route runs, outermost first: the rate
    limit, then Host, Origin and the token, then the body's type and size."""
    app.add_middleware(Intake, max_bytes=settings.max_body_bytes)  # type: ignore[arg-type]
    app.add_middleware(Guard, token=settings.token,  # type: ignore[arg-type]
                       hosts=Hosts.of(settings.allowed_hosts),
                       allowed_origins=settings.allowed_origins)
    app.add_middleware(RateLimit,  # type: ignore[arg-type]
                       buckets=TokenBuckets(settings.rate_per_s, settings.rate_burst))


def _count_slow(metrics: Metrics, _sub: Subscription) -> None:
    metrics.slow_disconnects.inc()
    metrics.dropped.inc()
