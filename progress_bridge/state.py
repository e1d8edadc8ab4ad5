"""What every route of one bridge app shares, kept on ``app.state.bridge``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

from planrun.loader import MAX_PLAN_BYTES
from planrun.progress_bridge.admission import Admission
from planrun.progress_bridge.breakers import BreakerBoard
from planrun.progress_bridge.hub import Hub
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.ratelimit import DEFAULT_BURST, DEFAULT_PER_S
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.store import MessageStore

if TYPE_CHECKING:
    from planrun.progress_bridge.runs import RunView

#: Starts a run of a validated plan (data) with its inputs; returns the run id.
Submit = Callable[[dict[str, Any], dict[str, Any]], Awaitable[str]]


#: How a run id looks (a Prefect flow run id): only such ids are looked up in Prefect.
RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Recall:
    """Brings a run the bridge has not followed from Prefect's history, for a client who
    asks for it; the upstream sets :attr:`read` as it starts (none: nothing to read)."""

    def __init__(self) -> None:
        self.read: Callable[[str], Awaitable[None]] | None = None

    async def __call__(self, views: dict[str, RunView], run_id: str) -> None:
        if self.read is not None and run_id not in views and RUN_ID.fullmatch(run_id):
            await self.read(run_id)


@dataclass(frozen=True)
class Settings:
    """How the bridge treats clients (docs/http-api.md, "Authentication and origins").

    token: the bearer token every route but ``GET /healthz`` requires.
    allowed_hosts: ``Host`` values accepted besides loopback at the bridge's port
        (``name`` for the bridge's port, ``name:port`` for that port only).
    allowed_origins: browser origins accepted besides the bridge's own.
    rate_per_s, rate_burst: requests a second per client address, and bursts above it
        (``rate_per_s <= 0``: no limit).
    max_body_bytes: a request body larger than this is refused (413) while it is read.
    heartbeat_s: a heartbeat is sent after this many seconds without a message.
    max_frame_bytes: a client frame larger than this closes its connection (1009).
    close_timeout_s: how long closing a connection may wait for a client that does not read.
    """

    token: str
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    rate_per_s: float = DEFAULT_PER_S
    rate_burst: int = DEFAULT_BURST
    max_body_bytes: int = MAX_PLAN_BYTES
    heartbeat_s: float = 15.0
    max_frame_bytes: int = 4096
    close_timeout_s: float = 30.0


@dataclass(frozen=True)
class BridgeState:
    """The store, hub, metrics and settings of one bridge app; ``control`` pauses, resumes,
    cancels and answers runs; ``views`` are the runs the upstream follows, by run id;
    ``submit`` starts runs (None: this bridge cannot); ``admission`` says when it must
    wait; ``breakers`` is what the bridge knows of the tools' circuit breakers;
    ``recall`` reads a run it does not know from Prefect (:meth:`known`)."""

    store: MessageStore
    hub: Hub
    metrics: Metrics
    control: ControlService
    settings: Settings
    views: dict[str, RunView] = field(default_factory=dict)
    submit: Submit | None = None
    admission: Admission = field(default_factory=Admission)
    breakers: BreakerBoard = field(default_factory=BreakerBoard)
    recall: Recall = field(default_factory=Recall)

    async def known(self, run_id: str) -> None:
        """Before serving ``run_id``: if the bridge has not followed it (it ended before the
        bridge's first start), read it from Prefect's history first, if it is there."""
        await self.recall(self.views, run_id)

    def queued(self) -> int:
        """Runs submitted here whose engine has not announced them yet."""
        return sum(1 for view in self.views.values() if view.pending)


def state_of(conn: HTTPConnection) -> BridgeState:
    """The bridge state of the app serving ``conn``."""
    state: BridgeState = conn.app.state.bridge
    return state
