"""The bridge's real event source: Prefect's event stream, reconciled from its REST API.

One subscription receives planrun's own events (``planrun.*``: a run's, about the resource
``planrun.run.<id>``, ``planrun.contract.events``; a tool's circuit breaker's, about
``planrun.tool.<key>``, ``planrun.contract.breakers``) and Prefect's flow-run state events.
Each is read into the contract's models here (``model_validate``); one that does not
validate is logged and left out. The breakers' state as the bridge starts is read from
their Prefect Variables (:meth:`PrefectEventSource.breakers`).

Prefect's stream can lose events: its server drops events for a subscriber whose queue is
full, backfills only the last minute on connect, and an event still waiting in the
server's persister (up to ``flush_interval``, 5 s) is neither in the backfill nor, for a
subscriber that was away when it passed, in the live stream. So after every (re)connect
the source reads the events since the cursor (the newest event committed, minus a margin)
from ``POST /events/filter``, page by page, and again once the persister has flushed; and
when a run's event numbers jump (a dropped event) it reads them again. What it asks
Prefect for (the event and flow-run filters) is ``progress_bridge/prefect_queries.py``.

A bridge with no cursor yet (its first start, a new message store) does not read the
server's history: it lists the planrun flow runs that have not ended (and those that
crashed within ``lookback_s``, to recover them) and reads the events of those runs only,
so its start costs what the runs in flight cost, whatever the server ran before
(:meth:`PrefectEventSource.start_read`). Any other run is read when the bridge first needs
it (:meth:`PrefectEventSource.recall`): a client asks for it, or one of its events comes
before the bridge has seen it start (docs/architecture.md, "The bridge's first start").
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel

from planrun.contract import breakers
from planrun.contract.breakers import EVENT_STATES, VARIABLE_PREFIX, BreakerChange
from planrun.contract.control import RUN_TAG
from planrun.contract.events import RUN_PREFIX, SEGMENT, read_payload
from planrun.errors import ContractError
from planrun.progress_bridge.apply import BreakerChanged, FlowRunEnded, RunEvent
from planrun.progress_bridge.prefect_queries import (
    FLOW_RUN_PREFIX,
    ended_since,
    flow_runs,
    live_filter,
    not_ended,
    query_filter,
    runs_filter,
)
from planrun.progress_bridge.source import Cursor, Deliver, Incoming
from planrun.progress_bridge.timers import Later
from planrun.progress_bridge.upstream_settings import UpstreamSettings

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.events import Event
    from prefect.events.filters import EventFilter

log = logging.getLogger("planrun.bridge")


def _import_prefect() -> None:
    """Import the parts of Prefect the bridge's upstream and run control use."""
    import prefect.client.orchestration
    import prefect.events.clients
    import prefect.events.filters
    import prefect.exceptions  # noqa: F401

PLANRUN_TAG = f"prefect.tag.{RUN_TAG}"
FLOW_RUN_ENDS = frozenset({"CRASHED", "FAILED", "CANCELLED", "COMPLETED"})
PAGE = 50  # POST /events/filter answers at most 50 events a page
VARIABLES_PAGE = 200  # POST /variables/filter answers at most 200 a page
RUNS_AT_ONCE = 50  # runs whose events one POST /events/filter asks for
TURN = 16  # events handled between two turns given to the senders
#: Reads of a run's missing events after the first, while Prefect has not stored them
#: (a busy server's persister): its live events wait meanwhile, ``settle_s`` a read.
GAP_READS = 5
#: The widest jump whose missing numbers are waited for one by one. A run's events are
#: numbered within its process's segment of a million, and the stream is Prefect's, which
#: any process that reaches the server can write to: a jump wider than this is read back
#: once, as any jump was before, rather than held in memory number by number.
WAIT_FOR_AT_MOST = 10_000


class _State(BaseModel):
    type: str = ""
    message: str | None = None


class _FlowRunPayload(BaseModel):
    """The part of Prefect's flow-run state event the bridge reads."""

    validated_state: _State | None = None


class PrefectEventSource:
    """Follows the Prefect server at ``PREFECT_API_URL``."""

    def __init__(self, settings: UpstreamSettings, later: Later) -> None:
        self.settings = settings
        self.later = later
        self.connected = asyncio.Event()
        self.connects = 0
        self._deliver: Deliver = lambda _event: False
        self._cursor: Cursor = lambda: None
        self._last_n: dict[str, int] = {}
        self._recheck: asyncio.Task[Any] | None = None
        self._gaps: set[str] = set()  # runs whose event numbers jumped, to read again
        #: A run's live events from its first jump until its missing events were read back:
        #: applied after them, so that no step's change comes after the run's end or
        #: behind a later change of the same step (:meth:`_gap_reconcile`).
        self._held: dict[str, list[RunEvent | FlowRunEnded]] = {}
        self._missing: dict[str, set[int]] = {}  # each run's numbers not seen since a jump
        self._reads: Counter[str] = Counter()  # reads of a run's jump that found it open
        #: Events read from Prefect's REST API (not its stream), by run id ("" for events
        #: about no run): what a start, a reconciliation or a recall cost.
        self.read: Counter[str] = Counter()
        self.start_reads = 0  # how many times the runs in flight were read (:meth:`start_read`)
        #: The first start's time (epoch s): no reconciliation reads from before it, as
        #: the runs in flight then were read whole (:meth:`start_read`).
        self._floor: float | None = None

    async def prepare(self) -> None:
        """Prefect's client imported in a thread: 1–3 s during which the event loop
        would otherwise stand still, answering neither ``/healthz`` nor its clients
        (BENCHMARKS.md, "Bridge start")."""
        await asyncio.to_thread(_import_prefect)

    async def follow(self, deliver: Deliver, cursor: Cursor) -> None:
        from prefect.events.clients import get_events_subscriber

        self._deliver, self._cursor = deliver, cursor
        delay = self.settings.retry_s
        while True:
            try:
                # No reconnects inside Prefect's client: every reconnect must reconcile.
                subscriber = get_events_subscriber(filter=live_filter(),
                                                   reconnection_attempts=0)
                _stream_from(subscriber, self.settings.settle_s)
                async with subscriber as events:
                    self.connects += 1
                    # With no cursor yet the runs in flight are read, not the history: also
                    # once the persister has flushed, lest a later reconciliation of the
                    # window before the cursor read the runs that had ended.
                    catch_up = self.start_read if self._cursor() is None else self.reconcile
                    await catch_up()
                    self.later.soon(self.settings.settle_s, catch_up)
                    self.connected.set()
                    delay = self.settings.retry_s
                    async for count, event in _numbered(events):
                        self._take(event, live=True)
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
        """Deliver every event since the cursor (minus the margin) from Prefect's REST
        API; how many were new. With no cursor yet, the runs in flight (:meth:`start_read`)."""
        from prefect.client.orchestration import get_client

        cursor = self._cursor()
        if cursor is None:
            return await self.start_read()
        since = cursor - self.settings.margin_s
        if self._floor is not None:
            since = max(since, self._floor)
        async with get_client() as client:
            new = await self._read(client, query_filter(since))
        if new:
            log.info("reconciled %d event(s) from Prefect's API", new)
        return new

    async def start_read(self) -> int:
        """Deliver the events of every planrun run that has not ended (and of those that
        crashed within ``lookback_s``, to recover them, or ended within two ``settle_s``
        of the first start); how many were new."""
        from prefect.client.orchestration import get_client

        began, read_before = time.time(), self.read.total()
        if self._floor is None:
            self._floor = began - self.settings.settle_s
        # A run that ended just before the first start may have events that occurred
        # within the stream's backfill but were stored after it (the persister): the
        # stream has the rest of that run, so it is read whole, here and once settled.
        just_ended = self._floor - self.settings.settle_s
        async with get_client() as client:
            runs = await flow_runs(client, not_ended())
            runs += await flow_runs(client, ended_since(began - self.settings.lookback_s,
                                                        crashed_only=True))
            runs += await flow_runs(client, ended_since(just_ended))
            new = await self._read_runs(client, runs)
        self.start_reads += 1
        log.info("start: read %d event(s) of %d run(s) in flight or just ended in %.2f s, %d new",
                 self.read.total() - read_before, len(runs), time.time() - began, new)
        return new

    async def recall(self, run_id: str) -> int:
        """Deliver every event of the planrun run ``run_id`` (a run the bridge has not
        followed); how many were new. Nothing for an id that is not a UUID or a flow run
        that is not a planrun run."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            flow_run_id = UUID(run_id)
        except ValueError:
            return 0
        async with get_client() as client:
            try:
                found = await client.read_flow_run(flow_run_id)
            except ObjectNotFound:
                return 0
            if RUN_TAG not in (found.tags or []):
                return 0
            new = await self._read_runs(client, [found])
        if new:
            log.info("recalled %d event(s) of run %s from Prefect's API", new, run_id)
        return new

    async def _read_runs(self, client: PrefectClient, runs: Iterable[FlowRun]) -> int:
        """Deliver the events of ``runs``, a batch of runs at a time, oldest first."""
        new, unique = 0, list({str(run.id): run for run in runs}.values())
        for first in range(0, len(unique), RUNS_AT_ONCE):
            batch = unique[first:first + RUNS_AT_ONCE]
            since = min(run.created or run.expected_start_time or _EPOCH
                        for run in batch).timestamp() - self.settings.margin_s
            new += await self._read(client, runs_filter([str(r.id) for r in batch], since))
        return new

    async def _read(self, client: PrefectClient, query: EventFilter) -> int:
        """Deliver every event ``query`` finds, page by page; how many were new."""
        new = 0
        page = await client.read_events(filter=query, limit=PAGE)
        while True:
            for event in page.events:
                self.read[_run_of(event)] += 1
                new += self._take(event)
            if not page.next_page or not page.events:
                return new
            page = await client.read_events_page(str(page.next_page))

    async def breakers(self) -> list[BreakerChange]:
        """Every breaker's state from its Prefect Variable (failures and claims, also
        named ``planrun-breaker-…``, have no ``state`` and are passed over)."""
        from prefect.client.orchestration import get_client

        found: list[BreakerChange] = []
        try:
            async with get_client() as client:
                offset = 0
                while True:
                    response = await client.request(  # type: ignore[call-overload]
                        "POST", "/variables/filter", json={
                            "variables": {"name": {"like_": f"{VARIABLE_PREFIX}%"}},
                            "offset": offset, "limit": VARIABLES_PAGE, "sort": "NAME_ASC"})
                    page = response.json()
                    offset += len(page)
                    found += [change for v in page if (change := _breaker(v.get("value")))]
                    if len(page) < VARIABLES_PAGE:
                        return found
        except Exception as exc:  # noqa: BLE001 - events will tell; /metrics starts empty
            log.warning("the breakers' state could not be read from Prefect (%s: %s)",
                        type(exc).__name__, exc)
            return found

    def _take(self, event: Event, *, live: bool = False) -> bool:
        """Deliver ``event`` (from the stream when ``live``, else read from the API);
        whether it was new. A live event of a run with missing events is held until they
        have been read back."""
        try:
            found = incoming(event)
        except ContractError as exc:
            log.warning("event %s (%s) is left out: %s", event.id, event.event, exc)
            return False
        if found is None:
            return False
        if isinstance(found, RunEvent):
            self._check_gap(found)
        if (live and isinstance(found, (RunEvent, FlowRunEnded))
                and (found.run_id in self._gaps or found.run_id in self._held)):
            self._held.setdefault(found.run_id, []).append(found)
            return False
        return self._deliver(found)

    def _check_gap(self, event: RunEvent) -> None:
        """A run's events carry n = 1, 2, 3...: a jump means Prefect dropped some while we
        were connected (a full subscriber queue), so read them back from its API."""
        n, run_id = event.payload.n, event.run_id
        if missing := self._missing.get(run_id):
            missing.discard(n)
        last = self._last_n.get(run_id)
        if last is None or n > last:
            self._last_n[run_id] = n
        same_process = last is not None and n // SEGMENT == last // SEGMENT
        if same_process and last is not None and n > last + 1:
            log.warning("events %d..%d of run %s are missing; reconciling", last + 1, n - 1,
                        run_id)
            if n - last - 1 <= WAIT_FOR_AT_MOST:
                self._missing.setdefault(run_id, set()).update(range(last + 1, n))
            self._gaps.add(run_id)
            if self._recheck is None:
                self._recheck = self.later.soon(self.settings.settle_s, self._gap_reconcile)

    async def _gap_reconcile(self) -> None:
        """Read the events since the cursor again, and the whole of each run with a gap:
        its missing events may be older than the window (a run in flight at the first
        start whose events Prefect had not stored yet)."""
        runs, self._gaps = self._gaps, set()
        try:
            await self.reconcile()
            for run_id in runs:
                await self.recall(run_id)
        finally:
            self._recheck = None
            # What the stream brought meanwhile goes on now, in the run's order (what the
            # reading delivered already is not applied twice), unless the run jumped again
            # or Prefect has not stored the missing events yet.
            for run_id in runs - self._gaps:
                if self._missing.get(run_id) and self._reads[run_id] < GAP_READS:
                    self._reads[run_id] += 1
                    self._gaps.add(run_id)
                    continue
                if still := self._missing.pop(run_id, None):
                    log.warning("events %s of run %s never came back from Prefect; going "
                                "on without them", _numbers(still), run_id)
                self._reads.pop(run_id, None)
                for held in sorted(self._held.pop(run_id, []), key=_order):
                    self._deliver(held)
            if self._gaps:  # found while this read went on: they get a read of their own
                self._recheck = self.later.soon(self.settings.settle_s, self._gap_reconcile)


def _numbers(found: set[int]) -> str:
    """Event numbers as a person reads them: ``3..7`` or ``3, 5 and 2 more``."""
    ordered = sorted(found)
    if ordered[-1] - ordered[0] + 1 == len(ordered):
        return f"{ordered[0]}..{ordered[-1]}"
    shown = ", ".join(str(n) for n in ordered[:2])
    return f"{shown} and {len(ordered) - 2} more" if len(ordered) > 2 else shown


def _order(event: RunEvent | FlowRunEnded) -> tuple[int, float]:
    """Held events in their run's order: planrun's by number, Prefect's end of the flow
    run after them all."""
    return (event.payload.n, 0.0) if isinstance(event, RunEvent) else (sys.maxsize,
                                                                        event.occurred)


def incoming(event: Event) -> Incoming | None:
    """A Prefect event as the bridge reads it; None for one it does not follow. Raises
    :class:`~planrun.errors.ContractError` for a planrun event that does not validate."""
    occurred = event.occurred.timestamp()
    if event.event.startswith(FLOW_RUN_PREFIX):
        state = _FlowRunPayload.model_validate(event.payload).validated_state or _State()
        if state.type not in FLOW_RUN_ENDS or not any(r.id == PLANRUN_TAG
                                                      for r in event.related):
            return None
        return FlowRunEnded(str(event.id), event.resource.id.removeprefix(FLOW_RUN_PREFIX),
                            occurred, state.type, state.message)
    if event.event in EVENT_STATES and event.resource.id.startswith(breakers.RESOURCE_PREFIX):
        change = BreakerChange.read({**event.payload, "state": EVENT_STATES[event.event]})
        return BreakerChanged(str(event.id), occurred, change)
    if not event.resource.id.startswith(RUN_PREFIX):
        return None
    payload = read_payload(event.event, event.payload)
    if payload is None:
        return None
    return RunEvent(str(event.id), event.event, event.resource.id.removeprefix(RUN_PREFIX),
                    occurred, payload)


def _stream_from(subscriber: Any, window_s: float) -> None:
    """Ask Prefect's stream for events from ``window_s`` ago on, not from a minute ago.
    The subscriber asks for the last minute's events first (a backfill), which on a busy
    server is thousands of events of runs that have ended, sent before the first live one;
    the bridge reads what it missed itself (:meth:`PrefectEventSource.start_read`, or
    since its cursor). The same time also bounds the live stream: an event that occurred
    before it is not sent even if it reaches the server after the subscription, so it is
    not "now" but a persister flush earlier. The subscriber keeps the time in a private
    attribute: without it (another Prefect), the backfill stays, which costs time but
    loses nothing."""
    if hasattr(subscriber, "_backfill_since"):
        subscriber._backfill_since = datetime.now(UTC) - timedelta(seconds=window_s)


def _run_of(event: Event) -> str:
    """The run an event is about ("" for none): its planrun run or its flow run."""
    resource = event.resource.id
    for prefix in (RUN_PREFIX, FLOW_RUN_PREFIX):
        if resource.startswith(prefix):
            return resource.removeprefix(prefix)
    return ""


def _breaker(value: Any) -> BreakerChange | None:
    """A breaker Variable's value as a change; None for a failure, a claim, or a value
    that does not read (logged)."""
    if not isinstance(value, dict) or not {"key", "state"} <= value.keys():
        return None
    try:
        return BreakerChange.read(value)
    except ContractError as exc:
        log.warning("a breaker Variable is left out: %s", exc)
        return None


async def _numbered(events: Any) -> AsyncIterator[tuple[int, Event]]:
    count = 0
    async for event in events:
        count += 1
        yield count, event


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
