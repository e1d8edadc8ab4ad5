"""The operator's policy: what a plan may use, per trust level (docs/policy.md).

Two trust levels: ``local`` (a plan file run by its author with ``planrun run FILE``) and
``submitted`` (a plan that came through the bridge or a deployment: written by a model,
untrusted). The policy file (``PLANRUN_POLICY``, else ``policy.yaml`` under the data
directory) gives each level its tools, the executables ``shell.run`` may start, the hosts
network tools may reach, the workspace root and ceilings a plan cannot raise. Without a
file the defaults below apply: ``submitted`` denies loopback, link-local and private
addresses and runs ``shell.run`` only inside the sandbox. A malformed file is an error,
never "allow all".

The trust level of the code running now is a context variable: ``submitted`` unless the
caller that knows better (``planrun run``) says ``local``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Trust(StrEnum):
    """Who wrote the plan: its author on this machine, or a planner (a model)."""

    LOCAL = "local"
    SUBMITTED = "submitted"


class Ceilings(BaseModel):
    """Limits a plan may lower but never raise; None means no ceiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_parallel: int | None = Field(None, ge=1, description="steps of one run at once")
    step_timeout_s: float | None = Field(None, gt=0, description="longest step timeout")
    output_bytes: int | None = Field(None, ge=1, description="largest output of one step")
    memory_mb: int | None = Field(None, ge=1, description="memory of one step")
    cpu_seconds: int | None = Field(None, ge=1, description="CPU time of one shell.run step")
    processes: int | None = Field(None, ge=1, description="processes of one sandboxed step")
    file_mb: int | None = Field(None, ge=1, description="largest file a sandboxed step writes")


class LevelPolicy(BaseModel):
    """What plans of one trust level may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Glob patterns of the tools allowed (``core.*``); None allows every registered tool.
    tools: list[str] | None = None
    #: Executables ``shell.run`` may start (names looked up on PATH, or absolute paths,
    #: glob patterns allowed); None allows any.
    executables: list[str] | None = None
    #: Hosts network tools may reach: ``host``, ``host:port``, ``*.domain``, an address or
    #: a CIDR range; None allows every public host (see ``allow_private``).
    hosts: list[str] | None = None
    #: Whether loopback, link-local and private addresses (and so the Prefect API and the
    #: bridge) may be reached at all. Hosts named in ``hosts`` are still required.
    allow_private: bool = False
    #: ``required``: ``shell.run`` runs only inside the sandbox (an error where it cannot
    #: start); ``if_available``: sandboxed where bubblewrap works, else unconfined with a
    #: warning; ``off``: never sandboxed.
    sandbox: Literal["required", "if_available", "off"] = "required"
    #: Extra paths the sandbox binds read-only (``/opt/tools``); ``path:rw`` binds writable.
    binds: list[str] = Field(default_factory=list)
    #: Whether a sandboxed command may use the network (then only ``hosts``).
    sandbox_network: bool = False
    #: The workspace root; None uses ``PLANRUN_WORKSPACE`` or ``./workspace``.
    workspace_root: str | None = None
    ceilings: Ceilings = Field(default_factory=Ceilings)


LOCAL_DEFAULT = LevelPolicy(allow_private=True, sandbox="if_available")
SUBMITTED_DEFAULT = LevelPolicy()


class Policy(BaseModel):
    """The whole policy file: one section per trust level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: LevelPolicy = LOCAL_DEFAULT
    submitted: LevelPolicy = SUBMITTED_DEFAULT

    def level(self, trust: Trust) -> LevelPolicy:
        """The rules for plans of ``trust``."""
        return self.local if trust == Trust.LOCAL else self.submitted


_TRUST: contextvars.ContextVar[Trust] = contextvars.ContextVar("planrun_trust",
                                                               default=Trust.SUBMITTED)


def current_trust() -> Trust:
    """The trust level of the plan being validated or run here: ``submitted`` by default."""
    return _TRUST.get()


@contextmanager
def trusted_as(trust: Trust) -> Iterator[None]:
    """Run the body at ``trust`` (``planrun run`` uses ``local``)."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)
