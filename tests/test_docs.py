"""The project's own reference in ``docs/``: its generated part is current, and it
documents what the code defines."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from planrun.adapters.registry import default_registry
from planrun.contract import stream as messages
from planrun.plan_schemas.reference import DOC_PATH, generated_part, render
from tests.helpers import ROOT


def test_the_committed_plan_format_reference_matches_the_code() -> None:
    committed = generated_part(DOC_PATH.read_text(encoding="utf-8"))
    assert committed == render(default_registry()), "run scripts/gen-docs"


def test_the_plan_format_reference_has_a_table_for_every_tool() -> None:
    text = DOC_PATH.read_text(encoding="utf-8")
    for name in default_registry().names():
        assert f"### `{name}`" in text


STREAM_DOC = ROOT / "docs" / "stream.md"
_SECTION = re.compile(r"^### `([a-z_.]+)`\n(.*?)(?=^#{1,3} |\Z)", re.S | re.M)
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.S | re.M)


def stream_examples() -> dict[str, list[str]]:
    """The JSON examples of ``docs/stream.md``, by the message type of their section."""
    text = STREAM_DOC.read_text(encoding="utf-8")
    return {kind: _JSON_BLOCK.findall(body) for kind, body in _SECTION.findall(text)}


def as_the_code_reads_it(example: str) -> dict[str, Any]:
    """The example parsed by the bridge's own message type, then written out again."""
    model: Any = messages.Message
    if hasattr(model, "model_validate_json"):  # a pydantic model
        return json.loads(model.model_validate_json(example).model_dump_json())
    parsed = model.from_json(example)
    parsed.__dict__.pop("json", None)  # written again from the fields, not the kept text
    return json.loads(parsed.json)


@pytest.mark.parametrize("kind", [t.value for t in messages.MessageType])
def test_every_message_type_is_documented_with_an_example_the_code_parses(kind: str) -> None:
    examples = stream_examples().get(kind)
    assert examples, f"docs/stream.md has no section ### `{kind}` with a JSON example"
    for example in examples:
        body = json.loads(example)
        assert body["type"] == kind
        assert as_the_code_reads_it(example) == body


def test_the_stream_reference_documents_no_type_the_code_does_not_send_unless_planned() -> None:
    known = {t.value for t in messages.MessageType}
    text = STREAM_DOC.read_text(encoding="utf-8")
    planned = text[text.index("### Planned types"):]
    for kind in stream_examples():
        assert kind in known or f"`{kind}`" in planned, kind


_CITED = re.compile(r"\bdocs/[a-z0-9_-]+\.(?:md|png)\b")
_CITING = ("planrun", "flows", "adapters", "progress_bridge", "plan_schemas", "benchmarks",
           "scripts", "docs")


def test_every_docs_file_the_code_and_the_docs_cite_exists() -> None:
    cited: dict[str, str] = {}
    files = [ROOT / "README.md", *(p for d in _CITING for p in (ROOT / d).rglob("*")
                                   if p.suffix in (".py", ".md", "") and p.is_file())]
    for path in files:
        for name in _CITED.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(name, str(path.relative_to(ROOT)))
    missing = {name: where for name, where in cited.items() if not (ROOT / name).exists()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_regenerating_the_reference_replaces_only_the_generated_part(tmp_path: Any) -> None:
    from planrun.plan_schemas.reference import BEGIN, END, write

    doc = tmp_path / "plan-format.md"
    doc.write_text(f"# Hand-written head\n{BEGIN}\nstale tables\n{END}\nHand-written tail\n",
                   encoding="utf-8")
    write(doc)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(f"# Hand-written head\n{BEGIN}\n")
    assert text.endswith(f"{END}\nHand-written tail\n")
    assert "stale tables" not in text and generated_part(text) == render(default_registry())


def test_a_reference_without_its_markers_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="the generated-part markers are missing"):
        generated_part("# a plan-format.md someone rewrote by hand\n")
