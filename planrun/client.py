"""Talking to a running stack (``planrun up``): ``submit``, ``status`` and ``watch``.

The bridge is at ``PLANRUN_BRIDGE_URL`` (default ``http://127.0.0.1:8765``); its bearer
token comes from ``PLANRUN_TOKEN``, else from the token file ``planrun up`` made
(:mod:`planrun.bridge_token`), so no flag is needed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import ValidationError

from planrun import bridge_token
from planrun.contract.estimate import Estimate
from planrun.contract.records import Resources
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.stream import Message, MessageType
from planrun.contract.times import epoch
from planrun.durations import format_duration
from planrun.errors import PlanrunError, step_error
from planrun.report import RunObserver, RunRecord, StepRecord

DEFAULT_URL = "http://127.0.0.1:8765"
POLICY_VIOLATION = 1008  # the bridge's close code for a wrong token, host or origin


def bridge_url() -> str:
    return os.environ.get("PLANRUN_BRIDGE_URL", DEFAULT_URL).rstrip("/")


def _headers() -> dict[str, str]:
    token = bridge_token.for_client()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request(method: str, path: str, **kwargs: Any) -> httpx.Response:
    url = bridge_url()
    try:
        return httpx.request(method, f"{url}{path}", headers=_headers(), timeout=30.0,
                             **kwargs)
    except httpx.HTTPError as exc:
        raise PlanrunError(f"no planrun stack answers at {url} ({exc}): start one with "
                           "`planrun up`, or set PLANRUN_BRIDGE_URL") from None


def _refused(response: httpx.Response) -> PlanrunError:
    if response.status_code == 401:
        return _token_refused()
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    detail = body.get("detail") if isinstance(body, dict) else body
    lines = [str(e.get("text") or e.get("message")) for e in body.get("errors", [])] \
        if isinstance(body, dict) else []
    return PlanrunError("\n".join([f"the bridge answered {response.status_code}: {detail}",
                                   *lines]))


def _token_refused() -> PlanrunError:
    given = ("PLANRUN_TOKEN is not its token" if bridge_token.explicit() else
             f"{bridge_token.path()} does not hold its token")
    return PlanrunError(f"the bridge at {bridge_url()} refused the token ({given}): set "
                        "PLANRUN_TOKEN to the token `planrun up` printed, or use the "
                        "PLANRUN_HOME of that `planrun up`")


def submit(plan_text: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Submit a plan (YAML text) with typed inputs; the bridge's answer (``run_id``...)."""
    response = _request("POST", "/v1/runs", json={"plan": plan_text, "inputs": inputs})
    if response.status_code != 201:
        raise _refused(response)
    answer: dict[str, Any] = response.json()
    return answer


def status(run_id: str) -> dict[str, Any]:
    """The run's report with progress and estimate."""
    response = _request("GET", f"/v1/runs/{run_id}")
    if response.status_code != 200:
        raise _refused(response)
    report: dict[str, Any] = response.json()
    return report


def control(run_id: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask the bridge to pause, resume or cancel a run (or answer a gate: ``run_id`` is
    then ``RUN/steps/STEP``); its answer."""
    response = _request("POST", f"/v1/runs/{run_id}/{action}", json=body)
    if response.status_code != 202:
        raise _refused(response)
    answer: dict[str, Any] = response.json()
    return answer


async def answer_gate(run_id: str, step_id: str, approved: bool, comment: str) -> bool:
    """Answer the step's gate through the bridge, as ``planrun approve`` does; False when
    the run does not wait there (any more): it was answered elsewhere first."""
    verb = "approve" if approved else "reject"
    response = await asyncio.to_thread(_request, "POST", f"/v1/runs/{run_id}/steps/{step_id}/"
                                       f"{verb}", json={"comment": comment})
    if response.status_code == 409:
        return False
    if response.status_code != 202:
        raise _refused(response)
    return True


def resources_text(resources: Resources | None) -> str:
    """What a finished step used, compactly: ``42 MiB peak · 0.3 s CPU · 12 KiB written``
    (docs/resources.md); empty when nothing was measured."""
    if resources is None:
        return ""
    parts = []
    if resources.peak_memory_bytes:
        parts.append(f"{_bytes(resources.peak_memory_bytes)} peak")
    parts.append(f"{resources.cpu_s:.1f} s CPU")
    if resources.written_bytes:
        parts.append(f"{_bytes(resources.written_bytes)} written")
    return " · ".join(parts)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate_text(estimate: Estimate | None, ended: bool) -> str:
    """"about 12s left (9s–18s)", or how much earlier than first estimated a run ended;
    while the run waits for a person, since when (local time) and the work left after."""
    if estimate is None:
        return ""
    early = estimate.early_by_s
    if ended:
        return f"finished {format_duration(early)} earlier than first estimated" if early else ""
    text = (f"about {format_duration(estimate.remaining_s)} left "
            f"({format_duration(estimate.low_s)}–{format_duration(estimate.high_s)})")
    since = epoch(estimate.waiting_since)
    if since is not None:
        return f"waiting since {time.strftime('%H:%M:%S', time.localtime(since))}; then {text}"
    return text + (f", {format_duration(early)} ahead of the first estimate" if early else "")


class RemoteRun:
    """A run record rebuilt from the bridge's messages, for the terminal displays. An end
    at or before seq ``after_end`` is not the end (a retry goes on after it)."""

    def __init__(self, run_id: str, plan: str = "", after_end: int = 0) -> None:
        self.record = RunRecord(run_id=run_id, plan=plan, steps={})
        self.last_seq = 0
        self.after_end = after_end
        self.estimate: Estimate | None = None

    def apply_frame(self, frame: str | bytes) -> StepRecord | None:
        """Apply one frame of the stream; one this client cannot read (a message type of
        a newer bridge) changes nothing."""
        try:
            message = Message.model_validate_json(frame)
        except ValidationError:
            return None
        return self.apply(message)

    def apply(self, message: Message) -> StepRecord | None:
        """Apply one message; the step it changed, if any."""
        kind, run = message.type, self.record
        if kind == MessageType.HEARTBEAT or message.seq <= self.last_seq:
            return None
        self.last_seq = message.seq
        self.estimate = message.estimate or self.estimate
        when = epoch(message.ts)
        if kind == MessageType.RUN_STARTED:
            run.status, run.started_at = RunStatus.RUNNING, when
            run.plan = message.summary or run.plan  # run.started names the plan
            run.steps = {s.id: StepRecord(id=s.id, tool=s.tool, name=s.name, needs=list(s.needs),
                                          critical=s.critical)
                         for s in message.plan or ()}
        elif kind.ends_run:
            run.status, run.ended_at = RunStatus(kind.removeprefix("run.")), when
            run.reason = message.summary
        elif kind in (MessageType.RUN_PAUSED, MessageType.RUN_RESUMED,
                      MessageType.RUN_AWAITING_APPROVAL):
            run.status = RunStatus(message.status or "running")
            run.reason = message.summary
        step = run.steps.get(message.step_id or "")
        if step is None or message.status is None:
            return None
        return _apply_to_step(step, message, StepStatus(message.status), when)

    @property
    def ended(self) -> bool:
        return self.record.status.ended and self.last_seq > self.after_end


def _apply_to_step(step: StepRecord, message: Message, status: StepStatus,
                   when: float | None) -> StepRecord:
    step.status = status
    step.note = message.note if message.type == MessageType.STEP_WAITING else None
    if message.type == MessageType.STEP_WAITING:  # only the note changes: why it waits
        return step
    step.attempts = message.attempt or step.attempts
    if step.status in (StepStatus.RUNNING, StepStatus.RETRYING) and step.started_at is None:
        step.started_at = when
    if step.status.finished:
        step.ended_at = when
        if message.duration_s is not None and when is not None:
            step.started_at = when - message.duration_s
        step.resources = message.resources or step.resources
    error = message.error
    step.error = step_error(error.category, error.message, hint=error.hint) if error else None
    step.reason = message.summary if step.status in (
        StepStatus.SKIPPED, StepStatus.CANCELLED) else None
    return step


async def watch(run_id: str, observer: RunObserver, *, plan: str = "",
                give_up_s: float = 30.0,
                on_start: Callable[[RemoteRun], object] | None = None,
                after_end: int = 0) -> RunRecord:
    """Follow the run over the bridge's WebSocket until it ends (past seq ``after_end``:
    a retried run's earlier end is not its end), telling ``observer`` of every change;
    reconnects with ``after`` (nothing missed, nothing twice)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException

    remote = RemoteRun(run_id, plan, after_end)
    if on_start is not None:
        on_start(remote)
    base = bridge_url().replace("http", "ws", 1)
    delay, down_since = 0.2, None
    while not remote.ended:
        url = f"{base}/v1/runs/{run_id}/ws?after={remote.last_seq}"
        try:
            async with connect(url, additional_headers=_headers(), proxy=None) as socket:
                down_since, delay = None, 0.2
                async for frame in socket:
                    before = (remote.record.status, remote.last_seq)
                    step = remote.apply_frame(frame)
                    if step is not None or remote.record.status != before[0]:
                        observer.changed(remote.record, step)  # not for progress ticks
                    if remote.ended:
                        break
        except InvalidStatus as exc:
            raise PlanrunError(f"the bridge refused to stream run {run_id}: "
                               f"{exc.response.status_code}") from None
        except (OSError, WebSocketException) as exc:
            _raise_if_refused(exc, run_id)
            down_since = down_since or asyncio.get_running_loop().time()
            if asyncio.get_running_loop().time() - down_since > give_up_s:
                raise PlanrunError(f"lost the bridge at {bridge_url()} for {give_up_s:.0f}s: "
                                   f"{exc}") from None
        if not remote.ended:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    return remote.record


def _raise_if_refused(exc: Exception, run_id: str) -> None:
    """A socket the bridge closed for a wrong token, host or origin: trying again will
    not help, so say why now."""
    from websockets.exceptions import ConnectionClosed

    closed = exc.rcvd if isinstance(exc, ConnectionClosed) else None
    if closed is not None and closed.code == POLICY_VIOLATION:
        raise (_token_refused() if "token" in closed.reason else PlanrunError(
            f"the bridge refused to stream run {run_id}: {closed.reason}")) from None
