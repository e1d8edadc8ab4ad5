"""``planrun run`` and ``planrun retry``: a plan run, or an ended run retried, while the
command waits, shown on the terminal (``planrun.console``) and asking there at the run's
gates; with ``--json``, the run report as strict JSON (``strict_json``).

A run of ``planrun run`` runs in this process; a retry of a run the stack ran is asked of
its runner through the bridge and followed from here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from typing import Any


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the plan (as the operator's own: trust ``local``), run it and wait for it;
    the run's exit code."""
    from planrun.console import LineDisplay, LiveDisplay
    from planrun.contract.status import RunStatus
    from planrun.inputs import parse_pairs, resolve_inputs
    from planrun.policy import Trust, trusted_as
    from planrun.runner import prepare_prefect, run_plan
    from planrun.validate import validate_file

    if args.workspace:
        os.environ["PLANRUN_WORKSPACE"] = os.path.abspath(args.workspace)
    with trusted_as(Trust.LOCAL):  # its author runs it; run_plan runs it local too
        valid = validate_file(args.plan)
    inputs = resolve_inputs(valid.plan, parse_pairs(args.input), from_text=True)
    prepare_prefect()
    plan_data = valid.plan.model_dump(mode="json", by_alias=True, exclude_none=True)
    display: Any
    if sys.stderr.isatty():
        display = LiveDisplay()
    elif not args.json:
        display = LineDisplay()
    else:
        display = None
    if display is not None:
        display.waiting = f"starting {valid.plan.name} on {os.environ['PREFECT_API_URL']}…"
        with display:
            report = asyncio.run(run_plan(plan_data, inputs, display, _terminal_asker(display)))
    else:
        report = asyncio.run(run_plan(plan_data, inputs, asker=_terminal_asker(None)))
    if args.json:
        print(json.dumps(strict_json(report), indent=2, default=str, allow_nan=False))
    elif report.get("prefect_url") and not isinstance(display, LiveDisplay):
        print(f"run {report['run_id']} {report['status']}: {report['prefect_url']}")
    else:
        print(f"run {report['run_id']} {report['status']}")
    return RunStatus(report["status"]).exit_code


def cmd_retry(args: argparse.Namespace) -> int:
    """A run of the stack is retried by its runner (through the bridge) and followed here;
    a run of ``planrun run`` is retried in this process, as ``run`` runs it."""
    from planrun import client
    from planrun.console import LineDisplay, LiveDisplay
    from planrun.contract.status import RunStatus
    from planrun.progress_bridge.flow_runs import PrefectFlowRuns
    from planrun.runner import prepare_prefect, retry_plan

    if args.workspace:
        os.environ["PLANRUN_WORKSPACE"] = os.path.abspath(args.workspace)
    prepare_prefect()
    found = asyncio.run(PrefectFlowRuns().read(args.run))
    display: Any = LiveDisplay() if sys.stderr.isatty() else (
        None if args.json else LineDisplay())
    if found.deployed:
        answer = client.control(args.run, "retry")
        report = client.status(args.run)
        display = display or _Quiet()
        display.waiting = f"retrying run {args.run}: {', '.join(answer['retry'])}…"
        with display:
            asyncio.run(client.watch(args.run, display, plan=report["plan"],
                                     after_end=answer["after"]))
        report = client.status(args.run)
    elif display is not None:
        display.waiting = f"retrying run {args.run}…"
        with display:
            report = asyncio.run(retry_plan(args.run, display, _terminal_asker(display)))
    else:
        report = asyncio.run(retry_plan(args.run, asker=_terminal_asker(None)))
    if args.json:
        print(json.dumps(strict_json(report), indent=2, default=str, allow_nan=False))
    else:
        print(f"run {report['run_id']} {report['status']}")
    return RunStatus(report["status"]).exit_code


class _Quiet:
    """A display that shows nothing (``--json``)."""

    waiting = ""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def changed(self, run: Any, step: Any) -> None:
        pass


def _terminal_asker(display: Any) -> Any:
    """On a terminal, what asks at the run's gates (its answer resumes the flow run, as
    any other answer does: docs/approvals.md); elsewhere None: gated steps are skipped."""
    from planrun.asking import TerminalAsker, on_a_terminal

    if not on_a_terminal():
        return None
    from planrun.flows.control import answer_here

    return TerminalAsker(answer_here, display)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities (which a tool may return) as null: RFC 8259 JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value
