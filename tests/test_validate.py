"""``planrun validate`` and the validator against docs/plan-format.md and docs/errors.md.

Every invalid plan in ``tests/plans/invalid`` starts with its expectations:

    # expect: <text found in "path: message" of one problem>
    # expect-line: <the line of that problem>       (optional, applies to the expect above)
    # expect-count: <exactly this many problems>    (optional)

Inputs a file cannot describe about itself (binary, non-UTF-8, too big, missing) are
generated here in ``tmp_path``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from planrun import templates
from planrun.adapters.registry import default_registry
from planrun.errors import PlanInvalid, Problem
from planrun.loader import MAX_PLAN_BYTES
from planrun.plan_schemas import SCHEMA_PATH, plan_schema
from planrun.plan_schemas.model import Approval, Defaults, Fallback, Limits, Plan, Retry, Step
from planrun.validate import ValidPlan, validate_file, validate_text
from tests.helpers import cli

PLANS = Path(__file__).resolve().parent / "plans"
INVALID = sorted((PLANS / "invalid").glob("*.yaml"))
VALID = sorted((PLANS / "valid").glob("*.yaml"))
TOOLS = ["browser.open", "core.echo", "core.fail", "core.sleep", "file.delete", "file.list",
         "file.read", "file.write", "http.request", "message.send", "search.web", "shell.run"]


@dataclass
class Expect:
    text: str
    line: int | None = None


def expectations(path: Path) -> tuple[list[Expect], int | None]:
    """The ``# expect...`` header of an invalid plan file."""
    found: list[Expect] = []
    count = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.startswith("#"):
            break
        key, _, value = raw[1:].strip().partition(":")
        if key == "expect":
            found.append(Expect(value.strip()))
        elif key == "expect-line":
            found[-1].line = int(value)
        elif key == "expect-count":
            count = int(value)
    return found, count


def problems_of(path: Path | str) -> list[Problem]:
    with pytest.raises(PlanInvalid) as caught:
        validate_file(path)
    assert caught.value.problems, "PlanInvalid without problems"
    return caught.value.problems


def assert_well_formed(problems: list[Problem], file: str) -> None:
    """Each problem prints as one ``file:line:col: path: message`` line."""
    pattern = re.compile(rf"^{re.escape(file)}:\d+:\d+: \S+: .+$")
    for problem in problems:
        text = str(problem)
        assert "\n" not in text, text
        assert pattern.match(text), text
        assert problem.line >= 1 and problem.column >= 1, text


def assert_expected(problems: list[Problem], expect: Expect) -> None:
    shown = "\n".join(str(p) for p in problems)
    matching = [p for p in problems if expect.text in f"{p.path}: {p.message}"]
    assert matching, f"no problem contains {expect.text!r}:\n{shown}"
    if expect.line is not None:
        lines = [p.line for p in matching]
        assert expect.line in lines, f"{expect.text!r} on lines {lines}, expected {expect.line}"


# -- invalid plan files, in-process ----------------------------------------------------------

def test_every_invalid_file_states_what_it_expects() -> None:
    assert len(INVALID) >= 30
    for path in INVALID:
        assert path.read_text(encoding="utf-8").startswith("# expect: "), path.name
        found, _ = expectations(path)
        assert found and all(e.text for e in found), path.name


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_plan_reports_the_expected_problems(path: Path) -> None:
    problems = problems_of(path)
    found, count = expectations(path)
    for expect in found:
        assert_expected(problems, expect)
    if count is not None:
        assert len(problems) == count, "\n".join(str(p) for p in problems)
    assert_well_formed(problems, str(path))
    assert problems == sorted(problems)


def test_several_errors_are_all_reported_sorted_by_line() -> None:
    path = PLANS / "invalid" / "many-errors.yaml"
    problems = problems_of(path)
    kinds = ["unknown key", "is not a duration", "unknown tool", "duplicate step id",
             "expected a number", "unknown step 'fetsh'", "unknown input", "not in this step's needs",
             "cycle in needs", "template syntax error"]
    assert len(problems) == len(kinds)
    for kind in kinds:
        assert sum(kind in p.message for p in problems) == 1, kind
    positions = [(p.line, p.column) for p in problems]
    assert positions == sorted(positions)
    assert len({p.line for p in problems}) >= 9  # on their own lines, not all at the top


def test_problems_of_several_steps_are_not_hidden_by_the_first() -> None:
    steps = "".join(f"  - {{id: s{i}, tool: core.sleep, with: {{seconds: bad{i}}}}}\n"
                    for i in range(20))
    with pytest.raises(PlanInvalid) as caught:
        validate_text(f"version: 1\nname: many\nsteps:\n{steps}", "many.yaml")
    problems = caught.value.problems
    assert [p.path for p in problems] == [f"steps[{i}].with.seconds" for i in range(20)]
    assert [p.line for p in problems] == list(range(4, 24))


# -- inputs a file cannot carry a comment in ---------------------------------------------------

PLAN_TAIL = b"steps: [{id: a, tool: core.echo}]\n"
UNREADABLE: dict[str, tuple[bytes, str, int, int]] = {
    # name: (content, expected message text, line, column)
    "zero-bytes": (b"", "the file holds no YAML documents", 1, 1),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "the file is binary, not YAML text",
               1, 1),
    "latin-1": (b"version: 1\nname: caf\xe9\n" + PLAN_TAIL, "not UTF-8 text (byte 0xe9)", 2, 10),
    "utf-16": ("version: 1\n".encode("utf-16"), "the file is binary", 1, 1),
    "truncated-utf-8": (b"version: 1\nname: x\ndescription: \xe2\x82", "not UTF-8 text", 3, 14),
    "control-character": (b"version: 1\nname: a\x07b\n" + PLAN_TAIL,
                          "the character #x0007 is not allowed in YAML", 2, 8),
    "too-big": (b"#" * (MAX_PLAN_BYTES + 1), f"a plan may be at most {MAX_PLAN_BYTES} bytes", 1, 1),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_content_is_one_located_problem(name: str, tmp_path: Path) -> None:
    content, text, line, column = UNREADABLE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    problems = problems_of(path)
    assert len(problems) == 1
    assert text in problems[0].message
    assert (problems[0].line, problems[0].column) == (line, column)
    assert_well_formed(problems, str(path))


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_file_that_cannot_be_read_is_reported_at_line_0(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    if kind == "directory":
        path.mkdir()
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].line == 0 and problems[0].path == "plan"
    assert "cannot read the file" in problems[0].message


def test_a_plan_with_too_many_steps_is_rejected(tmp_path: Path) -> None:
    steps = "".join(f"  - {{id: s{i}, tool: core.echo}}\n" for i in range(5001))
    path = tmp_path / "huge.yaml"
    path.write_text(f"version: 1\nname: huge\nsteps:\n{steps}")
    problems = problems_of(path)
    assert [(p.path, p.line) for p in problems] == [("steps", 4)]
    assert "5001 items; at most 5000 allowed" in problems[0].message


def test_a_plan_of_too_many_yaml_nodes_is_rejected(tmp_path: Path) -> None:
    items = ", ".join(["x"] * 250_000)
    path = tmp_path / "wide.yaml"
    path.write_text(f"version: 1\nname: wide\nsteps: [{{id: a, tool: core.echo, "
                    f"with: {{value: [{items}]}}}}]\n")
    problems = problems_of(path)
    assert len(problems) == 1 and "YAML nodes" in problems[0].message


# -- valid plans --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_plan_validates(path: Path) -> None:
    valid = validate_file(path)
    assert isinstance(valid, ValidPlan)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert valid.plan.name == data["name"]
    assert [s.id for s in valid.plan.steps] == [s["id"] for s in data["steps"]]


def _keys_used(value: Any, out: set[str], prefix: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            out.add(f"{prefix}.{key}")
            if key not in ("with", "inputs"):
                _keys_used(item, out, f"{prefix}.{key}")
    elif isinstance(value, list):
        for item in value:
            _keys_used(item, out, prefix)


def test_the_valid_plans_use_every_plan_field() -> None:
    used: set[str] = set()
    for path in VALID:
        _keys_used(yaml.safe_load(path.read_text(encoding="utf-8")), used, "plan")
    models = {"plan": Plan, "plan.defaults": Defaults, "plan.limits": Limits,
              "plan.steps": Step, "plan.steps.retry": Retry, "plan.defaults.retry": Retry,
              "plan.steps.fallback": Fallback, "plan.steps.approval": Approval}
    fields = {f"{prefix}.{info.alias or name}"
              for prefix, model in models.items() for name, info in model.model_fields.items()}
    assert fields - used == set()


def test_a_value_that_is_exactly_one_template_keeps_its_type() -> None:
    valid = validate_file(PLANS / "valid" / "market-brief.yaml")
    steps = {s.id: s for s in valid.plan.steps}
    inputs = {name: spec["default"] for name, spec in valid.plan.inputs.items()}
    context = {"inputs": inputs, "steps": {}, "run": {}}
    assert templates.render(steps["keep_tags"].with_["value"], context) == ["orchestration",
                                                                            "python"]
    assert templates.render(steps["pause"].with_["seconds"], context) == 0.5
    params = templates.render(steps["search"].with_["params"], context)
    assert params == {"q": "prefect pricing", "limit": 5}


def test_templated_typed_parameters_are_checked_only_once_rendered() -> None:
    text = """\
version: 1
name: later
inputs: {delay: {type: number, default: 1}}
steps:
  - {id: a, tool: core.sleep, with: {seconds: "{{ inputs.delay }}"}}
  - {id: b, tool: http.request, with: {url: "{{ inputs.delay }}"}}
"""
    assert [s.id for s in validate_text(text, "later.yaml").plan.steps] == ["a", "b"]


# -- the command line ---------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_cli_validate_reports_every_invalid_file_and_exits_2() -> None:
    proc = cli("validate", *(str(p) for p in INVALID))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = _lines(proc.stdout)
    pattern = re.compile(r"^(?P<file>\S+\.yaml):(?P<line>\d+):\d+: \S+: .+$")
    assert all(pattern.match(line) for line in lines), lines
    for path in INVALID:
        mine = [line for line in lines if line.startswith(f"{path}:")]
        for expect in expectations(path)[0]:
            prefix = f"{path}:{expect.line}:" if expect.line is not None else f"{path}:"
            assert any(line.startswith(prefix) and expect.text in line for line in mine), (
                f"{path.name}: {expect}\n" + "\n".join(mine))


def test_cli_validate_one_invalid_file() -> None:
    path = PLANS / "invalid" / "cyclic-needs.yaml"
    proc = cli("validate", str(path))
    assert proc.returncode == 2
    assert proc.stdout == (f"{path}:8:12: steps[0].needs: "
                           "cycle in needs: draft -> review -> publish -> draft\n")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_cli_validate_unreadable_content(name: str, tmp_path: Path) -> None:
    content, text, line, column = UNREADABLE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    proc = cli("validate", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    [printed] = _lines(proc.stdout)
    assert printed.startswith(f"{path}:{line}:{column}: plan: ") and text in printed


def test_cli_validate_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    proc = cli("validate", str(path))
    assert proc.returncode == 2
    assert proc.stdout.startswith(f"{path}:0:0: plan: cannot read the file")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_validate_valid_files_exits_0() -> None:
    proc = cli("validate", *(str(p) for p in VALID))
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stdout + proc.stderr
    assert f"{len(VALID)} plans valid" in proc.stderr


def test_cli_validate_mixed_files_reports_only_the_invalid_one() -> None:
    bad = PLANS / "invalid" / "duplicate-ids.yaml"
    proc = cli("validate", str(VALID[0]), str(bad))
    assert proc.returncode == 2
    assert {line.split(":")[0] for line in _lines(proc.stdout)} == {str(bad)}


@pytest.fixture(scope="module")
def printed_schema() -> dict[str, Any]:
    proc = cli("schema")
    assert proc.returncode == 0, proc.stderr
    schema: dict[str, Any] = json.loads(proc.stdout)
    return schema


def test_cli_schema_is_json_schema_2020_12(printed_schema: dict[str, Any]) -> None:
    assert printed_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(printed_schema)
    step = printed_schema["properties"]["steps"]["items"]
    assert step["properties"]["tool"]["enum"] == TOOLS


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_cli_schema_accepts_the_valid_plans(printed_schema: dict[str, Any], path: Path) -> None:
    errors = list(Draft202012Validator(printed_schema).iter_errors(
        yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert errors == []


@pytest.mark.parametrize("name, where", [
    ("unknown-key.yaml", ["steps", 1]),
    ("unknown-tool.yaml", ["steps", 0, "tool"]),
    ("bad-parameters.yaml", ["steps", 1, "with", "method"]),
    ("path-traversal.yaml", ["steps", 0, "with", "path"]),
    ("wrong-types.yaml", ["version"]),
])
def test_cli_schema_rejects_invalid_plans(printed_schema: dict[str, Any], name: str,
                                          where: list[Any]) -> None:
    data = yaml.safe_load((PLANS / "invalid" / name).read_text(encoding="utf-8"))
    paths = [list(e.absolute_path) for e in Draft202012Validator(printed_schema).iter_errors(data)]
    assert any(p[:len(where)] == where for p in paths), paths


def test_committed_plan_schema_matches_the_code() -> None:
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == plan_schema(default_registry()), "run scripts/gen-schema"


def test_cli_tools_lists_every_installed_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANRUN_ALLOWED_TOOLS", raising=False)
    proc = cli("tools")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line and line[0] != " "]
    assert listed == TOOLS
    proc = cli("tools", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [row["tool"] for row in rows] == TOOLS
    assert all(row["parameters"]["type"] == "object" for row in rows)
