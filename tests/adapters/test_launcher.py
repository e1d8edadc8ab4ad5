"""The launcher every program starts through: limits, groups, and the report of what the
reaped tree used, with real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.cgroups import make_step_group
from planrun.adapters.launcher import CHOICE_ENV, Report, launcher_command, read_report
from planrun.adapters.sandbox import Limits
from planrun.adapters.shell import ShellRun
from planrun.home import data_dir
from planrun.policy import LevelPolicy, Trust
from planrun.processes import alive, started
from tests import helpers
from tests.helpers import wait_for

MIB = 1024 * 1024


@pytest.fixture(autouse=True, params=["c", "python"])
def which(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the compiled launcher and with the Python one: they must agree."""
    monkeypatch.setenv(CHOICE_ENV, request.param)
    return str(request.param)


def test_the_c_launcher_is_built_once_into_the_data_directory(which: str) -> None:
    command = launcher_command()
    if which == "python":
        assert command[:4] == [sys.executable, "-I", "-S", "-c"]
        return
    assert len(command) == 1 and Path(command[0]).parent == data_dir() / "bin"
    assert os.access(command[0], os.X_OK) and launcher_command() == command


def launch(*argv: str, limits: Limits | None = None, procs: list[str] | None = None
           ) -> tuple[subprocess.CompletedProcess[str], Report]:
    return helpers.launch(list(argv), limits, procs)


def test_the_report_counts_the_cpu_memory_and_writes_of_the_reaped_tree(
        tmp_path: Path) -> None:
    writer = tmp_path / "writer.py"
    writer.write_text(f"open({str(tmp_path / 'f')!r}, 'wb').write(bytes(2**20))\n")
    main = tmp_path / "main.py"
    main.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.run([sys.executable, {str(writer)!r}], check=True)
        block = bytearray(50 * 2**20)
        started = time.process_time()
        while time.process_time() - started < 0.3:
            pass
    """))
    done, report = launch(sys.executable, str(main))
    assert done.returncode == 0, done.stderr
    assert report.failure is None and report.usage is not None
    assert report.usage.cpu_s >= 0.3
    assert report.usage.maxrss_bytes >= 50 * MIB
    assert report.usage.written_bytes is not None and report.usage.written_bytes >= MIB


def test_the_launcher_ends_as_the_program_ended() -> None:
    assert launch("sh", "-c", "exit 3")[0].returncode == 3
    assert launch("sh", "-c", "kill -TERM $$")[0].returncode == -signal.SIGTERM
    assert launch("sh", "-c", "kill -9 $$")[0].returncode == -signal.SIGKILL


def test_a_program_that_cannot_start_is_reported_with_its_errno() -> None:
    done, report = launch("/no/such/program-xyz")
    assert done.returncode == 127
    assert report.failure is not None and report.failure[:2] == ("exec", 2)


def test_the_launcher_sets_the_file_size_limit() -> None:
    done, _ = launch("sh", "-c", "ulimit -f", limits=Limits(file_bytes=MIB))
    assert done.stdout.strip() == str(MIB // 512)  # sh counts 512-byte blocks


def test_the_program_runs_in_the_step_group_and_the_launcher_outside_it() -> None:
    group = make_step_group()
    if group is None:
        pytest.skip("no control group can be made here: nothing to join")
    try:
        done, _ = launch("sh", "-c", "cat /proc/self/cgroup; echo launcher $PPID",
                         procs=group.procs_files())
        token = next(iter(group.dirs.values())).name
        lines = done.stdout.splitlines()
        assert any(token in line for line in lines[:-1])
        launcher = int(lines[-1].split()[1])
        assert launcher not in group.pids()  # it has exited; and never joined
    finally:
        group.remove()


def test_a_live_launcher_is_not_waited_for() -> None:
    read, write = os.pipe()
    try:
        assert read_report(read) == Report()
    finally:
        os.close(read)
        os.close(write)


#: A run process: starts the launcher as shell.run does (its own session, the status pipe's
#: write end passed), prints the launcher's pid and waits, holding the read end.
RUN_PROCESS = """
import json, os, subprocess, sys, time
from planrun.adapters.launcher import launch_argv, program_message
from planrun.adapters.sandbox import Limits
argv, procs = json.loads(sys.argv[1])
read, write = os.pipe()
go_read, go_write = os.pipe()
launcher = subprocess.Popen(launch_argv(write, go_read, procs), pass_fds=(write, go_read),
                            start_new_session=True)
os.close(write)
os.close(go_read)
os.write(go_write, program_message(argv, dict(os.environ), os.getcwd(), Limits()))
os.close(go_write)
print(launcher.pid, flush=True)
time.sleep(600)
"""


def orphan(tmp_path: Path, program: list[str], procs: list[str]) -> list[tuple[int, float]]:
    """Start ``program`` (which writes its pid to ``tmp_path/pid``) through a run process,
    SIGKILL that process once the program runs; the launcher and the program, as
    (pid, start time)."""
    with subprocess.Popen([sys.executable, "-c", RUN_PROCESS, json.dumps([program, procs])],
                          stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            launcher = int(parent.stdout.readline())
            pid_file = tmp_path / "pid"
            pids = [launcher, int(wait_for(
                lambda: pid_file.exists() and pid_file.read_text().strip(),
                what="the program's pid"))]
            processes = [(pid, started(pid)) for pid in pids]
        finally:
            parent.kill()
    return processes


def test_a_program_whose_run_process_died_is_killed(tmp_path: Path) -> None:
    """A run process killed with SIGKILL cannot stop its steps; its launcher sees the status
    pipe lose its reader and kills the program: a recovered run must not run a step again
    beside the old program."""
    processes = orphan(tmp_path, ["sh", "-c", f"echo $$ > {tmp_path / 'pid'}; exec sleep 600"],
                       [])
    wait_for(lambda: not any(alive(*process) for process in processes), timeout=10,
             what="the launcher and the program gone")


def test_a_program_that_left_the_process_group_is_killed_through_its_control_group(
        tmp_path: Path) -> None:
    group = make_step_group()
    if group is None:
        pytest.skip("no control group can be made here: the process group is all there is")
    try:
        script = f"echo $$ > {tmp_path / 'pid'}; exec sleep 600"
        processes = orphan(tmp_path, ["setsid", "sh", "-c", script], group.procs_files())
        launcher, program = processes[0][0], processes[1][0]
        assert os.getsid(program) != os.getsid(launcher)  # out of the launcher's session
        wait_for(lambda: not any(alive(*process) for process in processes), timeout=10,
                 what="the launcher and the program gone")
    finally:
        wait_for(lambda: not group.pids(), timeout=10, what="the step group empty")
        group.remove()


@pytest.mark.parametrize("sandbox", ["required", "off"])
def test_a_program_inherits_no_descriptor_of_planruns_but_its_streams(
        make_ctx: Callable[..., StepContext], sandbox: str) -> None:
    """posix_spawn passes on what planrun holds without close-on-exec (a C library's
    socket, a descriptor planrun inherited): the launcher closes it all."""
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True,
                                                             sandbox=sandbox))
        out = asyncio.run(ShellRun().run({"argv": ["ls", "/proc/self/fd"]}, ctx, 30))
    finally:
        os.close(leaked)
    # 0-2, and the directory ls reads (3): nothing of planrun's
    assert sorted(int(fd) for fd in out["stdout"].split()) == [0, 1, 2, 3]
