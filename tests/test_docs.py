"""The project's own reference in ``docs/``: its generated part is current, and it
documents what the code defines."""

from __future__ import annotations

from adapters.registry import default_registry
from plan_schemas.reference import DOC_PATH, generated_part, render


def test_the_committed_plan_format_reference_matches_the_code() -> None:
    committed = generated_part(DOC_PATH.read_text(encoding="utf-8"))
    assert committed == render(default_registry()), "run scripts/gen-docs"


def test_the_plan_format_reference_has_a_table_for_every_tool() -> None:
    text = DOC_PATH.read_text(encoding="utf-8")
    for name in default_registry().names():
        assert f"### `{name}`" in text
