"""The ``planrun`` command line (README; exit codes in docs/errors.md).

Exit codes: 0 completed (or valid), 3 completed_with_errors, 1 failed, 4 cancelled,
2 invalid plan or usage. Prefect is imported only by the commands that run plans.
``planrun run`` and ``planrun retry`` are in ``planrun/cli_run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from planrun.cli_run import cmd_retry, cmd_run, strict_json
from planrun.errors import PlanInvalid, PlanrunError, PolicyInvalid, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors; keep it
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"planrun: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="planrun", description="Run agent plans on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="check plans; print file:line:col: path: message per error")
    p.add_argument("plans", nargs="+", metavar="PLAN")
    p.add_argument("--trust", choices=["submitted", "local"], default="submitted",
                   help="check against the policy of plans submitted to the bridge "
                        "(default), or of `planrun run FILE` (local); docs/policy.md")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a plan and wait for it")
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", action="store_true", help="print the run report on stdout")
    p.add_argument("--workspace", metavar="DIR",
                   help="root the file and shell tools are confined to (default ./workspace, "
                        "or $PLANRUN_WORKSPACE)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("retry", help="run an ended run's failed, skipped and cancelled steps "
                       "again, keeping its completed ones (exit code as `run`)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print the run report on stdout")
    p.add_argument("--workspace", metavar="DIR",
                   help="a run of `planrun run`: the workspace it ran in, if not the default")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("up", help="start the local stack: Prefect server, runner, bridge")
    p.add_argument("--host", default="127.0.0.1", help="the bridge's address (127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="the bridge's port (8765, or $PLANRUN_BRIDGE_PORT)")
    p.add_argument("--database", default=os.environ.get("PLANRUN_DATABASE_URL"),
                   metavar="URL", help="run the stack's own Prefect server on this PostgreSQL "
                   "database (postgresql://user@host:5432/name, or $PLANRUN_DATABASE_URL); "
                   "default: the local server on SQLite (docs/production.md)")
    p.add_argument("--redis", default=os.environ.get("PLANRUN_REDIS_URL"), metavar="URL",
                   help="with --database: the server's messaging in Redis "
                   "(redis://host:6379/0, or $PLANRUN_REDIS_URL)")
    p.add_argument("--workers", type=_count, default=1, metavar="N",
                   help="how many runners execute submitted runs (1)")
    p.add_argument("--bridges", type=_count, default=1, metavar="N",
                   help="with --database: how many bridges serve clients, on --port and the "
                   "ports after it, sharing one message log (1)")
    p.add_argument("--in-process", action="store_true",
                   help="each runner executes its runs in its own process, on one event loop "
                   "(a waiting run costs kilobytes, not a process); default: a process per run")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("submit", help="submit a plan to the running stack; print the run id")
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a run's status, steps and estimate")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print the run report")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", help="follow a run live until it ends (exit code as `run`)")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_watch)

    for action, what in (("pause", "pause at the next step boundary (no process held)"),
                         ("resume", "resume a paused run from where it stopped"),
                         ("cancel", "cancel a run: commands killed, files rolled back")):
        p = sub.add_parser(action, help=what)
        p.add_argument("run", metavar="RUN")
        p.set_defaults(func=cmd_control, action=action)

    p = sub.add_parser("approve", help="answer a step's approval gate (--reject: skip it)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("step", metavar="STEP")
    p.add_argument("--reject", action="store_true", help="skip the step instead")
    p.add_argument("--comment", default="", help="why, for the run's report")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("schema", help="print the plan JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("tools", help="list tools, their parameter schemas and health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tools)

    p = sub.add_parser("server", help="the local Prefect server planrun starts and reuses")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``planrun`` console script. ``planrun run`` from the command
    line runs in a fork of the user's warm run host, started first where none answers; it
    runs here when the local server must start first or no host could, and then starts one
    for the next run (``planrun.run_host``)."""
    env = dict(os.environ)
    from_shell = argv is None and sys.argv[1:2] == ["run"]
    started = False  # a host for this command's environment, by this command
    if from_shell:
        from planrun import run_host

        try:
            code = run_host.run_through_host(sys.argv[1:])
            if code is None and (started := run_host.start_served(env)):
                code = run_host.run_through_host(sys.argv[1:], wait_s=run_host.BIND_WAIT_S)
        except KeyboardInterrupt:  # before the run's process took the signals over
            print("planrun: interrupted", file=sys.stderr)
            return 4
        if code is not None:
            return code
    code = _dispatch(argv)
    if from_shell and not started and code != EXIT_USAGE:
        run_host.start_served(env)  # for the next run (this one started the local server)
    return code


def _dispatch(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PlanInvalid as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, PolicyInvalid) as exc:
        print(f"planrun: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PlanrunError as exc:
        print(f"planrun: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("planrun: interrupted", file=sys.stderr)
        return 4
    except BrokenPipeError:  # stdout's reader stopped reading (`planrun tools | head -1`):
        # quietly, as other commands do; stdout points nowhere so the exit's flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    from planrun.policy import Trust, trusted_as
    from planrun.validate import validate_file

    problems = []
    for path in args.plans:
        try:
            with trusted_as(Trust(args.trust)):
                validate_file(path)
        except PlanInvalid as exc:
            problems.extend(exc.problems)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{len(args.plans)} plan{'s' if len(args.plans) > 1 else ''} valid", file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    from planrun.production import Production
    from planrun.stack import up

    port = args.port or int(os.environ.get("PLANRUN_BRIDGE_PORT", "8765"))
    if args.redis and not args.database:
        raise UsageError("--redis goes with --database: Redis messaging is for a Prefect "
                         "server on PostgreSQL")
    production = Production.parse(args.database, args.redis) if args.database else None
    return up(args.host, port, production=production, workers=args.workers,
              bridges=args.bridges, in_process=args.in_process)


def _count(text: str) -> int:
    """A positive whole number, for argparse."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"wants a whole number of at least 1, not {text!r}")
    return int(text)


def cmd_submit(args: argparse.Namespace) -> int:
    from planrun import client
    from planrun.inputs import parse_pairs, resolve_inputs
    from planrun.loader import read_plan
    from planrun.validate import validate_text

    text, problems = read_plan(args.plan)  # no more than the largest plan allowed
    if text is None:
        raise PlanInvalid(problems)
    valid = validate_text(text, args.plan)
    inputs = resolve_inputs(valid.plan, parse_pairs(args.input), from_text=True)
    answer = client.submit(text.decode("utf-8"), inputs)
    print(answer["run_id"])
    print(f"watch it: planrun watch {answer['run_id']}  or  "
          f"{client.bridge_url()}{answer['view_url']}", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from planrun import client
    from planrun.contract.estimate import Estimate
    from planrun.contract.records import RunReport

    report = client.status(args.run)
    if args.json:
        print(json.dumps(strict_json(report), indent=2, default=str, allow_nan=False))
        return EXIT_OK
    try:
        run = RunReport.model_validate(report)
    except ValidationError as exc:
        raise PlanrunError(f"the bridge answered a report this planrun cannot read: "
                           f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    print(f"run {run.run_id} ({run.plan}): {run.status}, "
          f"{run.progress.done}/{run.progress.total} steps")
    estimate = client.estimate_text(
        Estimate.model_validate(report["estimate"]) if report.get("estimate") else None,
        run.status.ended)
    if estimate:
        print(estimate)
    for step_id, step in run.steps.items():
        error = step.error
        note = (f"{error.category}: {error.message}" if error else step.note or step.reason or "")
        used = client.resources_text(step.resources)
        note += f" ({used})" if used and note else used
        took = f"{step.duration_s:.2f}s" if step.duration_s is not None else ""
        print(f"  {step_id:<20} {step.status:<12} {step.attempts or '':>2} {took:>8}  "
              f"{note}".rstrip())
    if report.get("prefect_url"):
        print(f"Prefect UI: {report['prefect_url']}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from planrun import client
    from planrun.console import LineDisplay, LiveDisplay

    report = client.status(args.run)  # an unknown run is an error, not an endless wait
    display: Any = LiveDisplay() if sys.stderr.isatty() else LineDisplay()
    display.waiting = f"waiting for run {args.run} to start…"
    remote: list[client.RemoteRun] = []
    if isinstance(display, LiveDisplay):
        display.footer = lambda: client.estimate_text(
            remote[0].estimate if remote else None, bool(remote and remote[0].ended))
    with display:
        record = asyncio.run(_watch_asking(args.run, display, report["plan"], remote.append))
    print(f"run {record.run_id} {record.status}")
    return record.status.exit_code


async def _watch_asking(run_id: str, display: Any, plan: str,
                        on_start: Callable[[Any], object]) -> Any:
    """Follow the run; on a terminal, ask at its gates while it waits there."""
    from planrun import client
    from planrun.asking import GateWatch, TerminalAsker, on_a_terminal

    if not on_a_terminal():
        return await client.watch(run_id, display, plan=plan, on_start=on_start)
    gates = GateWatch(display, TerminalAsker(client.answer_gate, display))
    try:
        return await client.watch(run_id, gates, plan=plan, on_start=on_start)
    finally:
        await gates.close()


def cmd_control(args: argparse.Namespace) -> int:
    from planrun import client

    answer = client.control(args.run, args.action)
    print(f"run {args.run}: {answer['status']}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    from planrun import client

    verb = "reject" if args.reject else "approve"
    answer = client.control(f"{args.run}/steps/{args.step}", verb,
                            body={"comment": args.comment})
    done = "rejected" if args.reject else "approved"
    print(f"run {args.run}: step {args.step} {done}; {answer['status']}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from planrun.plan_schemas import plan_schema

    print(json.dumps(plan_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_tools(args: argparse.Namespace) -> int:
    from planrun.adapters.registry import default_registry
    from planrun.flows.health import check

    async def every_health() -> list[dict[str, Any]]:  # at once: one slow check, not the sum
        adapters = default_registry().adapters()
        found = await asyncio.gather(*map(check, adapters))  # as before a run (docs/policy.md)
        return [{"tool": a.name, "summary": a.summary, "healthy": h.ok, "detail": h.detail,
                 "parameters": a.parameter_schema()} for a, h in zip(adapters, found, strict=True)]

    rows = asyncio.run(every_health())
    breakers = _breakers_by_tool()
    for row in rows:
        row["breakers"] = breakers.get(row["tool"], [])
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        params = ", ".join(
            f"{k}{'' if k in row['parameters'].get('required', []) else '?'}"
            for k in row["parameters"].get("properties", {}))
        if row["healthy"]:
            print(f"{row['tool']:<14} ok   {row['summary']}")
        else:  # the problem on a line of its own, not run into the summary
            print(f"{row['tool']:<14} UNHEALTHY {row['summary']}\n{'':<19}{row['detail']}")
        print(f"{'':<19}with: {params}")
        for breaker in row["breakers"]:
            if breaker["state"] != "closed":
                print(f"{'':<19}breaker {breaker['state']}: {breaker['message']}")
    return EXIT_OK


def _breakers_by_tool() -> dict[str, list[dict[str, Any]]]:
    """The circuit breakers on the Prefect server in use, by tool (none without a server)."""
    from planrun import server

    if not os.environ.get("PREFECT_API_URL"):
        info = server.running()
        if info is None:
            return {}
        os.environ["PREFECT_API_URL"] = info.url
    from planrun.flows.breakers import Breakers, message_of

    try:
        views = asyncio.run(asyncio.wait_for(Breakers().views(), timeout=5))
    except Exception:  # noqa: BLE001 - the tools are listed without their breakers
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for view in views:
        found.setdefault(view.key.partition("@")[0], []).append(
            {**view.to_value(), "message": message_of(view)})
    return found


def cmd_server(args: argparse.Namespace) -> int:
    from planrun import server

    if args.action == "start":
        url = server.ensure_server()
        print(f"Prefect API {url}  UI {url.removesuffix('/api')}")
    elif args.action == "stop":
        print("stopped" if server.stop() else "no local server was running")
    else:
        info = server.running()
        print(f"running: {info.url} (pid {info.pid})" if info else "not running")
        return EXIT_OK if info else EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
