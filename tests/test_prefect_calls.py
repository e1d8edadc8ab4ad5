"""planrun/prefect_calls.py: a busy server's 503 retried by planrun, soon, instead of by
Prefect's client after 2 s; against a real HTTP server on 127.0.0.1 that answers 503
a given number of times, through Prefect's real client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from planrun.prefect_calls import soon_again
from tests.helpers import serving


class Busy(ThreadingHTTPServer):
    """Answers ``GET /api/hello`` 503 ``busy`` times (or ``status`` for each), then 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.busy = 0
        self.status = 503
        self.requests = 0


class Handler(BaseHTTPRequestHandler):
    server: Busy

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests += 1
        if self.server.busy > 0:
            self.server.busy -= 1
            self.send_response(self.server.status)
            body = b'{"detail": "busy"}'
        else:
            self.send_response(200)
            body = json.dumps("hello").encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Busy]:
    with serving(Busy()) as busy:
        yield busy


def hello(server: Busy, budget_s: float = 10.0) -> tuple[int, int]:
    """Ask ``server`` hello through soon_again: (calls made, the answer's status)."""
    from prefect.client.orchestration import PrefectClient

    calls = 0

    async def main() -> int:
        async with PrefectClient(f"http://127.0.0.1:{server.server_address[1]}/api") as client:
            async def call() -> httpx.Response:
                nonlocal calls
                calls += 1
                return await client._client.get("/hello")

            return (await soon_again(call, budget_s)).status_code

    status = asyncio.run(main())
    return calls, status


def test_a_busy_server_is_asked_again_by_planrun_not_by_prefects_client(server: Busy) -> None:
    server.busy = 2
    calls, status = hello(server)
    assert status == 200
    # Each 503 came back to soon_again at once: one request per call. Prefect's client
    # would have made the three requests in one call, two and four seconds apart.
    assert (calls, server.requests) == (3, 3)


def test_another_error_is_not_retried(server: Busy) -> None:
    server.busy, server.status = 1, 404
    with pytest.raises(httpx.HTTPStatusError):
        hello(server)
    assert server.requests == 1


def test_past_its_budget_the_call_is_made_once_more_with_prefects_retries(server: Busy
                                                                          ) -> None:
    server.busy = 1
    calls, status = hello(server, budget_s=0)
    assert status == 200
    assert (calls, server.requests) == (1, 2)  # Prefect's client asked again itself


def test_outside_soon_again_prefects_client_retries_as_before(server: Busy) -> None:
    from prefect.client.orchestration import PrefectClient

    server.busy = 1

    async def main() -> int:
        await soon_again(lambda: asyncio.sleep(0), 0)  # installed
        async with PrefectClient(f"http://127.0.0.1:{server.server_address[1]}/api") as client:
            return (await client._client.get("/hello")).status_code

    assert asyncio.run(main()) == 200
    assert server.requests == 2
