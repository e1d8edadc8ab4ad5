"""The run semantics of docs/plan-format.md ("needs and when", "Statuses", "Errors and
retries"), row by row, against the real Prefect server of the test session."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from tests.helpers import run_yaml


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def steps(report: dict[str, Any]) -> dict[str, Any]:
    return report["steps"]


def test_a_step_starts_only_after_every_need_finished() -> None:
    report = run_yaml("""
        version: 1
        name: dag
        steps:
          - {id: slow, tool: core.sleep, with: {seconds: 0.4}}
          - {id: fast, tool: core.sleep, with: {seconds: 0.05}}
          - {id: join, tool: core.echo, needs: [slow, fast], with: {value: joined}}
    """)
    s = steps(report)
    assert report["status"] == "completed"
    assert ts(s["join"]["started_at"]) >= ts(s["slow"]["ended_at"])
    assert ts(s["join"]["started_at"]) >= ts(s["fast"]["ended_at"])
    # The two roots ran side by side, not one after the other.
    assert ts(s["fast"]["started_at"]) < ts(s["slow"]["ended_at"])


def test_without_when_a_step_after_a_failure_is_skipped_with_the_reason() -> None:
    report = run_yaml("""
        version: 1
        name: skip-after-failure
        steps:
          - {id: search, tool: core.fail, critical: false, with: {category: logic, message: nope}}
          - {id: summarise, tool: core.echo, needs: [search], with: {value: x}}
    """)
    s = steps(report)
    assert s["summarise"]["status"] == "skipped"
    assert s["summarise"]["reason"] == "upstream search failed"
    assert s["summarise"]["started_at"] is None and s["summarise"]["attempts"] == 0
    assert report["status"] == "completed_with_errors"


def test_with_when_a_step_runs_after_a_failed_need_if_its_condition_holds() -> None:
    report = run_yaml("""
        version: 1
        name: when-failed
        steps:
          - {id: primary, tool: core.fail, critical: false, with: {category: logic}}
          - id: recover
            tool: core.echo
            needs: [primary]
            when: "{{ steps.primary.status == 'failed' }}"
            with: {value: "recovering from {{ steps.primary.error.category }}"}
          - id: celebrate
            tool: core.echo
            needs: [primary]
            when: "{{ steps.primary.status == 'completed' }}"
            with: {value: yay}
    """)
    s = steps(report)
    assert s["recover"]["status"] == "completed"
    assert s["recover"]["output"] == {"value": "recovering from logic"}
    assert s["celebrate"]["status"] == "skipped"
    assert "condition is false" in s["celebrate"]["reason"]


def test_run_completed_when_every_step_completed_or_skipped_by_its_own_when() -> None:
    report = run_yaml("""
        version: 1
        name: all-good
        inputs: {enabled: {type: boolean, default: false}}
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
          - {id: b, tool: core.echo, needs: [a], when: "{{ inputs.enabled }}", with: {value: 2}}
          - {id: c, tool: core.echo, needs: [b], with: {value: 3}}
    """)
    s = steps(report)
    assert s["b"]["status"] == "skipped" and s["c"]["status"] == "skipped"
    assert s["c"]["reason"] == "upstream b was skipped"
    assert report["status"] == "completed"


def test_a_critical_failure_cancels_running_steps_and_skips_the_rest() -> None:
    report = run_yaml("""
        version: 1
        name: critical
        steps:
          - {id: long, tool: core.sleep, with: {seconds: 30}}
          - {id: gate, tool: core.sleep, with: {seconds: 0.2}}
          - {id: boom, tool: core.fail, needs: [gate], with: {category: logic, message: broken}}
          - {id: after, tool: core.echo, needs: [boom], with: {value: never}}
          - {id: later, tool: core.echo, needs: [long], with: {value: never}}
    """)
    s = steps(report)
    assert report["status"] == "failed"
    assert "boom" in report["reason"]
    assert s["boom"]["status"] == "failed"
    assert s["long"]["status"] == "cancelled"
    assert report["duration_s"] < 15, "the 30 s sleep must have been cancelled"
    assert s["after"]["status"] == "skipped" and s["later"]["status"] == "skipped"
    assert s["later"]["started_at"] is None


def test_a_non_critical_failure_lets_the_rest_go_on() -> None:
    report = run_yaml("""
        version: 1
        name: non-critical
        steps:
          - {id: optional, tool: core.fail, critical: false, with: {category: logic}}
          - {id: main, tool: core.sleep, with: {seconds: 0.1}}
          - {id: after, tool: core.echo, needs: [main], with: {value: done}}
    """)
    s = steps(report)
    assert s["optional"]["status"] == "failed"
    assert s["after"]["status"] == "completed"
    assert report["status"] == "completed_with_errors"


def test_defaults_critical_false_applies_to_every_step() -> None:
    report = run_yaml("""
        version: 1
        name: default-critical
        defaults: {critical: false}
        steps:
          - {id: a, tool: core.fail, with: {category: logic}}
          - {id: b, tool: core.echo, with: {value: 1}}
    """)
    assert report["status"] == "completed_with_errors"
    assert steps(report)["b"]["status"] == "completed"


@pytest.mark.parametrize(
    ("category", "attempts"),
    [("transient", 4), ("configuration", 1), ("permission", 2), ("resource", 4), ("logic", 1)],
)
def test_each_category_has_its_default_number_of_attempts(category: str, attempts: int) -> None:
    report = run_yaml(f"""
        version: 1
        name: category-{category}
        defaults: {{retry: {{initial_delay: 10ms, max_delay: 20ms}}}}
        steps:
          - {{id: s, tool: core.fail, with: {{category: {category}, message: always}}}}
    """)
    step = steps(report)["s"]
    assert step["attempts"] == attempts
    assert step["status"] == "failed"
    assert step["error"]["category"] == category
    assert step["error"]["message"] == "always" and step["error"]["hint"]


def test_max_attempts_and_the_category_limit_the_smaller_wins() -> None:
    report = run_yaml("""
        version: 1
        name: smaller-wins
        defaults: {critical: false, retry: {initial_delay: 10ms}}
        steps:
          - {id: tight, tool: core.fail, retry: {max_attempts: 2}, with: {category: transient}}
          - {id: loose, tool: core.fail, retry: {max_attempts: 9}, with: {category: permission}}
    """)
    s = steps(report)
    assert s["tight"]["attempts"] == 2
    assert s["loose"]["attempts"] == 2


def test_backoff_waits_between_attempts() -> None:
    report = run_yaml("""
        version: 1
        name: backoff
        steps:
          - id: s
            tool: core.fail
            retry: {initial_delay: 200ms, jitter: 0, backoff: exponential}
            with: {category: transient, times: 2}
    """)
    step = steps(report)["s"]
    assert step["status"] == "completed" and step["attempts"] == 3
    # 0.2 s then 0.4 s of backoff.
    assert step["duration_s"] >= 0.6


def test_a_failure_recovered_by_retry_completes_without_error() -> None:
    report = run_yaml("""
        version: 1
        name: recovered
        steps:
          - {id: s, tool: core.fail, retry: {initial_delay: 10ms}, with: {category: transient, times: 1}}
    """)
    step = steps(report)["s"]
    assert step["status"] == "completed" and step["attempts"] == 2 and step["error"] is None


def test_fallback_completes_the_step_once_attempts_are_exhausted() -> None:
    report = run_yaml("""
        version: 1
        name: fallback
        steps:
          - id: fetch
            tool: core.fail
            retry: {max_attempts: 2, initial_delay: 10ms}
            with: {category: transient, message: down}
            fallback: {tool: core.echo, with: {value: cached copy}}
          - {id: use, tool: core.echo, needs: [fetch], with: {value: "{{ steps.fetch.output.value }}"}}
    """)
    s = steps(report)
    assert s["fetch"]["status"] == "completed"
    assert s["fetch"]["fallback_used"] is True and s["fetch"]["attempts"] == 2
    assert s["use"]["output"] == {"value": "cached copy"}
    assert report["status"] == "completed"


def test_a_failing_fallback_leaves_the_step_failed_with_both_messages() -> None:
    report = run_yaml("""
        version: 1
        name: fallback-fails
        steps:
          - id: fetch
            tool: core.fail
            with: {category: logic, message: primary broke}
            fallback: {tool: core.fail, with: {category: logic, message: backup broke}}
    """)
    step = steps(report)["fetch"]
    assert step["status"] == "failed" and step["fallback_used"] is False
    assert "primary broke" in step["error"]["message"]
    assert "backup broke" in step["error"]["message"]


def test_a_timeout_stops_the_work_and_counts_as_transient() -> None:
    report = run_yaml("""
        version: 1
        name: timeout
        steps:
          - {id: s, tool: core.sleep, timeout: 200ms, retry: {max_attempts: 2, initial_delay: 10ms},
             with: {seconds: 30}}
    """)
    step = steps(report)["s"]
    assert step["status"] == "failed" and step["attempts"] == 2
    assert step["error"]["category"] == "transient"
    assert "timeout" in step["error"]["message"]
    assert step["duration_s"] < 5


def test_the_run_deadline_fails_the_run() -> None:
    report = run_yaml("""
        version: 1
        name: deadline
        limits: {deadline: 500ms}
        steps:
          - {id: long, tool: core.sleep, with: {seconds: 30}}
          - {id: next, tool: core.echo, needs: [long], with: {value: 1}}
    """)
    s = steps(report)
    assert report["status"] == "failed"
    assert "deadline" in report["reason"]
    assert s["long"]["status"] == "cancelled" and s["next"]["status"] == "skipped"
    assert report["duration_s"] < 10


def test_max_parallel_one_runs_strictly_one_step_at_a_time() -> None:
    report = run_yaml("""
        version: 1
        name: sequential
        limits: {max_parallel: 1}
        steps:
          - {id: a, tool: core.sleep, with: {seconds: 0.1}}
          - {id: b, tool: core.sleep, with: {seconds: 0.1}}
          - {id: c, tool: core.sleep, with: {seconds: 0.1}}
    """)
    spans = sorted((ts(s["started_at"]), ts(s["ended_at"])) for s in steps(report).values())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end


def test_max_parallel_bounds_how_many_steps_run_at_once() -> None:
    six = ", ".join(f"{{id: s{i}, tool: core.sleep, with: {{seconds: 0.2}}}}" for i in range(6))
    report = run_yaml(f"""
        version: 1
        name: bounded
        limits: {{max_parallel: 2}}
        steps: [{six}]
    """)
    spans = [(ts(s["started_at"]), ts(s["ended_at"])) for s in steps(report).values()]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 2


def test_templates_keep_types_and_read_outputs_and_inputs() -> None:
    report = run_yaml("""
        version: 1
        name: typed
        inputs:
          count: {type: integer, default: 3}
          topic: {type: string}
        steps:
          - {id: list, tool: core.echo, with: {value: [1, 2, 3]}}
          - id: use
            tool: core.echo
            needs: [list]
            with:
              value:
                same: "{{ steps.list.output.value }}"
                count: "{{ inputs.count }}"
                text: "{{ inputs.topic }} x{{ inputs.count }}"
                length: "{{ steps.list.output.value | length }}"
    """, inputs={"topic": "prefect"})
    value = steps(report)["use"]["output"]["value"]
    assert value == {"same": [1, 2, 3], "count": 3, "text": "prefect x3", "length": 3}
    assert steps(report)["use"]["input"]["value"]["same"] == [1, 2, 3]


def test_a_template_that_cannot_render_fails_the_step_as_configuration() -> None:
    report = run_yaml("""
        version: 1
        name: bad-render
        steps:
          - {id: a, tool: core.echo, with: {value: {x: 1}}}
          - {id: b, tool: core.echo, needs: [a], with: {value: "{{ steps.a.output.value.nope }}"}}
    """)
    step = steps(report)["b"]
    assert step["status"] == "failed"
    assert step["error"]["category"] == "configuration"
    assert "nope" in step["error"]["message"]


def test_secrets_are_redacted_from_the_reported_input() -> None:
    report = run_yaml("""
        version: 1
        name: redact
        steps:
          - {id: a, tool: core.echo, with: {value: {api_key: hunter2, headers: {Authorization: Bearer x}, q: ok}}}
    """)
    shown = steps(report)["a"]["input"]["value"]
    assert shown == {"api_key": "***", "headers": {"Authorization": "***"}, "q": "ok"}


def test_secrets_inside_urls_are_redacted_from_the_reported_input() -> None:
    report = run_yaml("""
        version: 1
        name: redact-url
        inputs: {key: {type: string, default: hunter2}}
        steps:
          - {id: a, tool: core.echo, with: {value: "https://u:pw@example.org/x?api_key={{ inputs.key }}&q=1"}}
    """)
    shown = steps(report)["a"]["input"]["value"]
    assert "hunter2" not in shown and "pw" not in shown
    assert "q=1" in shown


def test_every_step_in_the_report_carries_the_spec_fields() -> None:
    report = run_yaml("""
        version: 1
        name: fields
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
          - {id: b, tool: core.fail, critical: false, needs: [a], with: {category: logic}}
          - {id: c, tool: core.echo, needs: [b], with: {value: 1}}
    """)
    assert {"run_id", "plan", "status", "started_at", "ended_at", "duration_s",
            "steps"} <= set(report)
    for step in steps(report).values():
        assert {"status", "attempts", "started_at", "ended_at", "duration_s", "input", "output",
                "error", "reason", "fallback_used"} <= set(step)
    assert steps(report)["c"]["started_at"] is None and steps(report)["c"]["ended_at"] is None


def test_a_when_without_braces_is_read_as_an_expression() -> None:
    report = run_yaml("""
        version: 1
        name: bare-when
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
          - {id: yes_branch, tool: core.echo, needs: [a], when: "steps.a.output.value == 1", with: {value: y}}
          - {id: no_branch, tool: core.echo, needs: [a], when: "steps.a.output.value == 2", with: {value: n}}
    """)
    s = steps(report)
    assert s["yes_branch"]["status"] == "completed"
    assert s["no_branch"]["status"] == "skipped"


def test_a_step_behind_an_approval_gate_never_runs_unasked() -> None:
    report = run_yaml("""
        version: 1
        name: gated
        steps:
          - {id: draft, tool: core.echo, with: {value: text}}
          - {id: send, tool: core.echo, needs: [draft], approval: {prompt: "Send it?"}, with: {value: sent}}
    """)
    s = steps(report)
    assert s["send"]["status"] == "skipped" and s["send"]["started_at"] is None
    assert s["send"]["reason"].startswith("rejected: no one can be asked in this run")
    assert "planrun submit" in s["send"]["reason"]
    assert report["status"] == "completed_with_errors"
