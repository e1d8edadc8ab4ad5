"""Circuit breakers (flows/breakers.py) against the local Prefect server and a real HTTP
service on 127.0.0.1 that answers 500 to everything.

    .venv/bin/python benchmarks/bench_breaker.py [--calls 200] [--rounds 2000]

- reaction: one process sends ``--calls`` ``http.request`` calls one after another through
  its breaker (5 failures open it) while a second process (another ``Breakers``, its own
  1 s cache) sends one every 20 ms; calls that reached the service after the breaker had
  opened are counted for each (goal 0 for the process that opened it; the other one's
  are bounded by the cache's TTL);
- fast-fail cost per step: ``Breakers.call`` on an open breaker (cached), and when the
  cache has run out (one variable read), goal < 5 ms;
- closed-breaker overhead per step: ``Breakers.call`` around a no-op beside the no-op;
- a counted failure's cost (written before its attempt ends), in a run's client context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, setup, table  # noqa: E402


class _Down(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append((time.time(), self.path))  # type: ignore[attr-defined]
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()


def service() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Down)
    server.hits = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


async def reaction(url: str, calls: int) -> dict[str, Any]:
    from planrun.adapters.base import StepContext
    from planrun.adapters.http import HttpRequest
    from planrun.adapters.workspace import Workspace
    from planrun.errors import StepError
    from planrun.flows.breakers import Breakers, breaker_key
    from planrun.policy import BreakerSettings, LevelPolicy

    settings = BreakerSettings(failures=5, window_s=60, cooldown_s=600)
    opener, other = (Breakers(settings=lambda tool: settings) for _ in range(2))
    adapter, ws = HttpRequest(), Workspace(Path("/tmp/bench-breaker-ws"))
    ctx = StepContext(run_id="bench", step_id="s", workspace=ws,
                      policy=LevelPolicy(allow_private=True, sandbox="off"))
    made = {"opener": 0, "other": 0}

    async def step(b: Breakers, who: str) -> None:
        params = {"url": f"{url}/{who}"}
        try:
            await b.call("http.request", params, "bench", 10, lambda: adapter.run(params, ctx, 10))
        except StepError:
            pass

    async def others() -> None:
        while not done.is_set():
            await step(other, "other")
            await asyncio.sleep(0.02)

    done = asyncio.Event()
    side = asyncio.create_task(others())
    for _ in range(calls):
        await step(opener, "opener")
    await asyncio.sleep(1.5)  # the other process's cache runs out: it must have seen it
    done.set()
    await side
    view = await opener.view(breaker_key("http.request", {"url": url}), fresh=True)
    made["opened_at"] = view.opened_at or 0.0
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    srv = setup()
    server, url = service()
    load = os.getloadavg()
    made = asyncio.run(reaction(url, args.calls))
    hits = server.hits  # type: ignore[attr-defined]
    opened_at = float(made["opened_at"])
    after = {who: sum(1 for t, path in hits if path == f"/{who}" and t > opened_at)
             for who in ("opener", "other")}
    total = {who: sum(1 for _, path in hits if path == f"/{who}") for who in after}
    costs = asyncio.run(step_costs(args.rounds))
    costs.update(asyncio.run(in_a_run(step_costs(args.rounds // 10, stale_only=True))))
    print(f"Prefect server {srv.url}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} on {os.cpu_count()} cores")
    print(table(["reaction", "calls sent", "reached the service", "after it opened"], [
        ["the process that opened it", args.calls, total["opener"], after["opener"]],
        ["another process (1 s cache)", "every 20 ms", total["other"], after["other"]]]))
    print(table(["cost per step", "p50 µs", "p95 µs"], [
        [name, f"{percentile(v, 50) * 1e6:.1f}", f"{percentile(v, 95) * 1e6:.1f}"]
        for name, v in costs.items()]))


async def in_a_run(work: Any) -> dict[str, list[float]]:
    """``work`` with one Prefect client for the loop, as a flow or task run has."""
    from prefect.context import AsyncClientContext

    async with AsyncClientContext.get_or_create():
        found: dict[str, list[float]] = await work
    return {f"{name}, in a run's client context": v for name, v in found.items()}


async def step_costs(rounds: int, stale_only: bool = False) -> dict[str, list[float]]:
    from planrun.errors import ResourceError, TransientError
    from planrun.flows.breakers import Breakers
    from planrun.policy import BreakerSettings

    settings = BreakerSettings(failures=1, window_s=60, cooldown_s=600)
    cached = Breakers(settings=lambda tool: settings)
    stale = Breakers(settings=lambda tool: settings, ttl_s=0)
    closed = Breakers(settings=lambda tool: settings)

    async def noop() -> None:
        return None

    async def fail() -> None:
        raise TransientError("down")

    # Tools named for this run: breakers outlive it on the server.
    tag = f"{os.getpid()}{'s' if stale_only else ''}"
    opened, working = f"bench.open{tag}", f"bench.closed{tag}"
    with contextlib.suppress(TransientError):
        await cached.call(opened, {}, "bench", 10, fail)
    samples: dict[str, list[float]] = {k: [] for k in (
        "no breaker (the no-op alone)", "closed breaker, cached", "open breaker, cached",
        "open breaker, cache run out (1 read)")}
    if stale_only:
        samples = {"open breaker, cache run out (1 read)": [],
                   "a counted failure recorded (create + list)": []}
        counting = Breakers(settings=lambda tool: BreakerSettings(failures=100))
    for i in range(rounds):
        if stale_only:
            started = time.perf_counter()
            with contextlib.suppress(ResourceError):
                await stale.call(opened, {}, "bench", 10, noop)
            samples["open breaker, cache run out (1 read)"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with contextlib.suppress(TransientError):
                await counting.call(f"bench.count{tag}{i // 90}", {}, "bench", 10, fail)
            samples["a counted failure recorded (create + list)"].append(
                time.perf_counter() - started)
            continue
        started = time.perf_counter()
        await noop()
        samples["no breaker (the no-op alone)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        await closed.call(working, {}, "bench", 10, noop)
        samples["closed breaker, cached"].append(time.perf_counter() - started)
        for name, b in (("open breaker, cached", cached),
                        ("open breaker, cache run out (1 read)", stale)):
            if b is stale and i % 10:
                continue  # a request each: fewer rounds
            started = time.perf_counter()
            try:
                await b.call(opened, {}, "bench", 10, noop)
            except ResourceError:
                pass
            samples[name].append(time.perf_counter() - started)
    return samples


if __name__ == "__main__":
    main()
