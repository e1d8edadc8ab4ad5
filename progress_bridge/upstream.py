"""The bridge's one upstream: Prefect's event stream, reconciled from its REST API.

One subscription receives planrun's own events (``planrun.*``, see ``flows.events``) and
Prefect's flow-run state events; each event becomes messages through the run's
:class:`~progress_bridge.runs.RunView` and is committed with the view and the event's id in
one transaction (``MessageStore.commit``), so it is applied exactly once, across
reconnects and restarts.

Prefect's stream can lose events: its server drops events for a subscriber whose queue is
full, backfills only the last minute on connect, and an event still waiting in the
server's persister (up to ``flush_interval``, 5 s) is neither in the backfill nor, for a
subscriber that was away when it passed, in the live stream. So after every (re)connect
the upstream reads the events since its cursor (the newest event it committed, minus a
margin) from ``POST /events/filter``, page by page, and again once the persister has
flushed. Events already seen are skipped; an event older than what a step already shows
is dropped by the view.

A run whose process dies cannot announce its end: when its flow run ends (Crashed,
Cancelled...) without planrun's end event, the view ends it after a short grace; a crashed
run is first scheduled again (``recover_attempts`` times), and goes on from its checkpoints.
While a step runs, a ``progress`` message with a fresh estimate goes out every
``tick_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from flows.control import TIMED_OUT
from flows.events import SEGMENT
from planrun.report import RunStatus, iso
from progress_bridge import messages as m
from progress_bridge.estimate import durations_from
from progress_bridge.history import step_history
from progress_bridge.runs import ESTIMATE_EVERY_S, RunView
from progress_bridge.state import BridgeState
from progress_bridge.store import StoreError

if TYPE_CHECKING:
    from prefect.events import Event
    from prefect.events.filters import EventFilter

log = logging.getLogger("planrun.bridge")

RUN_PREFIX = "planrun.run."
STEP_PREFIX = "planrun.step."
FLOW_RUN_PREFIX = "prefect.flow-run."
PLANRUN_TAG = "prefect.tag.planrun"
HEARTBEAT = "planrun.run.heartbeat"
PAGE = 50  # POST /events/filter answers at most 50 events a page
TURN = 16  # events handled between two turns given to the senders


@dataclass(frozen=True)
class UpstreamSettings:
    """lookback_s: how far back a bridge with no cursor yet reads (its first start).
    margin_s: how far before its cursor a reconnect reads again (late and skewed events).
    settle_s: when to reconcile a second time after a connect (Prefect's persister flush).
    tick_s: the longest gap between messages while a step runs.
    grace_s: how long a run's end from Prefect waits for planrun's own end event.
    history: read past step durations from Prefect for the estimates.
    recover_attempts: how many times a run whose process crashed is started again
        (``PLANRUN_RECOVER_ATTEMPTS``); after that, a crash ends it failed.
    dead_after_s: a running run silent this long (no heartbeat, ``PLANRUN_DEAD_AFTER_S``)
        is marked crashed; generous, as a run marked crashed while alive would run twice.
    """

    lookback_s: float = 3600.0
    margin_s: float = 300.0
    settle_s: float = 6.0
    tick_s: float = 2.0
    grace_s: float = 2.0
    retry_s: float = 0.5
    history: bool = True
    recover_attempts: int = 2
    dead_after_s: float = 60.0


class PrefectUpstream:
    """Call it with the app's :class:`BridgeState`; it runs until cancelled."""

    def __init__(self, settings: UpstreamSettings | None = None) -> None:
        self.settings = settings or UpstreamSettings()
        self.connected = asyncio.Event()
        self.connects = 0
        self._history: dict[str, asyncio.Task[None]] = {}
        self._later: set[asyncio.Task[Any]] = set()
        self._last_n: dict[str, int] = {}
        self._last_sent: dict[str, float] = {}
        self._alive: dict[str, float] = {}  # the last sign of life of each run (epoch s)
        self._recheck: asyncio.Task[Any] | None = None

    async def __call__(self, state: BridgeState) -> None:
        self.state = state
        for run_id, text in state.store.run_states().items():
            state.views[run_id] = view = RunView.from_json(text)
            if view.gate is not None and not view.ended:
                self._watch_gate(run_id, view)  # a deadline set before a restart
            if view.pause_deadline is not None and not view.ended:
                self._watch_pause(run_id, view)
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self._follow()
        finally:
            # Wait for the background jobs to end: none may outlive the bridge's loop.
            jobs = [ticker, *self._later, *self._history.values()]
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    # The stream --------------------------------------------------------------------------

    async def _follow(self) -> None:
        from prefect.events.clients import get_events_subscriber

        delay = self.settings.retry_s
        while True:
            try:
                # No reconnects inside Prefect's client: every reconnect must reconcile.
                async with get_events_subscriber(filter=_live_filter(),
                                                 reconnection_attempts=0) as events:
                    self.connects += 1
                    await self.reconcile()
                    self._soon(self.settings.settle_s, self.reconcile)
                    self.connected.set()
                    delay = self.settings.retry_s
                    async for count, event in _numbered(events):
                        self.handle(event)
                        # Reading a buffered event does not wait: give the senders a turn
                        # now and then, and never stop reading for long (Prefect drops what
                        # overflows). After every event it was a lockstep with 1,000
                        # senders: fan-out fell from ≈ 40k to ≈ 10k deliveries/s.
                        if count % TURN == 0:
                            await asyncio.sleep(0)
                    log.warning("Prefect closed the event stream; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: log, wait, reconnect
                log.warning("the Prefect event stream failed (%s: %s); reconnecting in %.1fs",
                            type(exc).__name__, exc, delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def reconcile(self) -> int:
        """Apply every event since the cursor (minus the margin) from Prefect's REST API;
        returns how many were new."""
        from prefect.client.orchestration import get_client

        cursor = self.state.store.cursor
        now = time.time()
        since = (cursor - self.settings.margin_s if cursor is not None
                 else now - self.settings.lookback_s)
        new = 0
        async with get_client() as client:
            page = await client.read_events(filter=_query_filter(since), limit=PAGE)
            while True:
                for event in page.events:
                    new += self.handle(event)
                if not page.next_page or not page.events:
                    break
                page = await client.read_events_page(str(page.next_page))
        if new:
            log.info("reconciled %d event(s) from Prefect's API", new)
        return new

    def handle(self, event: Event) -> bool:
        """Apply one Prefect event; False when it was seen before or is not planrun's."""
        store = self.state.store
        event_id = str(event.id)
        if store.seen(event_id):
            return False
        name = event.event
        if name.startswith(FLOW_RUN_PREFIX):
            self._flow_run_event(event)
            return False
        resource_id = event.resource.id
        if not resource_id.startswith(RUN_PREFIX):
            return False
        run_id = resource_id.removeprefix(RUN_PREFIX)
        payload = event.payload
        occurred = event.occurred.timestamp()
        self._alive[run_id] = max(self._alive.get(run_id, 0.0), occurred)
        if name == HEARTBEAT:
            return False  # a sign of life only
        self._check_gap(run_id, payload)
        view = self.state.views.get(run_id)
        drafts: list[m.Draft] = []
        if name == "planrun.run.started":
            if view is None or view.pending:
                view, drafts = RunView.started(run_id, payload)
                self._fetch_history(view)
        elif view is None:
            return False  # a run seen before its start: the start is reconciled first
        elif name.startswith(STEP_PREFIX):
            drafts = view.step_event(payload)
            self._observe_step(view, payload)
        elif name == "planrun.run.paused":
            drafts = view.paused(payload)
            self._watch_pause(run_id, view)
        elif name == "planrun.run.resumed":
            drafts = view.resumed(payload)
        elif name == "planrun.run.awaiting_approval":
            drafts = view.awaiting_approval(payload)
            self._watch_gate(run_id, view)
        elif name.startswith(RUN_PREFIX):
            drafts = view.run_ended(payload)
        stamp = iso(occurred) or m.now_iso()  # a message is dated when its change happened
        self._commit(run_id, view, [replace(d, ts=stamp) for d in drafts], event_id=event_id,
                     occurred=occurred)
        return True

    # Runs Prefect ended ---------------------------------------------------------------

    def _flow_run_event(self, event: Event) -> None:
        run_id = event.resource.id.removeprefix(FLOW_RUN_PREFIX)
        state = event.payload.get("validated_state") or {}
        kind = str(state.get("type") or "")
        if kind not in ("CRASHED", "FAILED", "CANCELLED", "COMPLETED"):
            return
        if not any(r.id == PLANRUN_TAG for r in event.related):
            return
        view = self.state.views.get(run_id)
        if view is not None and view.ended:
            return
        message = state.get("message")
        # Seen from now on: a reconciliation must not act on it a second time.
        self.state.store.commit(run_id, [], None, event_id=str(event.id),
                                occurred=event.occurred.timestamp())
        self._soon(self.settings.grace_s, lambda: self._flow_run_ended(run_id, kind, message))

    async def _flow_run_ended(self, run_id: str, kind: str, message: str | None) -> None:
        view = self.state.views.get(run_id)
        if view is None or not view.ended:
            # planrun's end event should have come first: it was lost, or the process
            # died. Read what Prefect has once its persister has flushed, then decide.
            await asyncio.sleep(max(0.0, self.settings.settle_s - self.settings.grace_s))
            await self.reconcile()
            view = self.state.views.get(run_id)
            if view is not None and view.ended:
                return
        if view is None:  # it ended before its engine announced it (an invalid plan...)
            view = RunView.unstarted(run_id)
        if kind == "CRASHED" and view.recoveries < self.settings.recover_attempts:
            await self._recover(run_id, view, message)
            return
        self._commit(run_id, view, view.flow_run_ended(kind, message))

    async def _recover(self, run_id: str, view: RunView, message: str | None) -> None:
        """Schedule a crashed run again: a runner starts it in a new process, which keeps
        the steps that had finished (their checkpoints) and runs again only the steps that
        were in flight. It announces itself with ``run.resumed``."""
        from prefect.client.orchestration import get_client
        from prefect.states import Scheduled

        view.recoveries += 1
        self._commit(run_id, view, [])
        log.warning("run %s crashed (%s); recovering it (%d of %d)", run_id, message,
                    view.recoveries, self.settings.recover_attempts)
        async with get_client() as client:
            await client.set_flow_run_state(
                run_id, Scheduled(message=f"recovering after a crash: {message or 'no reason'}"),
                force=True)

    # Runs that stopped saying they are alive ------------------------------------------

    def _check_alive(self, run_id: str, view: RunView) -> None:
        """A running run sends a heartbeat every few seconds; one silent for
        ``dead_after_s`` lost its process with its host (or everything was killed at once,
        Prefect's server included): it is marked Crashed, and so recovered. So is a run a
        runner took (Pending) but did not start in that time."""
        if view.record.status not in (RunStatus.RUNNING, RunStatus.PENDING):
            return  # a paused run, or one waiting at a gate, holds no process
        last = self._alive.setdefault(run_id, time.time())  # first seen now: give it time
        if time.time() - last < self.settings.dead_after_s:
            return
        self._alive[run_id] = time.time()  # once per silence
        self._soon(0, lambda: self._declare_crashed(run_id, time.time() - last))

    async def _declare_crashed(self, run_id: str, silent_s: float) -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        async with get_client() as client:
            flow_run = await client.read_flow_run(run_id)  # type: ignore[arg-type]
            # Running without a sign of life, or Pending (a runner took it and died
            # starting it) that long. Scheduled is fine: it waits for a runner.
            if flow_run.state is None or flow_run.state.type.value not in ("RUNNING",
                                                                            "PENDING"):
                return
            log.warning("run %s has not been heard of for %.0fs: marking it crashed",
                        run_id, silent_s)
            await client.set_flow_run_state(
                flow_run.id, Crashed(message=f"no sign of life for {silent_s:.0f}s"),
                force=True)

    # Pause and approval deadlines ---------------------------------------------------

    def _watch_pause(self, run_id: str, view: RunView) -> None:
        if view.pause_deadline is None:
            return
        wait = max(0.0, float(view.pause_deadline["deadline"]) - time.time())
        self._soon(wait, lambda: self._pause_timed_out(run_id))

    async def _pause_timed_out(self, run_id: str) -> None:
        """``limits.pause_timeout`` passed: the run is cancelled, or resumed
        (``on_pause_timeout``)."""
        from fastapi import HTTPException

        from progress_bridge.control import cancel, resume

        view = self.state.views.get(run_id)
        if view is None or view.pause_deadline is None or view.record.status != RunStatus.PAUSED:
            return
        if time.time() < float(view.pause_deadline["deadline"]):
            return  # paused again since, with a later deadline
        action = view.pause_deadline["action"]
        log.info("run %s: the pause timed out; %s", run_id, action)
        try:
            await (resume(run_id) if action == "resume" else cancel(run_id))
        except HTTPException as exc:
            log.info("run %s: no %s after the pause timed out: %s", run_id, action, exc.detail)


    def _watch_gate(self, run_id: str, view: RunView) -> None:
        gate = view.gate or {}
        if gate.get("deadline") is None:
            return
        step_id = str(gate["step_id"])
        wait = max(0.0, float(gate["deadline"]) - time.time())
        self._soon(wait, lambda: self._time_out(run_id, step_id))

    async def _time_out(self, run_id: str, step_id: str) -> None:
        """No answer in time: the gate is answered "no", and the step is skipped."""
        from progress_bridge.control import answer_gate

        view = self.state.views.get(run_id)
        if view is None or view.ended or (view.gate or {}).get("step_id") != step_id:
            return
        log.info("run %s: no answer at the gate of %s in time", run_id, step_id)
        await answer_gate(run_id, step_id, approved=False, comment=TIMED_OUT)

    # Estimates -----------------------------------------------------------------------

    async def _tick(self) -> None:
        """A ``progress`` message for a run that has had none for ``tick_s`` while a step
        runs, or whose last message reused an earlier estimate (estimates are computed at
        most every ``ESTIMATE_EVERY_S``, so a burst of changes gets a fresh one after it)."""
        step = min(self.settings.tick_s, ESTIMATE_EVERY_S)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for run_id, view in list(self.state.views.items()):
                if view.ended:
                    continue
                self._check_alive(run_id, view)
                quiet = now - self._last_sent.get(run_id, now) >= self.settings.tick_s
                if view.estimate_stale or (view.running and quiet):
                    self._commit(run_id, view, view.tick(), save=False)

    def _fetch_history(self, view: RunView) -> None:
        if not self.settings.history or view.record.plan in self._history:
            return
        self._history[view.record.plan] = asyncio.ensure_future(self._read_history(view))

    async def _read_history(self, view: RunView) -> None:
        from prefect.client.orchestration import get_client

        await asyncio.sleep(0)  # after the event (or reconciled page) that started the run
        plan = view.record.plan
        if view.ended:  # a run seen only in hindsight needs no estimate
            self._history.pop(plan, None)
            return
        tools = {sid: s.tool for sid, s in view.record.steps.items()}
        try:
            async with get_client() as client:
                durations = durations_from(await step_history(client, plan, tools))
        except Exception as exc:  # noqa: BLE001 - estimates fall back to first estimates
            log.warning("no step history for plan %s: %s", plan, exc)
            durations = {}
        for other in self.state.views.values():
            if other.record.plan == plan:
                other.durations = durations
        # Read again for the plan's next run: this run adds to the history.
        self._soon(60.0, lambda: self._forget_history(plan))

    async def _forget_history(self, plan: str) -> None:
        self._history.pop(plan, None)

    # Committing ----------------------------------------------------------------------

    def _commit(self, run_id: str, view: RunView, drafts: list[m.Draft], *,
                save: bool = True, event_id: str | None = None,
                occurred: float | None = None) -> None:
        state = self.state
        try:
            sent = state.store.commit(run_id, drafts, view.to_json() if save else None,
                                      event_id=event_id, occurred=occurred)
        except StoreError as exc:
            log.error("cannot store the messages of run %s: %s", run_id, exc)
            return
        state.views[run_id] = view
        if sent:
            self._last_sent[run_id] = time.monotonic()
        for message in sent:
            state.hub.publish(message)
            state.metrics.observe(message)

    def _observe_step(self, view: RunView, payload: Mapping[str, Any]) -> None:
        step = view.record.steps.get(str(payload.get("step_id")))
        duration = payload.get("duration_s")
        if step is not None and payload.get("status") == "completed" and duration is not None:
            self.state.metrics.observe_step_duration(step.tool, float(duration))

    def _check_gap(self, run_id: str, payload: Mapping[str, Any]) -> None:
        """A run's events carry n = 1, 2, 3...: a jump means Prefect dropped some while we
        were connected (a full subscriber queue), so read them back from its API."""
        n = payload.get("n")
        if not isinstance(n, int):
            return
        last = self._last_n.get(run_id)
        if last is None or n > last:
            self._last_n[run_id] = n
        same_process = last is not None and n // SEGMENT == last // SEGMENT
        if same_process and last is not None and n > last + 1 and self._recheck is None:
            log.warning("events %d..%d of run %s are missing; reconciling", last + 1, n - 1,
                        run_id)
            self._recheck = self._soon(self.settings.settle_s, self._gap_reconcile)

    async def _gap_reconcile(self) -> None:
        try:
            await self.reconcile()
        finally:
            self._recheck = None

    def _soon(self, delay: float, job: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        async def later() -> None:
            await asyncio.sleep(delay)
            await job()

        task = asyncio.get_running_loop().create_task(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        task.add_done_callback(_log_failure)
        return task


async def _numbered(events: Any) -> AsyncIterator[tuple[int, Event]]:
    count = 0
    async for event in events:
        count += 1
        yield count, event


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background job of the upstream failed: %s", task.exception())


def _names() -> Any:
    from prefect.events.filters import EventNameFilter

    return EventNameFilter(prefix=["planrun.", FLOW_RUN_PREFIX],
                           exclude_name=["prefect.flow-run.heartbeat"])


def _live_filter() -> EventFilter:
    from prefect.events.filters import EventFilter

    return EventFilter(event=_names())


def _query_filter(since: float) -> EventFilter:
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventOrder

    window = {"since": datetime.fromtimestamp(since, UTC).isoformat(),
              "until": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
    return EventFilter(event=_names(), order=EventOrder.ASC,
                       occurred=EventOccurredFilter.model_validate(window))


async def wait_connected(upstream: PrefectUpstream, timeout: float) -> None:
    """Wait until ``upstream`` is subscribed and reconciled (for start-up and tests)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(upstream.connected.wait(), timeout)
