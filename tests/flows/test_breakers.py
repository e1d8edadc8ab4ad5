"""Circuit breakers on the in-memory store (one process) and on the test session's Prefect
server (variables as the shared state): flows/breakers.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from planrun.errors import ConfigurationError, ResourceError, StepError, TransientError
from planrun.flows.breaker_store import MemoryStore, PrefectStore
from planrun.flows.breakers import Breakers, BreakerView, State, breaker_key, variable_name
from planrun.policy import BreakerSettings

SETTINGS = BreakerSettings(failures=3, window_s=60, cooldown_s=10)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def breakers(store: Any = None, clock: Clock | None = None,
             events: list[BreakerView] | None = None) -> Breakers:
    seen = events if events is not None else []
    return Breakers(store or MemoryStore(), ttl_s=0.0, clock=clock or Clock(),
                    settings=lambda tool: SETTINGS if tool.startswith("svc") else None,
                    emit=lambda view, settings: seen.append(view))


async def attempt(b: Breakers, outcome: StepError | None, tool: str = "svc.call") -> bool:
    """One call through ``b``; True if the call was made."""
    made = []

    async def call() -> str:
        made.append(1)
        if outcome is not None:
            raise outcome
        return "ok"

    try:
        await b.call(tool, {}, "run-1", None, call)
    except StepError:
        pass
    return bool(made)


def test_a_breaker_opens_after_its_failures_and_then_no_call_is_made() -> None:
    async def go() -> None:
        events: list[BreakerView] = []
        b = breakers(events=events)
        for _ in range(3):
            assert await attempt(b, TransientError("down"))
        assert [v.state for v in events] == [State.OPEN]
        assert not await attempt(b, None)
        with pytest.raises(ResourceError) as refused:
            await b.admit("svc.call", {}, "run-2")
        assert "svc.call is failing in every run (3 in 60 s); the next try is at" in \
            refused.value.message
        assert refused.value.retry_after == pytest.approx(10.0)
    asyncio.run(go())


def test_failures_of_other_categories_and_old_failures_do_not_count() -> None:
    async def go() -> None:
        clock = Clock()
        b = breakers(clock=clock)
        for _ in range(5):
            await attempt(b, ConfigurationError("bad params"))
        await attempt(b, TransientError("down"))
        await attempt(b, TransientError("down"))
        clock.now += 61
        await attempt(b, TransientError("down"))
        assert (await b.view("svc.call")).state == State.CLOSED
    asyncio.run(go())


def test_after_the_cooldown_exactly_one_trial_goes_through_and_success_closes() -> None:
    async def go() -> None:
        clock, events = Clock(), []
        store = MemoryStore()
        b, other = breakers(store, clock, events), breakers(store, clock, events)
        for _ in range(3):
            await attempt(b, TransientError("down"))
        clock.now += 10
        permit = await b.admit("svc.call", {}, "run-1")
        assert permit.probe
        with pytest.raises(ResourceError, match="a trial call is under way"):
            await other.admit("svc.call", {}, "run-2")
        await b.record(permit, "run-1", None)
        assert [v.state for v in events] == [State.OPEN, State.HALF_OPEN, State.CLOSED]
        assert await attempt(other, None)
    asyncio.run(go())


def test_a_failed_trial_opens_the_breaker_again_for_another_cooldown() -> None:
    async def go() -> None:
        clock, events = Clock(), []
        b = breakers(clock=clock, events=events)
        for _ in range(3):
            await attempt(b, TransientError("down"))
        clock.now += 10
        assert await attempt(b, TransientError("still down"))
        view = await b.view("svc.call")
        assert (view.state, view.epoch, view.opened_total) == (State.OPEN, 2, 2)
        assert view.probe_at == clock.now + 10
        assert not await attempt(b, None)
    asyncio.run(go())


def test_a_cancelled_trial_frees_its_place_for_the_next() -> None:
    async def go() -> None:
        clock = Clock()
        b = breakers(clock=clock)
        for _ in range(3):
            await attempt(b, TransientError("down"))
        clock.now += 10

        async def cancelled() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await b.call("svc.call", {}, "run-1", None, cancelled)
        assert (await b.admit("svc.call", {}, "run-2")).probe
    asyncio.run(go())


def test_a_trial_whose_process_died_is_replaced_once_its_lease_runs_out() -> None:
    async def go() -> None:
        clock, store = Clock(), MemoryStore()
        dead, alive = breakers(store, clock), breakers(store, clock)
        for _ in range(3):
            await attempt(dead, TransientError("down"))
        clock.now += 10
        assert (await dead.admit("svc.call", {}, "run-1", lease_s=30)).probe
        with pytest.raises(ResourceError):
            await alive.admit("svc.call", {}, "run-2")
        clock.now += 31
        assert (await alive.admit("svc.call", {}, "run-2")).probe
    asyncio.run(go())


def test_tools_without_a_breaker_cost_no_request() -> None:
    async def go() -> None:
        store = MemoryStore()
        b = breakers(store)
        for _ in range(10):
            await attempt(b, TransientError("down"), tool="core.fail")
        assert store.requests == 0
    asyncio.run(go())


def test_http_requests_have_one_breaker_per_host() -> None:
    assert breaker_key("http.request", {"url": "https://api.example.org/x"}) == \
        "http.request@api.example.org"
    assert breaker_key("http.request", {"url": "http://127.0.0.1:8080/"}) == \
        "http.request@127.0.0.1:8080"
    assert breaker_key("search.web", {"query": "x"}) == "search.web"
    assert variable_name("http.request@127.0.0.1:8080").startswith(
        "planrun-breaker-http-request-127-0-0-1-8080-")


def test_the_state_is_shared_through_prefect_variables_and_read_by_a_new_process() -> None:
    async def go() -> None:
        tool = f"svc.shared{id(go)}"
        first = breakers(PrefectStore())
        for _ in range(3):
            await attempt(first, TransientError("down"), tool=tool)
        restarted = breakers(PrefectStore())  # nothing cached: as a new process
        assert not await attempt(restarted, None, tool=tool)
        views = {v.key: v for v in await restarted.views()}
        assert views[tool].state == State.OPEN and views[tool].opened_total == 1
    asyncio.run(go())


def test_only_one_of_many_concurrent_claims_of_a_trial_wins_on_the_server() -> None:
    async def go() -> None:
        store = PrefectStore()
        name = variable_name(f"svc.race{id(go)}", "probe-1")
        won = await asyncio.gather(*(store.claim(name, {"n": n}) for n in range(8)))
        assert sum(won) == 1
    asyncio.run(go())


def test_concurrent_failures_in_two_processes_are_all_counted_on_the_server() -> None:
    async def go() -> None:
        tool = f"svc.together{id(go)}"
        settings = BreakerSettings(failures=6, window_s=60, cooldown_s=60)
        one, two = (Breakers(PrefectStore(), settings=lambda t: settings, emit=lambda v, s: None)
                    for _ in range(2))
        await asyncio.gather(*(attempt(b, TransientError("down"), tool=tool)
                               for b in (one, two) for _ in range(3)))
        assert (await one.view(tool, fresh=True)).state == State.OPEN
    asyncio.run(go())
