"""The limiter (flows/limits.py) on a real SQLite store: calls held to their concurrency in
arrival order, waiters woken by a release in this process or in another (a second limiter
on the same file stands for another process), notes that say what a call waits for, load
pressure that holds calls back, and a store that cannot be used limiting nothing (a SQLite
file that cannot be made, a PostgreSQL that does not answer). Which store a process uses:
the stack's PostgreSQL when ``PLANRUN_DATABASE_URL`` names one."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from planrun.flows.limit_store import SqliteLimitStore
from planrun.flows.limit_store_pg import PostgresLimitStore
from planrun.flows.limits import Ask, Limiter, Waiting, limit_keys
from planrun.flows.load import LoadGauge
from planrun.plan_schemas.model import ToolLimit
from planrun.policy_limits import LoadLimits, OperatorLimits
from tests.stack import free_port


def limits(**data: Any) -> OperatorLimits:
    return OperatorLimits.model_validate(data)


def limiter(path: Path, settings: OperatorLimits, memory: float = 10.0) -> Limiter:
    gauge = LoadGauge(lambda: settings.load, memory=lambda: memory, cpu=lambda: 0.0)
    return Limiter(lambda: SqliteLimitStore(path), lambda: settings, gauge)


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh loop, within 20 seconds."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def within() -> None:
            async with asyncio.timeout(20):
                await test(*args, **kwargs)
        asyncio.run(within())

    return run


SHELL_2 = {"tools": {"shell.run": {"concurrency": 2}}}


@bounded
async def test_two_hundred_calls_at_a_limit_of_four_are_never_more_than_four_at_once(
        tmp_path: Path) -> None:
    lim = limiter(tmp_path / "l.sqlite3", limits(tools={"shell.run": {"concurrency": 4}}))
    running, most, overtaken = 0, 0, []
    callers: dict[Any, int] = {}  # each call's waiting callback: which call it is

    async def call(i: int) -> None:
        nonlocal running, most
        heard = functools.partial(lambda i, waiting: None, i)
        callers[heard] = i
        async with lim.hold(Ask("shell.run", step_id=str(i)), heard):
            running += 1
            most = max(most, running)
            # first come, first served: no later call has a slot while an earlier one waits
            overtaken.extend(callers[w.waiting] for w in lim._waiters.values()
                             if callers[w.waiting] < i)
            await asyncio.sleep(0.001)
            running -= 1

    tasks = []
    for i in range(200):  # each joins the queue before the next
        tasks.append(asyncio.create_task(call(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert most == 4
    assert overtaken == []


@bounded
async def test_a_waiter_hears_what_it_waits_for_and_how_many_are_ahead(tmp_path: Path) -> None:
    lim = limiter(tmp_path / "l.sqlite3", limits(**SHELL_2))
    heard: dict[str, list[Waiting]] = {"c": [], "d": []}
    release = asyncio.Event()

    async def call(name: str) -> None:
        async with lim.hold(Ask("shell.run", step_id=name), heard.setdefault(name, []).append):
            await release.wait()

    tasks = [asyncio.create_task(call(n)) for n in "abcd"]
    while len(heard["d"]) < 1:
        await asyncio.sleep(0.001)
    assert heard["c"] == [Waiting("slot", "waiting for a shell.run slot (limit 2), next in line",
                                  "tool:shell.run")]
    assert heard["d"][0].note == "waiting for a shell.run slot (limit 2), 1 ahead"
    release.set()
    await asyncio.gather(*tasks)
    assert heard["a"] == heard["b"] == []


@bounded
async def test_a_release_in_another_process_wakes_the_waiters_here(tmp_path: Path) -> None:
    path, settings = tmp_path / "l.sqlite3", limits(tools={"shell.run": {"concurrency": 1}})
    here, there = limiter(path, settings), limiter(path, settings)
    release, started = asyncio.Event(), []

    async def held_there() -> None:
        async with there.hold(Ask("shell.run"), lambda w: None):
            started.append("there")
            await release.wait()

    async def waits_here(name: str) -> None:
        async with here.hold(Ask("shell.run"), lambda w: None):
            started.append(name)

    holder = asyncio.create_task(held_there())
    while not started:
        await asyncio.sleep(0.001)
    waiters = [asyncio.create_task(waits_here(n)) for n in ("one", "two", "three")]
    await asyncio.sleep(0.1)
    assert started == ["there"]
    assert len(here._waiters) == 3  # three waiters, one keeper task polling for them all
    release.set()
    await asyncio.gather(holder, *waiters)
    assert started == ["there", "one", "two", "three"]


@bounded
async def test_a_cancelled_waiter_leaves_the_queue(tmp_path: Path) -> None:
    lim = limiter(tmp_path / "l.sqlite3", limits(tools={"shell.run": {"concurrency": 1}}))
    release, started = asyncio.Event(), []

    async def call(name: str) -> None:
        async with lim.hold(Ask("shell.run"), lambda w: None):
            started.append(name)
            await release.wait()

    first = asyncio.create_task(call("first"))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(call("gone"))
    last = asyncio.create_task(call("last"))
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    await asyncio.gather(first, last)
    assert started == ["first", "last"]
    assert not lim._waiters and not lim._held


@bounded
async def test_a_rate_makes_a_call_wait_exactly_its_turn_with_a_note(tmp_path: Path) -> None:
    settings = limits(tools={"http.request": {"rate": 20, "burst": 2}})
    lim = limiter(tmp_path / "l.sqlite3", settings)
    heard: list[Waiting] = []
    for _ in range(3):
        async with lim.hold(Ask("http.request", host="example.org"), heard.append):
            pass
    assert [w.why for w in heard] == ["rate"]
    assert heard[0].note.startswith("waiting for the http.request rate limit (20/s, burst 2): "
                                    "starts in 0.")


@bounded
async def test_under_load_a_call_waits_while_another_of_this_process_runs(
        tmp_path: Path) -> None:
    settings = limits(load={"memory_percent": 50})
    lim = limiter(tmp_path / "l.sqlite3", settings, memory=75.0)
    release, heard, started = asyncio.Event(), [], []

    async def call(name: str) -> None:
        async with lim.hold(Ask("core.echo"), heard.append):
            started.append(name)
            await release.wait()

    first = asyncio.create_task(call("first"))  # nothing else runs: it goes all the same
    second = asyncio.create_task(call("second"))
    while not heard:
        await asyncio.sleep(0.01)
    assert started == ["first"]
    assert heard[0] == Waiting("load", "waiting for the machine's load to drop: memory in use "
                                       "75 % ≥ 50 %", "load")
    assert lim.pressure() == "memory in use 75 % ≥ 50 %"
    release.set()
    await asyncio.gather(first, second)
    assert started == ["first", "second"]


def test_the_keys_of_a_call_are_the_machine_the_tool_the_host_and_the_run() -> None:
    settings = limits(concurrency=50, tools={"http.request": {"concurrency": 8, "rate": 20}},
                      hosts={"API.example.org": {"rate": 2, "burst": 3}})
    ask = Ask.of("http.request", {"url": "https://API.Example.org./v1"}, "r1", "s",
                 {"http.request": ToolLimit(concurrency=2)})
    slots, rates = limit_keys(ask, settings)
    assert slots == {"all": 50, "tool:http.request": 8, "run:r1:tool:http.request": 2}
    assert {k: (r.per_s, r.burst) for k, r in rates.items()} == {
        "tool:http.request": (20, 1), "host:api.example.org": (2, 3)}
    assert limit_keys(Ask("core.echo"), limits()) == ({}, {})


def test_without_a_policy_shell_run_is_held_to_twice_the_cores() -> None:
    import os

    slots, _ = limit_keys(Ask("shell.run"), limits())
    assert slots == {"tool:shell.run": 2 * (os.cpu_count() or 1)}
    slots, _ = limit_keys(Ask("shell.run"),
                          limits(tools={"shell.run": {"rate": 5, "concurrency": None}}))
    assert slots == {}


@bounded
async def test_a_store_that_cannot_be_used_limits_nothing_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    lim = limiter(blocker / "l.sqlite3", limits(**SHELL_2))
    ran = False
    with caplog.at_level(logging.WARNING, "planrun.limits"):
        async with lim.hold(Ask("shell.run"), lambda w: None):
            ran = True
    assert ran
    assert "goes ahead unlimited" in caplog.text


def test_load_thresholds_can_be_turned_off() -> None:
    gauge = LoadGauge(lambda: LoadLimits(memory_percent=None, cpu_per_core=None),
                      memory=lambda: 100.0, cpu=lambda: 100.0)
    assert gauge.pressure() is None
    gauge = LoadGauge(lambda: LoadLimits(memory_percent=None, cpu_per_core=0.5),
                      memory=lambda: 100.0, cpu=lambda: 1000.0)
    assert gauge.pressure() is not None and gauge.pressure().startswith("CPU load ")


@bounded
async def test_a_postgres_store_that_cannot_be_reached_limits_nothing_and_hides_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    store = PostgresLimitStore(f"postgresql+asyncpg://planrun:s3cr%40t@127.0.0.1:{port}/x")
    settings = limits(**SHELL_2)
    lim = Limiter(lambda: store, lambda: settings,
                  LoadGauge(lambda: settings.load, memory=lambda: 10.0, cpu=lambda: 0.0))
    ran = False
    with caplog.at_level(logging.WARNING, "planrun.limits"):
        async with lim.hold(Ask("shell.run"), lambda w: None):
            ran = True
    assert ran
    assert f"the limits' store cannot be used (PostgreSQL at 127.0.0.1:{port}: " in caplog.text
    assert "goes ahead unlimited" in caplog.text
    assert "s3cr" not in caplog.text


def test_the_store_is_the_stacks_postgres_database_when_planrun_database_url_names_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql+asyncpg://planrun@db.example:5432/planrun"
    monkeypatch.setenv("PLANRUN_DATABASE_URL", url)
    store = Limiter().store
    assert isinstance(store, PostgresLimitStore) and store.url == url
    monkeypatch.delenv("PLANRUN_DATABASE_URL")
    assert isinstance(Limiter().store, SqliteLimitStore)
