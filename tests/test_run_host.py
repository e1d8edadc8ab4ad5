"""`planrun run` through the warm run host (planrun/run_host.py): a run is a fork of a
process that has imported Prefect, and behaves as a run in the command's own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from planrun import run_host
from tests.helpers import PLANRUN, cli, unique_digits, wait_for
from tests.terminal import Terminal

ECHO = "version: 1\nname: warm\nsteps:\n  - {id: a, tool: core.echo, with: {value: 7}}\n"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of commands with the run host on, under a home of this test's own
    (so a host of its own); its hosts are stopped after the test."""
    home = tmp_path / "home"
    home.mkdir()
    environ = {**os.environ, "PLANRUN_HOME": str(home), "PLANRUN_RUN_HOST": "1"}
    yield environ
    running = hosts(environ)
    for host in running:
        host.terminate()  # coverage.py saves what it saw on SIGTERM
    _, alive = psutil.wait_procs(running, timeout=10)
    for host in alive:
        host.kill()


def hosts(environ: dict[str, str]) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "planrun.run_host" in (process.info["cmdline"] or []) and \
                    process.environ().get("PLANRUN_HOME") == environ["PLANRUN_HOME"]:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def answers(environ: dict[str, str]) -> bool:
    """Whether a host listens at the address of commands run with ``environ``."""
    path = run_host.address(environ)
    assert path is not None, "this test's home is too deep for a Unix socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def warm(environ: dict[str, str], tmp_path: Path) -> None:
    """A first run, which leaves a host for the next."""
    plan = tmp_path / "first.yaml"
    plan.write_text(ECHO)
    first = cli("run", str(plan), env=environ)
    assert first.returncode == 0, first.stderr
    try:
        wait_for(lambda: answers(environ), 60, "the run host to listen")
    except AssertionError as exc:  # what the host said (it once took over 60 s in a suite)
        log = Path(environ["PLANRUN_HOME"]) / "run-host.log"
        said = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}; the first run said: {first.stderr[-2000:]!r}; "
                             f"hosts: {[h.pid for h in hosts(environ)]}; {log}: {said}") from None


@pytest.mark.parametrize("first", [True, False], ids=["first run", "later run"])
def test_a_run_is_a_fork_of_the_host_and_a_signal_to_the_command_cancels_it(
        env: dict[str, str], tmp_path: Path, first: bool) -> None:
    """A first run (the session's server is up) starts the host and runs in a fork of it:
    Prefect is imported once; a later run finds the host there."""
    if not first:
        warm(env, tmp_path)
    seconds = f"600.{unique_digits()}"
    (tmp_path / "long.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        name: long
        steps:
          - {{id: wait, tool: shell.run, with: {{argv: [sleep, "{seconds}"]}}}}
    """))
    command = subprocess.Popen([*PLANRUN, "run", "long.yaml", "--json"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sleeper = wait_for(lambda: next((p for p in psutil.process_iter(["cmdline"])
                                         if p.info["cmdline"] == ["sleep", seconds]), None),
                           60, "the step's command to start")
        ancestors = sleeper.parents()
        assert {p.pid for p in ancestors} & {h.pid for h in hosts(env)}, \
            "the run is not a fork of the run host"
        if not first:  # (a first run's host is the command's child until the command exits)
            assert command.pid not in [p.pid for p in ancestors]
        command.send_signal(signal.SIGTERM)
        out, err = command.communicate(timeout=120)
    finally:
        command.kill()
    assert command.returncode == 4, err  # cancelled
    assert json.loads(out)["status"] == "cancelled"
    wait_for(lambda: not sleeper.is_running(), 30, "the step's command to be killed")


def test_the_host_runs_the_command_with_its_directory_streams_and_exit_code(
        env: dict[str, str], tmp_path: Path) -> None:
    warm(env, tmp_path)
    (tmp_path / "errors.yaml").write_text(textwrap.dedent("""\
        version: 1
        name: with-errors
        inputs: {word: {type: string}}
        steps:
          - {id: a, tool: core.echo, with: {value: "{{ inputs.word }}"}}
          - {id: b, tool: core.fail, critical: false, with: {category: logic}}
    """))
    done = cli("run", "errors.yaml", "--input", "word=hello", "--json", cwd=tmp_path, env=env)
    assert done.returncode == 3, done.stderr  # completed_with_errors
    report = json.loads(done.stdout)
    assert report["steps"]["a"]["output"] == {"value": "hello"}
    assert done.stderr.strip() == ""
    piped = cli("run", "errors.yaml", "--input", "word=x", cwd=tmp_path, env=env)
    assert "run with-errors completed_with_errors (2/2)" in piped.stderr  # a line a change
    assert piped.stdout.startswith("run ") and "completed_with_errors" in piped.stdout
    usage = cli("run", "errors.yaml", cwd=tmp_path, env=env)
    assert usage.returncode == 2 and "input 'word' is required" in usage.stderr


def test_on_a_terminal_the_run_asks_there_and_ctrl_c_cancels_it(env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    warm(env, tmp_path)
    (tmp_path / "gate.yaml").write_text(textwrap.dedent("""\
        version: 1
        name: gate
        steps:
          - {id: ship, tool: core.echo, approval: {prompt: "Ship it?"}, with: {value: 1}}
    """))
    asked = Terminal([*PLANRUN, "run", "gate.yaml"], env, tmp_path)
    try:
        asked.expect(r"approve\? \[y/N\] $")
        asked.type("y")
        asked.expect(r"comment \(optional, Enter for none\): $")
        asked.type("")
        assert asked.wait() == 0, asked.text()
        assert "step ship approved" in asked.text()
    finally:
        asked.close()
    interrupted = Terminal([*PLANRUN, "run", "gate.yaml"], env, tmp_path)
    try:
        interrupted.expect(r"approve\? \[y/N\] $")
        interrupted.process.send_signal(signal.SIGINT)  # what Ctrl-C sends the command
        assert interrupted.wait() == 4, interrupted.text()  # cancelled
    finally:
        interrupted.close()


def test_a_command_killed_outright_has_its_run_cancelled(env: dict[str, str],
                                                         tmp_path: Path) -> None:
    warm(env, tmp_path)
    seconds = f"600.{unique_digits()}"
    plan = tmp_path / "killed.yaml"
    plan.write_text(textwrap.dedent(f"""\
        version: 1
        name: killed
        steps:
          - {{id: wait, tool: shell.run, with: {{argv: [sleep, "{seconds}"]}}}}
    """))
    command = subprocess.Popen([*PLANRUN, "run", str(plan)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sleeper = wait_for(lambda: next((p for p in psutil.process_iter(["cmdline"])
                                     if p.info["cmdline"] == ["sleep", seconds]), None),
                       60, "the step's command to start")
    command.kill()
    command.wait(timeout=30)
    wait_for(lambda: not sleeper.is_running(), 60, "the orphaned run to kill its command")


def test_another_environment_gets_another_host_and_zero_turns_it_off() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root", "PLANRUN_HOME": "/tmp/a"}
    same = run_host.address(base)
    assert run_host.address({**base, "PATH": "/bin"}) == same  # read when used, not imported
    for read_by_the_fork in ("PLANRUN_WORKSPACE", "PLANRUN_POLICY", "PLANRUN_BRIDGE_URL",
                             "PLANRUN_TOKEN", "PLANRUN_SECRET_KEY"):
        assert run_host.address({**base, read_by_the_fork: "x"}) == same
    assert run_host.address({**base, "PLANRUN_HOME": "/tmp/b"}) != same
    assert run_host.address({**base, "PREFECT_API_URL": "http://127.0.0.1:1/api"}) != same
    assert run_host.address({**base, "HOME": "/home/x"}) != same
    assert same is not None and same.parent == Path("/tmp/a/run-host")
    assert run_host.address({**base, "PLANRUN_HOME": "/tmp/" + "deep/" * 30}) is None
    assert not run_host.enabled({"PLANRUN_RUN_HOST": "0"})
    assert run_host.enabled({})


def test_garbage_is_refused_an_idle_host_exits_and_a_second_host_steps_aside(
        env: dict[str, str]) -> None:
    environ = {**env, "PLANRUN_RUN_HOST_IDLE_S": "3"}
    first = subprocess.Popen([*PLANRUN[:2], "planrun.run_host"], env=environ)
    try:
        wait_for(lambda: answers(environ), 60, "the host to listen")
        for garbage in (b"not json\n", b'{"argv": "run"}\n', b"\xff" * 100):
            with socket.socket(socket.AF_UNIX) as peer:
                peer.connect(str(run_host.address(environ)))
                socket.send_fds(peer, [garbage], [0, 1, 2])
                peer.shutdown(socket.SHUT_WR)
                assert peer.recv(100) == b""  # closed without a word; nothing forked
        assert first.poll() is None
        second = subprocess.run([*PLANRUN[:2], "planrun.run_host"], env=environ, timeout=60)
        assert second.returncode == 0 and first.poll() is None
        path = run_host.address(environ)
        assert path is not None and path.parent.stat().st_mode & 0o777 == 0o700
        assert first.wait(timeout=60) == 0  # idle for a second: gone
    finally:
        first.kill()
    assert not answers(environ) and not path.exists()


def test_a_large_environment_reaches_the_run(env: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    """Asked from this process (its streams are pytest's): an environment larger than one
    read of the socket still arrives whole, and the run sees it."""
    env["PLANRUN_WORKSPACE"] = str(tmp_path / "ws")
    warm(env, tmp_path)
    for name, value in {**env, "BIG": "x" * 300_000}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "big.yaml").write_text(
        "version: 1\nname: big\nsteps:\n"
        "  - {id: w, tool: file.write, with: {path: big.txt, content: arrived}}\n")
    code = run_host.run_through_host(["run", str(tmp_path / "big.yaml"), "--json"])
    assert code == 0, capfd.readouterr().err  # None: no host took it
    assert json.loads(capfd.readouterr().out)["status"] == "completed"
    assert (tmp_path / "ws" / "big.txt").read_text() == "arrived"


def test_a_run_through_a_host_follows_its_own_policy_and_workspace(
        env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A host serves commands that differ in ``PLANRUN_POLICY`` and ``PLANRUN_WORKSPACE``
    (one address): each run reads its own, never the host's."""
    warm(env, tmp_path)  # the host's own environment names no policy and no workspace
    policy = tmp_path / "policy.yaml"
    policy.write_text("local: {tools: ['core.*']}\n")
    (tmp_path / "write.yaml").write_text(
        "version: 1\nname: writes\nsteps:\n"
        "  - {id: w, tool: file.write, with: {path: out.txt, content: hi}}\n")
    narrowed = {**env, "PLANRUN_POLICY": str(policy), "PLANRUN_WORKSPACE": str(tmp_path / "a")}
    assert run_host.address(narrowed) == run_host.address(env)
    for name, value in narrowed.items():  # asked from this process: a host must take it
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    refused = run_host.run_through_host(["run", "write.yaml"])
    err = capfd.readouterr().err
    assert refused == 2 and "file.write" in err, (refused, err)  # None: no host took it
    assert not (tmp_path / "a" / "out.txt").exists()
    monkeypatch.undo()  # this process's environment again, for the next command
    allowed = cli("run", "write.yaml", cwd=tmp_path,
                  env={**env, "PLANRUN_WORKSPACE": str(tmp_path / "b")})
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "b" / "out.txt").read_text() == "hi"
    assert len(hosts(env)) == 1, "all three commands on the one host"
