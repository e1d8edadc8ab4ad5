"""How the bridge follows Prefect: one frozen settings object, each field documented."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpstreamSettings:
    """lookback_s: how long ago a run may have crashed and still be recovered when the
        bridge first learns of it (its first start reads the runs in flight and those
        that crashed this recently, not the server's history).
    margin_s: how far before its cursor a reconnect reads again (late and skewed events).
    settle_s: when to reconcile a second time after a connect (Prefect's persister flush).
    tick_s: the longest gap between messages while a step runs.
    grace_s: how long a run's end from Prefect waits for planrun's own end event.
    retry_s: the first wait before reconnecting to Prefect's event stream (doubling to 10 s).
    history: read past step durations from Prefect for the estimates.
    recover_attempts: how many times a run whose process crashed is started again
        (``PLANRUN_RECOVER_ATTEMPTS``); after that, a crash ends it failed.
    dead_after_s: a running run silent this long (no heartbeat, ``PLANRUN_DEAD_AFTER_S``)
        is marked crashed; generous, as a run marked crashed while alive would run twice.
    quiet_s: a running run silent this long (three heartbeats missed) has its events read
        from Prefect's API once, in case the stream lost its last ones (its end).
    ticks: send ``progress`` messages and check signs of life on a timer (tests of the
        transports turn it off to count exactly the messages their events make).
    """

    lookback_s: float = 3600.0
    margin_s: float = 300.0
    settle_s: float = 6.0
    tick_s: float = 2.0
    grace_s: float = 2.0
    retry_s: float = 0.5
    history: bool = True
    recover_attempts: int = 2
    dead_after_s: float = 60.0
    quiet_s: float = 15.0
    ticks: bool = True
