"""Factories shared by the tests: run plan text in-process, run the CLI, wait on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

S = TypeVar("S", bound=socketserver.BaseServer)

ROOT = Path(__file__).resolve().parent.parent
PLANRUN = [sys.executable, "-m", "planrun.cli"]


def plan_data(text: str) -> dict[str, Any]:
    """Validate YAML plan text (dedented) and return its plan data for the flow."""
    from planrun.validate import validate_text

    valid = validate_text(textwrap.dedent(text), "test.yaml")
    return valid.plan.model_dump(mode="json", by_alias=True, exclude_none=True)


def run_yaml(text: str, inputs: dict[str, Any] | None = None,
             observer: Any = None) -> dict[str, Any]:
    """Run a plan given as YAML text in this process, against the test server."""
    from planrun.inputs import resolve_inputs
    from planrun.runner import run_plan
    from planrun.validate import validate_text

    valid = validate_text(textwrap.dedent(text), "test.yaml")
    values = resolve_inputs(valid.plan, inputs or {}, from_text=False)
    data = valid.plan.model_dump(mode="json", by_alias=True, exclude_none=True)
    return asyncio.run(run_plan(data, values, observer))


def cli(*args: str, cwd: Path | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``planrun ARGS`` as a subprocess with the test session's environment."""
    return subprocess.run([*PLANRUN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def cli_json(*args: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """``planrun run ... --json``: exit code and parsed report."""
    proc = cli(*args, "--json", **kwargs)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def serving(server: S) -> Iterator[S]:
    """``server`` (a real one, on 127.0.0.1) answering in a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ended(process: Any) -> bool:
    """Whether the ``psutil.Process`` has exited (a zombie has: only its parent has not
    looked yet)."""
    import psutil

    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def unique_digits() -> str:
    """Digits no other process of this machine's test runs will pick: for a command line
    (``sleep 31.<digits>``) that a test finds among all processes by its text."""
    return f"{os.getpid()}{time.monotonic_ns() % 10**9:09d}"


def launch(argv: list[str], limits: Any = None, procs: list[str] | None = None,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run ``argv`` through the launcher (adapters/launcher.py) as a plain subprocess:
    its result and the launcher's report."""
    from planrun.adapters.launcher import launch_argv, program_message, read_report
    from planrun.adapters.sandbox import Limits

    message = program_message(argv, dict(os.environ) if env is None else env, os.getcwd(),
                              limits or Limits())
    status_read, status_write = os.pipe()
    go_read, go_write = os.pipe()
    try:
        with subprocess.Popen(launch_argv(status_write, go_read, procs or []),
                              pass_fds=(status_write, go_read), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) as proc:
            os.close(status_write)
            os.close(go_read)
            status_write = go_read = -1
            with open(go_write, "wb") as go:
                go_write = -1
                go.write(message)
            out, err = proc.communicate(timeout=60)
        return (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                read_report(status_read))
    finally:
        for fd in (status_read, status_write, go_read, go_write):
            if fd >= 0:
                os.close(fd)
