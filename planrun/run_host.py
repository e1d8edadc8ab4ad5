"""A warm process for ``planrun run``: each run is a fork of a process that has imported
Prefect and planrun once, instead of a new interpreter that imports them again (≈ 1.5 s of
CPU before the run's first step; BENCHMARKS.md, "Whole process, one step").

``planrun run`` looks for its host on a Unix socket in planrun's data directory (a folder
only this user can open, which no sandboxed step sees), named after what the host read
before any command came: the ``PREFECT_*`` environment (Prefect's settings), ``PLANRUN_HOME``,
``HOME`` and ``XDG_DATA_HOME`` (the data directory and its server), the interpreter and
planrun's own files. planrun reads the rest of its environment (``PLANRUN_POLICY``,
``PLANRUN_WORKSPACE``, the bridge, secrets, …) only while a command runs: in the fork, from
the command's own environment, so commands that differ there share a host.

The command hands over its arguments, environment, working directory and its standard
input, output and error (the file descriptors themselves: a terminal stays a terminal); the
host forks, and the fork runs the command exactly as ``planrun run`` runs it in its own
process, then says its exit code.
The command forwards SIGINT, SIGTERM and SIGHUP to the fork (a run cancels on them,
README, "Command line"); if the command itself dies, the fork cancels its run as on SIGTERM.

Where no host answers, ``planrun run`` starts one (detached), waits up to ``BIND_WAIT_S``
for it to listen and runs through it: Prefect is imported once, in the host. It runs in its
own process instead, then starts a host for the next run, when planrun's local server must
start first (the command says so on its terminal) or the host does not listen in time. A
host serves only its own user (the peer's credentials are checked), exits after ``IDLE_S``
without a run, or when the local Prefect server it was started against stops.
``PLANRUN_RUN_HOST=0`` turns all of this off.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from planrun.home import data_root

#: ``0`` here: every ``planrun run`` runs in its own process, as before.
ENV = "PLANRUN_RUN_HOST"
#: A host without a run for this long exits (seconds; ``PLANRUN_RUN_HOST_IDLE_S``).
IDLE_S = 600.0
#: How often an idle host looks whether its Prefect server is still there.
TICK_S = 2.0
#: How long a command waits for a host it started to listen (seconds).
BIND_WAIT_S = 10.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: With ``PREFECT_*``, what the host reads before a command comes (no module of planrun
#: reads the environment on import).
_KEYED = ("PLANRUN_HOME", "HOME", "XDG_DATA_HOME")
_MAX_REQUEST = 1 << 20  # bytes: a command's arguments and environment
_SUN_PATH = 108  # the size of sockaddr_un's sun_path, its closing NUL included


def enabled(env: Mapping[str, str]) -> bool:
    return env.get(ENV, "1") != "0"


def address(env: Mapping[str, str]) -> Path | None:
    """The host's socket for a command run with ``env``: in planrun's data directory,
    which only this user (and no sandboxed step) can reach; None where its path would be
    too long for a Unix socket."""
    keyed = sorted((k, v) for k, v in env.items() if k.startswith("PREFECT_") or k in _KEYED)
    digest = hashlib.sha256(json.dumps([sys.executable, _code_stamp(), keyed]).encode())
    path = data_root(env) / "run-host" / f"{digest.hexdigest()[:16]}.sock"
    return path if len(os.fsencode(path)) < _SUN_PATH else None


def _code_stamp() -> list[int]:
    """What changes when planrun's code does: its files' count, latest mtime and sizes."""
    count, latest, size = 0, 0, 0
    root = Path(__file__).resolve().parent.parent
    for folder in ("planrun", "flows", "adapters", "progress_bridge", "plan_schemas"):
        for dirpath, _, files in os.walk(root / folder):
            for name in files:
                if name.endswith((".py", ".json", ".c")):
                    info = os.stat(os.path.join(dirpath, name))
                    count, size = count + 1, size + info.st_size
                    latest = max(latest, info.st_mtime_ns)
    return [count, latest, size]


# The command's side ---------------------------------------------------------------------

def run_through_host(argv: list[str], wait_s: float = 0.0) -> int | None:
    """Run ``planrun <argv>`` in a fork of this user's host; its exit code, or None when
    no host answered within ``wait_s`` (the caller runs the command itself)."""
    env = dict(os.environ)
    if not enabled(env):
        return None
    path = address(env)
    if path is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(60.0)  # a host just started is still importing
        _connect(conn, path, wait_s)
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "umask": _umask()}
        message = json.dumps(request).encode() + b"\n"
        sent = socket.send_fds(conn, [message], [0, 1, 2])
        conn.sendall(message[sent:])  # a large environment takes more than one send
        lines = conn.makefile("rb")
        hello = _message(lines)
        conn.settimeout(None)
    except OSError:
        conn.close()
        return None
    if "pid" not in hello:  # the host could not take it (its server changed): ourselves
        conn.close()
        return None
    pid = int(hello["pid"])
    previous = {sig: signal.signal(sig, lambda sig, _f: _forward(pid, sig)) for sig in _SIGNALS}
    try:
        end = _message(lines)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        conn.close()
    if "exit" in end:
        return int(end["exit"])
    print(f"planrun: the run's process ({pid}) ended without a result", file=sys.stderr)
    return 1


def _connect(conn: socket.socket, path: Path, wait_s: float) -> None:
    """Connect to the host at ``path``, trying again for ``wait_s`` while none listens
    there (a host just started binds in a fraction of a second; a dead one leaves its
    socket file behind)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _message(lines: Any) -> dict[str, Any]:
    """The next line from the host or its fork; {} at the end (or a line cut short)."""
    try:
        message = json.loads(lines.readline() or b"{}")
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def start(env: Mapping[str, str]) -> bool:
    """Start this user's host for commands run with ``env`` (detached; its log in planrun's
    data directory); whether it was started. A host already there keeps the address; the
    new one exits. Where none can be started, runs run in their own processes."""
    if not enabled(env):
        return False
    from planrun.home import data_dir
    from planrun.server import spawn_detached

    try:
        spawn_detached([sys.executable, "-m", "planrun.run_host"], dict(env),
                       data_dir() / "run-host.log")
    except OSError:
        return False
    return True


def start_served(env: Mapping[str, str]) -> bool:
    """Start a host for commands run with ``env`` where their Prefect server answers (the
    given one, or planrun's local one already running); whether one was started. A command
    that found no host calls it first, so that a first run too is a fork of the host
    (Prefect imported once, not in the command and again in the host); one that ran itself
    (it had to start the local server, saying so on its terminal) calls it after its run."""
    if not enabled(env) or address(env) is None:
        return False
    from planrun import server

    given = env.get("PREFECT_API_URL")
    if not (server.healthy(given) if given else server.running() is not None):
        return False  # the command says what is wrong, or starts the local server
    return start(env)


# The host's side ------------------------------------------------------------------------

def serve() -> None:
    """Bind this environment's address, import what a run needs, then fork a run for
    every command that connects, until idle for ``idle_s`` or the server is gone."""
    path = address(os.environ)
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another host has this address
        path.unlink(missing_ok=True)  # one that crashed left it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(64)  # commands that connect now wait for the imports below
            host = os.getpid()
            try:
                _serve(listener, lock)
            finally:
                if os.getpid() == host:  # a fork ends through here too
                    path.unlink(missing_ok=True)


def _serve(listener: socket.socket, lock: IO[str]) -> None:
    from planrun import server
    from planrun.runner import prepare_prefect

    api_url = prepare_prefect()
    local = server.running()
    if local is not None and local.url != api_url:
        local = None  # a server of the environment's own: only the idle time ends us
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks are reaped by the kernel
    listener.settimeout(TICK_S)
    idle_s = float(os.environ.get(f"{ENV}_IDLE_S") or IDLE_S)
    last = time.monotonic()
    while time.monotonic() - last < idle_s:
        if local is not None and not server.alive(local.pid):
            return
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        last = time.monotonic()
        with conn:
            _take(conn, (listener, lock), api_url)


def _preload() -> None:
    """Import what ``planrun run`` imports, Prefect included (this process has no thread
    after it: forking it is safe)."""
    from importlib.metadata import entry_points

    import planrun.asking
    import planrun.console
    import planrun.flows.plan_flow
    import planrun.inputs
    import planrun.validate  # noqa: F401

    for tool in entry_points(group="planrun.adapters"):
        tool.load()


def _take(conn: socket.socket, hosts: tuple[socket.socket, IO[str]], api_url: str) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    conn.settimeout(10.0)
    fds: list[int] = []
    data = b""
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
        while data and not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
            more = conn.recv(_MAX_REQUEST)  # the rest of a large request (its environment)
            if not more:
                break
            data += more
    except OSError:
        data = b""
    request = _request(data) if uid == os.getuid() and len(fds) == 3 else None
    if request is None:
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:
        for held in hosts:  # the listener and the lock stay the host's
            held.close()
        conn.settimeout(None)
        _run(conn, request, fds, api_url)  # exits
    for fd in fds:
        os.close(fd)


def _request(data: bytes) -> dict[str, Any] | None:
    """A command's request (one JSON line: argv, env, cwd, umask), or None if it is not one."""
    try:
        request = json.loads(data) if data.endswith(b"\n") else None
    except ValueError:
        return None
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list) or \
            not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str) \
            or not isinstance(request.get("umask"), int):
        return None
    return request


def _run(conn: socket.socket, request: dict[str, Any], fds: list[int], api_url: str) -> None:
    """In the fork: become the command (its streams, environment, directory) and run it.
    It ends as a process running it alone would (the interpreter's exit: Prefect's events
    and logs are sent, the run's clean-ups done), then says its exit code to the command."""
    reply = socket.socket(fileno=os.dup(conn.fileno()))  # outlives the host's frames
    ended = threading.Event()
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the command's own streams
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")  # noqa: SIM115
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        from planrun.server import ensure_server

        if ensure_server() != api_url:  # the server moved since this host started
            reply.sendall(b"{}\n")
            os._exit(0)
        reply.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        threading.Thread(target=_cancel_when_gone, args=(reply, ended), daemon=True).start()
        sys.argv = ["planrun", *request["argv"]]
        from planrun.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - the command hears of it, not the host's log
        print(f"planrun: {exc}", file=sys.stderr)
    atexit.register(_say_exit, reply, ended, code)  # after Prefect's own exit (its drain)
    sys.exit(code)


def _say_exit(reply: socket.socket, ended: threading.Event, code: int) -> None:
    ended.set()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError):
        reply.sendall(json.dumps({"exit": code}).encode() + b"\n")


def _cancel_when_gone(reply: socket.socket, ended: threading.Event) -> None:
    """The command died (its end of the socket closed): cancel the run, as SIGTERM does."""
    with contextlib.suppress(OSError):
        while reply.recv(1024):
            pass
    if not ended.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    from planrun.errors import PlanrunError

    try:
        serve()
    except PlanrunError as error:  # its server is gone: one line in the log, no traceback
        sys.exit(f"planrun run host: {error}")
