"""What one step asks of the Prefect server: API requests (by method and path), events and
log lines, for a planrun chain against a hand-written Prefect chain (issues 12 and 13: the
server's CPU per step is the largest share at every load).

    .venv/bin/python benchmarks/count_server_calls.py [--steps 50]

Each variant runs a chain of 1 and of ``--steps`` steps in this process (``run_plan``, as
``planrun run`` does; the hand-written flow of bench_engine.py); a step's share is the
difference divided by ``steps - 1``. Counted on the client side: every request of an httpx
client in any thread (Prefect's API client, its log worker), every event Prefect's events
worker sends, every log record its API log handler takes. And the CPU seconds the local
Prefect server spent per step (its process, until it is idle again after the run): that
figure needs the machine to itself. The variant "planrun, no step events" leaves out
planrun's ``planrun.step.*`` events (not a working configuration: the bridge needs them),
to tell their share of the server's work.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from _common import Server, plan_data, run_planrun, setup, table, wait_idle
from bench_engine import chain_plan, handwritten_flows

SENT = ("request", "event", "log")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Calls:
    """Counts what this process sends to the Prefect server while installed."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def install(self) -> None:
        import httpx
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogHandler

        seen = self.seen
        send = httpx.AsyncClient.send

        async def counted_send(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            seen[f"request {request.method} {UUID.sub('{id}', request.url.path)}"] += 1
            return await send(client, request, *args, **kwargs)

        httpx.AsyncClient.send = counted_send  # type: ignore[method-assign]
        handle = EventsWorker._handle

        async def counted_handle(worker: Any, event: Any) -> None:
            name = event.event
            seen[f"event {name.rsplit('.', 1)[0] if 'task-run' in name else name}"] += 1
            await handle(worker, event)

        EventsWorker._handle = counted_handle  # type: ignore[method-assign]
        emit = APILogHandler.emit

        def counted_emit(handler: Any, record: Any) -> None:
            seen[f"log line ({record.name})"] += 1
            emit(handler, record)

        APILogHandler.emit = counted_emit  # type: ignore[method-assign]


def drained() -> None:
    """Wait until Prefect's events and log workers have sent what they hold."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)


def counts(calls: Calls, srv: Server, run: Callable[[int], Any], n: int) -> Counter[str]:
    """What one run of ``n`` steps sent, and (as "server CPU ms") what it cost the server."""
    import psutil

    server = psutil.Process(srv.pid) if srv.pid else None
    wait_idle(srv)
    before, cpu = Counter(calls.seen), _cpu_s(server)
    run(n)
    drained()
    wait_idle(srv)
    seen = calls.seen - before
    seen["server CPU ms"] = round((_cpu_s(server) - cpu) * 1e3)
    return seen


def _cpu_s(process: Any) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def no_step_events(run: Callable[[int], Any]) -> Callable[[int], Any]:
    """``run`` with RunEvents.changed a no-op (no ``planrun.step.*`` event)."""
    def quiet(n: int) -> Any:
        from planrun.flows.events import RunEvents

        changed = RunEvents.changed
        RunEvents.changed = lambda self, step: None  # type: ignore[method-assign]
        try:
            return run(n)
        finally:
            RunEvents.changed = changed  # type: ignore[method-assign]

    return quiet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    srv = setup()
    import planrun.flows.plan_flow  # noqa: F401 - installs planrun's Prefect departures

    calls = Calls()
    calls.install()
    handwritten = handwritten_flows()["hand-written"]

    def planrun(n: int) -> Any:
        return run_planrun(plan_data(chain_plan(n)))

    variants: dict[str, Callable[[int], Any]] = {
        "planrun": planrun,
        "planrun, no step events": no_step_events(planrun),
        "hand-written": lambda n: asyncio.run(handwritten(n)),
    }
    per_step: dict[str, dict[str, float]] = {}
    for name, run in variants.items():
        run(1)  # warm: imports, the flow's registration
        drained()
        one, many = counts(calls, srv, run, 1), counts(calls, srv, run, args.steps)
        per_step[name] = {key: (many[key] - one[key]) / (args.steps - 1)
                          for key in set(one) | set(many)}
        per_step[name]["(a run of 1 step: requests, events, log lines)"] = float(
            sum(v for k, v in one.items() if k.split()[0] in SENT))
    keys = sorted(set().union(*per_step.values()))
    rows = [[key, *(f"{per_step[name].get(key, 0.0):.2f}" for name in variants)]
            for key in keys if any(per_step[name].get(key) for name in variants)]
    totals = ["requests, events and log lines per step",
              *(f"{sum(v for k, v in per_step[name].items() if k.split()[0] in SENT):.2f}"
                for name in variants)]
    print(table(["per step", *variants], [*rows, totals]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
