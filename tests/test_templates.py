"""The template sandbox: types kept, escapes refused, amplification bounded."""

from __future__ import annotations

import pytest

from planrun.templates import TemplateError, references, render


@pytest.mark.parametrize("text", [
    "{{ 'a' * 10**10 }}", "{{ [1] * 10**9 }}", "{{ 10 ** 100000 }}",
    "{{ ((9**256)**256)**256 }}", "{{ ().__class__.__bases__ }}",
])
def test_amplifying_or_escaping_templates_are_refused(text: str) -> None:
    with pytest.raises(TemplateError):
        render(text, {})


def test_ordinary_arithmetic_and_repetition_still_work() -> None:
    assert render("{{ 'ab' * 3 }}", {}) == "ababab"
    assert render("{{ 2 ** 10 }}", {}) == 1024
    assert render("{{ [0] * 3 }}", {}) == [0, 0, 0]


def test_a_deeply_nested_template_is_a_template_error_not_a_crash() -> None:
    text = "{{ " + "(" * 200 + "1" + ")" * 200 + " }}"
    with pytest.raises(TemplateError, match="nested too deeply"):
        references(text)
