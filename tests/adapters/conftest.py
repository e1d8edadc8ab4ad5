"""Fixtures shared by the adapter tests: a real workspace and a step context on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A workspace rooted at ``tmp_path/ws`` with its backups in ``tmp_path/backups``."""
    return Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")


@pytest.fixture
def make_ctx(ws: Workspace) -> Callable[..., StepContext]:
    """A factory of step contexts on ``ws``; keyword arguments set StepContext fields."""
    def make(**fields: object) -> StepContext:
        return StepContext(**{"run_id": "r", "step_id": "s", "workspace": ws, **fields})  # type: ignore[arg-type]
    return make


@pytest.fixture
def ctx(make_ctx: Callable[..., StepContext]) -> StepContext:
    return make_ctx()


def _wait_until(condition: Callable[[], bool], within: float = 5.0,
                what: str = "the condition") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {within}s")
        time.sleep(0.02)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """``wait_until(condition, within=5.0, what=...)``: poll until it holds, else fail."""
    return _wait_until
