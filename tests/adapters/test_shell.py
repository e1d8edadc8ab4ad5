"""shell.run with real processes: output, environment, limits, and killing the whole group.

The default context is a submitted plan's, so most tests run inside the real bubblewrap
sandbox; the process-group tests run both sandboxed and unconfined (a local run's path
where bubblewrap is missing). The attacks are in tests/security/test_shell.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from planrun.adapters import sandbox
from planrun.adapters.base import StepContext
from planrun.adapters.shell import ShellRun
from planrun.adapters.workspace import Workspace
from planrun.errors import (
    AccessError,
    ConfigurationError,
    LogicError,
    ResourceError,
    TransientError,
)
from planrun.policy import LevelPolicy, Trust
from tests.helpers import unique_digits

#: A Python the sandbox can see (the test's own may live in a virtualenv outside /usr).
PY = shutil.which("python3", path=sandbox.DEFAULT_PATH) or "python3"
UNCONFINED = LevelPolicy(allow_private=True, sandbox="off")


def run(ctx: StepContext, timeout: float = 20, **params: Any) -> Any:
    return asyncio.run(ShellRun().run(params, ctx, timeout=timeout))


@pytest.fixture
def unconfined(make_ctx: Callable[..., StepContext]) -> StepContext:
    """A local run's context with the sandbox off."""
    return make_ctx(trust=Trust.LOCAL, policy=UNCONFINED)


@pytest.fixture(params=["sandboxed", "unconfined"])
def either(request: pytest.FixtureRequest, make_ctx: Callable[..., StepContext]) -> StepContext:
    """The process-group tests run both ways: what a step starts must end with it."""
    if request.param == "sandboxed":
        return make_ctx()
    return make_ctx(trust=Trust.LOCAL, policy=UNCONFINED)


def _gone(pid: int) -> bool:
    """Dead, or a zombie (an orphan's zombie waits for init; it holds no resources)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleepers() -> list[int]:
    """Live ``sleep`` processes started below this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "sleep" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _running(cmdline: str) -> list[int]:
    """Live processes (anywhere on the machine) whose command line is ``cmdline``."""
    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] == cmdline.split() and p.info["status"] != psutil.STATUS_ZOMBIE]


# -- output, input, environment -------------------------------------------------------------

def test_captures_stdout_stderr_and_exit_code(ctx: StepContext) -> None:
    out = run(ctx, argv=["sh", "-c", "echo out; echo err >&2"])
    assert out["exit_code"] == 0
    assert out["stdout"] == "out\n"
    assert out["stderr"] == "err\n"
    assert out["truncated"] is False
    assert 0 <= out["duration_s"] < 10


def test_arguments_are_never_interpreted_by_a_shell(ctx: StepContext, ws: Workspace) -> None:
    out = run(ctx, argv=["echo", "$HOME; touch pwned", "`id`", "*"])
    assert out["stdout"] == "$HOME; touch pwned `id` *\n"
    assert not (ws.root / "pwned").exists()


def test_stdin_is_fed_to_the_program(ctx: StepContext) -> None:
    out = run(ctx, argv=["cat"], stdin="line one\nline two\n")
    assert out["stdout"] == "line one\nline two\n"


def test_stdin_a_program_does_not_read_is_no_error(ctx: StepContext) -> None:
    out = run(ctx, argv=["true"], stdin="x" * 1_000_000)
    assert out["exit_code"] == 0


def test_the_environment_is_minimal_plus_the_step_env(ctx: StepContext,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_TEST_SECRET", "do-not-leak")
    out = run(ctx, argv=["env"], env={"GREETING": "hi"})
    names = {line.split("=", 1)[0] for line in out["stdout"].splitlines()}
    assert "PLANRUN_TEST_SECRET" not in names
    assert "do-not-leak" not in out["stdout"]
    assert {"PATH", "GREETING"} <= names
    assert names - {"PATH", "HOME", "LANG", "GREETING", "PWD"} == set()
    assert "GREETING=hi" in out["stdout"].splitlines()


def test_in_the_sandbox_home_is_the_workspace_and_path_the_system_one(
        ctx: StepContext, ws: Workspace) -> None:
    lines = run(ctx, argv=["env"])["stdout"].splitlines()
    assert f"HOME={ws.real_root}" in lines
    assert f"PATH={sandbox.DEFAULT_PATH}" in lines


def test_unconfined_the_environment_is_planruns_minimal_one(
        unconfined: StepContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_TEST_SECRET", "do-not-leak")
    out = run(unconfined, argv=["env"], env={"GREETING": "hi"})
    names = {line.split("=", 1)[0] for line in out["stdout"].splitlines()}
    assert "PLANRUN_TEST_SECRET" not in names
    assert names - {"PATH", "HOME", "LANG", "GREETING"} == set()


def test_runs_in_the_workspace_root_by_default_and_in_cwd_when_given(
        ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "sub").mkdir()
    assert run(ctx, argv=["pwd", "-P"])["stdout"].strip() == str(ws.real_root)
    assert run(ctx, argv=["pwd", "-P"], cwd="sub")["stdout"].strip() == str(ws.real_root / "sub")


def test_cwd_is_confined_to_the_workspace(ctx: StepContext, ws: Workspace,
                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"'\.\.'"):
        run(ctx, argv=["pwd"], cwd="..")
    with pytest.raises(ConfigurationError, match="absolute"):
        run(ctx, argv=["pwd"], cwd="/tmp")
    (ws.root / "out").symlink_to(tmp_path)
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(ctx, argv=["pwd"], cwd="out")
    with pytest.raises(ConfigurationError, match="not a directory"):
        run(ctx, argv=["pwd"], cwd="missing")


@pytest.mark.parametrize("params", [
    {"argv": []}, {"argv": [""]}, {"argv": ["echo", "a\x00b"]},
    {"argv": ["env"], "env": {"BAD-NAME": "x"}}, {"argv": ["env"], "cpu_seconds": 0},
])
def test_bad_parameters_are_configuration_errors(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="invalid parameters for shell.run"):
        ShellRun().validate(params)


# -- output caps ----------------------------------------------------------------------------

def test_output_beyond_the_cap_is_read_and_dropped(ctx: StepContext) -> None:
    script = ("import sys; sys.stdout.write('a' * 3_000_000); sys.stdout.flush(); "
              "sys.stderr.write('b' * 3_000_000)")
    out = run(ctx, argv=[PY, "-c", script], max_output_bytes=1000)
    assert out["exit_code"] == 0  # the program was never blocked on a full pipe
    assert out["stdout"] == "a" * 1000
    assert out["stderr"] == "b" * 1000
    assert out["truncated"] is True


# -- failures -------------------------------------------------------------------------------

def test_a_non_zero_exit_is_a_logic_error_with_the_code_and_stderr(ctx: StepContext) -> None:
    with pytest.raises(LogicError) as caught:
        run(ctx, argv=["sh", "-c", "echo progress; echo 'disk is not ready' >&2; exit 3"])
    error = caught.value
    assert "exited with code 3" in error.message
    assert "disk is not ready" in error.message
    assert error.details["exit_code"] == 3
    assert "disk is not ready" in error.details["stderr_tail"]
    assert error.details["stdout_tail"] == "progress\n"


def test_only_the_tail_of_a_long_stderr_is_in_the_message(ctx: StepContext) -> None:
    script = "import sys; sys.stderr.write('x' * 20000 + 'THE END'); sys.exit(1)"
    with pytest.raises(LogicError) as caught:
        run(ctx, argv=[PY, "-c", script])
    assert caught.value.message.endswith("THE END")
    assert len(caught.value.message) < 1000


@pytest.mark.parametrize("memory_mb", [None, 256])
def test_a_missing_program_is_a_configuration_error_naming_it(
        make_ctx: Callable[..., StepContext], memory_mb: int | None) -> None:
    with pytest.raises(ConfigurationError, match="no-such-program-xyz") as caught:
        run(make_ctx(memory_mb=memory_mb), argv=["no-such-program-xyz", "--help"])
    assert "PATH" in caught.value.hint


def test_unconfined_a_file_that_is_not_a_program_is_a_configuration_error(
        unconfined: StepContext, ws: Workspace) -> None:
    # (In the sandbox bubblewrap's execvp hands such a file to /bin/sh, as a shell would.)
    (ws.root / "data.bin").write_bytes(b"\x00\x01 not a program")
    (ws.root / "data.bin").chmod(0o755)
    with pytest.raises(ConfigurationError, match="cannot run './data.bin': Exec format error") \
            as caught:
        run(unconfined, argv=["./data.bin"])
    assert caught.value.hint == "check argv[0] and the size of the arguments"


@pytest.mark.parametrize("memory_mb", [None, 256])
def test_a_program_without_execute_permission_is_an_access_error(
        make_ctx: Callable[..., StepContext], ws: Workspace, memory_mb: int | None) -> None:
    (ws.root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (ws.root / "tool.sh").chmod(0o644)
    with pytest.raises(AccessError, match="permission denied"):
        run(make_ctx(memory_mb=memory_mb), argv=["./tool.sh"])


def test_the_memory_limit_applies_and_is_a_resource_error(
        make_ctx: Callable[..., StepContext]) -> None:
    ctx = make_ctx(memory_mb=200)
    with pytest.raises(ResourceError, match="200 MiB"):
        run(ctx, argv=[PY, "-c", "block = bytearray(1024 * 1024 * 1024)"])
    assert run(ctx, argv=[PY, "-c", "block = bytearray(10 * 1024 * 1024)"])["exit_code"] == 0


def test_the_cpu_limit_applies_and_is_a_resource_error(ctx: StepContext) -> None:
    started = time.monotonic()
    with pytest.raises(ResourceError, match="CPU limit of 1s"):
        run(ctx, argv=[PY, "-c", "while True: pass"], cpu_seconds=1)
    assert time.monotonic() - started < 10


def test_a_program_killed_by_sigkill_is_a_resource_error(ctx: StepContext) -> None:
    with pytest.raises(ResourceError, match="SIGKILL"):
        run(ctx, argv=["sh", "-c", "kill -9 $$"])


def test_health_says_the_sandbox_works() -> None:
    health = asyncio.run(ShellRun().health())
    assert health.ok
    assert "sandbox" in health.detail


def test_health_says_when_the_sandbox_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    health = asyncio.run(ShellRun().health())
    assert not health.ok
    assert "/nonexistent/bwrap is not installed" in health.detail
    assert "submitted plans cannot use shell.run" in health.detail


# -- where the sandbox cannot start ---------------------------------------------------------

def test_a_submitted_plan_cannot_run_a_program_without_the_sandbox(
        ctx: StepContext, ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    with pytest.raises(ConfigurationError) as caught:
        run(ctx, argv=["touch", "ran"])
    assert caught.value.message.startswith(
        "shell.run needs the bubblewrap sandbox for submitted plans")
    assert "/nonexistent/bwrap is not installed" in caught.value.message
    assert "scripts/install" in caught.value.hint
    assert not (ws.root / "ran").exists()


def test_a_local_run_without_the_sandbox_runs_unconfined_and_says_so_once(
        make_ctx: Callable[..., StepContext], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, str(tmp_path / "no-bwrap-here"))
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(sandbox="if_available"))
    with caplog.at_level(logging.WARNING, logger="planrun.step"):
        first = run(ctx, argv=["sh", "-c", "cat /proc/1/comm"])
        run(ctx, argv=["true"])
    assert first["stdout"].strip() != "bwrap"  # not in a PID namespace of its own
    warnings = [r.getMessage() for r in caplog.records if "UNCONFINED" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "no-bwrap-here is not installed" in warnings[0]


def test_where_bubblewrap_works_if_available_means_sandboxed(
        make_ctx: Callable[..., StepContext]) -> None:
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(sandbox="if_available"))
    assert run(ctx, argv=["cat", "/proc/1/comm"])["stdout"].strip() == "bwrap"


def test_the_program_and_its_environment_are_on_no_command_line(either: StepContext) -> None:
    """The program, its environment and bubblewrap's options reach the launcher through
    a pipe, and bubblewrap through an anonymous file: a secret in a step's env is on no
    process's command line (which any user of the machine can read)."""
    secret = f"s3cret-{unique_digits()}"
    seen: list[list[str]] = []

    async def scenario() -> None:
        task = asyncio.ensure_future(ShellRun().run(
            {"argv": ["sleep", "3"], "env": {"TOKEN": secret}}, either, timeout=20))
        deadline = time.monotonic() + 10
        while not _sleepers() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen.extend(p.info["cmdline"] or [] for p in psutil.process_iter(["cmdline"]))
        assert (await task)["exit_code"] == 0

    asyncio.run(scenario())
    assert any(cmdline[:2] == ["sleep", "3"] for cmdline in seen)
    assert not [cmdline for cmdline in seen if any(secret in arg for arg in cmdline)]


# -- the process group ----------------------------------------------------------------------

def test_a_timeout_kills_the_whole_process_group(either: StepContext,
                                                 wait_until: Callable[..., None]) -> None:
    seen: list[int] = []

    async def scenario() -> None:
        task = asyncio.ensure_future(
            ShellRun().run({"argv": ["sh", "-c", "sleep 30 & sleep 30"]}, either, timeout=1.5))
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            seen[:] = _sleepers()
            await asyncio.sleep(0.02)
        with pytest.raises(TransientError, match="timeout"):
            await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert len(seen) == 2, "both sleeps should have been running"
    assert time.monotonic() - started < 10
    wait_until(lambda: all(_gone(pid) for pid in seen), within=5,
               what="every process of the group is gone")


def test_a_cancel_kills_the_whole_process_group(either: StepContext,
                                                wait_until: Callable[..., None]) -> None:
    seen: list[int] = []

    async def scenario() -> None:
        task = asyncio.ensure_future(
            ShellRun().run({"argv": ["sh", "-c", "sleep 30 & sleep 30"]}, either, timeout=None))
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            seen[:] = _sleepers()
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(seen) == 2, "both sleeps should have been running"
    # Gone when the cancel returns, not merely eventually: the adapter waits for them.
    assert [pid for pid in seen if not _gone(pid)] == []
    wait_until(lambda: _sleepers() == [], within=5, what="no sleep is left")


def test_a_group_that_ignores_sigterm_is_killed(make_ctx: Callable[..., StepContext],
                                                wait_until: Callable[..., None]) -> None:
    ctx = make_ctx()
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"time.sleep(30.{unique_digits()})")  # no other suite's process looks the same
    started = time.monotonic()
    with pytest.raises(TransientError, match="timeout"):
        run(ctx, timeout=0.5, argv=[PY, "-c", script])
    assert time.monotonic() - started < 5
    wait_until(lambda: not any(p.info["cmdline"] and script in p.info["cmdline"]
                               and p.info["status"] != psutil.STATUS_ZOMBIE
                               for p in psutil.process_iter(["cmdline", "status"])),
               within=5, what="the SIGTERM-ignoring process is gone")


def test_background_processes_left_behind_are_stopped(either: StepContext,
                                                      wait_until: Callable[..., None]) -> None:
    marker = f"sleep 131.{unique_digits()}"  # no other test's sleep looks the same
    script = f'{marker} & while [ "$(cat /proc/$!/comm)" != sleep ]; do :; done; echo up'
    started = time.monotonic()
    out = run(either, argv=["sh", "-c", script])
    assert out["stdout"] == "up\n"  # the sleep was running when the program exited
    assert time.monotonic() - started < 10
    wait_until(lambda: not _running(marker), within=5, what="the background sleep is gone")


def test_a_process_that_leaves_the_group_cannot_hold_the_step_open_unconfined(
        unconfined: StepContext, ws: Workspace, wait_until: Callable[..., None]) -> None:
    # setsid puts the sleep in a session of its own, out of reach of the group kill; it
    # keeps stdout open. The step must still end at its timeout and release the pipes.
    # sh waits for the escapee to have left the group: before that, the group kill at sh's
    # exit would still reach it (a race that made this test flaky on a loaded machine).
    script = ('setsid sh -c "echo \\$\\$ > escapee.pid; exec sleep 30" & '
              'while [ ! -s escapee.pid ]; do sleep 0.01; done; echo started')
    started = time.monotonic()
    try:
        with pytest.raises(TransientError, match="timeout"):
            run(unconfined, timeout=1, argv=["sh", "-c", script])
        assert time.monotonic() - started < 5
        gc.collect()  # an unclosed pipe transport would warn (an error here) when collected
    finally:
        wait_until(lambda: (ws.root / "escapee.pid").exists(), what="the escapee started")
        # The step's end may have killed it already, and its zombie been reaped since.
        with contextlib.suppress(ProcessLookupError):
            os.kill(int((ws.root / "escapee.pid").read_text()), signal.SIGKILL)


def test_a_cancel_while_the_program_is_starting_stops_its_whole_group(
        either: StepContext, wait_until: Callable[..., None]) -> None:
    marker = f"sleep 31.{unique_digits()}"  # no other test's sleep looks the same

    async def cancel_after(turns: int) -> float:
        task = asyncio.ensure_future(
            ShellRun().run({"argv": ["sh", "-c", f"{marker} & {marker}"]}, either, None))
        for _ in range(turns):  # land the cancel at each point of the start-up in turn
            await asyncio.sleep(0)
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    for turns in range(12):
        assert asyncio.run(cancel_after(turns)) < 5

    wait_until(lambda: not _running(marker), within=5, what="the started group to be gone")


def test_a_program_given_more_than_a_pipe_holds_gets_all_of_it(either: StepContext) -> None:
    """Its argv and environment reach the launcher on a pipe (64 KiB): the rest is written
    as the launcher's child reads, for a new launcher and for the one kept ahead."""
    big, arg = "v" * 100_000, "a" * 100_000
    params = {"argv": ["sh", "-c", 'printf "%s %s" "${#BIG}" "${#1}"', "sh", arg],
              "env": {"BIG": big}}

    async def twice() -> list[str]:  # the second through the launcher kept after the first
        return [(await ShellRun().run(params, either, 30))["stdout"] for _ in range(2)]

    assert asyncio.run(twice()) == ["100000 100000"] * 2
