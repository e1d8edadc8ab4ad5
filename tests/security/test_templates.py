"""Templates inside the limits (issue 8, item 6), replayed as a user would: real
``planrun validate`` / ``planrun run --json`` subprocesses against the test server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from planrun.template_limits import MAX_RENDER_S
from tests.helpers import PLANRUN, ROOT, cli

#: A template that would allocate gigabytes if anything evaluated it.
GIGABYTES = "{% for i in range(3) %}{{ 'x'|center(300000000) }}{% endfor %}"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``planrun ARGS`` from a fresh parent and return the child's peak RSS (MB)."""
    probe = ("import resource, subprocess, sys, json\n"
             f"p = subprocess.run({[*PLANRUN, *args]!r}, capture_output=True, text=True)\n"
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
             "print(json.dumps([peak, p.returncode, p.stdout, p.stderr]))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True).stdout
    peak, code, stdout, stderr = json.loads(out)
    return peak, subprocess.CompletedProcess(args, code, stdout, stderr)


def test_validating_a_plan_never_evaluates_its_templates(tmp_path: Path) -> None:
    small = write(tmp_path, "small.yaml", """\
        version: 1
        name: small
        steps:
          - {id: a, tool: core.echo, with: {value: hi}}
        """)
    folding = write(tmp_path, "fold.yaml", f"""\
        version: 1
        name: fold
        steps:
          - {{id: a, tool: core.echo, with: {{value: "{GIGABYTES}"}}}}
        """)
    baseline, _ = peak_rss_mb("validate", str(small))
    peak, proc = peak_rss_mb("validate", str(folding))
    assert proc.returncode == 0, proc.stderr
    assert "1 plan valid" in proc.stderr
    assert peak - baseline < 100, f"validate grew from {baseline:.0f} MB to {peak:.0f} MB"


SLOW = ("{% set big = 'a' * 100000 %}{% for i in range(90000) %}"
        "{% set x = big|replace('a', 'b') %}{% set y = big|replace('a', 'c') %}{% endfor %}done")


def _slow_run(tmp_path: Path, limits: str, timeout: str) -> tuple[dict[str, Any], float]:
    """``planrun run`` of one step whose input is a template that renders for minutes;
    its report, and how long the command took."""
    plan = write(tmp_path, "slow.yaml", f"""\
        version: 1
        name: slow
        limits: {{{limits}}}
        steps:
          - {{id: a, tool: core.echo, timeout: {timeout}, with: {{value: "{SLOW}"}}}}
        """)
    started = time.monotonic()
    proc = cli("run", str(plan), "--json")
    took = time.monotonic() - started
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    return json.loads(proc.stdout), took


# Each limit on its own: with a 1 s step timeout under a 2 s deadline, a step that starts
# over a second after its run (a loaded machine) meets the deadline first.
def test_a_slow_template_counts_against_the_step_timeout(tmp_path: Path) -> None:
    report, took = _slow_run(tmp_path, "deadline: 120s", "1s")
    step = report["steps"]["a"]
    assert step["status"] == "failed"
    assert step["error"]["category"] == "configuration"
    assert "took longer than the step's timeout of 1s" in step["error"]["message"]
    # Stopped at its 1 s timeout, not by the render's own cap of MAX_RENDER_S (10 s) nor
    # after the minutes the template would take; the margin is for a loaded machine.
    assert step["duration_s"] < MAX_RENDER_S / 2, step
    assert took < 30


def test_a_slow_template_counts_against_the_run_deadline(tmp_path: Path) -> None:
    report, took = _slow_run(tmp_path, "deadline: 2s", "120s")
    assert "deadline" in report["reason"]
    assert report["steps"]["a"]["status"] == "cancelled"
    assert report["duration_s"] < 5, report  # the template would render for minutes
    assert took < 30


def test_templates_that_ask_for_too_much_fail_their_step_naming_the_cap(
        tmp_path: Path) -> None:
    attacks = {
        "center": ("{{ 'x'|center(10**9) }}", "center width 1000000000 is too wide"),
        "percent": ("{{ '%999999999s'|format(1) }}", "format width 999999999 is too wide"),
        "lipsum": ("{{ lipsum(10**6) }}", "lipsum of 1000000 paragraphs"),
        "repeat": ("{{ 'a' * 10**9 }}", "is too much (at most 100,000 items)"),
        "joined": ("{{ range(100000)|join('x' * 100000) }}", "join would make over 1 MB"),
        "loops": ("{% for a in range(10**4) %}{% for b in range(10**4) %}{{ '' }}"
                  "{% endfor %}{% endfor %}", "loops or calls more than 100,000 times"),
        "printed": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
                    "template output over 1 MB"),
        "indent": ("{{ 'x'|indent(10**9) }}", "indent width 1000000000 is too wide"),
    }
    steps = "\n".join(
        f'  - {{id: {name}, tool: core.echo, critical: false, with: {{value: "{text}"}}}}'
        for name, (text, _) in attacks.items())
    plan = tmp_path / "caps.yaml"
    plan.write_text(f"version: 1\nname: caps\nsteps:\n{steps}\n", encoding="utf-8")
    peak, proc = peak_rss_mb("run", str(plan), "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    for name, (_, words) in attacks.items():
        step = report["steps"][name]
        assert step["status"] == "failed", (name, step)
        assert step["error"]["category"] == "configuration", (name, step)
        assert words in step["error"]["message"], (name, step["error"]["message"])
        assert step["error"]["message"].endswith(f"at steps.{name}.with.value"), step["error"]
    assert peak < 600, f"the run's process peaked at {peak:.0f} MB"


def test_a_template_that_fails_at_run_time_ends_the_run_with_a_report_and_a_rollback(
        tmp_path: Path) -> None:
    plan = write(tmp_path, "tuple.yaml", """\
        version: 1
        name: tuple-key
        steps:
          - {id: write, tool: file.write, with: {path: notes/a.txt, content: hello}}
          - {id: odd, tool: core.echo, needs: [write], with: {value: "{{ {(1,2): 3} }}"}}
        """)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    proc = cli("run", str(plan), "--json", "--workspace", str(workspace))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "failed"
    error = report["steps"]["odd"]["error"]
    assert error["category"] == "configuration"
    assert "a mapping's keys must be text; (1, 2) is not at steps.odd.with.value" \
        in error["message"]
    assert "notes/a.txt" in json.dumps(report["rolled_back"])
    assert not (workspace / "notes" / "a.txt").exists()
