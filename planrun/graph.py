"""The plan as a graph: what the scheduler and the time estimates both need of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def remaining_paths(needs: Mapping[str, Sequence[str]],
                    duration: Mapping[str, float]) -> dict[str, float]:
    """For each step, the longest sum of ``duration`` from its start to the end of the run.

    Iterative (Kahn's topological order, walked backwards), so chains of thousands of steps
    need no recursion. Steps on a cycle (which validation refuses) are left out.
    """
    dependents: dict[str, list[str]] = {sid: [] for sid in needs}
    waiting = {sid: len(deps) for sid, deps in needs.items()}
    for sid, deps in needs.items():
        for need in deps:
            dependents[need].append(sid)
    topological = [sid for sid, count in waiting.items() if count == 0]
    for sid in topological:  # grows while it is walked
        for dependent in dependents[sid]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                topological.append(dependent)
    remaining: dict[str, float] = {}
    for sid in reversed(topological):
        after = max((remaining[d] for d in dependents[sid]), default=0.0)
        remaining[sid] = duration[sid] + after
    return remaining
