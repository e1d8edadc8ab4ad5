"""A step's output in a few words."""

from __future__ import annotations

from typing import Any

import pytest

from planrun.summary import summarize


@pytest.mark.parametrize(("output", "expected"), [
    (None, None),
    ({"status": 200, "url": "http://x", "json": {"results": [1, 2, 3, 4, 5]}},
     "HTTP 200, 5 results"),
    ({"status": 404, "url": "http://x", "json": None, "text": "no"}, "HTTP 404"),
    ({"exit_code": 0, "stdout": "a\nb\n"}, "exit 0, 2 lines of output"),
    ({"path": "out.txt", "bytes": 1}, "wrote 1 byte to out.txt"),
    ({"path": "d", "entries": [{}, {}], "truncated": False}, "2 entries in d"),
    ({"path": "x", "deleted": False}, "x was absent"),
    ({"value": [1, 2]}, "2 items"),
    ({"value": "line one\nline two"}, "line one"),
    ({"url": "http://x", "final_url": "http://x/", "status": 200, "title": "Ferry", "text": ""},
     "HTTP 200: Ferry"),
    ({"url": "http://x", "final_url": "http://x/", "status": 200, "title": ""}, "HTTP 200"),
    ({"channel": "ops", "type": "email", "delivered": True, "replayed": False,
      "accepted": ["a@example.org", "b@example.org"], "refused": {}},
     "sent to a@example.org, b@example.org"),
    ({"channel": "ops", "type": "email", "delivered": True, "replayed": True,
      "accepted": ["a@example.org"], "refused": {"c@example.org": "550"}},
     "sent to a@example.org (1 refused), already sent"),
    ({"channel": "chat", "type": "webhook", "delivered": True, "replayed": False, "status": 200},
     "posted to chat: HTTP 200"),
    ({"a": 1, "b": 2}, "2 fields"),
    ("x" * 200, "x" * 79 + "…"),
])
def test_outputs_are_summarised_in_a_few_words(output: Any, expected: str | None) -> None:
    assert summarize(output) == expected
