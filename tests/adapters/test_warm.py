"""The launcher kept ahead of the next step (adapters/warm.py), with real processes and
control groups: the next step's program starts through it, in its group, under that
step's own limits; the one not taken goes when its loop does."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from planrun.adapters import cgroups, sandbox, warm
from planrun.adapters.base import StepContext
from planrun.adapters.shell import ShellRun
from planrun.errors import ResourceError
from planrun.policy import LevelPolicy, Trust

PY = shutil.which("python3", path=sandbox.DEFAULT_PATH) or "python3"


@pytest.fixture(params=["sandboxed", "unconfined"])
def either(request: pytest.FixtureRequest, make_ctx: Callable[..., StepContext]) -> StepContext:
    if request.param == "sandboxed":
        return make_ctx(memory_mb=200)
    return make_ctx(memory_mb=200, trust=Trust.LOCAL,
                    policy=LevelPolicy(allow_private=True, sandbox="off"))


def _kept() -> list[tuple[int, list[Path]]]:
    """The kept launchers of this process: pid and group directories."""
    return [(kept.launched.proc.pid,
             list(kept.group.dirs.values()) if kept.group is not None else [])
            for kept in warm._KEPT]


async def _until_kept() -> tuple[int, list[Path]]:
    """The launcher kept after a step, once started (a loaded machine: up to 20 s)."""
    deadline = time.monotonic() + 20
    while not warm._KEPT:
        if time.monotonic() > deadline:
            raise AssertionError("no launcher was kept after a step within 20 s")
        await asyncio.sleep(0.01)
    return _kept()[0]


def test_the_next_step_starts_through_the_launcher_kept_in_its_group(
        either: StepContext) -> None:
    seen: dict[str, Any] = {}

    async def two_steps() -> None:
        first = await ShellRun().run({"argv": ["true"]}, either, 20)
        assert first["exit_code"] == 0
        seen["kept"] = await _until_kept()
        second = await ShellRun().run(
            {"argv": ["sh", "-c", "echo $PPID; cat /proc/self/cgroup"]}, either, 20)
        seen["second"] = second
        seen["kept after"] = await _until_kept()  # the one after it, started meanwhile

    asyncio.run(two_steps())
    (launcher, dirs), out = seen["kept"], seen["second"]
    assert out["exit_code"] == 0
    assert not any(path.exists() for path in dirs)  # used once, removed after the step
    assert seen["kept after"][0] != launcher
    if either.policy.sandbox != "off":
        return  # in the sandbox: its own cgroup namespace, and its parent is bwrap's PID 1
    assert int(out["stdout"].split()[0]) == launcher
    if dirs:  # the program ran in the kept group
        assert dirs[0].name in out["stdout"]


def test_the_kept_launcher_takes_the_steps_memory_limit(either: StepContext) -> None:
    async def two_steps() -> None:
        await ShellRun().run({"argv": ["true"]}, either, 20)
        await _until_kept()
        with pytest.raises(ResourceError, match="200 MiB"):
            await ShellRun().run({"argv": [PY, "-c", "block = bytearray(2**30)"]}, either, 20)

    asyncio.run(two_steps())


def test_the_launcher_not_taken_goes_with_its_loop(ctx: StepContext) -> None:
    kept: list[tuple[int, list[Path]]] = []

    async def one_step() -> None:
        await ShellRun().run({"argv": ["true"]}, ctx, 20)
        kept.append(await _until_kept())

    asyncio.run(one_step())
    (launcher, dirs), = kept
    assert not warm._KEPT
    assert not psutil.pid_exists(launcher) or \
        psutil.Process(launcher).status() == psutil.STATUS_ZOMBIE
    assert not any(path.exists() for path in dirs)


def test_without_control_groups_a_launcher_is_still_kept(
        ctx: StepContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.ROOT_ENV, "/nonexistent")  # a machine without cgroups

    async def two_steps() -> tuple[int, list[Path]]:
        await ShellRun().run({"argv": ["true"]}, ctx, 20)
        kept = await _until_kept()
        out = await ShellRun().run({"argv": ["echo", "ran"]}, ctx, 20)
        assert out["stdout"] == "ran\n"
        return kept

    assert asyncio.run(two_steps())[1] == []


def test_a_loop_that_ends_as_the_next_launcher_starts_ends_at_once(ctx: StepContext) -> None:
    """The next launcher starts as a short step ends; a loop shutting down right then
    cancels that start, which must leave nothing waiting (asyncio's subprocess start,
    cancelled half way, waited forever for pipes it never connected)."""
    ended: list[float] = []

    def steps() -> None:
        for _ in range(10):
            started = time.monotonic()
            asyncio.run(ShellRun().run({"argv": ["true"]}, ctx, 20))
            ended.append(time.monotonic() - started)

    runner = threading.Thread(target=steps, daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), f"a loop did not end after its step ({len(ended)} of 10 did)"
    assert not warm._KEPT and not warm._STARTING
