"""The policy's ``limits:`` section and a plan's ``limits.tools``: a plan may only tighten a
tool's limits; asking for more fails validation at its line, naming the rule; a malformed
section is a policy error like any other (docs/limits.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from planrun.errors import PolicyInvalid
from planrun.policy import POLICY_ENV, Trust, load_policy
from tests.test_policy import problems


@pytest.fixture
def policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "policy.yaml"
    monkeypatch.setenv(POLICY_ENV, str(path))
    yield path


POLICY = """\
limits:
  tools:
    http.request: {concurrency: 8, rate: 20, burst: 5}
  hosts:
    API.example.org: {rate: 2}
"""


def test_a_plan_loosening_a_tool_limit_fails_at_its_line_naming_the_rule(
        policy_file: Path) -> None:
    policy_file.write_text(POLICY)
    found = problems("""\
        version: 1
        name: greedy
        limits:
          tools:
            http.request: {concurrency: 9, rate: 50, burst: 5}
            shell.run: {concurrency: 1000}
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
        """, Trust.LOCAL)
    cores = 2 * (os.cpu_count() or 1)
    assert found == [
        "plan.yaml:5:33: limits.tools[\"http.request\"].concurrency: http.request's concurrency "
        "9 is above the policy's limit limits.tools.http.request.concurrency of 8: a plan may "
        "only tighten it (docs/limits.md)",
        "plan.yaml:5:42: limits.tools[\"http.request\"].rate: http.request's rate 50 is above "
        "the policy's limit limits.tools.http.request.rate of 20: a plan may only tighten it "
        "(docs/limits.md)",
        "plan.yaml:6:30: limits.tools[\"shell.run\"].concurrency: shell.run's concurrency 1000 "
        f"is above the policy's limit limits.tools.shell.run.concurrency of {cores} (the "
        "default): a plan may only tighten it (docs/limits.md)",
    ]


def test_a_plan_tightening_its_tools_passes(policy_file: Path) -> None:
    policy_file.write_text(POLICY)
    assert problems("""\
        version: 1
        name: modest
        limits:
          tools:
            http.request: {concurrency: 2, rate: 1.5, burst: 1}
            shell.run: {concurrency: 1}
            search.web: {rate: 100}
        steps:
          - {id: a, tool: core.echo, with: {value: 1}, degrade: skip}
        """) == []


def test_the_policy_limits_read_back_over_the_defaults(policy_file: Path) -> None:
    policy_file.write_text(POLICY + "  load: {memory_percent: 80, cpu_per_core: 1.5}\n")
    limits = load_policy().limits
    assert limits.tool("http.request").rate == 20
    assert limits.tool("shell.run").concurrency == 2 * (os.cpu_count() or 1)
    assert limits.host("api.EXAMPLE.org.") is not None and limits.host("other.org") is None
    assert limits.load.memory_percent == 80 and limits.load.window_s == 5
    assert limits.concurrency is None


@pytest.mark.parametrize(("section", "problem"), [
    ("{tools: {shell.run: {concurrency: 0}}}",
     'limits.tools["shell.run"].concurrency: Input should be greater than or equal to 1'),
    ("{tools: {shell.run: {parallel: 2}}}", 'limits.tools["shell.run"].parallel: unknown key'),
    ("{hosts: {'https://x.org/': {rate: 1}}}", "is not a host name or address"),
    ("{load: {memory_percent: 120}}",
     "limits.load.memory_percent: Input should be less than or equal to 100"),
    ("{tools: {'not a tool': {rate: 1}}}", "is not a tool name like 'search.web'"),
])
def test_a_malformed_limits_section_is_a_policy_error(policy_file: Path, section: str,
                                                      problem: str) -> None:
    policy_file.write_text(f"limits: {section}\n")
    with pytest.raises(PolicyInvalid) as raised:
        load_policy()
    assert problem in str(raised.value)
