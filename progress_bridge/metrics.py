"""Prometheus metrics of one bridge, in a registry of its own (several bridges may share
a process, as in tests).

Counters and gauges of what passes through are updated as it passes; what the bridge
holds (its runs' waiting steps and queue, the breakers it knows of) is read when
``/metrics`` is asked (:class:`_Guardrails`), so it never drifts from the views.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from planrun.contract.stream import RUN_ENDED, Message, MessageType
from planrun.progress_bridge.breakers import STATE_VALUES

if TYPE_CHECKING:
    from planrun.progress_bridge.state import BridgeState

#: What a waiting step can wait for (``planrun.contract.events.StepWaiting.why``).
WAITING_FOR = ("slot", "rate", "load")

_STEP_ENDED = frozenset({MessageType.STEP_COMPLETED, MessageType.STEP_FAILED,
                         MessageType.STEP_SKIPPED})


class Metrics:
    """Clients, messages sent and dropped, and runs and steps by status."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.clients = Gauge("planrun_bridge_clients", "Connected clients",
                             ["transport"], registry=r)
        self.sent = Counter("planrun_bridge_messages_sent", "Messages sent to clients",
                            ["transport"], registry=r)
        self.published = Counter("planrun_bridge_messages_published",
                                 "Messages published by the upstream", registry=r)
        self.dropped = Counter("planrun_bridge_messages_dropped",
                               "Messages not delivered because a client's queue was full",
                               registry=r)
        self.slow_disconnects = Counter("planrun_bridge_slow_disconnects",
                                        "Clients cut off for being too slow", registry=r)
        self.bad_frames = Counter("planrun_bridge_bad_client_frames",
                                  "Connections closed for a bad client frame", ["why"],
                                  registry=r)
        self.runs = Counter("planrun_runs", "Runs that ended, by status", ["status"],
                            registry=r)
        self.steps = Counter("planrun_steps", "Steps that ended, by status", ["status"],
                             registry=r)
        self.step_duration = Histogram("planrun_step_duration_seconds",
                                       "Step durations by tool", ["tool"], registry=r)
        self.refused = Counter("planrun_bridge_runs_refused",
                               "Submissions answered 503 (queue_full, memory)", ["reason"],
                               registry=r)

    def follow(self, state: BridgeState) -> None:
        """Report the guardrails ``state`` holds: breakers, waiting steps, the queue."""
        self.registry.register(_Guardrails(state))

    def observe(self, message: Message) -> None:
        """Count one published message toward the run and step metrics."""
        self.published.inc()
        if message.type in RUN_ENDED:
            self.runs.labels(status=message.type.removeprefix("run.")).inc()
        elif message.type in _STEP_ENDED:
            self.steps.labels(status=message.type.removeprefix("step.")).inc()

    def observe_step_duration(self, tool: str, duration_s: float) -> None:
        """Hook for the upstream, which knows each step's tool from the plan."""
        self.step_duration.labels(tool=tool).observe(duration_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _Guardrails:
    """A collector read at every scrape (prometheus_client's custom collector)."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # read at every scrape, never at registration

    def collect(self) -> Iterator[Metric]:
        breakers = sorted(self.state.breakers.latest.items())
        states = GaugeMetricFamily(
            "planrun_breaker_state", "Circuit breaker state by breaker (tool, or "
            "http.request@host): 0 closed, 1 half-open, 2 open", labels=["breaker"])
        opened = CounterMetricFamily(
            "planrun_breaker_opened", "Times each circuit breaker opened, since it first "
            "did (kept by the breaker, across restarts)", labels=["breaker"])
        for key, change in breakers:
            states.add_metric([key], STATE_VALUES[change.state])
            opened.add_metric([key], change.opened_total)
        views = [v for v in list(self.state.views.values()) if not v.ended]
        counts = Tally(why for view in views for why in view.waiting.values())
        waiting = GaugeMetricFamily("planrun_steps_waiting", "Steps waiting to start, by "
                                    "what they wait for (slot, rate, load)", labels=["why"])
        for why in sorted({*WAITING_FOR, *counts}):
            waiting.add_metric([why], counts[why])
        yield from (states, opened, waiting)
        yield GaugeMetricFamily("planrun_runs_queued", "Runs submitted to this bridge that "
                                "have not started yet", value=self.state.queued())
