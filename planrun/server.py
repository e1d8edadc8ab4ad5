"""The embedded default: one local Prefect server (SQLite, under planrun's data directory),
started on first use and reused by every later invocation.

Prefect's own temporary per-process server costs ≈ 8 s a run and no other process sees
its events, so planrun never relies on it. With ``PREFECT_API_URL`` set, that server is
used instead and nothing is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from planrun import prefect_template
from planrun.errors import PlanrunError
from planrun.home import data_dir as data_dir  # where the server keeps its database

DEFAULT_PORT = 4200
START_TIMEOUT_S = 90.0

#: Environment every Prefect process of planrun gets: no telemetry on a closed network.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}


# coverage.py's variables that make each Python process started with them record its
# lines (planrun's test suite sets them): Prefect's own processes run none of planrun's
# code, and traced, a server costs up to twice the CPU.
COVERAGE_VARS = ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")


def prefect_env(**settings: str) -> dict[str, str]:
    """The environment of a Prefect process planrun starts (a server, its database
    migration): this one's, quiet (``QUIET_ENV``), with ``settings`` on top."""
    inherited = {k: v for k, v in os.environ.items() if k not in COVERAGE_VARS}
    return {**inherited, **QUIET_ENV, **settings}


class ServerError(PlanrunError):
    """The local Prefect server could not be started or reached."""


class ServerExited(ServerError):
    """The local Prefect server's process ended while starting."""


@dataclass(frozen=True)
class ServerInfo:
    """A running local server: its API URL and process id."""

    url: str
    pid: int

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check."""
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _state_file() -> Path:
    return data_dir() / "server.json"


def _read_state() -> ServerInfo | None:
    try:
        raw = json.loads(_state_file().read_text())
        return ServerInfo(url=str(raw["url"]), pid=int(raw["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on 127.0.0.1, else a free port. Probed as
    the server binds (``SO_REUSEADDR``): connections of a server just stopped, still in
    TIME_WAIT, do not move its successor off ``preferred``."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ServerError("no free TCP port on 127.0.0.1")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(data_dir() / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def running() -> ServerInfo | None:
    """The local server recorded in the data directory, if it is alive and healthy."""
    info = _read_state()
    if info and alive(info.pid) and healthy(info.url):
        return info
    return None


def ensure_server() -> str:
    """The Prefect API URL to use, starting the local server if needed; sets the env var."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        with _locked():
            info = running() or _start_telling()
        url = info.url
    os.environ["PREFECT_API_URL"] = url
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return url


def _start_telling() -> ServerInfo:
    """``start()``, saying so on stderr (a terminal or a pipe): the first start on a new
    machine creates the server's database and takes tens of seconds."""
    first = not ((data_dir() / "prefect").exists() or prefect_template.template_path().exists())
    why = " (its first start creates the database: ≈ 30 s)" if first else ""
    print(f"planrun: starting the local Prefect server{why}; log: {data_dir() / 'server.log'}",
          file=sys.stderr, flush=True)
    began = time.monotonic()
    info = start()
    print(f"planrun: the Prefect server is up at {info.url.removesuffix('/api')} "
          f"({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    return info


def start(port: int | None = None) -> ServerInfo:
    """Start a detached Prefect server on SQLite under the data directory and wait for it.

    The port is free when chosen but another process may take it before the server binds
    it; then the server exits and another free port is tried (three times in all).
    """
    if port is None:
        port = int(os.environ.get("PLANRUN_SERVER_PORT", DEFAULT_PORT))
    for _ in range(3):
        info = _start_on(free_port(port))
        if info is not None:
            _state_file().write_text(json.dumps({"url": info.url, "pid": info.pid}))
            return info
        port = 0
    raise ServerError(f"the Prefect server could not bind a port; see {data_dir() / 'server.log'}")


def _start_on(port: int) -> ServerInfo | None:
    """Our server on ``port``, or None if it exited because the port was taken. A new
    database starts as a copy of the migrated template, or becomes the template once the
    server has migrated it (``planrun.prefect_template``)."""
    home = data_dir()
    new = not (home / "prefect" / prefect_template.DB_NAME).exists()
    seeded = new and prefect_template.seed(home / "prefect")
    try:
        info = _start_server(home, port)
    except ServerExited:
        if not seeded:
            raise
        prefect_template.discard(home / "prefect")  # migrate a new one instead
        print(f"planrun: the server could not start from a copy of the database template "
              f"({prefect_template.template_path()}): the template is thrown away and a new "
              f"database created (≈ 30 s)", file=sys.stderr, flush=True)
        return _start_on(port)
    if new and not seeded and info is not None:
        prefect_template.save(home / "prefect" / prefect_template.DB_NAME)
    return info


def _start_server(home: Path, port: int) -> ServerInfo | None:
    url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_API_HOST="127.0.0.1",
                      PREFECT_SERVER_API_PORT=str(port), PREFECT_API_URL=url)
    pid = spawn_detached([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                  "--port", str(port)], env, home / "server.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    delay = 0.1
    while time.monotonic() < deadline:
        exited = _reap(pid)
        if exited is not None:
            if port_taken(port):
                return None
            raise ServerExited(f"the Prefect server exited with status {exited}; "
                              f"see {home / 'server.log'}")
        # A healthy answer counts only from our own process: another server may hold the port.
        if _listens(pid, port) and healthy(url, timeout=1.0):
            return ServerInfo(url=url, pid=pid)
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    stop_pid(pid)
    raise ServerError(f"the Prefect server did not become healthy within {START_TIMEOUT_S:.0f}s; "
                      f"see {home / 'server.log'}")


def _listens(pid: int, port: int) -> bool:
    """Whether ``pid`` or one of its children listens on ``port``."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for p in family for c in p.net_connections(kind="inet"))
    except psutil.Error:
        return False


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port``. ``SO_REUSEADDR``, as the
    servers themselves bind: the connections of a killed bridge waiting out ``TIME_WAIT``
    do not count (they would refuse a restart for a minute)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def spawn_detached(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start ``argv`` detached in its own session, output appended to ``log``."""
    return os.posix_spawn(
        argv[0], argv, env, setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
    )


def _reap(pid: int) -> int | None:
    """The exit status of our child ``pid`` if it has exited, else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if alive(pid) else -1
    return os.waitstatus_to_exitcode(status) if done else None


def stop_pid(pid: int, grace_s: float = 10.0) -> None:
    """Stop a server's process group: SIGTERM, then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop() -> bool:
    """Stop the recorded local server; False if none was running."""
    with _locked():
        info = _read_state()
        if not info or not alive(info.pid):
            return False
        stop_pid(info.pid)
        _state_file().unlink(missing_ok=True)
        return True
