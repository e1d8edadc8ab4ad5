"""Stopping a program's whole process group (planrun.adapters.process)."""

from __future__ import annotations

import asyncio

from planrun.adapters.process import stop


def test_a_program_stopped_before_anyone_read_from_it_is_killed_and_reaped() -> None:
    async def stopped() -> int | None:
        proc = await asyncio.create_subprocess_exec(
            "sleep", "30", start_new_session=True, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        await stop(proc, [])  # no readers yet: it was cancelled while starting
        return proc.returncode

    assert asyncio.run(stopped()) is not None  # reaped: nothing left for the collector
