"""``planrun up``: the local stack in one command.

A Prefect server (planrun's local one on SQLite, unless ``PREFECT_API_URL`` names one; with
``--database`` one of the stack's own on PostgreSQL: ``planrun.production``), runners
serving the ``planrun/plan-runner`` deployment (one unless ``--workers``; each run in a
process of its own) and the progress bridge. These are child processes; Ctrl-C or SIGTERM
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
from planrun.errors import PlanrunError, UsageError
from planrun.production import Production, shown

START_TIMEOUT_S = 60.0
#: The stack's own server on PostgreSQL: its first start creates Prefect's tables (≈ 20 s on
#: a quiet 2-core machine, over a minute on a loaded one).
SERVER_START_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0
#: A child that exits more than MAX_RESTARTS times within RESTART_WINDOW_S stops the stack.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def up(host: str, port: int, out: IO[str] = sys.stdout, production: Production | None = None,
       workers: int = 1, bridges: int = 1, in_process: bool = False) -> int:
    """Start the stack, print where it is, and keep it up until a signal; the exit code.

    ``production``: the stack's own Prefect server on PostgreSQL (and Redis), instead of
    the local one on SQLite (docs/production.md). ``workers``: how many runners serve the
    deployment; each executes runs in processes of its own, and Prefect gives each
    submitted run to one of them. ``bridges``: how many bridges serve clients, on
    ``port`` and the ports after it; they share their message log in the production
    database, so more than one needs ``production`` (docs/production.md). ``in_process``:
    each runner executes its runs in its own process, on one event loop
    (``flows.loop_runner``), instead of a process per run.
    """
    from planrun.runner import prepare_prefect

    token = bridge_token.for_bind(host)  # before anything starts: a refusal costs nothing
    if production is not None and os.environ.get("PREFECT_API_URL"):
        raise UsageError("--database starts a Prefect server of the stack's own, and "
                         "PREFECT_API_URL names another one: unset it or drop --database")
    if bridges > 1 and production is None:
        raise UsageError("--bridges needs --database: several bridges share their message log "
                         "in PostgreSQL")
    ports = list(range(port, port + bridges))
    taken = [p for p in ports if server.port_taken(p, host)]
    if taken:
        raise PlanrunError(f"{host}:{taken[0]} is already in use (another planrun up?): stop "
                           "that or pass --port")
    limit = os.environ.get("PREFECT_RUNNER_PROCESS_LIMIT", "").strip()
    if limit and not (limit.isdigit() and int(limit) > 0):
        raise UsageError(f"PREFECT_RUNNER_PROCESS_LIMIT is the number of runs each runner "
                         f"executes at once (a whole number of at least 1), not {limit!r}")
    if production is not None:
        production.check()
    home = server.data_dir()
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    own_server = (production is None and not os.environ.get("PREFECT_API_URL")
                  and server.running() is None)
    children: list[Child] = []
    if production is not None:
        children.append(_start_server(production, logs))
    try:
        api = prepare_prefect()
        stop = _on_signals()
        urls = [f"http://{_reachable(host)}:{p}" for p in ports]
        bridge = urls[0]
        env = {**os.environ, **server.QUIET_ENV, "PREFECT_API_URL": api,
               "PREFECT_RUNNER_POLL_FREQUENCY": os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY",
                                                               "1"),
               "PLANRUN_WORKSPACE": os.path.abspath(os.environ.get("PLANRUN_WORKSPACE",
                                                                   "workspace")),
               # runs name their live page in their log at a gate (docs/prefect-ui.md)
               "PLANRUN_BRIDGE_URL": os.environ.get("PLANRUN_BRIDGE_URL", bridge)}
        runner = [sys.executable, "-m", "planrun.flows.serve",
                  *(["--in-process"] if in_process else [])]
        # Runs keep their limits in the stack's database, shared by all its machines.
        runner_env = {**env, **(production.runner_env() if production is not None else {})}
        # The server, when the stack has its own, stops last: after those that use it.
        children[:0] = [
            *(_spawn(name, runner, runner_env, logs) for name in _names("runner", workers)),
            *(_spawn(name, [sys.executable, "-m", "planrun.progress_bridge", "--host", host,
                            "--port", str(p), "--data", str(home / "bridge"),
                            *(["--store", production.database] if production else [])],
                     env, logs) for name, p in zip(_names("bridge", bridges), ports, strict=True)),
        ]
        _wait_ready(children, {**{name: f"{url}/healthz" for name, url
                                  in zip(_names("bridge", bridges), urls, strict=True)},
                               "runner": f"{api}/deployments/name/planrun/plan-runner"}, stop)
        if stop:
            return 0
        _tell_up(out, urls, token, api, logs, production, workers, in_process)
        _keep_up(children, stop, out)
        print("stopping…", file=out, flush=True)
        return 0
    finally:
        for child in children:
            _stop(child)
        if own_server:
            server.stop()


def _names(kind: str, count: int) -> list[str]:
    return [kind] if count == 1 else [f"{kind}-{i}" for i in range(1, count + 1)]


def _start_server(production: Production, logs: Path) -> Child:
    """The stack's own Prefect server with ``production``'s settings, once healthy (Ctrl-C
    stops it meanwhile). Its first start on a new database creates Prefect's tables
    (≈ 20 s)."""
    port = server.free_port(int(os.environ.get("PLANRUN_SERVER_PORT", server.DEFAULT_PORT)))
    bind = os.environ.get("PLANRUN_SERVER_HOST", "127.0.0.1")
    api = f"http://{_reachable(bind)}:{port}/api"
    env = server.prefect_env(**production.server_env(),
                             PREFECT_HOME=str(server.data_dir() / "prefect"), PREFECT_API_URL=api,
                             PREFECT_SERVER_API_HOST=bind, PREFECT_SERVER_API_PORT=str(port),
                             COLUMNS="1000")  # its messages on one line each, for _last_error
    child = _spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", bind,
                              "--port", str(port)], env, logs)
    try:
        _wait_ready([child], {"server": f"{api}/health"}, [], SERVER_START_TIMEOUT_S)
    except PlanrunError:
        _stop(child)
        if child.process.returncode is None or child.process.returncode < 0:
            raise  # it did not start in time: stopped here
        raise PlanrunError(f"the Prefect server exited with status {child.process.returncode} "
                           f"while starting: {_last_error(child)} (its log: {child.log})"
                           ) from None
    except BaseException:
        _stop(child)
        raise
    os.environ["PREFECT_API_URL"] = api
    return child


def _last_error(child: Child) -> str:
    """The last line of ``child``'s log that names an error (a traceback's last line), or
    its last line."""
    lines = [line.strip() for line in child.tail(40).splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    return (named or lines or ["no output"])[-1]


def _tell_up(out: IO[str], bridges: list[str], token: str, api: str, logs: Path,
             production: Production | None, workers: int, in_process: bool) -> None:
    ui = api.removesuffix("/api")
    bridge = bridges[0]
    kept = ("from PLANRUN_TOKEN" if bridge_token.explicit() else
            f"kept in {bridge_token.path()}, which the CLI reads")
    lines = [f"  bridge      {bridge}" if len(bridges) == 1 else
             f"  bridges     {', '.join(bridges)} (one message log: any of them serves "
             "any run)",
             f"  token       {token}  ({kept})",
             f"  live page   {bridge}/v1/runs/RUN/view?token={quote(token, safe='')}",
             f"  API docs    {bridge}/docs?token={quote(token, safe='')}",
             f"  Prefect UI  {ui}"]
    if production is not None:
        lines += [f"  database    {shown(production.database)}",
                  f"  messaging   {shown(production.redis) if production.redis else 'in memory'}"]
    how = "its runs in the runner's own process" if in_process else "a process per run"
    lines.append(f"  runner      serving planrun/plan-runner, {how} (logs in {logs})"
                 if workers == 1 else
                 f"  runners     {workers} serving planrun/plan-runner, {how} (logs in {logs})")
    print("planrun is up\n" + "\n".join(lines) + "\n"
          "submit a plan with `planrun submit PLAN`, follow it with `planrun watch RUN` "
          "or on its live page; Ctrl-C stops", file=out, flush=True)


def _keep_up(children: list[Child], stop: list[int], out: IO[str]) -> None:
    """Start each child that exits again, until a signal comes."""
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
            children[i] = _spawn(child.name, child.argv, child.env, child.log.parent)
        time.sleep(0.2)


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
    death = DEATH_SIGNALS.get(name.partition("-")[0], signal.SIGTERM)  # runner-2: a runner
    with log.open("ab") as sink:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: _die_with_parent(death))
    return Child(name, argv, env, process, log)


def _die_with_parent(death: signal.Signals) -> None:
    """In the child: get ``death`` when ``planrun up`` dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, death)


def _wait_ready(children: list[Child], waiting: dict[str, str], stop: list[int],
                timeout: float | None = None) -> None:
    """Until each URL of ``waiting`` (by the name of what it shows ready) answers 200;
    ``PlanrunError`` when a child exits or ``timeout`` (``START_TIMEOUT_S``) passes first."""
    timeout = START_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
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
                               f"{timeout:.0f}s; see the logs in {children[0].log.parent}")
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
