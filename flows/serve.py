"""The runner of ``planrun up``: serves the ``planrun/plan-runner`` deployment.

``python -m planrun.flows.serve`` registers the deployment (the same one ``prefect.yaml``
declares for workers on other machines) and executes each of its runs in a process of its
own, as Prefect's ``serve()`` does. Set ``PREFECT_RUNNER_POLL_FREQUENCY`` low (``planrun
up`` sets 1 s): a submitted run waits for the runner's next poll.

Run processes are forked, not spawned: Prefect's runner starts each run with
``multiprocessing``'s ``spawn``, a new interpreter that imports Prefect and planrun again
(≈ 2 s of CPU and as long before the run's first step). Here a fork server, started with
the runner, has imported them once; each run is a fork of it (docs/prefect-notes.md;
BENCHMARKS.md, "Submit to first step"). It is single-threaded, so forking it is safe; it
exits with the runner, and runs in flight go on as before. ``PLANRUN_SPAWN_RUNS=1``
keeps Prefect's ``spawn``.

``--in-process`` (or ``PLANRUN_RUNS_IN_PROCESS=1``) runs them all in this process instead,
on one event loop: ``flows.loop_runner``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
from typing import Any

import prefect.flow_engine

from planrun.flows.plan_flow import plan_flow

DEPLOYMENT = "plan-runner"
#: What clients pass to ``run_deployment``: flow name / deployment name.
DEPLOYMENT_PATH = f"planrun/{DEPLOYMENT}"


class _ForkServerOnly:
    """Stands for the ``multiprocessing`` module in ``prefect.flow_engine``, whose
    ``run_flow_in_subprocess`` asks it for the ``spawn`` context: it gets the fork server."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")

    def get_context(self, method: str | None = None) -> Any:
        return self._context


def fork_runs() -> None:
    """Start the fork server now (the first run starts as fast as the next) and have
    Prefect's runner start its runs from it."""
    forks = _ForkServerOnly()
    forks.get_context().set_forkserver_preload(["planrun.flows.plan_flow"])
    multiprocessing.forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = forks  # type: ignore[assignment]


def run_limit() -> int | None:
    """How many runs this runner executes at once: ``PREFECT_RUNNER_PROCESS_LIMIT`` when it
    is set, else no limit. (``serve()`` ignores that setting: its ``limit`` defaults to
    none.) A run over the limit stays Scheduled for another runner."""
    given = os.environ.get("PREFECT_RUNNER_PROCESS_LIMIT", "").strip()
    return int(given) if given else None


DESCRIPTION = ("Runs planrun plans submitted with `planrun submit` or POST /v1/runs; "
               "parameters: plan (data), inputs.")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--in-process"]):
        sys.exit(f"usage: python -m planrun.flows.serve [--in-process] (not {' '.join(args)})")
    if args or os.environ.get("PLANRUN_RUNS_IN_PROCESS") == "1":
        from planrun.flows.loop_runner import serve

        serve(DEPLOYMENT, run_limit(), DESCRIPTION)
        return
    if os.environ.get("PLANRUN_SPAWN_RUNS") != "1":
        fork_runs()
    plan_flow.serve(name=DEPLOYMENT, tags=["planrun"], print_starting_message=False,
                    limit=run_limit(), description=DESCRIPTION)


if __name__ == "__main__":
    main()
