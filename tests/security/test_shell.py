"""Attacks a submitted plan would try with shell.run, against the real bubblewrap sandbox.

Each runs through the adapter as a submitted plan's step (or through a real
``planrun run``), and asserts what the user sees: the error's category and message, or
an output without the secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.shell import ShellRun
from planrun.adapters.workspace import Workspace
from planrun.errors import ConfigurationError, LogicError, ResourceError, TransientError
from planrun.policy import Ceilings, LevelPolicy, Trust
from tests.helpers import ROOT, cli, unique_digits, wait_for

CANARY = "canary-7f3a9c-do-not-leak"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")


@pytest.fixture
def submitted(ws: Workspace) -> Callable[..., StepContext]:
    """A submitted plan's step context; keyword arguments are the policy's fields."""
    def make(**policy: Any) -> StepContext:
        return StepContext(run_id="r", step_id="attack", workspace=ws, trust=Trust.SUBMITTED,
                           policy=LevelPolicy(**policy))
    return make


@pytest.fixture(autouse=True)
def canary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_TEST_CANARY", CANARY)


def run(ctx: StepContext, *argv: str, timeout: float = 20) -> dict[str, Any]:
    return asyncio.run(ShellRun().run({"argv": list(argv)}, ctx, timeout=timeout))  # type: ignore[no-any-return]


def sh(ctx: StepContext, script: str, timeout: float = 20) -> dict[str, Any]:
    return run(ctx, "sh", "-c", script, timeout=timeout)


def _running(cmdline: list[str]) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] == cmdline and p.info["status"] != psutil.STATUS_ZOMBIE]


# -- secrets of the parent ------------------------------------------------------------------

def test_the_parents_environment_cannot_be_read_through_proc(
        submitted: Callable[..., StepContext]) -> None:
    host_pids = " ".join(str(pid) for pid in (os.getpid(), os.getppid()))
    out = sh(submitted(), "cat /proc/$PPID/environ /proc/1/environ; env; "
                          f"for p in {host_pids}; do cat /proc/$p/environ; done; true")
    assert CANARY not in out["stdout"] + out["stderr"]
    assert "PLANRUN_TEST_CANARY" not in out["stdout"]
    assert "No such file or directory" in out["stderr"]  # the host's PIDs do not exist


def test_a_file_planrun_holds_open_cannot_be_read_through_an_inherited_descriptor(
        submitted: Callable[..., StepContext], tmp_path: Path) -> None:
    """A descriptor planrun holds without close-on-exec (a C library's, one it inherited)
    is closed before the program starts: reading every descriptor it might have finds
    only its own streams."""
    secret = tmp_path / "secret.txt"
    secret.write_text(CANARY)
    held = os.open(secret, os.O_RDONLY)
    os.set_inheritable(held, True)
    try:
        out = sh(submitted(), "for fd in 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 "
                              f"{held}; do cat /proc/self/fd/$fd 2>/dev/null; done; "
                              "ls /proc/self/fd; true")
    finally:
        os.close(held)
    assert CANARY not in out["stdout"] + out["stderr"]
    assert sorted(int(fd) for fd in out["stdout"].split()) == [0, 1, 2, 3]  # ls's own 3


# -- the file system ------------------------------------------------------------------------

def test_files_outside_the_workspace_cannot_be_read(
        submitted: Callable[..., StepContext], tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text(CANARY)
    for target in (tmp_path / "secret.txt", ROOT / "pyproject.toml", Path("/root")):
        with pytest.raises(LogicError, match="No such file or directory") as caught:
            run(submitted(), "cat" if target.is_file() else "ls", str(target))
        assert caught.value.category == "logic"
        assert CANARY not in str(caught.value.details)


def test_nothing_outside_the_workspace_can_be_written(
        submitted: Callable[..., StepContext], tmp_path: Path, ws: Workspace) -> None:
    for target in (Path("/usr/pwned"), Path("/etc/pwned"), Path("/pwned")):
        with pytest.raises(LogicError, match="Read-only file system"):
            sh(submitted(), f"echo x > {target}")
        assert not target.exists()
    # The sandbox's /tmp is its own: a write there succeeds and vanishes with the step.
    outside = tmp_path / "pwned"
    assert sh(submitted(), f"echo x > {outside} && cat {outside}")["stdout"] == "x\n"
    assert not outside.exists()
    assert sh(submitted(), "echo x > inside && cat inside")["stdout"] == "x\n"
    assert (ws.root / "inside").read_text() == "x\n"


# -- processes ------------------------------------------------------------------------------

def test_a_setsid_escapee_dies_with_the_step(submitted: Callable[..., StepContext],
                                            ) -> None:
    seconds = f"1000.{unique_digits()}"
    started = time.monotonic()
    out = sh(submitted(), f"setsid -f sleep {seconds}; echo started")
    assert out["stdout"] == "started\n"
    assert time.monotonic() - started < 5
    wait_for(lambda: not _running(["sleep", seconds]), timeout=5,
             what="the escaped sleep to be gone")


def test_a_setsid_escapee_cannot_hold_a_timed_out_step_open(
        submitted: Callable[..., StepContext]) -> None:
    seconds = f"1100.{unique_digits()}"
    started = time.monotonic()
    with pytest.raises(TransientError, match="did not finish within its timeout of 1s"):
        sh(submitted(), f"setsid -f sleep {seconds}; sleep 30", timeout=1)
    assert time.monotonic() - started < 5
    wait_for(lambda: not _running(["sleep", seconds]), timeout=5,
             what="the escaped sleep to be gone")


def test_a_fork_bomb_is_bounded_by_the_process_limit(
        submitted: Callable[..., StepContext]) -> None:
    script = textwrap.dedent("""
        import os, sys, time
        started = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                started += 1
        except OSError:
            print(started, file=sys.stderr)
            raise
    """)
    with pytest.raises(ResourceError, match="could not start more processes: its limit is 40"
                       ) as caught:
        run(submitted(ceilings=Ceilings(processes=40)), "python3", "-c", script)
    assert caught.value.category == "resource"
    assert int(caught.value.details["stderr_tail"].split()[0]) < 40
    assert "ceilings.processes" in caught.value.hint


def test_a_shell_fork_bomb_is_contained_and_leaves_nothing_behind(
        submitted: Callable[..., StepContext]) -> None:
    # Every process of the bomb carries the mark on its command line (the shell's forks
    # keep it, and its `sleep` is given it), so it is counted, not the machine's others.
    mark = f"30.{unique_digits()}"
    peak = [0]

    async def bomb() -> None:
        task = asyncio.ensure_future(ShellRun().run(
            {"argv": ["sh", "-c", f"b() {{ b | b & }}; b; exec sleep {mark}"]},
            submitted(ceilings=Ceilings(processes=30)), timeout=3))
        while not task.done():
            peak[0] = max(peak[0], len(_marked(mark)))
            await asyncio.sleep(0.05)
        # Stopped at its timeout; or at once when the bomb used up the limit before the
        # shell's own second fork for `b | b &` (under load it can), as a resource error.
        with pytest.raises((TransientError, ResourceError),
                           match="timeout of 3s|could not start more processes: its limit is 30"):
            await task

    started = time.monotonic()
    asyncio.run(bomb())
    assert time.monotonic() - started < 8
    assert peak[0] <= 30  # never more than the limit at once
    wait_for(lambda: not _marked(mark), timeout=5, what="the bomb's processes to be gone")


def _marked(mark: str) -> list[int]:
    """The live processes (not zombies) with ``mark`` in their command line."""
    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE
            and any(mark in arg for arg in p.info["cmdline"] or ())]


def test_a_file_bigger_than_the_limit_is_refused(
        submitted: Callable[..., StepContext], ws: Workspace) -> None:
    with pytest.raises(ResourceError, match="larger than its limit of 1 MiB") as caught:
        sh(submitted(ceilings=Ceilings(file_mb=1)), "head -c 3000000 /dev/zero > big")
    assert caught.value.category == "resource"
    assert "ceilings.file_mb" in caught.value.hint
    assert (ws.root / "big").stat().st_size <= 1024 * 1024


# -- the network ----------------------------------------------------------------------------

class _Counting(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reached")

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def local_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    _Counting.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read())"


def test_a_local_http_server_cannot_be_reached_from_inside(
        submitted: Callable[..., StepContext], local_server: str) -> None:
    with pytest.raises(LogicError, match="Connection refused|Network is unreachable"):
        run(submitted(), "python3", "-c", FETCH, local_server)
    assert _Counting.hits == 0


def test_the_network_is_there_only_when_the_policy_grants_it(
        submitted: Callable[..., StepContext], local_server: str) -> None:
    out = run(submitted(sandbox_network=True), "python3", "-c", FETCH, local_server)
    assert "reached" in out["stdout"]
    assert _Counting.hits == 1


# -- executables ----------------------------------------------------------------------------

def test_a_program_the_policy_does_not_allow_is_refused(
        submitted: Callable[..., StepContext]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        run(submitted(executables=["echo", "python3*"]), "cat", "/etc/passwd")
    assert caught.value.message == (
        "shell.run may not start 'cat (/usr/bin/cat)': the policy allows only "
        "['echo', 'python3*']")
    assert "executables" in caught.value.hint
    assert caught.value.category == "configuration"


def test_path_tricks_do_not_pass_the_executables_rule(
        submitted: Callable[..., StepContext], ws: Workspace) -> None:
    ctx = submitted(executables=["/usr/bin/echo", "echo"])
    with pytest.raises(ConfigurationError,
                       match=r"may not start '/usr/bin/echo/\.\./\.\./\.\./bin/sh \(/bin/sh\)'"):
        run(ctx, "/usr/bin/echo/../../../bin/sh", "-c", "id")
    fake = ws.root / "echo"
    fake.write_text("#!/bin/sh\ntouch pwned\n")
    fake.chmod(0o755)
    with pytest.raises(ConfigurationError, match="may not start"):
        asyncio.run(ShellRun().run({"argv": ["echo"], "env": {"PATH": str(ws.root)}}, ctx,
                                   timeout=20))
    assert not (ws.root / "pwned").exists()
    assert run(ctx, "echo", "allowed")["stdout"] == "allowed\n"


# -- through planrun run --------------------------------------------------------------------

def test_a_planrun_run_step_cannot_read_the_runners_environment(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent("""
        version: 1
        name: leak
        steps:
          - id: snoop
            tool: shell.run
            with: {argv: [sh, -c, "cat /proc/1/comm; cat /proc/1/environ /proc/$PPID/environ; env"]}
    """))
    proc = cli("run", str(plan), "--json", cwd=tmp_path,
               env={"PLANRUN_TEST_CANARY": CANARY, "PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "completed"
    assert CANARY not in proc.stdout + proc.stderr
    assert "bwrap" in json.dumps(report)  # PID 1 of the step is the sandbox's
