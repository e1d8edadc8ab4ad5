"""A step's output in a few words, for a person watching the run ("5 results")."""

from __future__ import annotations

from typing import Any

MAX_CHARS = 80


def summarize(output: Any) -> str | None:
    """A short line about ``output``: the shapes planrun's tools return get their own words
    (HTTP status, a page's title, exit code, bytes written, result counts, the recipients
    of a message); anything else its size or text."""
    if output is None:
        return None
    if isinstance(output, dict):
        return _shaped(output) or f"{len(output)} fields"
    if isinstance(output, list | tuple):
        return _count(len(output), "item")
    return _clip(str(output))


def _shaped(out: dict[str, Any]) -> str | None:
    if out.get("delivered") is True and "channel" in out:
        return _delivered(out)
    if isinstance(out.get("status"), int) and "final_url" in out and out.get("title"):
        return _clip(f"HTTP {out['status']}: {out['title']}")  # browser.open
    if isinstance(out.get("status"), int) and "url" in out:
        body = out.get("json")
        found = _results(body) if isinstance(body, dict | list) else None
        return f"HTTP {out['status']}" + (f", {found}" if found else "")
    if isinstance(out.get("exit_code"), int):
        lines = len(str(out.get("stdout") or "").splitlines())
        return f"exit {out['exit_code']}, {_count(lines, 'line')} of output"
    if "path" in out:
        if "bytes" in out:
            return f"wrote {_count(out['bytes'], 'byte')} to {out['path']}"
        if "entries" in out and isinstance(out["entries"], list):
            return f"{_count(len(out['entries']), 'entry', 'entries')} in {out['path']}"
        if "deleted" in out:
            return f"deleted {out['path']}" if out["deleted"] else f"{out['path']} was absent"
        if "content" in out:
            return f"read {_count(len(str(out['content'])), 'character')} of {out['path']}"
    if "value" in out and len(out) == 1:
        return summarize(out["value"])
    return _results(out)


def _delivered(out: dict[str, Any]) -> str:
    """message.send's confirmation: who got it, or the webhook's answer."""
    if isinstance(out.get("accepted"), list):
        said = "sent to " + ", ".join(map(str, out["accepted"]))
        refused = out.get("refused")
        if isinstance(refused, dict) and refused:
            said += f" ({len(refused)} refused)"
    else:
        said = f"posted to {out['channel']}" + \
            (f": HTTP {out['status']}" if isinstance(out.get("status"), int) else "")
    return _clip(said + (", already sent" if out.get("replayed") else ""))


def _results(body: dict[str, Any] | list[Any]) -> str | None:
    if isinstance(body, list):
        return _count(len(body), "item")
    for key, one, many in (("results", "result", "results"), ("items", "item", "items"),
                           ("data", "item", "items"), ("entries", "entry", "entries")):
        if isinstance(body.get(key), list):
            return _count(len(body[key]), one, many)
    return None


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _clip(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1] + "…"
