"""The bridge's one upstream: events from a source, applied to run views, committed.

Each event from the :class:`~progress_bridge.source.EventSource` is applied to its run's
view by the pure :func:`~progress_bridge.apply.apply`, and the new view, its messages and
the event's id are committed in one transaction (:class:`~progress_bridge.commit.Committer`),
so it is applied exactly once across reconnects and restarts; a failed commit leaves the
old view, and the event counts as new when it comes again.

A run whose process dies cannot announce its end: when its flow run ends (Crashed,
Cancelled...) without planrun's end event, the view ends it after a short grace; a crashed
run is first scheduled again (``recover_attempts`` times), and goes on from its
checkpoints. While a step runs, a ``progress`` message with a fresh estimate goes out
every ``tick_s``. Deadlines (a pause, a gate, a silent run) act through the control
service (``progress_bridge.timers``).

A breaker's change (``planrun.tool.circuit_*``) is about a tool, not a run: it goes to every
active run whose plan uses the tool, one commit per run, and each run's view records what
it was told, so a change that comes again tells no run twice; a run that starts while a
breaker of its tools is open is told in the commit of its ``run.started``
(``progress_bridge.breakers``).

A run the bridge has not followed (it ended before the bridge's first start, or one of its
events comes before the bridge saw it start) is read whole from Prefect when a client asks
for it or when such an event comes (:meth:`Upstream.recall`; docs/architecture.md, "The
bridge's first start"). A run that crashed longer than ``lookback_s`` ago is not recovered
when the bridge learns of it so late: it is ended as Prefect ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

from planrun.contract.events import HEARTBEAT, Heartbeat, RunResumed, RunStarted, StepChanged
from planrun.contract.status import StepStatus
from planrun.progress_bridge.apply import (
    BreakerChanged,
    FlowRunEnded,
    RunEvent,
    apply,
    breaker_changed,
    end_by_flow_run,
    tick,
    told_of_breakers,
)
from planrun.progress_bridge.commit import Committer
from planrun.progress_bridge.history import HistoryReader
from planrun.progress_bridge.prefect_source import PrefectEventSource
from planrun.progress_bridge.runs import ESTIMATE_EVERY_S, RunView
from planrun.progress_bridge.source import EventSource, Incoming
from planrun.progress_bridge.state import BridgeState
from planrun.progress_bridge.store import StoreError
from planrun.progress_bridge.timers import Deadlines, Later
from planrun.progress_bridge.upstream_settings import UpstreamSettings

log = logging.getLogger("planrun.bridge")

#: A run read from Prefect lately (found or not) is not read again for this long.
RECALL_AGAIN_S = 30.0
#: How long a client's request waits for its run to be read from Prefect.
RECALL_WAIT_S = 15.0
#: How often the events of a run whose flow run completed before its own end came are
#: read again.
LATE_END_POLL_S = 3.0

__all__ = ["PrefectUpstream", "Upstream", "UpstreamSettings", "wait_connected"]


class Upstream:
    """Call it with the app's :class:`BridgeState`; it follows ``source`` until cancelled."""

    def __init__(self, source: EventSource, settings: UpstreamSettings | None = None,
                 later: Later | None = None) -> None:
        self.source = source
        self.settings = settings or UpstreamSettings()
        self.later = later or Later()
        self._recalls: dict[str, asyncio.Task[Any]] = {}  # runs being read, by run id
        self._recalled: dict[str, float] = {}  # when each run was read last (monotonic s)
        self._held: dict[str, list[RunEvent]] = {}  # events that came while their run was read

    @property
    def connected(self) -> asyncio.Event:
        return self.source.connected

    async def __call__(self, state: BridgeState) -> None:
        self.state = state
        self.committer = Committer(state)
        self.deadlines = Deadlines(state.views, state.control, self.later,
                                   self.settings.dead_after_s, recall=self.source.recall,
                                   quiet_s=self.settings.quiet_s)
        self.history = HistoryReader(state.views, self.later, enabled=self.settings.history)
        state.recall.read = self.recall
        for run_id, text in state.store.run_states().items():
            state.views[run_id] = view = RunView.from_json(text)
            self.deadlines.restored(run_id, view)  # deadlines set before a restart
        await self.source.prepare()  # the views are in: the routes can answer meanwhile
        self.later.soon(0.0, self._load_breakers)
        ticker = asyncio.ensure_future(self._tick() if self.settings.ticks
                                       else asyncio.Event().wait())
        try:
            await self.source.follow(self.handle, lambda: state.store.cursor)
        finally:
            # Wait for the background jobs to end: none may outlive the bridge's loop.
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await self.later.close()

    def handle(self, event: Incoming) -> bool:
        """Apply and commit one event; whether it was new (and committed now)."""
        if self.state.store.seen(event.id):
            return False
        if isinstance(event, FlowRunEnded):
            return self._flow_run_ended(event)
        if isinstance(event, BreakerChanged):
            return self._breaker_changed(event)
        payload = event.payload
        self.deadlines.seen_alive(event.run_id, event.occurred, payload.process if isinstance(
            payload, (Heartbeat, RunStarted, RunResumed)) else None)
        view, now = self.state.views.get(event.run_id), time.time()
        if event.name == HEARTBEAT:
            if view is None:
                self._recall_soon(event.run_id)  # a run going on that the bridge has not seen
            return False  # a sign of life only
        if view is None and not isinstance(event.payload, RunStarted):
            # A run going on that the bridge has not seen start: read it, and apply this
            # event after what the reading brings (it may not be stored in Prefect yet).
            if self._recall_soon(event.run_id) is not None:
                self._held.setdefault(event.run_id, []).append(event)
                return False
        applied = apply(view, event, now)
        if isinstance(event.payload, RunStarted):
            applied = told_of_breakers(applied, self.state.breakers.not_closed(),
                                       event.occurred, now)
            if view is not None and view.pending and applied.drafts:
                self.state.admission.started(now)  # a submitted run left the queue
        if applied.view is None:
            return False
        if not self.committer.commit(event.run_id, applied.view, applied.drafts,
                                     event_id=event.id, occurred=event.occurred):
            return False
        self._after(event, applied.view)
        return True

    def _after(self, event: RunEvent, view: RunView) -> None:
        """What follows a committed event: history for a new run, metrics, deadlines."""
        payload = event.payload
        if isinstance(payload, RunStarted):
            self.history.fetch(view)
        elif isinstance(payload, StepChanged):
            step = view.record.steps.get(payload.step_id)
            if (step is not None and payload.status == StepStatus.COMPLETED
                    and payload.duration_s is not None):
                self.state.metrics.observe_step_duration(step.tool, payload.duration_s)
        self.deadlines.watch(event.run_id, view)

    # Breakers --------------------------------------------------------------------------

    def _breaker_changed(self, event: BreakerChanged) -> bool:
        """Tell every active run whose plan uses the breaker's tool. The event is marked
        seen once every run's commit went through; until then it is applied again when it
        comes again, and the runs told already are not told twice (``RunView.on_breaker``)."""
        now, done = time.time(), True
        if self.state.breakers.update(event.change):
            for run_id, view in list(self.state.views.items()):
                if view.ended or view.pending:
                    continue
                applied = breaker_changed(view, event, now)
                if applied.view is not None and applied.drafts:
                    done &= self.committer.commit(run_id, applied.view, applied.drafts)
        if not done:
            return False
        try:
            self.state.store.commit(f"breaker {event.change.key}", [], None,
                                    event_id=event.id, occurred=event.occurred)
        except StoreError as exc:
            log.error("cannot store the change of breaker %s: %s", event.change.key, exc)
            return False
        return True

    async def _load_breakers(self) -> None:
        """The breakers' state now (Prefect Variables), for /metrics and for runs that
        start while one is open; events received meanwhile are not undone."""
        for change in await self.source.breakers():
            self.state.breakers.update(change)

    # Runs the bridge has not followed ------------------------------------------------

    async def recall(self, run_id: str) -> None:
        """Read the run ``run_id`` from Prefect, unless the bridge knows it or read it in
        the last ``RECALL_AGAIN_S``; waits for the reading (up to ``RECALL_WAIT_S``)."""
        task = self._recall_soon(run_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), RECALL_WAIT_S)

    def _recall_soon(self, run_id: str) -> asyncio.Task[Any] | None:
        """The reading of ``run_id`` under way, or a new one (None: no need)."""
        if run_id in self._recalls:
            return self._recalls[run_id]
        last = self._recalled.get(run_id)
        if run_id in self.state.views or (
                last is not None and time.monotonic() - last < RECALL_AGAIN_S):
            return None
        task = self._recalls[run_id] = self.later.soon(0.0, lambda: self._recall(run_id))
        return task

    async def _recall(self, run_id: str) -> None:
        try:
            await self._read_run(run_id)
        finally:
            self._recalls.pop(run_id, None)
            now = time.monotonic()
            if len(self._recalled) > 10_000:  # a client asking for many ids: forget old ones
                self._recalled = {k: t for k, t in self._recalled.items()
                                  if now - t < RECALL_AGAIN_S}
            self._recalled[run_id] = now
            for held in sorted(self._held.pop(run_id, []), key=lambda e: e.payload.n):
                self.handle(held)  # in the run's order, after what the reading brought
        view = self.state.views.get(run_id)
        if view is None or not view.ended:
            # A run going on, or one that has just ended: its latest events (or all of
            # them) may still wait in Prefect's persister. Read it once more after a flush.
            self.later.soon(self.settings.settle_s, lambda: self._read_run(run_id))

    async def _read_run(self, run_id: str) -> None:
        try:
            await self.source.recall(run_id)
        except Exception as exc:  # noqa: BLE001 - the run stays unknown; a client may ask again
            log.warning("run %s could not be read from Prefect (%s: %s)", run_id,
                        type(exc).__name__, exc)

    # Runs Prefect ended ---------------------------------------------------------------

    def _flow_run_ended(self, event: FlowRunEnded) -> bool:
        view = self.state.views.get(event.run_id)
        if view is not None and view.ended:
            return False
        # Seen from now on: a reconciliation must not act on it a second time.
        try:
            self.state.store.commit(event.run_id, [], None, event_id=event.id,
                                    occurred=event.occurred)
        except StoreError as exc:
            log.error("cannot store the end of run %s: %s", event.run_id, exc)
            return False
        # A crashed run is recovered at once (below); other ends wait for planrun's own.
        wait = 0.0 if event.state == "CRASHED" else self.settings.grace_s
        self.later.soon(wait, lambda: self._end(event))
        return True

    async def _end(self, event: FlowRunEnded) -> None:
        run_id = event.run_id
        view = self.state.views.get(run_id)
        # A crash learnt of long after (a run read from Prefect's history) is not recovered,
        # nor one of a run no runner can start again (it ran in `planrun run`'s process).
        crashed = (event.state == "CRASHED"
                   and time.time() - event.occurred <= self.settings.lookback_s)
        if crashed:
            recoverable = await self.state.control.recoverable(run_id)
            if recoverable is None:
                return  # no longer crashed: recovered already, or resumed by a person
            crashed = recoverable
        if (crashed and view is not None and not view.ended
                and view.recoveries < self.settings.recover_attempts):
            # At once, without waiting for a late end event of the run: an engine that had
            # ended before its process died ends again as it had (flows/checkpoints.py).
            await self._recover(run_id, view, event.message)
            return
        if view is None or not view.ended:
            # planrun's end event should have come first: it was lost, or the process
            # died. Read what Prefect has once its persister has flushed, then decide.
            await asyncio.sleep(max(0.0, self.settings.settle_s - self.settings.grace_s))
            if view is None:
                await self.recall(run_id)  # a run that started before the bridge did
            else:  # its own events, not the stream's since the cursor: read for each run
                # ending so, that was a fifth of the server's CPU at 50 runs at once
                await self.source.recall(run_id)
            view = self.state.views.get(run_id)
            if view is not None and view.ended:
                return
            if view is not None and event.state == "COMPLETED":
                view = await self._await_own_end(run_id)
                if view.ended:
                    return
        if view is None:  # it ended before its engine announced it (an invalid plan...)
            view = RunView.unstarted(run_id)
        if crashed and view.recoveries < self.settings.recover_attempts:
            await self._recover(run_id, view, event.message)
            return
        applied = end_by_flow_run(view, event, time.time())
        if applied.view is not None and self.committer.commit(run_id, applied.view,
                                                              applied.drafts):
            self.deadlines.watch(run_id, applied.view)  # ended: forgotten there too

    async def _await_own_end(self, run_id: str) -> RunView:
        """A started run whose flow run completed has sent its own end first, but a loaded
        server takes events in late (at 200 runs at once, a minute and more: 33 completed
        runs were reported failed): read its events again every ``LATE_END_POLL_S`` for up
        to ``dead_after_s`` before ending it by its flow run. Its view then."""
        deadline = time.monotonic() + self.settings.dead_after_s
        view = self.state.views[run_id]
        while not view.ended and time.monotonic() < deadline:
            await asyncio.sleep(LATE_END_POLL_S)
            await self.source.recall(run_id)
            view = self.state.views[run_id]
        return view

    async def _recover(self, run_id: str, view: RunView, message: str | None) -> None:
        """Schedule a crashed run again; it announces itself with ``run.resumed``."""
        recovered = view.copy()
        recovered.recoveries += 1
        if not self.committer.commit(run_id, recovered, []):
            return
        log.warning("run %s crashed (%s); recovering it (%d of %d)", run_id, message,
                    recovered.recoveries, self.settings.recover_attempts)
        await self.state.control.recover(
            run_id, f"recovering after a crash: {message or 'no reason'}")

    # Estimates and signs of life ----------------------------------------------------

    async def _tick(self) -> None:
        """A ``progress`` message for a run that has had none for ``tick_s`` while a step
        runs, or whose last message reused an earlier estimate once a fresh one is due
        (estimates are computed at most every ``ESTIMATE_EVERY_S``, longer for a large
        plan: a burst of changes gets a fresh one after it)."""
        every = min(self.settings.tick_s, ESTIMATE_EVERY_S)
        while True:
            await asyncio.sleep(every)
            now, wall = time.monotonic(), time.time()
            for run_id, view in list(self.state.views.items()):
                if view.ended:
                    continue
                self.deadlines.check_alive(run_id, view, wall)
                last = self.committer.last_sent.get(run_id, now)
                if ((view.estimate_stale and view.estimate_due(wall))
                        or (view.running and now - last >= self.settings.tick_s)):
                    applied = tick(view, wall)
                    assert applied.view is not None
                    self.committer.commit(run_id, applied.view, applied.drafts, save=False)


class PrefectUpstream(Upstream):
    """The upstream of a served bridge: Prefect's event stream and REST API."""

    def __init__(self, settings: UpstreamSettings | None = None) -> None:
        settings = settings or UpstreamSettings()
        later = Later()
        self.prefect = PrefectEventSource(settings, later)
        super().__init__(self.prefect, settings, later)

    @property
    def connects(self) -> int:
        return self.prefect.connects

    @property
    def start_reads(self) -> int:
        return self.prefect.start_reads

    @property
    def read(self) -> Counter[str]:
        """Events read from Prefect's REST API, by run id (the stream's not counted)."""
        return self.prefect.read

    async def reconcile(self) -> int:
        return await self.prefect.reconcile()


async def wait_connected(upstream: Upstream, timeout: float) -> None:
    """Wait until ``upstream`` is subscribed and reconciled (for start-up and tests)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(upstream.connected.wait(), timeout)
