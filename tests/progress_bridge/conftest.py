"""A real bridge for the tests: the app under uvicorn, in a thread with its own event loop,
on a free port of 127.0.0.1, over a SQLite message log in a temporary directory.

Unless a test gives its own upstream, the bridge's upstream is the production one fed by a
fake event source: what a test publishes goes through the real apply and commit path."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

from planrun.contract.stream import Draft, Message
from planrun.progress_bridge.app import BridgeServer, create_app
from planrun.progress_bridge.flow_runs import FakeFlowRuns
from planrun.progress_bridge.hub import Hub
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.source import FakeEventSource, Incoming
from planrun.progress_bridge.state import BridgeState, Settings
from planrun.progress_bridge.store import MessageStore
from planrun.progress_bridge.upstream import Upstream, UpstreamSettings

from .events import nth

#: The fake-fed upstream's settings: no history reads, no timer messages to count.
QUIET = UpstreamSettings(history=False, ticks=False)

T = TypeVar("T")


@asynccontextmanager
async def fed_upstream(directory: Path, *, hub: Hub | None = None,
                       flow_runs: FakeFlowRuns | None = None,
                       settings: UpstreamSettings = QUIET, upstream: Upstream | None = None
                       ) -> AsyncIterator[tuple[BridgeState, FakeEventSource]]:
    """The production upstream (``upstream``, or a new one) over a store in ``directory``,
    fed by a fake event source: the bridge's state and that source, once connected."""
    store = MessageStore(directory)
    upstream = upstream or Upstream(FakeEventSource(), settings)
    source = upstream.source
    assert isinstance(source, FakeEventSource)
    state = BridgeState(store, hub or Hub(), Metrics(),
                        ControlService(flow_runs or FakeFlowRuns()), Settings(token="t"))
    task = asyncio.ensure_future(upstream(state))
    await source.connected.wait()
    try:
        yield state, source
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


class ServedBridge:
    """One bridge served by uvicorn; ``push`` and ``emit`` hand events to its fake event
    source on the bridge's own loop."""

    def __init__(self, directory: Path, queue_size: int = 1000, *,
                 store: MessageStore | None = None, **app_options: Any) -> None:
        self.store = store or MessageStore(directory)
        self.hub = Hub(queue_size=queue_size)
        app_options.setdefault("freeze_gc", False)
        self.token: str = app_options.setdefault("token", secrets.token_urlsafe(16))
        #: headers that authenticate as this bridge's clients
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.source = FakeEventSource()
        if "upstream" not in app_options:
            app_options["upstream"] = Upstream(self.source, QUIET)
        self.upstream = app_options["upstream"]
        self.app = create_app(self.store, self.hub, **app_options)
        self.state: BridgeState = self.app.state.bridge
        self.loop = asyncio.new_event_loop()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = BridgeServer(config)
        self._thread = threading.Thread(target=self._serve, name="bridge-under-test")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, run_id: str, after: int | None = None, token: str | None = None) -> str:
        """The run's socket with ``?token=`` this bridge's token (None), ``token``, or no
        token at all (``""``)."""
        token = self.token if token is None else token
        query = "&".join(f"{k}={v}" for k, v in (("after", after), ("token", token))
                         if v is not None and v != "")
        return f"ws://127.0.0.1:{self.port}/v1/runs/{run_id}/ws" + (f"?{query}" if query else "")

    def start(self) -> ServedBridge:
        self._thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True  # as a signal does: BridgeServer closes the streams
        self._thread.join(15)
        assert not self._thread.is_alive(), "uvicorn did not stop"
        self.store.close()
        self.loop.close()
        self._sock.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` on the bridge's loop; await the result from the test's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def push(self, event: Incoming) -> bool:
        """Deliver ``event`` through the fake source; whether it was new (committed)."""
        return await self.call(self.source.push(event))

    async def emit(self, run_id: str, n: int, summary_bytes: int = 0) -> Message:
        """Deliver the run's ``n``-th event (``events.nth``); the one message it made."""
        async def push_and_read() -> Message:
            before = self.store.last_seq(run_id)
            assert await self.source.push(nth(run_id, n, summary_bytes)), f"event {n} not new"
            return (await self.store.after(run_id, before))[0]

        return await self.call(push_and_read())

    async def commit(self, run_id: str, draft: Draft) -> Message:
        """Commit ``draft`` as the run's next message through the upstream's commit path
        (for the live page's tests, which choose each message)."""
        async def commit() -> Message:
            committer = getattr(self.upstream, "committer")  # noqa: B009 - set once it runs
            view = self.state.views.get(run_id) or RunView.unstarted(run_id)
            before = self.store.last_seq(run_id)
            assert committer.commit(run_id, view, [draft])
            return (await self.store.after(run_id, before))[0]

        return await self.call(commit())

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self._sock]))
        # On a loaded machine the graceful shutdown can time out with connections still
        # open; close their transports here, or they are collected later as "unclosed
        # transport" warnings in whichever test runs then.
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))  # their connection_lost callbacks


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


BridgeFactory = Callable[..., ServedBridge]


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[BridgeFactory]:
    """Start bridges (by default over one SQLite directory); every one is stopped at the end."""
    started: list[ServedBridge] = []

    def start(directory: Path | None = None, **options: Any) -> ServedBridge:
        bridge = ServedBridge(directory or tmp_path, **options).start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        if bridge._thread.is_alive():
            bridge.stop()


@pytest.fixture
def bridge(bridge_factory: BridgeFactory) -> ServedBridge:
    """A bridge with default options (a random token: ``bridge.auth``)."""
    return bridge_factory()
