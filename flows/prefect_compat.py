"""Where planrun departs from a Prefect default, in one place, each with its reason.

Tag concurrency: Prefect 3 asks the server for concurrency slots of every tag of every
task run (one HTTP round trip per step; on SQLite a locked database answers 503 and the
client waits ≈ 2 s). planrun tags each step ``planrun``, ``plan:<name>`` and
``tool:<tool>`` so runs can be found in the Prefect UI, not to limit them: those tags are
left out of the slot request. Any other tag (an operator's own limit) still goes to the
server. Set ``PLANRUN_PREFECT_TAG_LIMITS=1`` to send planrun's tags too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import prefect.task_engine as _engine

_OWN_PREFIXES = ("tag:planrun", "tag:plan:", "tag:tool:")
_prefect_concurrency = _engine._aconcurrency


def own_tag(limit_name: str) -> bool:
    """Whether ``limit_name`` (``tag:<tag>``) is one of the tags planrun puts on steps."""
    return limit_name == "tag:planrun" or limit_name.startswith(_OWN_PREFIXES[1:])


@asynccontextmanager
async def _concurrency(names: str | list[str], *args: Any, **kwargs: Any) -> AsyncIterator[None]:
    listed = [names] if isinstance(names, str) else list(names)
    kept = [n for n in listed if not own_tag(n)]
    async with _prefect_concurrency(kept, *args, **kwargs):
        yield


def install() -> None:
    """Apply the departures above (idempotent)."""
    if os.environ.get("PLANRUN_PREFECT_TAG_LIMITS") != "1":
        _engine._aconcurrency = _concurrency  # type: ignore[assignment]


def installed() -> bool:
    wrapper: AbstractAsyncContextManager[None] | Any = _engine._aconcurrency
    return wrapper is _concurrency
