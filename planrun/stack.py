"""``planrun up``: the local stack in one command.

A Prefect server (planrun's local one on SQLite, unless ``PREFECT_API_URL`` names one), a
runner serving the ``planrun/plan-runner`` deployment (each run in a process of its own)
and the progress bridge. The runner and the bridge are child processes; Ctrl-C or SIGTERM
stops them, and the local server too when this command started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx

from planrun import bridge_token, server
from planrun.errors import PlanrunError

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
#: A child that exits more than MAX_RESTARTS times within RESTART_WINDOW_S stops the stack.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def up(host: str, port: int, out: IO[str] = sys.stdout) -> int:
    """Start the stack, print where it is, and keep it up until a signal; the exit code."""
    from planrun.runner import prepare_prefect

    token = bridge_token.for_bind(host)  # before anything starts: a refusal costs nothing
    if server.port_taken(port, host):
        raise PlanrunError(f"{host}:{port} is already in use (another planrun up?): stop that "
                           "or pass --port")
    own_server = not os.environ.get("PREFECT_API_URL") and server.running() is None
    api = prepare_prefect()
    home = server.data_dir()
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    bridge = f"http://{_reachable(host)}:{port}"
    env = {**os.environ, **server.QUIET_ENV, "PREFECT_API_URL": api,
           "PREFECT_RUNNER_POLL_FREQUENCY": os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "1"),
           "PLANRUN_WORKSPACE": os.path.abspath(os.environ.get("PLANRUN_WORKSPACE",
                                                               "workspace")),
           # runs name their live page in their log at a gate (docs/prefect-ui.md)
           "PLANRUN_BRIDGE_URL": os.environ.get("PLANRUN_BRIDGE_URL", bridge)}
    children = [
        _spawn("runner", [sys.executable, "-m", "planrun.flows.serve"], env, logs),
        _spawn("bridge", [sys.executable, "-m", "planrun.progress_bridge", "--host", host,
                          "--port", str(port), "--data", str(home / "bridge")], env, logs),
    ]
    stop = _on_signals()
    try:
        _wait_ready(children, bridge, api, stop)
        if stop:
            return 0
        ui = api.removesuffix("/api")
        kept = ("from PLANRUN_TOKEN" if bridge_token.explicit() else
                f"kept in {bridge_token.path()}, which the CLI reads")
        print(f"planrun is up\n"
              f"  bridge      {bridge}\n"
              f"  token       {token}  ({kept})\n"
              f"  live page   {bridge}/v1/runs/RUN/view?token={quote(token, safe='')}\n"
              f"  API docs    {bridge}/docs?token={quote(token, safe='')}\n"
              f"  Prefect UI  {ui}\n"
              f"  runner      serving planrun/plan-runner (logs in {logs})\n"
              f"submit a plan with `planrun submit PLAN`, follow it with `planrun watch RUN` "
              f"or on its live page; Ctrl-C stops", file=out, flush=True)
        restarts: list[float] = []
        while not stop:
            for i, child in enumerate(children):
                if child.process.poll() is None:
                    continue
                # A runner or bridge that dies is started again (its runs are recovered
                # by the bridge); one that keeps dying is a problem a person must see.
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    raise PlanrunError(f"the {child.name} keeps exiting (status "
                                       f"{child.process.returncode}):\n{child.tail()}")
                print(f"the {child.name} exited with status {child.process.returncode}; "
                      "starting it again", file=out, flush=True)
                children[i] = _spawn(child.name, child.argv, env, logs)
            time.sleep(0.2)
        print("stopping…", file=out, flush=True)
        return 0
    finally:
        for child in children:
            _stop(child)
        if own_server:
            server.stop()


def _reachable(host: str) -> str:
    """How a client on this machine names a bridge listening on ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in host:  # IPv6
        return "[::1]" if host == "::" else f"[{host}]"
    return host


#: What a child gets when ``planrun up`` dies without stopping it (SIGKILL, the OOM killer).
#: The bridge stops cleanly on SIGTERM. The runner must not get SIGTERM: like a normal
#: shutdown it would cancel the runs in flight. Killed, it leaves its run processes running:
#: each run goes on, and one whose process dies too is recovered (README, "Crashes").
DEATH_SIGNALS = {"runner": signal.SIGKILL}


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    death = DEATH_SIGNALS.get(name, signal.SIGTERM)
    with log.open("ab") as sink:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: _die_with_parent(death))
    return Child(name, argv, process, log)


def _die_with_parent(death: signal.Signals) -> None:
    """In the child: get ``death`` when ``planrun up`` dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, death)


def _wait_ready(children: list[Child], bridge: str, api: str, stop: list[int]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = {"bridge": f"{bridge}/healthz",
               "runner": f"{api}/deployments/name/planrun/plan-runner"}
    while waiting and not stop:
        for child in children:
            if child.process.poll() is not None:
                raise PlanrunError(f"the {child.name} exited with status "
                                   f"{child.process.returncode} while starting:\n{child.tail()}")
        for name, url in list(waiting.items()):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    del waiting[name]
        if time.monotonic() > deadline:
            raise PlanrunError(f"the {' and the '.join(waiting)} did not start within "
                               f"{START_TIMEOUT_S:.0f}s; see the logs in {children[0].log.parent}")
        time.sleep(0.2)


def _on_signals() -> list[int]:
    """A list that gets the signal number when SIGINT or SIGTERM arrives."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return received


def _stop(child: Child) -> None:
    """SIGTERM to the child's process group (a runner's runs included), SIGKILL if needed."""
    if child.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGTERM)
    try:
        child.process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
