"""Whether the tools a run uses can work now: each adapter's ``health()``, asked before
the run's first step and remembered briefly by each process (docs/policy.md, "Health").

A tool found unhealthy does not stop the run: each of its steps fails at its first attempt,
before any call, with category ``configuration`` (not retried) and the health check's
words as the hint, and so goes to its ``fallback`` when it has one. ``planrun tools``
shows the same checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from functools import lru_cache

from planrun.adapters.base import Adapter, Health
from planrun.errors import ConfigurationError
from planrun.policy import current_trust

#: How long a process trusts a tool's last health check.
HEALTH_TTL_S = 30.0
#: A health check that takes longer is taken as an unhealthy tool.
CHECK_TIMEOUT_S = 5.0


async def check(adapter: Adapter, timeout_s: float = CHECK_TIMEOUT_S) -> Health:
    """``adapter.health()`` within ``timeout_s``; a check that fails or hangs is unhealthy."""
    try:
        return await asyncio.wait_for(adapter.health(), timeout=timeout_s)
    except TimeoutError:
        return Health(ok=False, detail=f"its health check did not answer in {timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - a broken health check is reported, not raised
        return Health(ok=False, detail=f"its health check failed: {type(exc).__name__}: {exc}")


class HealthChecks:
    """Tool health as one process sees it: each check remembered for ``ttl_s`` seconds
    (per tool and trust level: a tool's health may depend on the level's policy)."""

    def __init__(self, ttl_s: float = HEALTH_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[Health, float]] = {}

    async def health(self, adapter: Adapter) -> Health:
        """The tool's health, checked now unless checked less than ``ttl_s`` ago."""
        key = (adapter.name, str(current_trust()))
        seen = self._seen.get(key)
        if seen is not None and self.clock() - seen[1] < self.ttl_s:
            return seen[0]
        health = await check(adapter)
        self._seen[key] = (health, self.clock())
        return health

    async def unhealthy_tools(self, adapters: Iterable[Adapter]) -> dict[str, str]:
        """Each unhealthy tool among ``adapters`` and why, checked concurrently."""
        unique = {adapter.name: adapter for adapter in adapters}
        found = await asyncio.gather(*(self.health(a) for a in unique.values()))
        return {name: health.detail or "unhealthy"
                for name, health in zip(unique, found, strict=True) if not health.ok}


@lru_cache(maxsize=1)
def default_health() -> HealthChecks:
    """This process's health checks (one memory for all its runs)."""
    return HealthChecks()


async def unhealthy_tools(adapters: Iterable[Adapter]) -> dict[str, str]:
    """Each unhealthy tool among ``adapters`` and why, as this process last saw it."""
    return await default_health().unhealthy_tools(adapters)


def tool_unhealthy(tool: str, reason: str) -> ConfigurationError:
    """The error of a step whose tool was unhealthy when its run started."""
    return ConfigurationError(
        f"{tool} is unhealthy: {reason}",
        hint=f"the step was not tried: {tool} failed its health check before the run "
             "started; fix what it names (`planrun tools` shows every tool's health), or "
             "give the step a fallback")
