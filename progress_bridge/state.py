"""What every route of one bridge app shares, kept on ``app.state.bridge``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

from progress_bridge.hub import Hub
from progress_bridge.metrics import Metrics
from progress_bridge.publisher import Publisher
from progress_bridge.store import MessageStore

if TYPE_CHECKING:
    from progress_bridge.runs import RunView

#: Starts a run of a validated plan (data) with its inputs; returns the run id.
Submit = Callable[[dict[str, Any], dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True)
class Settings:
    """How the bridge treats clients.

    token: the bearer token clients must present; None lets everyone in.
    allowed_origins: browser origins allowed on the WebSocket besides the bridge's own host
        (``"*"`` allows any).
    heartbeat_s: a heartbeat is sent after this many seconds without a message.
    max_frame_bytes: a client frame larger than this closes its connection (1009).
    close_timeout_s: how long closing a connection may wait for a client that does not read.
    """

    token: str | None = None
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    heartbeat_s: float = 15.0
    max_frame_bytes: int = 4096
    close_timeout_s: float = 30.0


@dataclass(frozen=True)
class BridgeState:
    """The store, hub, metrics and settings of one bridge app; ``views`` are the runs the
    upstream follows, by run id; ``submit`` starts runs (None: this bridge cannot)."""

    store: MessageStore
    hub: Hub
    metrics: Metrics
    publisher: Publisher
    settings: Settings
    views: dict[str, RunView] = field(default_factory=dict)
    submit: Submit | None = None


def state_of(conn: HTTPConnection) -> BridgeState:
    """The bridge state of the app serving ``conn``."""
    state: BridgeState = conn.app.state.bridge
    return state
