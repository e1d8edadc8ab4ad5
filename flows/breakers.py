"""Circuit breakers per tool (per host for ``http.request``), shared by every run and every
process that uses the same Prefect server, and kept across restarts (docs/policy.md).

A breaker is ``closed`` (calls go through) until ``failures`` attempts of its tool fail
with category ``transient`` or ``resource`` within ``window_s`` seconds, in any run. Then
it is ``open``: a step of that tool fails at once, no call made, with category
``resource``, a message naming the breaker and a ``retry_after`` up to its next try.
``cooldown_s`` later it lets exactly one call through (``half_open``): if that call does
not fail with a counted category the breaker closes, else it opens again.

Where the state lives, and why. Each breaker is a Prefect Variable on the server
(``planrun-breaker-<key>``: its state, epoch, when it probes next) beside one holding its
recent failures: the database keeps them across restarts of planrun and of the server,
and every process of a deployment reaches them. Variables have no compare-and-swap, so a
transition that must happen once (open epoch ``n``; take the one trial call of epoch
``n``) is *claimed* by creating a variable named after it: the server's unique constraint
on variable names lets exactly one creator win (``flows.breaker_store``). Prefect's
global concurrency limits were the other candidate, but their leases last at least 60 s
and live in the server's memory (lost, with the slot held, when it restarts), and a
decaying slot's clock is reset by every refused attempt. A trial call whose process died
is noticed by whoever finds its claim past its ``until`` and opens the next epoch. Each
failure is a variable of its own, created (so no concurrent writer loses it) and named by
its time; counting lists the latest ``failures`` of them (``POST /variables/filter``,
sorted by name) and deletes those that have left the window. The state is written only
by claim winners.

The hot path: a closed breaker costs no request. Each process caches a breaker's state
for ``ttl_s`` (1 s), so another process's opening is seen within that; the process that
opens it sees it at once. A failure is written before its attempt ends (a few requests
on a path that is about to wait for a retry anyway), so no call of this process goes out
after the failure that opened the breaker. When the server cannot be reached, breakers
let calls through: they never stop a run for their own failure.

Changes are Prefect events ``planrun.tool.circuit_opened``, ``..._half_open`` and
``..._closed`` about the resource ``planrun.tool.<key>``, the run that caused them a
related resource (role ``run``); each breaker counts its openings (``opened_total``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any, TypeVar

import httpx

from planrun.contract.breakers import EVENT_STATES, RESOURCE_PREFIX
from planrun.contract.events import RESOURCE_PREFIX as RUN_RESOURCE_PREFIX
from planrun.errors import Category, ResourceError, StepError
from planrun.flows.breaker_store import PREFIX, BreakerStore, PrefectStore
from planrun.policy import BreakerSettings, load_policy

T = TypeVar("T")
log = logging.getLogger("planrun.breakers")

#: The categories that count as the tool failing (others are the step's own mistakes).
COUNTED = frozenset({Category.TRANSIENT, Category.RESOURCE})
#: Tools with a breaker unless the policy says otherwise: those that call other services.
DEFAULTS: Mapping[str, BreakerSettings] = {
    tool: BreakerSettings.model_validate({})
    for tool in ("http.request", "search.web", "browser.open", "message.send")}
CACHE_TTL_S = 1.0
#: Failures listed beyond the threshold, so that old ones are found and deleted.
LIST_SLACK = 10
#: How long a trial call may hold its claim when its step has no timeout.
PROBE_LEASE_S = 300.0
#: The event of each new state.
EVENT_NAMES: dict[str, str] = {state: event for event, state in EVENT_STATES.items()}


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerView:
    """One breaker's shared state. ``epoch`` counts its openings' claims; ``failures``
    and ``window_s`` are what opened it; ``run_id`` the run of its latest change."""

    key: str
    state: State = State.CLOSED
    epoch: int = 0
    failures: int = 0
    window_s: float = 0.0
    probe_at: float | None = None
    opened_at: float | None = None
    run_id: str | None = None
    opened_total: int = 0

    @classmethod
    def from_value(cls, key: str, value: Mapping[str, Any] | None) -> BreakerView:
        """The view stored as ``value`` (None: a breaker never opened)."""
        if not value:
            return cls(key)
        fields = {k: value[k] for k in cls.__dataclass_fields__ if k in value}
        return cls(**{**fields, "key": key, "state": State(value.get("state", "closed"))})

    def to_value(self) -> dict[str, Any]:
        return {**asdict(self), "state": str(self.state)}

    def describe(self) -> str:
        """``search.web is failing in every run (5 in 60 s)``."""
        return f"{self.key} is failing in every run ({self.failures} in {self.window_s:g} s)"


@dataclass(frozen=True)
class Permit:
    """Leave to make one call: ``key`` is None when the tool has no breaker; ``probe``
    when this call is the breaker's one trial."""

    key: str | None
    settings: BreakerSettings | None = None
    probe: bool = False
    epoch: int = 0


def breaker_key(tool: str, params: Mapping[str, Any]) -> str:
    """The breaker a call belongs to: the tool, or ``http.request@host[:port]``."""
    if tool != "http.request" or not isinstance(params.get("url"), str):
        return tool
    try:
        url = httpx.URL(params["url"])
    except (httpx.InvalidURL, TypeError):
        return tool
    if not url.host:
        return tool
    return f"{tool}@{url.host}" + (f":{url.port}" if url.port else "")


def settings_for(tool: str) -> BreakerSettings | None:
    """The tool's breaker settings: the policy file's, else the default; None: no breaker."""
    settings = load_policy().breakers.get(tool) or DEFAULTS.get(tool)
    return settings if settings is not None and settings.enabled else None


def variable_name(key: str, suffix: str = "") -> str:
    """The Prefect Variable name of breaker ``key`` (names allow ``[a-z0-9_-]`` only)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:60]
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{PREFIX}{slug}-{digest}" + (f"-{suffix}" if suffix else "")


def clock_text(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


def emit_breaker_event(view: BreakerView, settings: BreakerSettings) -> None:
    """The Prefect event of ``view``'s new state."""
    from prefect.events import emit_event

    tool, _, host = view.key.partition("@")
    resource = {"prefect.resource.id": f"{RESOURCE_PREFIX}{view.key}",
                "prefect.resource.name": view.key, "planrun.tool": tool}
    if host:
        resource["planrun.host"] = host
    related = [{"prefect.resource.id": f"{RUN_RESOURCE_PREFIX}{view.run_id}",
                "prefect.resource.role": "run"}] if view.run_id else []
    emit_event(EVENT_NAMES[str(view.state)], resource=resource, related=related,
               payload={**view.to_value(), "threshold": settings.failures,
                        "cooldown_s": settings.cooldown_s,
                        "message": message_of(view)})


def message_of(view: BreakerView) -> str:
    """What a person reads about a breaker's change."""
    if view.state == State.OPEN and view.probe_at is not None:
        return f"{view.describe()}; the next try is at {clock_text(view.probe_at)}"
    if view.state == State.HALF_OPEN:
        return f"{view.key}: one trial call goes through"
    return f"{view.key} works again"


class Breakers:
    """The breakers of every tool, seen from one process (its cache), on ``store``.

    ``settings`` gives a tool's settings (None: no breaker); ``emit`` publishes a change;
    ``transitions`` counts the changes this process made, by (key, state).
    """

    def __init__(self, store: BreakerStore | None = None, *, ttl_s: float = CACHE_TTL_S,
                 clock: Callable[[], float] = time.time,
                 settings: Callable[[str], BreakerSettings | None] = settings_for,
                 emit: Callable[[BreakerView, BreakerSettings], None] = emit_breaker_event,
                 ) -> None:
        self.store = store or PrefectStore()
        self.ttl_s = ttl_s
        self.clock = clock
        self.settings = settings
        self.emit = emit
        self.transitions: Counter[tuple[str, str]] = Counter()
        self._cache: dict[str, tuple[BreakerView, float]] = {}
        self._held: dict[str, tuple[int, float]] = {}  # key -> (epoch, until): a trial elsewhere

    async def call(self, tool: str, params: Mapping[str, Any], run_id: str,
                   lease_s: float | None, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` if the breaker of ``tool`` (and ``params``' host) lets it, its outcome
        recorded; a ResourceError, without calling, while it is open."""
        permit = await self.admit(tool, params, run_id, lease_s)
        try:
            result = await call()
        except StepError as error:
            await self.record(permit, run_id, error)
            raise
        except BaseException:
            await self.abandon(permit)
            raise
        await self.record(permit, run_id, None)
        return result

    async def admit(self, tool: str, params: Mapping[str, Any], run_id: str,
                    lease_s: float | None = None) -> Permit:
        """A permit for one call, or the ResourceError of an open breaker."""
        settings = self.settings(tool)
        if settings is None:
            return Permit(None)
        key = breaker_key(tool, params)
        try:
            view = await self.view(key)
            if view.state == State.CLOSED:
                return Permit(key, settings, epoch=view.epoch)
            now = self.clock()
            if view.state == State.OPEN and view.probe_at is not None and now < view.probe_at:
                raise self._refusal(view, settings, view.probe_at)
            return await self._probe(view, settings, run_id, now + (lease_s or PROBE_LEASE_S))
        except StepError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server's trouble is not the tool's
            log.warning("the breaker of %s could not be read (%s); the call goes ahead", key, exc)
            return Permit(None)

    async def record(self, permit: Permit, run_id: str, error: StepError | None) -> None:
        """Count the outcome of a call made with ``permit``."""
        if permit.key is None or permit.settings is None:
            return
        counted = error is not None and error.category in COUNTED
        try:
            if permit.probe:
                await (self._reopen(permit, run_id) if counted else self._close(permit, run_id))
            elif counted:
                await self._count_failure(permit.key, permit.settings, run_id)
        except Exception as exc:  # noqa: BLE001 - as in admit
            log.warning("the breaker of %s could not be updated: %s", permit.key, exc)

    async def abandon(self, permit: Permit) -> None:
        """A call that ended without an outcome (cancelled): free its trial, if it was one."""
        if permit.key is None or not permit.probe:
            return
        try:
            await self.store.delete(variable_name(permit.key, f"probe-{permit.epoch}"))
        except Exception as exc:  # noqa: BLE001 - its claim then runs out at its until
            log.warning("the trial call of %s could not be freed: %s", permit.key, exc)

    async def view(self, key: str, fresh: bool = False) -> BreakerView:
        """Breaker ``key`` as this process knows it, at most ``ttl_s`` old (``fresh``: now)."""
        cached = self._cache.get(key)
        if cached is not None and not fresh and time.monotonic() - cached[1] < self.ttl_s:
            return cached[0]
        view = BreakerView.from_value(key, await self.store.read(variable_name(key)))
        self._cache[key] = (view, time.monotonic())
        return view

    async def views(self) -> list[BreakerView]:
        """Every breaker that has ever opened, from the store."""
        values = await self.store.read_all()
        return sorted((BreakerView.from_value(str(v["key"]), v) for v in values.values()
                       if "state" in v and "key" in v), key=lambda v: v.key)

    # -- transitions ------------------------------------------------------------------------

    async def _probe(self, view: BreakerView, settings: BreakerSettings, run_id: str,
                     until: float) -> Permit:
        now = self.clock()
        held = self._held.get(view.key)
        if held is not None and held[0] == view.epoch and now < held[1]:
            raise self._refusal(view, settings, None)
        name = variable_name(view.key, f"probe-{view.epoch}")
        if await self.store.claim(name, {"run_id": run_id, "until": until}):
            await self._publish(replace(view, state=State.HALF_OPEN, run_id=run_id), settings)
            return Permit(view.key, settings, probe=True, epoch=view.epoch)
        claim = await self.store.read(name) or {}
        claim_until = float(claim.get("until", 0.0))
        if claim_until > now:
            self._held[view.key] = (view.epoch, claim_until)
            raise self._refusal(view, settings, None)
        # The trial's process went away without a word: the next epoch tries again now.
        reopened = await self._open(view, settings, run_id, now)
        if reopened.state == State.CLOSED:
            return Permit(view.key, settings, epoch=reopened.epoch)
        return await self._probe(reopened, settings, run_id, until)

    async def _open(self, view: BreakerView, settings: BreakerSettings, run_id: str,
                    probe_at: float, failures: int | None = None) -> BreakerView:
        """Open epoch ``view.epoch + 1`` (if this process wins its claim): the view now."""
        epoch = view.epoch + 1
        if not await self.store.claim(variable_name(view.key, f"open-{epoch}"), {"run_id": run_id}):
            return await self.view(view.key, fresh=True)  # another process opened it
        opened = replace(view, state=State.OPEN, epoch=epoch, probe_at=probe_at,
                         opened_at=self.clock(), run_id=run_id,
                         failures=failures if failures is not None else view.failures,
                         window_s=settings.window_s, opened_total=view.opened_total + 1)
        await self._publish(opened, settings)
        return opened

    async def _reopen(self, permit: Permit, run_id: str) -> None:
        assert permit.key is not None and permit.settings is not None
        view = await self.view(permit.key, fresh=True)
        if view.epoch == permit.epoch:
            await self._open(view, permit.settings, run_id,
                             self.clock() + permit.settings.cooldown_s)

    async def _close(self, permit: Permit, run_id: str) -> None:
        assert permit.key is not None and permit.settings is not None
        view = await self.view(permit.key, fresh=True)
        if view.epoch != permit.epoch or view.state == State.CLOSED:
            return  # the trial outlived its claim and a later epoch decides
        await self._forget_failures(permit.key)
        await self._publish(replace(view, state=State.CLOSED, probe_at=None, run_id=run_id),
                            permit.settings)
        self._held.pop(permit.key, None)
        for old in (f"open-{view.epoch - 1}", f"probe-{view.epoch - 1}"):
            await self.store.delete(variable_name(permit.key, old))

    async def _count_failure(self, key: str, settings: BreakerSettings, run_id: str) -> None:
        """Each failure is a variable of its own (created: never lost to a concurrent
        writer), named by its time so the latest are listed first; those out of the
        window are deleted as they are met."""
        prefix = variable_name(key, "f-")
        now = self.clock()
        await self.store.claim(f"{prefix}{int(now * 1e6):017d}-{uuid.uuid4().hex[:8]}",
                               {"at": now, "run_id": run_id})
        latest = await self.store.latest(prefix, settings.failures + LIST_SLACK)
        fresh = [name for name, value in latest
                 if now - float(value.get("at", 0.0)) < settings.window_s]
        for name, _ in latest:
            if name not in fresh:
                await self.store.delete(name)
        if len(fresh) >= settings.failures:
            view = await self.view(key, fresh=True)
            if view.state == State.CLOSED:
                await self._open(view, settings, run_id, now + settings.cooldown_s,
                                 failures=len(fresh))

    async def _forget_failures(self, key: str) -> None:
        prefix = variable_name(key, "f-")
        for name, _ in await self.store.latest(prefix, 200):
            await self.store.delete(name)

    async def _publish(self, view: BreakerView, settings: BreakerSettings) -> None:
        await self.store.write(variable_name(view.key), view.to_value())
        self._cache[view.key] = (view, time.monotonic())
        self.transitions[(view.key, str(view.state))] += 1
        try:
            self.emit(view, settings)
        except Exception as exc:  # noqa: BLE001 - the change is stored; its news is extra
            log.warning("the event of breaker %s could not be sent: %s", view.key, exc)

    def _refusal(self, view: BreakerView, settings: BreakerSettings,
                 probe_at: float | None) -> ResourceError:
        """The error of a step refused by an open breaker (``probe_at`` None: a trial
        call is under way elsewhere; the step tries again after a cool-down)."""
        now = self.clock()
        wait = (probe_at - now) if probe_at is not None else settings.cooldown_s
        at = clock_text(now + wait)
        trial = "" if probe_at is not None else "a trial call is under way; "
        return ResourceError(
            f"{view.describe()}; {trial}the next try is at {at}",
            hint=f"planrun stopped calling {view.key} after repeated transient or resource "
                 f"failures; one trial call goes through at {at}. Check the service; "
                 "`planrun tools` shows its breaker",
            retry_after=max(wait, 0.0),
            details={"breaker": view.key, "state": str(view.state),
                     "next_try_at": datetime.fromtimestamp(now + wait).astimezone().isoformat()})


@lru_cache(maxsize=1)
def default_breakers() -> Breakers:
    """This process's breakers on the Prefect server (one cache for all its runs)."""
    return Breakers()
