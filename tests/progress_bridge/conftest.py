"""A real bridge for the tests: the app under uvicorn, in a thread with its own event loop,
on a free port of 127.0.0.1, over a SQLite message log in a temporary directory."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

from progress_bridge.app import create_app
from progress_bridge.hub import Hub
from progress_bridge.messages import Draft, Message
from progress_bridge.publisher import Publisher
from progress_bridge.store import MessageStore

T = TypeVar("T")


class ServedBridge:
    """One bridge served by uvicorn; ``emit`` publishes on the bridge's own loop."""

    def __init__(self, directory: Path, queue_size: int = 1000, **app_options: Any) -> None:
        self.store = MessageStore(directory)
        self.hub = Hub(queue_size=queue_size)
        app_options.setdefault("freeze_gc", False)
        self.token: str = app_options.setdefault("token", secrets.token_urlsafe(16))
        #: headers that authenticate as this bridge's clients
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.app = create_app(self.store, self.hub, **app_options)
        self.publisher: Publisher = self.app.state.bridge.publisher
        self.loop = asyncio.new_event_loop()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
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
        self.loop.call_soon_threadsafe(self.hub.close_all)
        self.server.should_exit = True
        self._thread.join(15)
        assert not self._thread.is_alive(), "uvicorn did not stop"
        self.store.close()
        self.loop.close()
        self._sock.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` on the bridge's loop; await the result from the test's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def emit(self, run_id: str, draft: Draft) -> Message:
        return await self.call(self.publisher.emit(run_id, draft))

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self._sock]))


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
