"""Concurrency and rate limits that hold across processes, and waiting out machine load
(docs/limits.md).

Each attempt of a step asks the ``Limiter`` for leave to call its tool (``hold``), and
gives it back as soon as the call returns, so a retry's delay holds nothing. In order:

1. **Load**: while the machine is over a threshold of the policy (``flows.load``), the
   attempt waits, unless no other step of this process has been let through (a run always
   makes progress: under pressure a process runs one step at a time).
2. **Slots**: a turn in the shared queue (``flows.limit_store``: a SQLite file per machine,
   or ``flows.limit_store_pg`` in the stack's PostgreSQL database) of every concurrency key
   that applies: ``all`` (the policy's ``limits.concurrency``), the tool, the host the
   call reaches (an ``http.request``'s URL host, or the host a network tool's adapter
   names: ``Adapter.call_host``), and the run's own limit of the tool (the plan's
   ``limits.tools``).
3. **Rate**: one reservation over every rate key that applies (tool, host, the run's);
   the attempt sleeps until its exact moment, its slot kept (a slot given back here would
   only let the same tool's next call wait for the same clock).

While it waits, ``waiting`` hears why, in words (``Waiting``). Waiters of this process
wake at once when a turn of this process is given back; for a turn given back by another
process, one task per process looks every ``POLL_S`` with one query for all its waiters
(200 waiting steps are one poller, not 200), and every ``SWEEP_S`` takes back the turns of
dead processes and refreshes where each waiter stands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

import httpx

from planrun.flows.limit_store import FILE_NAME, STORE_ERRORS, LimitStore, Place, Queue, Rate
from planrun.flows.load import SAMPLE_S, LoadGauge
from planrun.policy_limits import OperatorLimits

#: How often a process with waiters asks the store whether another process granted them.
POLL_S = 0.015
#: How often it takes back dead processes' turns (and renews its own leases).
SWEEP_S = 0.5
#: How often a process that only holds turns renews their leases.
RENEW_S = 15.0

Why = Literal["slot", "rate", "load"]
log = logging.getLogger("planrun.limits")


class LimitSettings(Protocol):
    """One tool's limits: the policy's ``ToolLimits`` or a plan's ``ToolLimit``."""

    @property
    def concurrency(self) -> int | None: ...

    @property
    def rate(self) -> float | None: ...

    @property
    def burst(self) -> int | None: ...


@dataclass(frozen=True)
class Ask:
    """What one attempt asks to start: its tool, the host it calls (network tools), its
    run and step, and the run's own limits by tool (the plan's ``limits.tools``)."""

    tool: str
    host: str | None = None
    run_id: str = ""
    step_id: str = ""
    run_limits: Mapping[str, LimitSettings] = field(default_factory=dict)

    @classmethod
    def of(cls, tool: str, params: Any, run_id: str, step_id: str,
           run_limits: Mapping[str, LimitSettings]) -> Ask:
        """The ask of a call of ``tool`` with its rendered ``params``."""
        return cls(tool, url_host(params) if tool == "http.request" else
                   _tool_host(tool, params), run_id, step_id, run_limits)


def _tool_host(tool: str, params: Any) -> str | None:
    """The host another network tool reaches (its adapter knows: the search provider's,
    a message channel's), lower case; None when it names none."""
    from planrun.adapters.registry import default_registry

    registry = default_registry()
    if tool not in registry or not isinstance(params, Mapping):
        return None
    host = registry.get(tool).call_host(params)
    return host.lower().rstrip(".") if host else None


def url_host(params: Any) -> str | None:
    """The host of ``params``' ``url``, lower case; None without one."""
    url = params.get("url") if isinstance(params, Mapping) else None
    if not isinstance(url, str):
        return None
    try:
        return httpx.URL(url).host.lower().rstrip(".") or None
    except (httpx.InvalidURL, TypeError):
        return None


@dataclass(frozen=True)
class Waiting:
    """Why an attempt cannot start yet: ``why`` for programs, ``note`` for people,
    ``about`` what it waits for (a key, or ``load``): a new ``why`` or ``about`` is a new
    reason."""

    why: Why
    note: str
    about: str

    @property
    def reason(self) -> str:
        """What it waits for, without the note's count of steps ahead."""
        return f"{self.why} {self.about}"


OnWait = Callable[[Waiting], None]


class StepLimits(Protocol):
    """Leave for each call of a tool under the limits shared by every run of the machine,
    and whether it is under load (``Limiter``; ``flows.fakes.MemoryLimits``)."""

    def hold(self, ask: Ask, waiting: OnWait) -> AbstractAsyncContextManager[None]:
        """Leave for the body of the ``async with``; ``waiting`` hears why it waits."""
        ...

    def pressure(self) -> str | None:
        """Which load threshold the machine is over, in words; None when none."""
        ...


def limit_keys(ask: Ask, limits: OperatorLimits) -> tuple[dict[str, int], dict[str, Rate]]:
    """The concurrency keys (with their limits) and rate keys that apply to ``ask``."""
    slots: dict[str, int] = {}
    rates: dict[str, Rate] = {}

    def add(key: str, settings: LimitSettings | None) -> None:
        if settings is None:
            return
        if settings.concurrency is not None:
            slots[key] = settings.concurrency
        if settings.rate is not None:
            rates[key] = Rate(settings.rate, settings.burst or 1)

    if limits.concurrency is not None:
        slots["all"] = limits.concurrency
    add(f"tool:{ask.tool}", limits.tool(ask.tool))
    if ask.host:
        add(f"host:{ask.host.lower().rstrip('.')}", limits.host(ask.host))
    add(f"run:{ask.run_id}:tool:{ask.tool}", ask.run_limits.get(ask.tool))
    return slots, rates


def slot_note(place: Place) -> str:
    """``waiting for a shell.run slot (limit 4), 3 ahead``."""
    line = "next in line" if place.ahead == 0 else f"{place.ahead} ahead"
    return f"waiting for {_slot_words(place.key)} (limit {place.limit}), {line}"


def _slot_words(key: str) -> str:
    kind, _, rest = key.partition(":")
    if kind == "tool":
        return f"a {rest} slot"
    if kind == "host":
        return f"a slot for host {rest}"
    if kind == "run":
        return f"a {rest.partition(':tool:')[2]} slot of this run"
    return "a step slot of this machine"


def rate_note(key: str, rate: Rate, wait_s: float) -> str:
    """``waiting for the http.request rate limit (20/s, burst 5): starts in 0.35 s``."""
    kind, _, rest = key.partition(":")
    whose = {"tool": rest, "host": f"host {rest}"}.get(kind) or \
        f"this run's {rest.partition(':tool:')[2]}"
    return (f"waiting for the {whose} rate limit ({rate.per_s:g}/s, burst {rate.burst}): "
            f"starts in {wait_s:.2f} s")


@dataclass
class _Waiter:
    """A turn of this process that is not granted yet."""

    granted: asyncio.Future[None]
    waiting: OnWait
    note: str = ""

    def stands(self, place: Place) -> None:
        note = slot_note(place)
        if note != self.note:
            self.note = note
            self.waiting(Waiting("slot", note, place.key))


class Limiter:
    """This process's side of the shared limits (see the module docstring): ``settings``
    gives the operator's limits, ``store`` is opened on first need."""

    def __init__(self, store: Callable[[], LimitStore] | None = None,
                 settings: Callable[[], OperatorLimits] | None = None,
                 gauge: LoadGauge | None = None, *, poll_s: float = POLL_S,
                 sweep_s: float = SWEEP_S) -> None:
        self._open = store or _default_store
        self.settings = settings or _policy_limits
        self.gauge = gauge or LoadGauge(lambda: self.settings().load)
        self.poll_s, self.sweep_s = poll_s, sweep_s
        self._store: LimitStore | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._held: set[int] = set()
        self._admitted = 0
        self._keeper: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def store(self) -> LimitStore:
        if self._store is None:
            self._store = self._open()
        return self._store

    def pressure(self) -> str | None:
        """Which load threshold the machine is over, in words; None when none."""
        return self.gauge.pressure()

    @asynccontextmanager
    async def hold(self, ask: Ask, waiting: OnWait) -> AsyncIterator[None]:
        """Leave for one call of ``ask``'s tool, for the body of the ``async with``. A
        store that cannot be used limits nothing (with a warning): limits never stop a
        run for their own failure."""
        slots, rates = limit_keys(ask, self.settings())
        await self._calm(waiting)
        self._admitted += 1
        ticket = None
        try:
            try:
                if slots:
                    ticket = await self._turn(slots, f"{ask.run_id}/{ask.step_id}", waiting)
                if rates:
                    await self._pace(rates, waiting)
            except STORE_ERRORS as exc:
                log.warning("the limits' store cannot be used (%s): %s goes ahead unlimited",
                            exc, ask.tool)
            yield
        finally:
            self._admitted -= 1
            if ticket is not None:
                self._leave(ticket)

    def _leave(self, ticket: int) -> None:
        self._held.discard(ticket)
        self._waiters.pop(ticket, None)
        try:
            self._apply(self.store.leave([ticket]))
        except STORE_ERRORS as exc:  # its lease runs out instead
            log.warning("a turn could not be given back to the limits' store: %s", exc)
        if not self._held and not self._waiters and self._wake is not None:
            self._wake.set()  # the keeper has nothing left to keep: it ends

    async def _calm(self, waiting: OnWait) -> None:
        """Wait while the machine is under pressure and another step of ours runs."""
        while self._admitted > 0:
            why = self.gauge.pressure()
            if why is None:
                return
            waiting(Waiting("load", f"waiting for the machine's load to drop: {why}", "load"))
            await asyncio.sleep(SAMPLE_S)

    async def _turn(self, slots: dict[str, int], label: str, waiting: OnWait) -> int:
        """A granted turn for ``slots``; waits in the queue for it."""
        ticket, queue = self.store.join(slots, label)
        if ticket not in queue.granted:
            waiter = _Waiter(asyncio.get_running_loop().create_future(), waiting)
            self._waiters[ticket] = waiter
            try:
                self._apply(queue)
                self._keep()
                await waiter.granted
            except BaseException:
                self._leave(ticket)  # waiting, or granted meanwhile
                raise
        self._held.add(ticket)
        self._keep()
        return ticket

    async def _pace(self, rates: dict[str, Rate], waiting: OnWait) -> None:
        """Sleep until the exact moment every rate allows the call (no polling): each
        reservation counts the call in at least one key, so this ends."""
        while rates:
            go, rest = self.store.reserve(rates)
            wait = go - time.time()
            if wait > 0:
                key = min(set(rates) - set(rest), key=lambda k: rates[k].per_s)
                waiting(Waiting("rate", rate_note(key, rates[key], wait), key))
                await asyncio.sleep(wait)
            rates = rest

    def _apply(self, queue: Queue) -> None:
        """Wake the waiters ``queue`` says were granted; tell the others where they stand."""
        for ticket in sorted(queue.granted):  # woken in arrival order
            waiter = self._waiters.pop(ticket, None)
            if waiter is not None and not waiter.granted.done():
                waiter.granted.set_result(None)
        for ticket, place in queue.waiting.items():
            found = self._waiters.get(ticket)
            if found is not None:
                found.stands(place)

    def _keep(self) -> None:
        """Make sure the keeper runs (one task per process), and looks now."""
        if self._keeper is None or self._keeper.done() or \
                self._keeper.get_loop() is not asyncio.get_running_loop():
            self._wake = asyncio.Event()
            self._keeper = asyncio.get_running_loop().create_task(self._keep_turns())
        elif self._wake is not None:
            self._wake.set()

    async def _keep_turns(self) -> None:
        """While this process waits for or holds turns: find those other processes
        granted, take back dead ones' and renew our leases."""
        loop = asyncio.get_running_loop()
        swept = loop.time()
        while self._waiters or self._held:
            if self._waiters:
                await asyncio.sleep(self.poll_s)
            else:
                assert self._wake is not None
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), RENEW_S)
                except TimeoutError:
                    pass
            try:
                if loop.time() - swept >= (self.sweep_s if self._waiters else RENEW_S):
                    swept = loop.time()
                    self._apply(self.store.sweep())
                elif self._waiters:
                    granted = self.store.granted()
                    self._apply(Queue(granted=granted & set(self._waiters)))
            except STORE_ERRORS as exc:  # try again at the next look
                log.warning("the limits' store could not be read: %s", exc)


def _policy_limits() -> OperatorLimits:
    from planrun.policy import load_policy

    return load_policy().limits


def _default_store() -> LimitStore:
    """The stack's PostgreSQL database when ``PLANRUN_DATABASE_URL`` names one (every
    machine of the stack shares it: docs/production.md), else the SQLite file of this
    machine's data directory."""
    from planrun.production import DATABASE_ENV

    url = os.environ.get(DATABASE_ENV, "").strip()
    if url:
        from planrun.flows.limit_store_pg import PostgresLimitStore

        return PostgresLimitStore(url)
    from planrun.flows.limit_store import SqliteLimitStore
    from planrun.home import data_dir

    return SqliteLimitStore(data_dir() / FILE_NAME)


@lru_cache(maxsize=1)
def default_limiter() -> Limiter:
    """This process's limiter, shared by all its runs."""
    return Limiter()
