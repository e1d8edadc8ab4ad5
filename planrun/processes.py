"""Which process: a pid, its start time and its place (host and PID namespace), so that
another process can tell whether it still runs. A lease taken by a process that has exited
is taken back at once (flows/limit_store.py); a run whose process has exited is marked
crashed at once by a bridge on the same machine (docs/production.md, "A worker that dies").
"""

from __future__ import annotations

import os
import socket

import psutil


def this_place() -> str:
    """Where this process's pid means something: its host and PID namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def started(pid: int | None = None) -> float:
    """When the process ``pid`` (by default this one) started, in epoch seconds."""
    return psutil.Process(pid).create_time()


def alive(pid: int, started_at: float) -> bool:
    """Whether the process ``pid`` that started at ``started_at`` still runs (a zombie does
    not: it has exited, only its parent has not looked yet)."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started_at) < 0.01 and \
            process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # it exists, but we may not look at it: assume it is the one
