"""The time left in a run: a point estimate, an 80 % interval and a finish time.

Method. Each step's duration is a lognormal. Without history its median is the step's
first estimate (plan hint or adapter estimate) with a wide spread (``PRIOR_SIGMA``); with
past durations of the same step the log-mean and log-spread come from them, the prior
counting as ``PRIOR_WEIGHT`` of one sample. Finished steps count 0; a running step counts
its expected remaining time given how long it has run (the lognormal conditioned on
``D > elapsed``, never negative); pending steps are all assumed to run. ``remaining_s`` is
the makespan of list scheduling of the unfinished graph with those expected durations, at
most ``max_parallel`` steps at once, in the order ``flows.scheduler`` starts them: a free
slot goes to the step that has waited longest for one, and among steps ready at the same
moment to the one with the longest path to the end by first estimates. The interval is
the 10th..90th percentile of the makespan over 200 Monte-Carlo draws of every step's
duration (fewer, down to 100, beyond 25 unfinished steps, to stay within ~2 ms). Each
draw replays the steps in the start order of that schedule, a step starting once its
``needs`` are done and the earliest of the slots is free (a fixed order makes a draw a few
% longer than re-scheduling every draw would). Draws come from a fixed pool of normals,
each step's from its own place in it, so the same inputs give the same answer.
``early_by_s`` compares the projected end with the same schedule made for the whole plan
at the run's start.

While the run waits for a person (paused, or at an approval gate) nothing runs and no one
knows when it will go on: the estimate is the work left once it does, as if it went on
now (a step at its gate has not started its work), with ``waiting_since`` set and no
``finish_at`` or ``early_by_s``.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush, heapreplace
from statistics import NormalDist

from planrun.contract.estimate import Estimate
from planrun.contract.status import StepStatus
from planrun.contract.times import iso
from planrun.graph import remaining_paths
from planrun.report import RunRecord, StepRecord

#: Monte-Carlo draws per estimate ...
SAMPLES = 200
#: ... but at most this many step-draws in all, and never fewer than MIN_SAMPLES draws.
DRAW_BUDGET = 5000
MIN_SAMPLES = 100
#: Log-spread of a step's duration with no history: its 10th..90th percentile is
#: 0.46x..2.2x the first estimate.
PRIOR_SIGMA = 0.6
#: How many past durations the first estimate is worth once there is history.
PRIOR_WEIGHT = 0.5
#: The shortest duration considered, in seconds (lognormals need a positive median).
FLOOR_S = 0.001
#: An earlier finish is reported only beyond this share of the first estimate (and 0.1 s).
EARLY_MARGIN = 0.02

_NORMAL = NormalDist()
_POOL_SIZE = 1 << 14
_pool: list[float] = []


@dataclass(frozen=True)
class StepDurations:
    """What is known of one step's duration: past durations (newest first) and a prior.

    ``prior_s`` None means the step's own first estimate (``StepRecord.estimate_s``).
    """

    history: tuple[float, ...] = ()
    prior_s: float | None = None

    @classmethod
    def of(cls, history: Sequence[float] = (), prior_s: float | None = None) -> StepDurations:
        return cls(tuple(float(x) for x in history), prior_s)

    def lognormal(self, first_estimate_s: float) -> tuple[float, float]:
        """(mu, sigma) of the lognormal this step's duration is taken to follow."""
        prior = self.prior_s if self.prior_s is not None else first_estimate_s
        mu0 = math.log(max(prior, FLOOR_S))
        logs = [math.log(max(x, FLOOR_S)) for x in self.history]
        n = len(logs)
        if n == 0:
            return mu0, PRIOR_SIGMA
        mean = sum(logs) / n
        squares = sum((x - mean) ** 2 for x in logs)
        mu = (n * mean + PRIOR_WEIGHT * mu0) / (n + PRIOR_WEIGHT)
        # n - 1 degrees of freedom from the data, the prior spread worth PRIOR_WEIGHT more.
        variance = (squares + PRIOR_WEIGHT * PRIOR_SIGMA**2) / (n - 1 + PRIOR_WEIGHT)
        return mu, math.sqrt(variance)


def durations_from(history: Mapping[str, Sequence[float]]) -> dict[str, StepDurations]:
    """``StepDurations`` for each step of a history mapping (step id -> past durations)."""
    return {step_id: StepDurations.of(values) for step_id, values in history.items()}


def estimate(run: RunRecord, max_parallel: int, durations: Mapping[str, StepDurations],
             now: float, waiting_since: float | None = None) -> Estimate:
    """The estimate of the time left in ``run`` at ``now`` (epoch seconds); see the module
    docstring for the method. Steps missing from ``durations`` use their first estimate.
    ``waiting_since``: when the run, if it waits for a person, began to (default ``now``)."""
    dists = {sid: durations.get(sid, StepDurations()).lognormal(step.estimate_s)
             for sid, step in run.steps.items()}
    max_parallel = max(1, max_parallel)
    first_s = _schedule(run, dists, max_parallel, now, fresh=True).makespan
    first_finish = (run.started_at if run.started_at is not None else now) + first_s
    if run.status.ended or all(s.status.finished for s in run.steps.values()):
        end = run.ended_at if run.ended_at is not None else now
        return Estimate(remaining_s=0.0, low_s=0.0, high_s=0.0, finish_at=_iso(end),
                        early_by_s=_early(first_finish - end, first_s))
    plan = _schedule(run, dists, max_parallel, now, fresh=False)
    draws = sorted(_draws(plan, dists))
    low = min(draws[int(0.1 * len(draws))], plan.makespan)
    high = max(draws[int(0.9 * len(draws)) - 1], plan.makespan)
    left = Estimate(remaining_s=round(plan.makespan, 3), low_s=round(low, 3),
                    high_s=round(high, 3))
    if run.status.waiting:
        since = now if waiting_since is None else waiting_since
        return left.model_copy(update={"waiting_since": _iso(since)})
    finish = now + plan.makespan
    return left.model_copy(update={"finish_at": _iso(finish),
                                   "early_by_s": _early(first_finish - finish, first_s)})


@dataclass
class _Plan:
    """The list schedule of the unfinished steps with their expected durations."""

    makespan: float
    order: list[str]  # start order (running steps first): a topological order
    needs: dict[str, list[str]]  # the unfinished needs of each step
    elapsed: dict[str, float]  # running steps: seconds run so far
    slots: int  # max_parallel, or more if more steps run already


def _schedule(run: RunRecord, dists: Mapping[str, tuple[float, float]], max_parallel: int,
              now: float, *, fresh: bool) -> _Plan:
    """List scheduling of the unfinished steps (every step, if ``fresh``)."""
    steps = run.steps
    todo = {sid: s for sid, s in steps.items() if fresh or not s.status.finished}
    elapsed = {} if fresh else {sid: _elapsed(s, now) for sid, s in todo.items()
                                if s.status.active}
    expect = {sid: _expected(*dists[sid], elapsed.get(sid)) for sid in todo}
    dependents: dict[str, list[str]] = {sid: [] for sid in todo}
    waiting: dict[str, int] = {}
    for sid, step in todo.items():
        needs = [n for n in step.needs if n in todo]
        waiting[sid] = len(needs)
        for need in needs:
            dependents[need].append(sid)
    rank = _scheduler_rank(run)
    # A running step's needs are done, whatever the view has seen yet (its events can come
    # out of order): the draws start it first, not after them.
    plan = _Plan(0.0, [], {sid: [] if sid in elapsed else [n for n in s.needs if n in todo]
                           for sid, s in todo.items()},
                 elapsed, max(max_parallel, len(elapsed)))
    events: list[tuple[float, int, str]] = []
    ready: list[tuple[float, int, str]] = []
    for sid in elapsed:
        plan.order.append(sid)
        heappush(events, (expect[sid], rank[sid], sid))
    free = max_parallel - len(elapsed)
    for sid in todo:
        if sid not in elapsed and waiting[sid] == 0:  # ready already: since when?
            since = max((e for n in steps[sid].needs if (e := steps[n].ended_at) is not None),
                        default=run.started_at if run.started_at is not None else now)
            heappush(ready, (min(0.0, since - now), rank[sid], sid))
    clock = 0.0
    while ready or events:
        while ready and free > 0:
            _, _, sid = heappop(ready)
            plan.order.append(sid)
            free -= 1
            heappush(events, (clock + expect[sid], rank[sid], sid))
        if not events:
            break
        clock, _, done = heappop(events)
        plan.makespan, free = clock, free + 1
        for dependent in dependents[done]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0 and dependent not in elapsed:
                heappush(ready, (clock, rank[dependent], dependent))
    return plan


def _scheduler_rank(run: RunRecord) -> dict[str, int]:
    """The order in which ``flows.scheduler`` starts steps that are ready at the same time:
    the longest path by first estimates from the step to the end first, then plan order."""
    path = remaining_paths({sid: s.needs for sid, s in run.steps.items()},
                           {sid: s.estimate_s for sid, s in run.steps.items()})
    order = sorted(enumerate(run.steps), key=lambda item: (-path.get(item[1], 0.0), item[0]))
    return {sid: position for position, (_, sid) in enumerate(order)}


def _draws(plan: _Plan, dists: Mapping[str, tuple[float, float]]) -> list[float]:
    """Draws of the makespan, every step's duration drawn independently."""
    samples = max(MIN_SAMPLES, min(SAMPLES, DRAW_BUDGET // len(plan.order)))
    took = _duration_draws(plan, dists, samples)
    position = {sid: j for j, sid in enumerate(plan.order)}
    steps = [([position[n] for n in plan.needs[sid]], took[j])
             for j, sid in enumerate(plan.order)]
    free = [0.0] * plan.slots
    makespans = []
    for i in range(samples):  # the hot loop: locals only, one call per step
        finish: list[float] = []
        done = finish.append
        slots = free[:]
        for needs, durations in steps:
            start = slots[0]
            for need in needs:
                if finish[need] > start:
                    start = finish[need]
            end = start + durations[i]
            done(end)
            heapreplace(slots, end)
        makespans.append(max(slots))  # the latest finish never leaves the heap
    return makespans


def _duration_draws(plan: _Plan, dists: Mapping[str, tuple[float, float]],
                    samples: int) -> list[list[float]]:
    """``samples`` draws of each step's duration (time left, for a running step)."""
    pool = _normals()
    offsets = _offsets(sorted(plan.order))
    took = []
    for sid in plan.order:
        offset = offsets[sid]
        mu, sigma = dists[sid]
        z = pool[offset:offset + samples]
        if sid in plan.elapsed:
            took.append(_remaining_draws(mu, sigma, plan.elapsed[sid], z))
        else:
            took.append(list(map(math.exp, [mu + sigma * x for x in z])))
    return took


def _offsets(step_ids: list[str]) -> dict[str, int]:
    """Where each step's draws start in the pool: fixed per step id (so the interval does not
    jump as other steps finish) and distinct while the pool has room."""
    span = _POOL_SIZE - SAMPLES
    taken: set[int] = set()
    offsets = {}
    for sid in step_ids:
        offset = zlib.crc32(sid.encode()) % span
        while offset in taken and len(taken) < span:
            offset = (offset + 1) % span
        taken.add(offset)
        offsets[sid] = offset
    return offsets


def _remaining_draws(mu: float, sigma: float, elapsed: float, z: list[float]) -> list[float]:
    """Draws of ``D - elapsed`` given ``D > elapsed``: the draws of ``D`` beyond ``elapsed``
    repeated in turn; when too few are, the inverse of the lognormal CDF above ``elapsed``;
    beyond its precision, an exponential with the conditional mean."""
    beyond = [d - elapsed for d in map(math.exp, [mu + sigma * x for x in z]) if d > elapsed]
    if len(beyond) >= len(z) // 4:
        return (beyond * (len(z) // len(beyond) + 1))[:len(z)]
    p0 = _NORMAL.cdf((math.log(max(elapsed, FLOOR_S)) - mu) / sigma)
    if p0 > 1 - 1e-9:  # far out in the tail: exponential around the conditional mean
        mean = _expected(mu, sigma, elapsed)
        return [-mean * math.log(max(1e-12, _NORMAL.cdf(x))) for x in z]
    top = 1 - 1e-12
    return [max(0.0, math.exp(mu + sigma * _NORMAL.inv_cdf(
        min(top, p0 + (1 - p0) * _NORMAL.cdf(x)))) - elapsed) for x in z]


def _expected(mu: float, sigma: float, elapsed: float | None) -> float:
    """The expected duration, or with ``elapsed`` the expected time left: E[D - e | D > e]."""
    if elapsed is None:
        return math.exp(mu + sigma * sigma / 2)
    e = max(elapsed, FLOOR_S)
    z0 = (math.log(e) - mu) / sigma
    if z0 - sigma > 8:  # both tails underflow: the asymptotic ratio of normal tails
        return e * sigma / (z0 - sigma)
    tail = math.erfc(z0 / math.sqrt(2))
    if tail <= 0:
        return e * sigma / max(z0 - sigma, 1.0)
    mean_above = math.exp(mu + sigma * sigma / 2) * math.erfc((z0 - sigma) / math.sqrt(2)) / tail
    return max(0.0, mean_above - elapsed)


def _elapsed(step: StepRecord, now: float) -> float:
    """How long the step has worked: a step at its approval gate has not begun."""
    if step.started_at is None or step.status == StepStatus.AWAITING_APPROVAL:
        return 0.0
    return max(0.0, now - step.started_at)


def _early(by: float, first_s: float) -> float | None:
    return round(by, 3) if by > max(0.1, EARLY_MARGIN * first_s) else None


def _iso(ts: float) -> str:
    text = iso(ts)
    assert text is not None
    return text


def _normals() -> list[float]:
    """A fixed pool of standard normal draws (made once), which every estimate samples."""
    if not _pool:
        rng = random.Random(20261125)
        _pool.extend(rng.gauss(0.0, 1.0) for _ in range(_POOL_SIZE))
    return _pool
