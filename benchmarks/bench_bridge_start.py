"""Bridge start: how long a new bridge (a first start: an empty message log) takes, from
starting its process, to answer ``GET /healthz`` with 200 and to send a WebSocket client
the first live message of a run that is going on, with N ended runs in the server's
history of the last hour.

    .venv/bin/python benchmarks/bench_bridge_start.py [--ended 0,300] [--repeat 3]
        [--before DIR]   # also a bridge started from DIR (a checkout of older code)

For each N (ascending) the script adds ended runs to the server's history until it holds N
of its own: one real run of a two-step plan, whose planrun events are then emitted again
under new run ids (``tests/progress_bridge/ended_runs.py``), as if that many had ended in
the last hour. A plan-running subprocess keeps a chain of short steps going; then a bridge
process starts (``python -m planrun.progress_bridge``, cwd: this checkout, or ``--before``'s)
and the script polls ``/healthz`` and connects a WebSocket client to the running run at
once (retrying until the bridge listens). "first message" is the first message the client
gets (a replayed one: the run's start; the run has been going for 2 s), "first live" the
first whose ``ts`` is after the bridge process was started. The client connects at once,
so a bridge that serves before its start read is over reads the run for it (the log then
says ``recalled ...`` before ``start: read ...``). The bridge's own log says how many
events its start read (``start: read ...``; the older bridge does not say). Prefect's
history is also counted: the planrun events of the last hour in the server.

Run it on an idle machine; it prints a table and the JSON of every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bridge
import _common
import _plan_runner

sys.path.insert(0, str(_common.ROOT))

ENDED = {"version": 1, "name": "bench-start-ended", "steps": [
    {"id": "a", "tool": "core.echo", "with": {"value": 1}},
    {"id": "b", "tool": "core.echo", "needs": ["a"], "with": {"value": 2}}]}
GOING_STEPS = 40  # 0.5 s each: the run goes on for the whole measurement
GOING = {"version": 1, "name": "bench-start-going", "steps": [
    {"id": f"s{i}", "tool": "core.sleep", "with": {"seconds": 0.5},
     **({"needs": [f"s{i - 1}"]} if i else {})} for i in range(GOING_STEPS)]}
RUN_BEFORE_S = 2.0  # how long the run has been going when the bridge starts
START_READ = re.compile(r"start: read (\d+) event\(s\) of (\d+) run\(s\)")


async def history_events() -> int:
    """The planrun events of the last hour in the server."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    since = time.time() - 3600
    query = EventFilter(event=EventNameFilter(prefix=["planrun."]),
                        occurred=EventOccurredFilter.model_validate(
                            {"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))}))
    async with get_client() as client:
        return int((await client.read_events(filter=query, limit=1)).total)


async def add_history(real_run: str, have: int, want: int) -> None:
    from tests.progress_bridge.ended_runs import copy_ended_run

    if want > have:
        await copy_ended_run(real_run, want - have, timeout=600)


def start_bridge(cwd: Path, srv: _common.Server) -> tuple[_bridge.Bridge, float]:
    """A bridge process over a new message log; it and the wall time just before it started."""
    import os

    port = _common.free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-start-"))
    log = Path(f"/tmp/bench-bridge-start-{port}.log")
    env = {**os.environ, "PREFECT_API_URL": srv.url, "PLANRUN_TOKEN": _common.TOKEN,
           "PLANRUN_RATE_PER_S": "0"}
    with open(log, "w") as fh:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "planrun.progress_bridge", "--host",
                                 "127.0.0.1", "--port", str(port), "--data", str(data)],
                                cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return _bridge.Bridge(port=port, proc=proc, data=data, log=log), t0


async def healthz_at(bridge: _bridge.Bridge, deadline: float) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{bridge.url}/healthz")).status_code == 200:
                    return time.time()
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"no /healthz 200 in time; see {bridge.log}")


async def live_at(bridge: _bridge.Bridge, run_id: str, t0: float,
                  deadline: float) -> tuple[float, float]:
    """When the client got its first message, and its first live one (``ts`` after t0)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    first: float | None = None
    while time.monotonic() < deadline:
        try:
            async with connect(bridge.ws_url(run_id), proxy=None) as ws:
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    now = time.time()
                    if message["type"] == "heartbeat":
                        continue
                    first = first or now
                    if _common.ts_epoch(message["ts"]) > t0:
                        return first, now
        except (OSError, WebSocketException):  # not listening yet, or closed: again
            await asyncio.sleep(0.02)
    raise RuntimeError(f"no live message in time; see {bridge.log}")


async def one_start(cwd: Path, srv: _common.Server, run_id: str) -> dict[str, Any]:
    says_start = (cwd / "progress_bridge" / "prefect_source.py").read_text().count("start: read")
    bridge, t0 = start_bridge(cwd, srv)
    try:
        deadline = time.monotonic() + 300
        health, (first, live) = await asyncio.gather(healthz_at(bridge, deadline),
                                                     live_at(bridge, run_id, t0, deadline))
        log_deadline = time.monotonic() + 30
        while (says_start and not START_READ.search(bridge.log.read_text(errors="replace"))
               and time.monotonic() < log_deadline and bridge.proc.poll() is None):
            await asyncio.sleep(0.1)  # the start read may end after the first live message
    finally:
        bridge.stop()
    read = START_READ.search(bridge.log.read_text(errors="replace"))
    return {"healthz_s": health - t0, "first_message_s": first - t0, "first_live_s": live - t0,
            "start_read_events": int(read.group(1)) if read else None,
            "start_read_runs": int(read.group(2)) if read else None}


async def measure(args: argparse.Namespace, srv: _common.Server) -> list[dict[str, Any]]:
    runner = _plan_runner.PlanRunner()
    await runner.start()
    samples: list[dict[str, Any]] = []
    try:
        real_run = await runner.start_run(_common.plan_data(ENDED), hold=False)
        await runner.finished()
        have = 0
        for n in sorted(args.ended):
            await add_history(real_run, have, n)
            have = max(have, n)
            history = await history_events()
            for _ in range(args.repeat):
                _common.wait_idle(srv)
                run_id = await runner.start_run(_common.plan_data(GOING), hold=False)
                await asyncio.sleep(RUN_BEFORE_S)  # the run has a past to replay
                try:
                    for name, cwd in args.bridges:
                        sample = {"bridge": name, "ended": n, "history_events": history,
                                  **await one_start(cwd, srv, run_id)}
                        samples.append(sample)
                        print(json.dumps(sample), flush=True)
                finally:
                    await runner.finished()  # the run goes on to its end
    finally:
        await runner.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ended", default="0,300",
                        help="comma-separated counts of ended runs in the history")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout of older code to compare")
    args = parser.parse_args()
    try:
        args.ended = [int(n) for n in args.ended.split(",") if n.strip()]
    except ValueError:
        parser.error("--ended takes comma-separated whole numbers")
    if args.repeat < 1 or any(n < 0 for n in args.ended):
        parser.error("--repeat and --ended must not be negative (--repeat at least 1)")
    if args.before is not None and not (args.before / "progress_bridge").is_dir():
        parser.error(f"--before {args.before}: not a planrun checkout")
    args.bridges = [("this", _common.ROOT)] + ([("before", args.before)] if args.before else [])
    srv = _common.setup()
    print(json.dumps(_common.machine()))
    samples = asyncio.run(measure(args, srv))
    rows = []
    for name, _cwd in args.bridges:
        for n in sorted(set(args.ended)):
            mine = [s for s in samples if s["bridge"] == name and s["ended"] == n]
            if mine:
                rows.append([name, n, mine[0]["history_events"],
                             *(f"{_common.median([s[k] for s in mine]):.2f}"
                               for k in ("healthz_s", "first_message_s", "first_live_s")),
                             mine[0]["start_read_events"]])
    print(_common.table(["bridge", "ended runs", "planrun events, last hour", "healthz s",
                         "first message s", "first live s", "start read events"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
