"""Search for a canary secret everywhere a run leaves something, for the security tests.

``everywhere(canary, ...)`` lists each place a canary was found, as ``"where: excerpt"``;
a test asserts the list is empty. Several canaries are searched for in one pass over
everything (the session's server holds thousands of events). Places searched:

- the Prefect API: every flow run (parameters, state and its message...), every task run,
  every log (``read_logs``), every event (``POST /api/events/filter``), artifacts,
  variables, and block documents read with their secrets (a secret input's block must be
  gone once its run ended);
- files: Prefect's local result storage (the checkpoints), the planrun home (the bridge's
  SQLite store, the Prefect server's database, run backups) and any other directory given;
- texts: reports, ``--json`` output, terminal output.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

PAGE = 200


def everywhere(*canaries: str, texts: dict[str, str] | None = None,
               directories: Iterable[Path] = (), skip_blocks: Iterable[str] = ()) -> list[str]:
    """Every place any of ``canaries`` shows: the Prefect API, files and ``texts`` (by name)."""
    hits = [f"{name}: {_excerpt(text, canary)}" for name, text in (texts or {}).items()
            for canary in canaries if canary in text]
    hits += asyncio.run(prefect_hits(canaries, set(skip_blocks)))
    hits += file_hits(canaries, [*default_directories(), *directories])
    return hits


def default_directories() -> list[Path]:
    """Prefect's local result storage (checkpoints) and the planrun home."""
    from prefect.settings import get_current_settings

    found = [Path(get_current_settings().results.local_storage_path).expanduser()]
    home = os.environ.get("PLANRUN_HOME")
    return found + ([Path(home)] if home else [])


def file_hits(canaries: Iterable[str], directories: Iterable[Path]) -> list[str]:
    """Every file under ``directories`` whose bytes hold one of ``canaries``."""
    needles = [canary.encode() for canary in canaries]
    hits = []
    for directory in directories:
        for path in directory.rglob("*") if directory.is_dir() else ():
            try:
                data = path.read_bytes() if path.is_file() else b""
                if any(needle in data for needle in needles):
                    hits.append(f"file {path}")
            except OSError:
                continue  # gone while we looked (a WAL file, a temporary)
    return hits


async def prefect_hits(canaries: Iterable[str],
                       skip_blocks: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Every object of the Prefect API whose JSON holds one of ``canaries``."""
    from prefect.client.orchestration import get_client

    hits: list[str] = []
    async with get_client() as client:
        for what, items in (("flow run", await _all(client.read_flow_runs)),
                            ("task run", await _all(client.read_task_runs)),
                            ("log", await _all(client.read_logs)),
                            ("artifact", await _all(client.read_artifacts)),
                            ("variable", await client.read_variables()),
                            ("block", await _blocks(client, skip_blocks))):
            hits += [f"{what}: {_excerpt(text, canary)}"
                     for text in map(_json, items) for canary in canaries if canary in text]
        hits += [f"event: {_excerpt(text, canary)}"
                 for text in map(_json, await events(client.api_url))
                 for canary in canaries if canary in text]
    return hits


async def events(api_url: Any, days: float = 1) -> list[dict[str, Any]]:
    """Every event of the last ``days`` from ``POST /api/events/filter``, page by page."""
    now = datetime.now(UTC)
    body = {"filter": {"occurred": {"since": (now - timedelta(days=days)).isoformat(),
                                    "until": (now + timedelta(minutes=5)).isoformat()}},
            "limit": 50}  # the most the API gives a page
    found: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=str(api_url).rstrip("/") + "/", timeout=30) as http:
        page = (await http.post("events/filter", json=body)).raise_for_status().json()
        while True:
            found += page["events"]
            if not page.get("next_page"):
                return found
            page = (await http.get(page["next_page"])).raise_for_status().json()


async def _all(read: Any) -> list[Any]:
    items: list[Any] = []
    while True:
        page = await read(limit=PAGE, offset=len(items))
        items += page
        if len(page) < PAGE:
            return items


async def _blocks(client: Any, skip: set[str]) -> list[Any]:
    documents = await client.read_block_documents(include_secrets=True)
    return [d for d in documents if d.name not in skip]


def _json(item: Any) -> str:
    if hasattr(item, "model_dump_json"):
        return str(item.model_dump_json())
    return json.dumps(item, default=str)


def _excerpt(text: str, canary: str) -> str:
    at = text.index(canary)
    return text[max(at - 80, 0):at + len(canary) + 40]
