"""What people ask of a running run from outside: pause, resume, cancel.

Every request is a state of the run's Prefect flow run, so planrun's API, the CLI and the
Prefect UI's own buttons all work the same way:

- **pause**: a ``Paused`` state (``POST /v1/runs/{id}/pause`` sets one; so does the
  Prefect UI's "change state"). Prefect itself ignores a Paused state set from outside; the
  engine watches for it, starts nothing new, lets running steps finish, then suspends the
  flow run (``Suspended``: a pause that holds no process) and its process exits.
- **resume**: Prefect's resume of the suspended run (``POST .../resume``, the UI's Resume
  button) schedules it; a runner starts the flow again in a new process, which restores
  the finished steps from their checkpoints (``flows.checkpoints``) and goes on. A resume
  that arrives before the pause took effect takes the pause back.
- **cancel**: a ``Cancelling`` state; a runner passes it on as SIGTERM, which the engine
  turns into a clean cancel (commands killed, files rolled back), and the engine also
  notices the state itself. A paused run is cancelled by resuming it with the label
  ``planrun.control=cancel``: its new process rolls the files back and ends Cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any
from uuid import UUID

from flows.scheduler import Scheduler

log = logging.getLogger("planrun.control")

POLL_S = 0.5
#: How often a running run says it is alive (``planrun.run.heartbeat``).
HEARTBEAT_S = 5.0
CONTROL_LABEL = "planrun.control"
#: The comment of a decision made because no one answered in time.
TIMED_OUT = "approval timed out"


def approval_key(step_id: str) -> str:
    """The pause key of a step's approval gate: one per step, so a gate asked once is not
    asked again when the run's flow body starts over (and gates in skipped branches never
    take another gate's key)."""
    slug = re.sub(r"[^a-z0-9]+", "-", step_id.lower()).strip("-")[:40]
    digest = hashlib.sha1(step_id.encode()).hexdigest()[:8]  # ids differing only in case
    return f"approval-{slug}-{digest}"  # Prefect's input keys: lowercase, digits, dashes


def approval_input() -> Any:
    """The form a person answers (the Prefect UI renders it from this model)."""
    from prefect.input import RunInput
    from pydantic import Field

    class Approval(RunInput):
        approved: bool = Field(description="true: run the step; false: skip it")
        comment: str = Field(default="", description="why, for the run's report")

    return Approval


class RunControl:
    """Watches one run's flow-run state and tells its scheduler."""

    def __init__(self, run_id: str, scheduler: Scheduler, poll_s: float = POLL_S,
                 beat: Callable[[], None] | None = None) -> None:
        self.run_id = UUID(run_id)
        self.scheduler = scheduler
        self.poll_s = poll_s
        self.beat = beat  # a sign of life every HEARTBEAT_S, for the bridge's crash rule

    async def cancel_requested(self) -> bool:
        """Whether the run was asked to end cancelled while it was paused."""
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            flow_run = await client.read_flow_run(self.run_id)
        return dict(flow_run.labels or {}).get(CONTROL_LABEL) == "cancel"

    async def watch(self) -> None:
        """Poll the flow run's state until cancelled (by the engine, when the run ends)."""
        from prefect.client.orchestration import get_client

        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        async with get_client() as client:
            while True:
                if self.beat is not None and loop.time() - last_beat >= HEARTBEAT_S:
                    self.beat()
                    last_beat = loop.time()
                try:
                    state = (await client.read_flow_run(self.run_id)).state
                except Exception as exc:  # noqa: BLE001 - the API may blink: ask again
                    log.warning("cannot read the state of run %s: %s", self.run_id, exc)
                    state = None
                if state is not None:
                    self._react(state)
                await asyncio.sleep(self.poll_s)

    def _react(self, state: Any) -> None:
        kind = state.type.value
        scheduler = self.scheduler
        if kind == "PAUSED":
            scheduler.pause(state.message or "paused by a person")
        elif kind == "RUNNING" and scheduler.pause_reason is not None and scheduler.gate is None:
            scheduler.unpause()  # a person's pause taken back (a gate waits for its answer)
        elif kind in ("CANCELLING", "CANCELLED"):
            scheduler.stop("cancelled by a person", cancelled=True)

    async def suspend(self, key: str, message: str, timeout_s: float | None = None) -> Any:
        """Make the paused flow run a suspended one (no process; a resume reschedules it)
        and return the state, for the flow to raise ``Pause`` with."""
        from prefect.client.orchestration import get_client
        from prefect.states import Suspended

        state: Any = Suspended(timeout_seconds=None if timeout_s is None else round(timeout_s),
                               pause_key=key, message=message)
        async with get_client() as client:
            result = await client.set_flow_run_state(self.run_id, state, force=True)
        return result.state

    async def decision(self, step_id: str) -> tuple[bool, str] | None:
        """The answer given at the step's gate, or None while there is none."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
        from prefect.input.run_input import keyset_from_base_key

        keys = keyset_from_base_key(f"suspended-{approval_key(step_id)}")
        async with get_client() as client:
            try:
                raw = await client.read_flow_run_input(self.run_id, keys["response"])
            except ObjectNotFound:
                return None
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code == 404:  # not answered (not asked) yet
                    return None
                raise
        data = json.loads(raw)
        return bool(data.get("approved")), str(data.get("comment") or "")

    async def ask(self, step_id: str, prompt: str) -> None:
        """Suspend the run at the step's gate, with a form for the answer; raises
        ``Pause`` (the process ends; an answer resumes the run in a new one)."""
        from prefect.flow_runs import asuspend_flow_run

        form = approval_input().with_initial_data(description=prompt, approved=False)
        await asuspend_flow_run(wait_for_input=form, key=approval_key(step_id))
        raise RuntimeError(f"the gate of {step_id} was answered while it was being asked")

