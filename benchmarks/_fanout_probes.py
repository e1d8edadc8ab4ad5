"""What bench_fanout.py watches beside its clients: planrun's events as a raw Prefect
subscriber gets them (:class:`PlanrunEvents`), the bridge's peak RSS (:class:`Sampler`), a
process's CPU time (:func:`cpu_of`) and the bridge's ``/metrics`` counters
(:func:`counters`).
"""

from __future__ import annotations

import asyncio
import threading
import time

from _bridge import Bridge


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
