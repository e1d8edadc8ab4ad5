"""The warm plan-running subprocess of the bridge benchmarks (bench_latency.py,
bench_fanout.py, bench_bridge_start.py): :func:`serve_runs` in the child, :class:`PlanRunner`
in the parent.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from _common import BENCH, ROOT, setup


def serve_runs() -> None:
    """A plan-running process for the bridge benchmarks; the parent (``PlanRunner``) talks
    to it with one JSON object per line, and it answers on stdout with lines starting ``@@ ``.

    ``{"plan": <plan data>, "hold": true}`` runs the plan through ``planrun.runner.run_plan``.
    As soon as the run's id is known (the observer's first call, after the engine has
    emitted ``planrun.run.started`` and before any step starts) it says ``{"run_id": ...}``
    and, with ``hold``, waits for a line (``go``) on stdin: the engine's event loop is
    blocked meanwhile, so the parent can connect its clients before the first step. Then
    ``{"done": status, ...}``. ``{"quit": true}`` ends the process.
    """
    import sys

    setup()
    from planrun.runner import run_plan

    def say(**fields: Any) -> None:
        sys.stdout.write("@@ " + json.dumps(fields) + "\n")
        sys.stdout.flush()

    class Hold:
        def __init__(self, hold: bool) -> None:
            self.hold = hold
            self.announced = False

        def changed(self, run: Any, step: Any) -> None:
            if self.announced:
                return
            self.announced = True
            say(run_id=run.run_id, t=time.time())
            if self.hold:
                sys.stdin.readline()

    say(ready=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        if request.get("quit"):
            return
        t0 = time.time()
        try:
            report = asyncio.run(run_plan(request["plan"], {}, Hold(request.get("hold", True))))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            say(error=f"{type(exc).__name__}: {exc}")
            continue
        say(done=report["status"], reason=report.get("reason"), steps=len(report["steps"]),
            t0=t0, t1=time.time())


class PlanRunner:
    """The parent's side of :func:`serve_runs`: one warm plan-running subprocess."""

    def __init__(self) -> None:
        self.proc: Any = None  # asyncio.subprocess.Process

    async def start(self) -> None:
        import sys

        code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
                "import _plan_runner; _plan_runner.serve_runs()")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        await self._answer("ready")

    async def _send(self, obj: Any) -> None:
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)).encode()
                              + b"\n")
        await self.proc.stdin.drain()

    async def _answer(self, key: str) -> dict[str, Any]:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the plan runner exited")
            if line.startswith(b"@@ "):
                answer: dict[str, Any] = json.loads(line[3:])
                if "error" in answer:
                    raise RuntimeError(f"the plan runner failed: {answer['error']}")
                if key in answer:
                    return answer

    async def start_run(self, data: dict[str, Any], hold: bool = True) -> str:
        """Start a run of ``data``; its run id (the run then waits for :meth:`go`)."""
        await self._send({"plan": data, "hold": hold})
        return str((await self._answer("run_id"))["run_id"])

    async def go(self) -> None:
        await self._send("go")

    async def finished(self) -> dict[str, Any]:
        return await self._answer("done")

    async def close(self) -> None:
        import contextlib

        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._send({"quit": True})
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
