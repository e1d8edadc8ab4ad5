"""Prometheus metrics of one bridge, in a registry of its own (several bridges may share
a process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from planrun.contract.stream import RUN_ENDED, Message, MessageType

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
