"""Fan-out: 1,000 WebSocket clients of one progress bridge following one 200-step run.

    .venv/bin/python benchmarks/bench_fanout.py [--clients 1000] [--client-procs 2]
        [--steps 200] [--max-parallel 20] [--runs 2] [--no-compression] [--trace]
        [--json out.json]

Against one Prefect server (``PREFECT_API_URL``, else planrun's local server under
``PLANRUN_HOME``, by default /tmp/bench-home, started if needed):

- the bridge, ``python -m planrun.progress_bridge``, runs as a subprocess with a new message log;
- a warm plan-running subprocess (``_plan_runner.serve_runs``) runs a plan of ``--steps``
  independent ``core.sleep`` steps of 0.05-0.3 s with ``max_parallel: --max-parallel``
  through ``planrun.runner.run_plan``;
- ``--client-procs`` client processes (asyncio, ``websockets``, ``proxy=None``,
  permessage-deflate offered as browsers do unless ``--no-compression``, no pings) hold
  ``--clients`` WebSocket clients in all.

Order, for each run: the runner starts the run and reports its id as soon as it is known
(after ``planrun.run.started`` is emitted, before the first step) and holds its engine;
every client then connects to ``/v1/runs/{id}/ws?after=0`` (so ``run.started`` comes from
the replay); only when all are connected does the run go on. Every message after
``run.started`` is therefore delivered live.

Each client reads until the run-end message and checks that it got seq 1..N with no gap
and no duplicate (heartbeats left out). Reported: deliveries per second (all clients'
messages from the go to the last client's run end, and the busiest second), latency =
client receive time (``time.time()``) - the message's ``ts`` (the time of the change: the
``occurred`` of planrun's event, millisecond resolution; ``run.started`` left out), the
bridge's RSS (psutil) before the clients connect, with them connected (``run.started``
replayed to each), at its peak during the run and after they left, its CPU, and the
``/metrics`` counters (dropped messages and slow disconnects must stay 0). Also: which
steps never got a ``step.running`` / end message, and the gaps in Prefect's stream the
bridge logged ("events a..b of run R are missing; reconciling").

Before the first run, the same clients connect to a run id with no messages and leave
again: the bridge's RSS then is the cost of idle connections. ``--trace`` runs the bridge
through ``_bridge.traced_bridge`` and adds how far its upstream fell behind Prefect's
stream, what handling each event cost, and the time from a message's commit to the first,
median and last client.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import threading
import time
from array import array
from typing import Any

from _bridge import Bridge, _raise_nofile, start_bridge
from _common import (
    BENCH,
    ROOT,
    RUN_END_TYPES,
    TOKEN,
    Server,
    machine,
    median,
    other_prefect_servers,
    percentile,
    plan_data,
    setup,
    table,
    ts_epoch,
    wait_idle,
)
from _plan_runner import PlanRunner

BIN_S = 0.1  # throughput histogram bin


def fanout_plan(steps: int, max_parallel: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    return {"version": 1, "name": "bench-fanout", "limits": {"max_parallel": max_parallel},
            "steps": [{"id": f"s{i:03d}", "tool": "core.sleep",
                       "with": {"seconds": round(rng.uniform(0.05, 0.3), 3)}}
                      for i in range(steps)]}


# The client processes ---------------------------------------------------------------------

def say(**fields: Any) -> None:
    sys.stdout.write("@@ " + json.dumps(fields) + "\n")
    sys.stdout.flush()


class Client:
    __slots__ = ("closed", "ended", "error", "heartbeats", "seqs", "times", "ws")

    def __init__(self) -> None:
        self.ws: Any = None
        self.seqs = array("i")
        self.times = array("d")
        self.heartbeats = 0
        self.ended = False
        self.error: str | None = None
        self.closed: str | None = None

    async def read(self, types: dict[int, tuple[str, str, str | None]]) -> None:
        from websockets.exceptions import ConnectionClosed

        seqs, times = self.seqs, self.times
        try:
            async for text in self.ws:
                received = time.time()
                message = json.loads(text)
                kind = message["type"]
                if kind == "heartbeat":
                    self.heartbeats += 1
                    continue
                seq = message["seq"]
                seqs.append(seq)
                times.append(received)
                if seq not in types:
                    types[seq] = (kind, message["ts"], message.get("step_id"))
                if kind in RUN_END_TYPES:
                    self.ended = True
                    break
        except ConnectionClosed as exc:
            frame = exc.rcvd
            self.closed = f"{frame.code} {frame.reason}" if frame else "closed, no frame"
        except Exception as exc:  # noqa: BLE001 - reported
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                await asyncio.wait_for(self.ws.close(), 10)
            except Exception:  # noqa: BLE001
                pass


async def client_worker(n: int, port: int, out: str, compression: bool,
                        concurrency: int) -> None:
    from websockets.asyncio.client import connect

    _raise_nofile()
    loop = asyncio.get_running_loop()
    say(ready=True)
    run_id = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
    url = f"ws://127.0.0.1:{port}/v1/runs/{run_id}/ws?after=0&token={TOKEN}"
    clients = [Client() for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)
    types: dict[int, tuple[str, str, str | None]] = {}
    readers: list[asyncio.Task[None]] = []

    async def open_one(client: Client) -> None:
        async with gate:
            try:
                client.ws = await connect(url, proxy=None, open_timeout=120,
                                          compression="deflate" if compression else None,
                                          ping_interval=None, ping_timeout=None,
                                          close_timeout=5, max_size=None)
            except Exception as exc:  # noqa: BLE001 - reported
                client.error = f"connect: {type(exc).__name__}: {exc}"
                return
        readers.append(asyncio.ensure_future(client.read(types)))

    t_start = time.time()
    await asyncio.gather(*(open_one(c) for c in clients))
    connected_at = time.time()
    say(connected=sum(1 for c in clients if c.error is None), t=connected_at,
        connect_s=connected_at - t_start)
    # The clients' own collector would pause every reader at once; refcounting frees the
    # messages anyway.
    gc.collect()
    gc.freeze()
    gc.disable()
    stop = loop.run_in_executor(None, sys.stdin.readline)  # the parent's "stop": give up
    waiting = asyncio.ensure_future(asyncio.gather(*readers))
    await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
    gc.enable()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    if not waiting.cancelled():
        waiting.exception()  # retrieved: a reader cancelled by a "stop" is not an error

    summaries = []
    seqs_all, times_all = array("i"), array("d")
    for client in clients:
        seqs = list(client.seqs)
        last = max(seqs, default=0)
        seen = set(seqs)
        summaries.append({"messages": len(seqs), "last_seq": last,
                          "duplicates": len(seqs) - len(seen),
                          "missing": len(set(range(1, last + 1)) - seen),
                          "in_order": all(a < b for a, b in zip(seqs, seqs[1:], strict=False)),
                          "ended": client.ended, "error": client.error,
                          "closed": client.closed, "heartbeats": client.heartbeats})
        seqs_all.extend(client.seqs)
        times_all.extend(client.times)
    with open(out + ".bin", "wb") as binary:
        seqs_all.tofile(binary)
        times_all.tofile(binary)
    with open(out, "w") as fh:
        json.dump({"clients": summaries, "deliveries": len(seqs_all),
                   "messages": {s: [k, stamp, sid] for s, (k, stamp, sid) in types.items()},
                   "connected_at": connected_at}, fh)
    say(done=out)


# The parent ---------------------------------------------------------------------------------

class Worker:
    """One client process, driven through stdin/stdout lines."""

    def __init__(self, n: int, port: int, compression: bool, concurrency: int) -> None:
        fd, self.out = tempfile.mkstemp(prefix="bench-fanout-", suffix=".json")
        os.close(fd)
        self.args = [sys.executable, str(BENCH / "bench_fanout.py"), "--worker", str(n),
                     "--port", str(port), "--out", self.out,
                     "--concurrency", str(concurrency)]
        if not compression:
            self.args.append("--no-compression")
        self.proc: Any = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 24)
        await self.answer("ready")

    async def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def answer(self, key: str) -> dict[str, Any]:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("a client process exited")
            if line.startswith(b"@@ "):
                data: dict[str, Any] = json.loads(line[3:])
                if key in data:
                    return data

    def result(self) -> dict[str, Any]:
        """The worker's summary, with ``seqs`` and ``times``: every delivery's seq and
        receive time."""
        with open(self.out) as fh:
            data: dict[str, Any] = json.load(fh)
        n = data["deliveries"]
        seqs, times = array("i"), array("d")
        with open(self.out + ".bin", "rb") as fh:
            seqs.fromfile(fh, n)
            times.fromfile(fh, n)
        os.unlink(self.out)
        os.unlink(self.out + ".bin")
        data["seqs"], data["times"] = seqs, times
        return data

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.stdin.close()  # EOF ends the worker's wait for a "stop"
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class PlanrunEvents:
    """A raw Prefect subscriber to planrun's events in the parent (what the bridge follows):
    (run id, step id or None, status) -> (occurred, received)."""

    def __init__(self) -> None:
        self.planrun: dict[tuple[str, str | None, str], tuple[float, float]] = {}
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self._follow())
        await asyncio.wait_for(self.ready.wait(), 60)

    async def _follow(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        event_filter = EventFilter(event=EventNameFilter(prefix=["planrun."]))
        async with get_events_subscriber(filter=event_filter,
                                         reconnection_attempts=0) as events:
            self.ready.set()
            async for event in events:
                received = time.time()
                payload = event.payload
                step = payload.get("step_id") if event.event.startswith("planrun.step.") else None
                key = (str(payload.get("run_id")), step, str(payload.get("status")))
                self.planrun.setdefault(key, (event.occurred.timestamp(), received))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Sampler:
    """Samples the bridge's RSS every 50 ms in a thread; keeps the peak."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.bridge.rss())
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def receipt_summary(results: list[dict[str, Any]],
                    messages: dict[int, tuple[str, float, str | None]]) -> dict[int, list[float]]:
    """Per seq: the first, median and last receipt time over every client (for the trace)."""
    by_seq: dict[int, list[float]] = {}
    for r in results:
        for seq, received in zip(r["seqs"], r["times"], strict=True):
            by_seq.setdefault(seq, []).append(received)
    out = {}
    for seq, times in by_seq.items():
        times.sort()
        out[seq] = [times[0], times[len(times) // 2], times[-1]]
    return out


def trace_breakdown(records: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """From the trace of the bridge's upstream: how late it took each of the run's events
    (its subscription's backlog), what ``handle`` cost, and from the message's commit to
    the first, median and last client."""
    mine = [r for r in records if r["run_id"] == run["run_id"] and r["new"]
            and r["event"].startswith("planrun.")]
    by_key = {(r["step_id"], r["status"]): r for r in mine}
    after_commit: dict[str, list[float]] = {"first": [], "median": [], "last": []}
    for seq, (kind, step, _) in run["message_index"].items():
        if not kind.startswith("step."):
            continue
        r = by_key.get((step, kind.removeprefix("step.")))
        got = run["client_receipts"].get(seq)
        if r is None or got is None:
            continue
        for name, t in zip(("first", "median", "last"), got, strict=True):
            after_commit[name].append((t - r["exit"]) * 1e3)

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99),
                "max": max(values, default=float("nan")), "n": len(values)}

    live = [r for r in mine if r["occurred"] >= run["t_go"] - 1]
    return {
        "upstream_lag_ms": dist([(r["enter"] - r["occurred"]) * 1e3 for r in live]),
        "handle_ms": dist([(r["exit"] - r["enter"]) * 1e3 for r in live]),
        "handle_cpu_ms_total": sum(r["cpu_ms"] for r in live),
        "estimate_ms": dist([r.get("estimate_ms", 0.0) for r in live]),
        "estimate_ms_total": sum(r.get("estimate_ms", 0.0) for r in live),
        "commit_to_first_client_ms": dist(after_commit["first"]),
        "commit_to_median_client_ms": dist(after_commit["median"]),
        "commit_to_last_client_ms": dist(after_commit["last"]),
    }


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return float("nan")


def counters(bridge: Bridge) -> dict[str, float]:
    m = bridge.metrics()
    return {"dropped": m.get("planrun_bridge_messages_dropped_total", 0.0),
            "slow": m.get("planrun_bridge_slow_disconnects_total", 0.0),
            "sent_ws": m.get('planrun_bridge_messages_sent_total{transport="ws"}', 0.0),
            "published": m.get("planrun_bridge_messages_published_total", 0.0),
            "bad_frames": sum(v for k, v in m.items()
                              if k.startswith("planrun_bridge_bad_client_frames_total"))}


async def one_run(srv: Server, bridge: Bridge, runner: PlanRunner, data: dict[str, Any],
                  args: argparse.Namespace, subscriber: PlanrunEvents) -> dict[str, Any]:
    sizes = [args.clients // args.client_procs + (1 if i < args.clients % args.client_procs
                                                  else 0) for i in range(args.client_procs)]
    workers = [Worker(n, bridge.port, not args.no_compression, args.concurrency)
               for n in sizes]
    await asyncio.gather(*(w.start() for w in workers))
    before = await asyncio.to_thread(counters, bridge)
    rss_idle = await asyncio.to_thread(bridge.rss)

    run_id = await runner.start_run(data, hold=True)
    t_id = time.time()
    for w in workers:
        await w.send(run_id)
    connected = await asyncio.wait_for(asyncio.gather(*(w.answer("connected") for w in workers)),
                                       300)
    t_connected = time.time()
    n_connected = sum(c["connected"] for c in connected)
    await asyncio.sleep(1.0)
    health = await asyncio.to_thread(bridge.healthz)
    rss_connected = await asyncio.to_thread(bridge.rss)

    cpu0 = {"bridge": bridge.cpu_s(), "server": cpu_of(srv.pid),
            **{f"clients{i}": cpu_of(w.proc.pid) for i, w in enumerate(workers)}}
    import psutil

    psutil.cpu_percent(None)
    with Sampler(bridge) as sampler:
        t_go = time.time()
        await runner.go()
        done = await runner.finished()
        t_run_end = time.time()
        try:
            await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)),
                                   args.drain_timeout)
        except TimeoutError:
            print(f"  clients still reading {args.drain_timeout:.0f} s after the run: "
                  "stopping them", flush=True)
            for w in workers:
                await w.send("stop")
            await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)), 120)
        t_all = time.time()
        busy = psutil.cpu_percent(None)
        cpu1 = {"bridge": bridge.cpu_s(), "server": cpu_of(srv.pid),
                **{f"clients{i}": cpu_of(w.proc.pid) for i, w in enumerate(workers)}}
    results = [w.result() for w in workers]
    await asyncio.gather(*(w.close() for w in workers))
    await asyncio.sleep(1.0)
    after = await asyncio.to_thread(counters, bridge)
    rss_after = await asyncio.to_thread(bridge.rss)
    health_after = await asyncio.to_thread(bridge.healthz)

    clients = [c for r in results for c in r["clients"]]
    messages: dict[int, tuple[str, float, str | None]] = {}  # seq -> (type, ts, step id)
    for r in results:
        for seq, (kind, stamp, sid) in r["messages"].items():
            messages[int(seq)] = (kind, ts_epoch(stamp), sid)
    # When this process's subscriber got the planrun event behind each message (what the
    # bridge could have got it at, at best): for the upstream / fan-out breakdown.
    upstream_at: dict[int, tuple[float, float]] = {}  # seq -> (occurred, received)
    for seq, (kind, _, sid) in messages.items():
        if kind.startswith("step.") and sid is not None:
            got = subscriber.planrun.get((run_id, sid, kind.removeprefix("step.")))
        elif kind in RUN_END_TYPES:
            got = subscriber.planrun.get((run_id, None, kind.removeprefix("run.")))
        else:
            got = None
        if got is not None:
            upstream_at[seq] = got
    connected_at = max(r["connected_at"] for r in results)
    latencies: list[float] = []
    fanout: list[float] = []
    bins: dict[int, int] = {}
    last_receive = 0.0
    replayed = 0
    for r in results:
        for seq, received in zip(r["seqs"], r["times"], strict=True):
            key = int(received / BIN_S)
            bins[key] = bins.get(key, 0) + 1
            last_receive = max(last_receive, received)
            stamp = messages[seq][1]
            if stamp < connected_at:  # produced before every client was in: replayed
                replayed += 1
                continue
            latencies.append((received - stamp) * 1e3)
            if seq in upstream_at:
                fanout.append((received - upstream_at[seq][1]) * 1e3)
    upstream = [(got - occurred) * 1e3 for occurred, got in upstream_at.values()
                if occurred >= connected_at]
    last_seqs = sorted({c["last_seq"] for c in clients})
    n_messages = max(last_seqs, default=0)
    deliveries = sum(c["messages"] for c in clients)
    live = len(latencies)
    per_second = [sum(bins.get(k + j, 0) for j in range(int(1 / BIN_S)))
                  for k in sorted(bins)]
    end_seq = max((s for s, v in messages.items() if v[0] in RUN_END_TYPES), default=0)
    step_ts = [v[1] for v in messages.values() if v[0].startswith("step.")]
    kinds: dict[str, int] = {}
    for v in messages.values():
        kinds[v[0]] = kinds.get(v[0], 0) + 1
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    window = t_all - t_go
    step_ids = [step["id"] for step in data["steps"]]
    told = {(v[2], v[0]) for v in messages.values()}
    no_running = [sid for sid in step_ids if (sid, "step.running") not in told]
    no_end = [sid for sid in step_ids
              if not any((sid, k) in told for k in ("step.completed", "step.failed"))]
    # The bridge's own account of gaps in Prefect's stream during this run.
    gap_lines = [line.strip() for line in bridge.log.read_text().splitlines()
                 if run_id in line and "missing" in line]
    reconciled = [line.strip() for line in bridge.log.read_text().splitlines()
                  if "reconciled" in line]

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p95": percentile(values, 95),
                "p99": percentile(values, 99), "max": max(values, default=float("nan")),
                "n": len(values)}

    return {
        "run_id": run_id, "status": done["done"], "clients": len(clients),
        "connected": n_connected, "connect_s": t_connected - t_id,
        "healthz_clients": health.get("clients"), "healthz_clients_after": health_after.get(
            "clients"),
        "messages": n_messages, "kinds": kinds,
        "clients_complete": sum(1 for c in clients if c["ended"] and c["missing"] == 0
                                and c["duplicates"] == 0 and c["last_seq"] == n_messages
                                and c["in_order"]),
        "clients_with_gaps": sum(1 for c in clients if c["missing"]),
        "clients_with_duplicates": sum(1 for c in clients if c["duplicates"]),
        "clients_out_of_order": sum(1 for c in clients if not c["in_order"]),
        "clients_not_ended": sum(1 for c in clients if not c["ended"]),
        "client_errors": sorted({str(c["error"] or c["closed"]) for c in clients
                                 if c["error"] or c["closed"]})[:5],
        "last_seqs": last_seqs[:5], "end_seq": end_seq,
        "deliveries": deliveries, "expected_deliveries": n_messages * len(clients),
        "replayed": replayed, "live": live,
        "run_wall_s": t_run_end - t_go,
        "step_span_s": (max(step_ts) - min(step_ts)) if step_ts else float("nan"),
        "drain_after_run_s": last_receive - t_run_end,
        "deliveries_per_s": live / (last_receive - t_go),
        "offered_per_s": (n_messages - 1) * len(clients) / (t_run_end - t_go),
        "peak_deliveries_per_s": max(per_second, default=0),
        "latency_ms": dist(latencies),
        # Prefect: planrun event received by this process's subscriber - occurred;
        # fan-out: client received - this process's subscriber received (step and run-end
        # messages).
        "upstream_ms": dist(upstream), "fanout_ms": dist(fanout),
        "rss_mb": {"idle": rss_idle / 2**20, "connected": rss_connected / 2**20,
                   "peak": sampler.peak / 2**20, "after": rss_after / 2**20},
        "cpu_s": cpu, "window_s": window, "machine_busy_pct": busy,
        "metrics_delta": {k: after[k] - before[k] for k in after},
        "metrics_after": after,
        "steps_without_running": no_running, "steps_without_end": no_end,
        "bridge_gap_warnings": gap_lines, "bridge_reconciled_lines": reconciled[-3:],
        "message_index": {seq: [v[0], v[2], v[1]] for seq, v in messages.items()},
        "t_go": t_go,
        "client_receipts": receipt_summary(results, messages),
    }


async def idle_probe(bridge: Bridge, args: argparse.Namespace) -> dict[str, float]:
    """The bridge's RSS with every client connected to a run that has no messages (nothing
    replayed, nothing sent): the cost of an idle connection."""
    sizes = [args.clients // args.client_procs + (1 if i < args.clients % args.client_procs
                                                  else 0) for i in range(args.client_procs)]
    workers = [Worker(n, bridge.port, not args.no_compression, args.concurrency)
               for n in sizes]
    await asyncio.gather(*(w.start() for w in workers))
    before = await asyncio.to_thread(bridge.rss)
    for w in workers:
        await w.send(f"idle-probe-{os.getpid()}")
    connected = await asyncio.wait_for(asyncio.gather(*(w.answer("connected") for w in workers)),
                                       300)
    await asyncio.sleep(2.0)
    during = await asyncio.to_thread(bridge.rss)
    for w in workers:
        await w.send("stop")
    await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)), 120)
    for w in workers:
        w.result()
    await asyncio.gather(*(w.close() for w in workers))
    await asyncio.sleep(2.0)
    after = await asyncio.to_thread(bridge.rss)
    n = sum(c["connected"] for c in connected)
    return {"clients": n, "before_mb": before / 2**20, "connected_mb": during / 2**20,
            "after_mb": after / 2**20, "per_client_kb": (during - before) / max(n, 1) / 1024}


async def measure(srv: Server, bridge: Bridge,
                  args: argparse.Namespace) -> tuple[dict[str, float], list[dict[str, Any]]]:
    data = plan_data(fanout_plan(args.steps, args.max_parallel))
    probe = await idle_probe(bridge, args)
    print(f"  idle clients: {probe['clients']} connected to a run with no messages: bridge RSS "
          f"{probe['before_mb']:.0f} -> {probe['connected_mb']:.0f} MB "
          f"({probe['per_client_kb']:.0f} KB a client); {probe['after_mb']:.0f} MB after they "
          "left", flush=True)
    subscriber = PlanrunEvents()
    await subscriber.start()
    runner = PlanRunner()
    await runner.start()
    results = []
    try:
        for i in range(args.runs):
            r = await one_run(srv, bridge, runner, data, args, subscriber)
            print(f"  run {i + 1}/{args.runs}: {r['status']}, {r['messages']} messages x "
                  f"{r['clients']} clients; complete {r['clients_complete']}; "
                  f"{r['deliveries_per_s']:.0f} deliveries/s; latency p50 "
                  f"{r['latency_ms']['p50']:.0f} ms p99 {r['latency_ms']['p99']:.0f} ms; "
                  f"dropped {r['metrics_delta']['dropped']:.0f}, slow "
                  f"{r['metrics_delta']['slow']:.0f}", flush=True)
            results.append(r)
            await asyncio.to_thread(wait_idle, srv)
    finally:
        subscriber.stop()
        await runner.close()
    return probe, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-parallel", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in flight per client process")
    parser.add_argument("--no-compression", action="store_true",
                        help="clients do not offer permessage-deflate")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--port", type=int, help="the bridge's port (default: a free one)")
    parser.add_argument("--trace", action="store_true",
                        help="time the bridge's upstream (_bridge.traced_bridge)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(client_worker(args.worker, args.port, args.out, not args.no_compression,
                                  args.concurrency))
        return 0

    started = time.monotonic()
    srv = setup()
    info = machine()
    info["other_prefect_servers"] = other_prefect_servers(srv)
    print(f"server {srv.url} (pid {srv.pid}); machine {info}", flush=True)
    bridge = start_bridge(srv, port=args.port, trace=args.trace)
    print(f"bridge {bridge.url} (pid {bridge.pid}, log {bridge.log}); RSS idle "
          f"{bridge.rss() / 2**20:.1f} MB", flush=True)
    try:
        probe, runs = asyncio.run(measure(srv, bridge, args))
    finally:
        bridge.stop()
    records = bridge.trace()
    for r in runs:
        if records:
            r["trace"] = trace_breakdown(records, r)
        del r["message_index"], r["client_receipts"]
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    rows = []
    for i, r in enumerate(runs, 1):
        lat, rss, d = r["latency_ms"], r["rss_mb"], r["metrics_delta"]
        rows.append([
            i, f"{r['clients_complete']} / {r['clients']}", r["messages"],
            f"{r['deliveries']} / {r['expected_deliveries']}",
            f"{r['run_wall_s']:.1f}", f"{r['drain_after_run_s']:.2f}",
            f"{r['deliveries_per_s'] / 1e3:.1f}k", f"{r['peak_deliveries_per_s'] / 1e3:.1f}k",
            f"{lat['p50']:.0f}", f"{lat['p95']:.0f}", f"{lat['p99']:.0f}", f"{lat['max']:.0f}",
            f"{rss['idle']:.0f} / {rss['connected']:.0f} / {rss['peak']:.0f}",
            f"{r['cpu_s']['bridge']:.1f} of {r['window_s']:.1f}",
            f"{d['dropped']:.0f} / {d['slow']:.0f}"])
    print()
    print(f"Fan-out: {args.clients} WebSocket clients in {args.client_procs} processes, one run "
          f"of {args.steps} core.sleep steps (0.05-0.3 s, max_parallel {args.max_parallel}); "
          f"compression {'off' if args.no_compression else 'permessage-deflate'}")
    print(table(["run", "clients complete", "messages", "deliveries", "run s",
                 "last delivery after run end s", "deliveries/s", "busiest 1 s",
                 "latency p50 ms", "p95", "p99", "max",
                 "bridge RSS MB before / 1,000 connected / peak",
                 "bridge CPU s", "dropped / slow"], rows))
    print()
    print("Where the latency goes (ms): Prefect = planrun's event received by a subscriber "
          "in the benchmark's parent process - occurred; fan-out = client received - that "
          "subscriber received (step and run-end messages)")
    print(table(["run", "latency p50", "p99", "Prefect p50", "Prefect p99", "fan-out p50",
                 "fan-out p99", "fan-out max"],
                [[i, f"{r['latency_ms']['p50']:.0f}", f"{r['latency_ms']['p99']:.0f}",
                  f"{r['upstream_ms']['p50']:.0f}", f"{r['upstream_ms']['p99']:.0f}",
                  f"{r['fanout_ms']['p50']:.0f}", f"{r['fanout_ms']['p99']:.0f}",
                  f"{r['fanout_ms']['max']:.0f}"] for i, r in enumerate(runs, 1)]))
    for i, r in enumerate(runs, 1):
        print(f"run {i}: kinds {r['kinds']}; step span {r['step_span_s']:.2f} s; offered "
              f"{r['offered_per_s'] / 1e3:.1f}k deliveries/s while the run ran; CPU s "
              f"{ {k: round(v, 1) for k, v in r['cpu_s'].items()} } (machine busy "
              f"{r['machine_busy_pct']:.0f} %); healthz clients "
              f"{r['healthz_clients']} (after {r['healthz_clients_after']}); ws sent "
              f"{r['metrics_delta']['sent_ws']:.0f}; bad frames "
              f"{r['metrics_delta']['bad_frames']:.0f}; RSS after clients left "
              f"{r['rss_mb']['after']:.0f} MB; gaps {r['clients_with_gaps']}, duplicates "
              f"{r['clients_with_duplicates']}, out of order {r['clients_out_of_order']}, "
              f"not ended {r['clients_not_ended']}, errors {r['client_errors'] or 'none'}")
        print(f"       steps without a step.running message: "
              f"{r['steps_without_running'] or 'none'}; without an end message: "
              f"{r['steps_without_end'] or 'none'}; the bridge's gap warnings: "
              f"{r['bridge_gap_warnings'] or 'none'}")
        if "trace" in r:
            t = r["trace"]
            print(f"       trace: upstream lag (handle entered - occurred) p50 "
                  f"{t['upstream_lag_ms']['p50']:.0f} ms, p99 {t['upstream_lag_ms']['p99']:.0f}"
                  f" ms; handle p50 {t['handle_ms']['p50']:.1f} ms (estimate p50 "
                  f"{t['estimate_ms']['p50']:.1f} ms, {t['estimate_ms_total'] / 1e3:.1f} s in "
                  f"all; handle CPU {t['handle_cpu_ms_total'] / 1e3:.1f} s); commit -> first "
                  f"client p50 {t['commit_to_first_client_ms']['p50']:.0f} ms, -> median "
                  f"client p50 {t['commit_to_median_client_ms']['p50']:.0f} ms, -> last client "
                  f"p50 {t['commit_to_last_client_ms']['p50']:.0f} ms p99 "
                  f"{t['commit_to_last_client_ms']['p99']:.0f} ms")
    print(f"benchmark took {time.monotonic() - started:.0f} s; load average at end "
          f"{info['loadavg_end']}")
    line = {"benchmark": "fanout", "clients": args.clients, "steps": args.steps,
            "compression": not args.no_compression,
            "idle_rss_mb": [round(probe["before_mb"], 1), round(probe["connected_mb"], 1)],
            "idle_kb_per_client": round(probe["per_client_kb"], 1),
            "runs": [{"messages": r["messages"], "clients_complete": r["clients_complete"],
                      "deliveries": r["deliveries"],
                      "expected_deliveries": r["expected_deliveries"],
                      "deliveries_per_s": round(r["deliveries_per_s"]),
                      "peak_deliveries_per_s": r["peak_deliveries_per_s"],
                      "latency_p50_ms": round(r["latency_ms"]["p50"], 1),
                      "latency_p99_ms": round(r["latency_ms"]["p99"], 1),
                      "prefect_p50_ms": round(r["upstream_ms"]["p50"], 1),
                      "fanout_p50_ms": round(r["fanout_ms"]["p50"], 1),
                      "fanout_p99_ms": round(r["fanout_ms"]["p99"], 1),
                      "rss_idle_mb": round(r["rss_mb"]["idle"], 1),
                      "rss_connected_mb": round(r["rss_mb"]["connected"], 1),
                      "rss_peak_mb": round(r["rss_mb"]["peak"], 1),
                      "dropped": r["metrics_delta"]["dropped"],
                      "slow_disconnects": r["metrics_delta"]["slow"],
                      "steps_without_running": len(r["steps_without_running"]),
                      "bridge_gap_warnings": len(r["bridge_gap_warnings"])} for r in runs],
            "median_deliveries_per_s": round(median([r["deliveries_per_s"] for r in runs])),
            "median_latency_p50_ms": round(median([r["latency_ms"]["p50"] for r in runs]), 1),
            "median_latency_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs]), 1),
            "loadavg_end": info["loadavg_end"]}
    print(json.dumps(line))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "idle_probe": probe, "runs": runs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
