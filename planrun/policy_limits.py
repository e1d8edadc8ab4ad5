"""The operator's limits on how much runs may do at once (docs/limits.md, docs/policy.md).

The policy file's ``limits:`` section: a concurrency limit over every step of the machine,
per-tool and per-host (``http.request``'s URL host) concurrency and rate limits, and the
machine's load thresholds above which new steps wait. They hold across every run and every
process that shares planrun's data directory, or the stack's PostgreSQL database
(``flows/limits.py``, docs/limits.md). A plan may tighten a
tool's limits for its own run (``limits.tools`` in the plan), never loosen them.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _host_name(value: str) -> str:
    host = value.strip().lower().rstrip(".")
    if not host or any(c in host for c in "/:@ *"):
        raise ValueError(f"{value!r} is not a host name or address like 'api.example.org'")
    return host


_TOOL_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+")


def _tool_name(value: str) -> str:
    if not _TOOL_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a tool name like 'search.web'")
    return value


HostName = Annotated[str, AfterValidator(_host_name)]
ToolName = Annotated[str, AfterValidator(_tool_name)]


class ToolLimits(BaseModel):
    """How much of one tool (or one host) may run: ``concurrency`` calls at once, and at
    most ``rate`` calls a second with bursts of ``burst`` calls at once. None: no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Calls at once, over every run on this machine.
    concurrency: int | None = Field(None, ge=1, le=100_000)
    #: Calls a second, on average.
    rate: float | None = Field(None, gt=0, le=100_000)
    #: Calls that may start at once when the rate allows (1: evenly spaced).
    burst: int = Field(1, ge=1, le=100_000)

    def over(self, base: ToolLimits) -> ToolLimits:
        """These settings laid over ``base``: what this entry sets wins, the rest is kept
        (so ``shell.run: {rate: 5}`` keeps the default concurrency; ``concurrency: null``
        turns it off)."""
        return base.model_copy(update={name: getattr(self, name)
                                       for name in self.model_fields_set})


class LoadLimits(BaseModel):
    """Above these, new steps wait (``degrade: skip`` steps are skipped); nothing running
    is stopped. None turns a threshold off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Memory in use, in percent of the machine's (psutil's ``virtual_memory().percent``).
    memory_percent: float | None = Field(90.0, ge=0, le=100)
    #: Runnable processes per core, averaged over ``window_s`` (a load average of seconds).
    cpu_per_core: float | None = Field(None, ge=0, le=1000)
    #: How far back CPU load is averaged, in seconds.
    window_s: float = Field(5.0, gt=0, le=300)


def default_tools() -> dict[str, ToolLimits]:
    """What protects a small machine without a policy: ``shell.run`` at most twice the
    cores at once (200 parallel programs on 2 cores thrash it)."""
    return {"shell.run": ToolLimits.model_validate({"concurrency": 2 * (os.cpu_count() or 1)})}


class OperatorLimits(BaseModel):
    """The policy file's ``limits:`` section, over the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Steps of every run and tool at once on this machine; None: no limit.
    concurrency: int | None = Field(None, ge=1, le=100_000)
    #: Per tool, laid over ``default_tools()``.
    tools: dict[ToolName, ToolLimits] = Field(default_factory=dict)
    #: Per host: ``http.request`` calls (the URL's host, exactly as written, lower case),
    #: and the calls of other network tools to the host they name (``Adapter.call_host``).
    hosts: dict[HostName, ToolLimits] = Field(default_factory=dict)
    load: LoadLimits = Field(default_factory=lambda: LoadLimits.model_validate({}))

    def tool(self, tool: str) -> ToolLimits:
        """The limits in force for ``tool``: the policy's entry over the default."""
        base = default_tools().get(tool) or ToolLimits.model_validate({})
        own = self.tools.get(tool)
        return own.over(base) if own is not None else base

    def host(self, host: str | None) -> ToolLimits | None:
        """The limits of ``host``'s calls, if the policy names it."""
        return self.hosts.get(host.lower().rstrip(".")) if host else None

