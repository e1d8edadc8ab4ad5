"""Prefect API calls retried soon when the server is busy.

Prefect's client retries a 503 after 2 s, then 4, 8 and 16 (``2 ** try``), and it
sleeps that long even after its last try, so no setting makes it answer a 503 at once.
The local SQLite server answers 503 whenever a write meets another's lock, which for a
read-then-write such as a flow run's label update is whenever something else wrote in
between (docs/prefect-notes.md, "Start-up and the server"): on an idle server one 503
cost a submit, or a run's first step, 2 s. Inside :func:`soon_again` the client's
``_send_with_retry`` leaves 503 and 429 out of the codes it retries, so the answer comes
back as an error at once, and the call is made again after 50 ms, growing to 0.5 s, for
up to ``budget_s``; then once more with Prefect's own retries. Every other call keeps
Prefect's retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

#: The first pause after a 503, and the longest.
FIRST_PAUSE_S = 0.05
LONGEST_PAUSE_S = 0.5
#: The answers retried here rather than by Prefect's client.
BUSY = frozenset({429, 503})

_here: ContextVar[bool] = ContextVar("planrun_soon_again", default=False)


async def soon_again(call: Callable[[], Awaitable[T]], budget_s: float = 10.0) -> T:
    """``await call()``, a 503 (or 429) from the server retried after a short pause."""
    _install()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    pause = FIRST_PAUSE_S
    while loop.time() < deadline:
        token = _here.set(True)
        try:
            return await call()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in BUSY:
                raise
        finally:
            _here.reset(token)
        await asyncio.sleep(pause)
        pause = min(pause * 2, LONGEST_PAUSE_S)
    return await call()  # Prefect's own retries, as for any other call


def _install() -> None:
    """Wrap the client's ``_send_with_retry`` once (idempotent)."""
    from prefect.client.base import PrefectHttpxAsyncClient

    client: Any = PrefectHttpxAsyncClient
    if getattr(client._send_with_retry, "planrun", False):
        return
    prefects = client._send_with_retry

    async def send_with_retry(self: Any, request: httpx.Request, send: Any, send_args: Any,
                              send_kwargs: Any, retry_codes: set[int] = set(),  # noqa: B006
                              retry_exceptions: tuple[type[Exception], ...] = ()) -> Any:
        if _here.get():
            retry_codes = set(retry_codes) - BUSY
        return await prefects(self, request, send, send_args, send_kwargs,
                              retry_codes=retry_codes, retry_exceptions=retry_exceptions)

    send_with_retry.planrun = True  # type: ignore[attr-defined]
    client._send_with_retry = send_with_retry
