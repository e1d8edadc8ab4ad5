"""``planrun up`` as a subprocess for the end-to-end tests, and the CLI pointed at it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import PLANRUN, cli, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (``planrun up --bridges``)."""
    for _ in range(50):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise AssertionError(f"found no {count} consecutive free ports")


class Stack:
    """``planrun up ARGS`` in ``tmp``; ``env`` adds to (and ``drop`` removes from) the test
    session's environment; ``port`` reuses a bridge port (a restart); ``timeout``: how long
    it may take to say it is up.

    A stack on the session's Prefect server first stops the shared one (:func:`shared`):
    two runners serving the same deployment would take each other's runs."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, drop: tuple[str, ...] = (),
                 port: int | None = None, args: tuple[str, ...] = (),
                 timeout: float = 90, *, _shared: bool = False) -> None:
        if not _shared and "PREFECT_API_URL" not in drop:
            stop_shared()
        self.own_server = "PREFECT_API_URL" in drop
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**{k: v for k, v in os.environ.items() if k not in drop},
                    "PLANRUN_BRIDGE_URL": self.url, "PLANRUN_WORKSPACE": str(tmp / "workspace"),
                    **(env or {})}
        self.out = tmp / "up.out"
        self.offset = self.out.stat().st_size if self.out.exists() else 0  # a restart appends
        with self.out.open("ab") as sink:
            self.process = subprocess.Popen([*PLANRUN, "up", "--port", str(self.port), *args],
                                            cwd=tmp, env=self.env, stdout=sink,
                                            stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "planrun is up" in self.output() or self.process.poll() is not None,
                     timeout, "planrun up to print its URLs")
        except AssertionError as error:
            self.kill()  # a stack left running would load every test after this one
            raise AssertionError(f"{error}; planrun up printed:\n{self.output()}") from None
        assert self.process.poll() is None, self.output()

    @property
    def token(self) -> str:
        """The bridge's token: ``PLANRUN_TOKEN``, else the file ``planrun up`` made."""
        home = Path(self.env["PLANRUN_HOME"])
        return self.env.get("PLANRUN_TOKEN") or (home / "bridge.token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authenticate as a client of this stack's bridge."""
        return {"Authorization": f"Bearer {self.token}"}

    def output(self) -> str:
        return self.out.read_bytes()[self.offset:].decode(errors="replace")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # The CLI finds the token where this stack's planrun up keeps it: no flag.
        done = cli(*args, env={"PLANRUN_BRIDGE_URL": self.url,
                               "PLANRUN_HOME": self.env["PLANRUN_HOME"]}, timeout=timeout)
        if "no planrun stack answers" in done.stderr:  # say why, in the test's failure
            done.stderr += f"\nthe end of what planrun up printed:\n{self.output()[-6000:]}"
        return done

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """A request to this stack's bridge, waited for as ``planrun``'s client waits
        (30 s): a pause answers once the run's engine has taken it in, which on a loaded
        machine takes longer than httpx's default 5 s."""
        return httpx.post(f"{self.url}{path}", headers=self.auth, timeout=30, **kwargs)

    def report(self, run_id: str) -> dict[str, Any]:
        """The run's report from the bridge: what ``planrun status --json`` prints (that
        command has its own tests); a poll here costs no process start."""
        try:
            answer = httpx.get(f"{self.url}/v1/runs/{run_id}", headers=self.auth, timeout=30)
        except httpx.TimeoutException:
            raise AssertionError("the bridge did not answer in 30 s; the end of what planrun "
                                 f"up printed:\n{self.output()[-6000:]}") from None
        assert answer.status_code == 200, answer.text
        report: dict[str, Any] = answer.json()
        return report

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def run_processes(self) -> list[psutil.Process]:
        """The runner's run processes, one per run in flight: forks of its fork server
        (flows/serve.py), which they share a command line with."""
        servers = [p for p in self.children() if _forkserver(p)]
        assert len(servers) == 1, f"the runner has {len(servers)} fork servers"
        with contextlib.suppress(psutil.Error):
            return servers[0].children()
        return []

    def runners(self) -> dict[psutil.Process, list[psutil.Process]]:
        """Each runner of the stack (``--workers``) and its run processes, one per run in
        flight: the forks of its own fork server."""
        found: dict[psutil.Process, list[psutil.Process]] = {}
        with contextlib.suppress(psutil.Error):
            for runner in psutil.Process(self.process.pid).children():
                if "planrun.flows.serve" not in " ".join(runner.cmdline()):
                    continue
                found[runner] = []
                with contextlib.suppress(psutil.Error):
                    for server in (p for p in runner.children() if _forkserver(p)):
                        found[runner] += server.children()
        return found

    def runner(self) -> psutil.Process:
        """The stack's one runner."""
        found = list(self.runners())
        assert len(found) == 1, found
        return found[0]

    def kill(self) -> None:
        """SIGKILL planrun up, everything it started and the Prefect server it started
        (a stack without the session's server starts its own)."""
        victims: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            victims += [psutil.Process(self.process.pid), *self.children()]
        if self.own_server:
            with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
                info = Path(self.env["PLANRUN_HOME"]) / "server.json"
                server = psutil.Process(json.loads(info.read_text())["pid"])
                victims += [server, *server.children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(victims, timeout=10)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(30)


def _forkserver(process: psutil.Process) -> bool:
    """Whether ``process`` is the runner's fork server (not one of its forks)."""
    try:
        return ("multiprocessing.forkserver" in " ".join(process.cmdline())
                and "multiprocessing.forkserver" not in " ".join(process.parent().cmdline()))
    except (psutil.Error, AttributeError):  # gone, or no parent
        return False


_SHARED: dict[str, Stack] = {}


def shared(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The worker's stack in the default configuration, shared by every test that uses
    it (a start costs seconds: two processes import Prefect). Started on first use, and
    again after another stack stopped it. Its tests use runs and workspace files of their
    own, so they do not depend on the order they run in."""
    running = _SHARED.get("stack")
    if running is None or running.process.poll() is not None:
        running = _SHARED["stack"] = Stack(tmp_path_factory.mktemp("stack"), _shared=True)
    return running


def stop_shared() -> None:
    """Stop the shared stack, if it runs (with Ctrl-C, as a person would)."""
    running = _SHARED.pop("stack", None)
    if running is not None and running.process.poll() is None:
        running.stop()


def messages(stack: Stack, run_id: str, timeout: float = 30,
             on: Callable[[dict[str, Any]], object] | None = None) -> list[dict[str, Any]]:
    """Every message of the run until it ends, over the bridge's WebSocket (replayed from
    the first); ``on`` is called with each as it arrives."""
    from websockets.asyncio.client import connect

    ends = {"run.completed", "run.completed_with_errors", "run.failed", "run.cancelled"}

    async def read() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        url = f"{stack.url.replace('http', 'ws', 1)}/v1/runs/{run_id}/ws?after=0"
        async with connect(url, proxy=None, additional_headers=stack.auth) as ws, \
                asyncio.timeout(timeout):
            while not got or got[-1]["type"] not in ends:
                message = json.loads(await ws.recv())
                if message["type"] != "heartbeat":
                    got.append(message)
                    if on is not None:
                        on(message)
        return got

    return asyncio.run(read())
