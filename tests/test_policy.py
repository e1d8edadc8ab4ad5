"""The operator's policy: reading the file, checking plans against a trust level, and the
trust level and ceilings reaching the steps of real runs (a real Prefect server)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from planrun import policy as policy_module
from planrun.adapters.base import StepContext
from planrun.adapters.workspace import Workspace
from planrun.errors import PlanInvalid, PolicyInvalid
from planrun.policy import POLICY_ENV, Policy, Trust, current_trust, load_policy, trusted_as
from planrun.policy_check import executable_problem, tightest
from planrun.validate import validate_text
from tests.helpers import ROOT, cli, plan_data, run_yaml
from tests.security.local_server import LocalServer, local_server


@pytest.fixture
def policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A policy file named by PLANRUN_POLICY; the test writes it."""
    path = tmp_path / "policy.yaml"
    monkeypatch.setenv(POLICY_ENV, str(path))
    yield path


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as running:
        yield running


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def problems(text: str, trust: Trust = Trust.SUBMITTED) -> list[str]:
    try:
        with trusted_as(trust):
            validate_text(textwrap.dedent(text), "plan.yaml")
    except PlanInvalid as exc:
        return [str(p) for p in exc.problems]
    return []


# -- reading the file -----------------------------------------------------------------------

def test_without_a_file_the_defaults_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert not (Path(os.environ["PLANRUN_HOME"]) / "policy.yaml").exists()
    policy = load_policy()
    assert policy == Policy()
    assert policy.submitted.allow_private is False and policy.submitted.sandbox == "required"
    assert policy.local.allow_private is True


def test_the_file_under_the_data_directory_is_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    write(tmp_path / "policy.yaml", "submitted: {tools: ['core.*']}\n")
    assert load_policy().submitted.tools == ["core.*"]


def test_planrun_policy_naming_a_missing_file_is_an_error(policy_file: Path) -> None:
    with pytest.raises(PolicyInvalid, match="cannot read the policy file: No such file"):
        load_policy()


def test_every_problem_of_a_malformed_file_is_named_at_its_line(policy_file: Path) -> None:
    write(policy_file, """\
        submitted:
          tools: ["Core tools"]
          hosts: [example.org, "10.0.0.0/33", "x:99999"]
          allow_private: perhaps
          surprise: 1
          ceilings: {max_parallel: 0}
        """)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy()
    lines = caught.value.problems
    assert [line.split(": ")[0] for line in lines] == [
        f"{policy_file}:2:11", f"{policy_file}:3:24", f"{policy_file}:3:39",
        f"{policy_file}:4:18", f"{policy_file}:5:3", f"{policy_file}:6:28"]
    assert "'Core tools' is not a tool name or glob" in lines[0]
    assert "'10.0.0.0/33' is not a host" in lines[1]
    assert "the port must be a number from 1 to 65535" in lines[2]
    assert "submitted.surprise: unknown key" in lines[4]


def test_broken_yaml_is_an_error_not_the_defaults(policy_file: Path) -> None:
    write(policy_file, "submitted: {tools: [core.*\n")
    with pytest.raises(PolicyInvalid, match=r"policy.yaml:\d+:\d+: policy: YAML syntax error"):
        load_policy()


def test_the_file_is_read_again_only_when_it_changes(policy_file: Path) -> None:
    write(policy_file, "submitted: {tools: ['core.*']}\n")
    first = load_policy()
    assert load_policy() is first
    write(policy_file, "submitted: {tools: ['core.echo', 'http.request']}\n")
    os.utime(policy_file, ns=(1, 1))  # a different modification time, whatever the clock
    assert load_policy().submitted.tools == ["core.echo", "http.request"]


def test_within_one_policy_the_file_is_looked_for_once(policy_file: Path) -> None:
    write(policy_file, "submitted: {tools: ['core.*']}\n")
    with policy_module.one_policy():
        first = load_policy()
        write(policy_file, "submitted: {tools: ['http.*', 'core.echo']}\n")  # another size
        assert load_policy() is first
        assert load_policy(policy_file).submitted.tools == ["http.*", "core.echo"]  # named
    assert load_policy().submitted.tools == ["http.*", "core.echo"]  # the next attempt's


def test_a_step_context_takes_the_policy_of_the_current_trust_level(policy_file: Path,
                                                                    tmp_path: Path) -> None:
    write(policy_file, "submitted: {tools: ['core.*']}\nlocal: {tools: ['http.*']}\n")
    ws = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    assert StepContext("r", "s", ws).policy.tools == ["core.*"]
    with trusted_as(Trust.LOCAL):
        ctx = StepContext("r", "s", ws)
    assert (ctx.trust, ctx.policy.tools) == (Trust.LOCAL, ["http.*"])
    assert current_trust() == Trust.SUBMITTED


# -- checking plans -------------------------------------------------------------------------

RESTRICTED = """\
    submitted:
      tools: ["core.*", "http.request", "shell.run"]
      executables: [python3, /usr/bin/env]
      hosts: [api.example.org]
      ceilings: {max_parallel: 4, step_timeout_s: 60, memory_mb: 512, output_bytes: 1000}
    """


def test_a_plan_asking_for_more_than_its_level_allows_fails_at_each_line(
        policy_file: Path) -> None:
    write(policy_file, RESTRICTED)
    found = problems("""\
        version: 1
        name: greedy
        limits: {max_parallel: 50, memory_mb: 4096}
        defaults: {timeout: 2h}
        steps:
          - {id: a, tool: file.write, with: {path: x, content: y}}
          - {id: b, tool: shell.run, with: {argv: [sh, -c, x]}, timeout: 5m}
          - {id: c, tool: http.request, with: {url: "https://evil.example/", max_bytes: 5000}}
          - {id: d, tool: http.request, with: {url: "http://127.0.0.1:4200/api/flow_runs/filter"}}
        """)
    assert found == [
        "plan.yaml:3:24: limits.max_parallel: max_parallel 50 is above the 'submitted' "
        "policy's ceiling max_parallel of 4 (docs/policy.md)",
        "plan.yaml:3:39: limits.memory_mb: memory_mb 4096 is above the 'submitted' policy's "
        "ceiling memory_mb of 512 (docs/policy.md)",
        "plan.yaml:4:21: defaults.timeout: a timeout of 7200s is above the 'submitted' "
        "policy's ceiling step_timeout_s of 60s (docs/policy.md)",
        "plan.yaml:6:19: steps[0].tool: tool 'file.write' is not allowed: the 'submitted' "
        "policy allows only core.*, http.request, shell.run (docs/policy.md)",
        "plan.yaml:7:44: steps[1].with.argv[0]: shell.run may not start 'sh': the "
        "'submitted' policy's executables are python3, /usr/bin/env (docs/policy.md)",
        "plan.yaml:7:66: steps[1].timeout: a timeout of 300s is above the 'submitted' "
        "policy's ceiling step_timeout_s of 60s (docs/policy.md)",
        "plan.yaml:8:45: steps[2].with.url: http.request is blocked by policy: "
        "evil.example:443 is not in the 'submitted' policy's hosts (api.example.org) "
        "(docs/policy.md)",
        "plan.yaml:8:81: steps[2].with.max_bytes: http.request's max_bytes 5000 is above "
        "the 'submitted' policy's ceiling output_bytes of 1000 (docs/policy.md)",
        "plan.yaml:9:45: steps[3].with.url: http.request is blocked by policy: "
        "127.0.0.1:4200 is not in the 'submitted' policy's hosts (api.example.org) "
        "(docs/policy.md)",
    ]


def test_a_steps_own_memory_above_the_ceiling_fails_at_its_line(policy_file: Path) -> None:
    write(policy_file, RESTRICTED)
    found = problems("""\
        version: 1
        name: heavy
        steps:
          - {id: a, tool: core.echo, memory_mb: 256, with: {value: 1}}
          - {id: b, tool: core.echo, memory_mb: 2048, with: {value: 1}}
        """)
    assert found == ["plan.yaml:5:41: steps[1].memory_mb: memory_mb 2048 is above the "
                     "'submitted' policy's ceiling memory_mb of 512 (docs/policy.md)"]


def test_a_plan_within_its_level_passes_and_templated_values_wait_for_the_run(
        policy_file: Path) -> None:
    write(policy_file, RESTRICTED)
    assert load_policy(ROOT / "examples" / "policy.yaml").submitted.ceilings.file_mb == 256
    assert problems("""\
        version: 1
        name: modest
        inputs: {target: {type: string, default: "http://127.0.0.1/"}}
        limits: {max_parallel: 2}
        steps:
          - {id: a, tool: shell.run, with: {argv: [python3, -c, "print(1)"]}, timeout: 30s}
          - {id: b, tool: shell.run, with: {argv: [/usr/bin/env]}}
          - {id: c, tool: http.request, with: {url: "https://api.example.org/v1"}}
          - {id: d, tool: http.request, with: {url: "{{ inputs.target }}"}}
        """) == []


def test_the_default_submitted_level_denies_loopback_metadata_and_the_bridge() -> None:
    found = problems("""\
        version: 1
        name: attack
        steps:
          - {id: a, tool: http.request, with: {url: "http://127.0.0.1:9/"}}
          - {id: b, tool: http.request, with: {url: "http://169.254.169.254/latest/meta-data"}}
          - {id: c, tool: http.request, with: {url: "http://localhost:8765/v1/runs"}}
        """)
    assert [p.split(": ", 2)[1] for p in found] == ["steps[0].with.url", "steps[1].with.url",
                                                    "steps[2].with.url"]
    assert "the 'submitted' policy denies loopback addresses" in found[0]
    assert "the 'submitted' policy denies link-local (cloud metadata) addresses" in found[1]
    assert "localhost:8765 is the planrun bridge: a submitted plan may never reach it" \
        in found[2]


def test_the_same_plan_is_valid_for_its_author() -> None:
    assert problems("""\
        version: 1
        name: mine
        steps:
          - {id: a, tool: http.request, with: {url: "http://127.0.0.1:9/"}}
        """, Trust.LOCAL) == []


def test_executables_are_judged_as_shell_run_judges_them(policy_file: Path) -> None:
    write(policy_file, "submitted: {executables: [python3, 'py*', /usr/bin/env]}\n")
    level = load_policy().submitted
    for program in ("python3", "pytest" if shutil.which("pytest", path="/usr/bin") else "python3",
                    "/usr/bin/../bin/env", "/usr/bin/python3"):
        assert executable_problem(program, level, Trust.SUBMITTED) is None, program
    for program in ("sh", "/tmp/python3", "/usr/bin/../../bin/sh"):
        assert "shell.run may not start" in (
            executable_problem(program, level, Trust.SUBMITTED) or ""), program
    assert executable_problem("./tool", level, Trust.SUBMITTED) is None  # left to the run


def test_a_limit_the_plan_leaves_out_gets_the_ceiling_and_a_lower_one_stays() -> None:
    assert tightest(None, 60) == 60
    assert tightest(10, 60) == 10
    assert tightest(100, 60) == 60
    assert tightest(None, None) is None


# -- the command line -----------------------------------------------------------------------

ATTACK = """\
version: 1
name: attack
steps:
  - {id: a, tool: http.request, with: {url: "http://169.254.169.254/latest"}}
"""


def test_cli_validate_checks_as_submitted_unless_told_local(tmp_path: Path) -> None:
    plan = write(tmp_path / "attack.yaml", ATTACK)
    proc = cli("validate", str(plan))
    assert proc.returncode == 2
    assert f"{plan}:4:45: steps[0].with.url: http.request is blocked by policy: " \
           "169.254.169.254 is a link-local (cloud metadata) address" in proc.stdout
    assert cli("validate", "--trust", "local", str(plan)).returncode == 0


def test_a_malformed_policy_stops_validate_and_run_with_exit_2(tmp_path: Path) -> None:
    plan = write(tmp_path / "plan.yaml", """\
        version: 1
        name: harmless
        steps:
          - {id: a, tool: file.write, with: {path: proof.txt, content: ran}}
        """)
    policy = write(tmp_path / "policy.yaml", "submitted:\n  hosts: 8\n")
    env = {POLICY_ENV: str(policy), "PLANRUN_WORKSPACE": str(tmp_path / "ws")}
    for args in (("validate", str(plan)), ("run", str(plan))):
        proc = cli(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"{policy}:2:10: submitted.hosts: Input should be a valid list" in proc.stderr
    assert not (tmp_path / "ws" / "proof.txt").exists()
    missing = cli("validate", str(plan), env={POLICY_ENV: str(tmp_path / "nope.yaml")})
    assert missing.returncode == 2
    assert "cannot read the policy file: No such file or directory" in missing.stderr


# -- real runs ------------------------------------------------------------------------------

async def run_submitted(data: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Run plan data as the deployment's runner does: in a flow run, trust not raised."""
    from planrun.flows.plan_flow import RunHost

    host = RunHost()
    state = await host.flow()(data, inputs, return_state=True)
    return host.reports.pop(str(state.state_details.flow_run_id))


FETCH = """\
    version: 1
    name: fetch
    inputs: {target: {type: string}}
    steps:
      - {id: get, tool: http.request, with: {url: "{{ inputs.target }}"}, retry: {max_attempts: 3}}
    """


def test_planrun_run_is_local_all_the_way_to_its_steps(server: LocalServer) -> None:
    report = run_yaml(FETCH, {"target": server.url("/mine")})
    assert report["status"] == "completed", report
    assert report["steps"]["get"]["output"]["status"] == 200
    assert server.hits == ["/mine"]


def test_a_submitted_run_is_checked_where_the_step_executes(server: LocalServer) -> None:
    report = asyncio.run(run_submitted(plan_data(FETCH), {"target": server.url("/theirs")}))
    step = report["steps"]["get"]
    assert report["status"] == "failed"
    assert step["error"]["category"] == "configuration"
    assert step["error"]["message"] == ("blocked by policy: 127.0.0.1 is a loopback address: "
                                        "the 'submitted' policy denies loopback addresses")
    assert step["attempts"] == 1  # a refusal is not retried
    assert server.hits == []


def test_a_submitted_run_gets_the_ceilings_it_did_not_ask_for(policy_file: Path) -> None:
    write(policy_file, "submitted: {ceilings: {step_timeout_s: 0.5, max_parallel: 1}}\n")
    report = asyncio.run(run_submitted(plan_data("""\
        version: 1
        name: ceilings
        steps:
          - {id: long, tool: core.sleep, with: {seconds: 30}, critical: false}
          - {id: a, tool: core.sleep, with: {seconds: 0.2}}
          - {id: b, tool: core.sleep, with: {seconds: 0.2}}
        """), {}))
    steps = report["steps"]
    assert steps["long"]["status"] == "failed"
    took = re.search(r"did not finish within its timeout of ([\d.]+)s",
                     steps["long"]["error"]["message"])
    assert took is not None and float(took.group(1)) <= 0.5, steps["long"]["error"]
    spans = sorted((_time(s["started_at"]), _time(s["ended_at"])) for s in steps.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), spans


def test_a_plan_that_breaks_the_policy_does_not_run_even_when_handed_to_the_flow(
        policy_file: Path, tmp_path: Path) -> None:
    write(policy_file, "submitted: {tools: ['core.*']}\n")
    data = {"version": 1, "name": "smuggled", "steps": [
        {"id": "w", "tool": "file.write", "with": {"path": "proof.txt", "content": "ran"}}]}

    async def scenario() -> Any:
        from planrun.flows import plan_flow as compiled

        return await compiled.plan_flow(data, {}, return_state=True)

    state = asyncio.run(scenario())
    assert state.is_failed()
    assert "tool 'file.write' is not allowed: the 'submitted' policy allows only core.*" \
        in (state.message or "")


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- the workspace root and the output ceiling, where the step runs ------------------------

def test_a_run_writes_under_the_workspace_root_its_level_is_given(tmp_path: Path) -> None:
    root = tmp_path / "operator-root"
    policy = write(tmp_path / "policy.yaml", f"local: {{workspace_root: '{root}'}}\n")
    plan = write(tmp_path / "plan.yaml", """\
        version: 1
        name: rooted
        steps:
          - {id: w, tool: file.write, with: {path: out.txt, content: here}}
        """)
    ran = cli("run", str(plan), "--json", cwd=tmp_path,
              env={POLICY_ENV: str(policy), "PLANRUN_WORKSPACE": str(tmp_path / "env-root")})
    assert ran.returncode == 0, ran.stderr
    assert (root / "out.txt").read_text() == "here"  # the policy's root wins
    assert not (tmp_path / "env-root" / "out.txt").exists()


def test_a_tool_output_over_the_output_ceiling_fails_the_step_as_a_resource_error(
        policy_file: Path, tmp_path: Path) -> None:
    from planrun.adapters.core import Echo
    from planrun.errors import ResourceError

    write(policy_file, "submitted: {ceilings: {output_bytes: 100}}\n")
    ws = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    ctx = StepContext("r", "s", ws)
    assert asyncio.run(Echo().run({"value": "small"}, ctx, 5)) == {"value": "small"}
    with pytest.raises(ResourceError) as refused:
        asyncio.run(Echo().run({"value": "x" * 500}, ctx, 5))
    assert "over the policy's output ceiling of 100 bytes" in refused.value.message
