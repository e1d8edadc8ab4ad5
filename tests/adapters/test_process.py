"""Stopping a program's whole process group (planrun.adapters.process)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest

from planrun.adapters.process import spawn, stop


def test_a_program_stopped_before_anyone_read_from_it_is_killed_and_reaped() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None

    async def stopped() -> tuple[int | None, list[int]]:
        proc = spawn([sleep, "30"], {})
        await stop(proc, [])  # no readers yet: it was cancelled while starting
        return proc.returncode, [proc.stdout, proc.stderr]

    code, pipes = asyncio.run(stopped())
    assert code == -signal.SIGTERM  # reaped: no zombie left behind
    for fd in pipes:  # and its pipes let go
        with pytest.raises(OSError):
            os.fstat(fd)
