"""The template sandbox: types kept, escapes refused, amplification bounded."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(("text", "words"), [
    ("{{ 'x'|center(10**9) }}", "center width"),
    ("{{ '{:>999999999}'.format(1) }}", "format width"),
    ("{{ '%*s' % (10**9, 'x') }}", "'*' widths"),
    ("{{ 'x'.ljust(10**9) }}", "ljust width"),
    ("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "replace would make over 1 MB"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "joined with ~ over 1 MB"),
    ("{{ ([('x' * 100000)] * 100000)|string }}", "filter input over 1 MB"),
    ("{{ 5|round(-10**9) }}", "round precision"),
    ("{{ [1]|batch(10**9, 'x') }}", "linecount"),
    ("{% set x %}{% for i in range(100000) %}{{ 'abcdefghijk' }}{% endfor %}{% endset %}",
     "template output over 1 MB"),
])
def test_each_cap_refuses_before_building_and_names_itself(text: str, words: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(words)):
        render(text, {})


def test_a_failure_names_the_place_in_the_step() -> None:
    with pytest.raises(TemplateError, match=r"at steps\.a\.with\.body\[1\]$"):
        render({"body": ["ok", "{{ 'x'|center(10**9) }}"]}, {}, ("steps", "a", "with"))


def test_a_whole_template_gives_plain_data() -> None:
    assert render("{{ range(3) }}", {}) == [0, 1, 2]
    assert render("{{ {'a': (1, 2)} }}", {}) == {"a": [1, 2]}
    with pytest.raises(TemplateError, match="keys must be text"):
        render("{{ {(1, 2): 3} }}", {})



@pytest.mark.parametrize(("text", "words"), [
    ("{{ 'a\tb'.expandtabs(10**9) }}", "expandtabs width 1000000000 is too wide"),
    ("{{ ('\t' * 1000).expandtabs(5000) }}", "expandtabs() would make over 1 MB"),
    ("{{ ('x' * 1000).translate({120: 'y' * 10000}) }}", "translate() would make over 1 MB"),
    ("{{ ('-' * 10000).join(['a'] * 1000) }}", "join() would make over 1 MB"),
    ("{{ lipsum(2000) }}", "lipsum of 2000 paragraphs of up to 100 words is too long"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
     "template loops or calls more than 100,000 times"),
    ("{{ '%(a)99999999999s' % {'a': 1} }}", "format width 99999999999 is too wide"),
    ("{{ '%.99999999999f' % 1.5 }}", "format width 99999999999 is too wide"),
    ("{{ 'x'|indent(10**9) }}", "indent width 1000000000 is too wide"),
    ("{{ '{}'.format_map(1, 2) }}", "format_map() takes exactly one argument"),
])
def test_more_caps_refuse_and_name_themselves(text: str, words: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(words)):
        render(text, {})


@pytest.mark.parametrize(("text", "result"), [
    ("{{ '{x:>5}'.format_map({'x': 1}) }}", "    1"),
    ("{{ 'a\nb'|indent('  ') }}", "a\n  b"),
    ("{{ range(5)|join(',') }}", "0,1,2,3,4"),
    ("{{ 'x y'|wordwrap(1, wrapstring='|') }}", "x|y"),
    ("{{ range(3)|sum }}", 3),
    ("{{ [[1], [2]]|sum(start=[]) }}", [1, 2]),
    ("{{ 1 ** 100000 }}", 1),
    ("{{ lipsum(2, html=False) is string }}", True),
    ("{{ '%5s' % 'x' }}", "    x"),
])
def test_ordinary_uses_of_the_capped_methods_and_filters_still_work(
        text: str, result: object) -> None:
    assert render(text, {}) == result
