"""Test session set-up: a real Prefect server on SQLite in a temporary planrun home.

The server is started once per session, before anything imports Prefect, and every
test process and CLI subprocess points at it through PREFECT_API_URL. Under pytest-xdist
(``scripts/test`` runs four workers) each worker has its own server and home: two stacks on
one server would serve each other's runs. Set PREFECT_API_URL yourself to run the suite
against another server (then run it without workers).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.stack import Stack, shared, stop_shared

pytest_plugins = ["tests.browser"]  # browser, context, page, prefect_ui_page

ROOT = Path(__file__).resolve().parent.parent
PLANS = Path(__file__).resolve().parent / "plans"
_STARTED: dict[str, object] = {}
#: Modules whose tests drive the whole stack: ``planrun up``, ``planrun`` subprocesses,
#: Chromium, several processes against the Prefect server. Their tests are marked ``slow``,
#: so that ``scripts/test -m "not slow"`` is a fast inner loop of the rest.
FULL_STACK = {
    "tests.test_cli_run", "tests.test_control", "tests.test_examples", "tests.test_restart",
    "tests.test_page_controls",
    "tests.test_server", "tests.test_stack", "tests.test_resources_run",
    "tests.test_retry_runs", "tests.flows.test_breaker_runs", "tests.flows.test_limit_runs",
    "tests.flows.test_prefect_ui_graph", "tests.flows.test_prefect_ui_gate", "tests.test_terminal",
    "tests.test_agent_tools_run", "tests.test_production_stack",
    "tests.progress_bridge.test_guardrail_events", "tests.progress_bridge.test_upstream",
    "tests.progress_bridge.test_view",
    "tests.security.test_bad_input", "tests.security.test_bridge", "tests.security.test_gates",
    "tests.security.test_policy", "tests.security.test_secrets", "tests.security.test_shell",
    "tests.security.test_templates", "tests.security.test_workspace",
    "tests.adapters.test_browser", "tests.test_browser_run",
}


#: The longest modules, in seconds (``scripts/test --durations=0``, summed per module,
#: 2026-12-03, a helper's small benchmark runs beside it for part of the time): they run
#: first, longest first, so that the workers end on short modules together instead of one
#: of them on a long module while the others are idle. Only the order depends on these
#: numbers; a module missing here runs after them.
LONGEST = {
    "tests.test_cli_run": 239, "tests.test_control": 204, "tests.test_retry_runs": 160,
    "tests.test_restart": 156, "tests.flows.test_breaker_runs": 121,
    "tests.flows.test_limit_runs": 97, "tests.test_page_controls": 95,
    "tests.test_examples": 95, "tests.test_terminal": 93, "tests.test_production_stack": 90,
    "tests.security.test_workspace": 85, "tests.adapters.test_browser": 84,
    "tests.test_validate": 64, "tests.test_server": 53, "tests.security.test_secrets": 52,
    "tests.security.test_templates": 52, "tests.test_stack": 51,
    "tests.test_validate_properties": 46, "tests.test_policy": 46,
    "tests.progress_bridge.test_upstream": 34, "tests.security.test_gates": 32,
    "tests.security.test_policy": 31, "tests.security.test_bridge": 31,
    "tests.flows.test_semantics": 31, "tests.test_browser_run": 28,
    "tests.progress_bridge.test_start": 28, "tests.progress_bridge.test_view": 21,
    "tests.flows.test_prefect_ui_gate": 19, "tests.flows.test_prefect_ui_graph": 17,
    "tests.flows.test_limit_store": 17, "tests.security.test_bad_input": 17,
    "tests.test_production": 16, "tests.test_resources_run": 15,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Full-stack modules are marked ``slow``. The longest modules run first, then the
    other full-stack ones, then the rest (``scripts/test`` keeps this order for pytest-xdist:
    ``--no-loadscope-reorder``)."""
    for item in items:
        if _full_stack(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: (-LONGEST.get(_module(item), 0), not _full_stack(item)))


def _module(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else ""


def _full_stack(item: pytest.Item) -> bool:
    return _module(item) in FULL_STACK


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: each worker starts its own server
    home = Path(tempfile.mkdtemp(prefix="planrun-test-home-"))
    os.environ["PLANRUN_HOME"] = str(home)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # `planrun run` goes through the warm run host, as for a user: a quarter of the suite's
    # CPU was runs importing Prefect. A host of an environment whose server is not the
    # session's exits when idle this long (the session's own hosts, when their server stops).
    os.environ.setdefault("PLANRUN_RUN_HOST_IDLE_S", "60")
    _STARTED["home"] = home
    if not os.environ.get("PREFECT_API_URL"):
        from planrun import server

        info = server.start(port=0)  # untraced by coverage.py: server.prefect_env
        _STARTED["pid"] = info.pid
        os.environ["PREFECT_API_URL"] = info.url
    from planrun.server import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """``planrun up`` in the default configuration, shared by the tests of every module
    that asks for it (tests/stack.py ``shared``). A module that needs another
    configuration starts a stack of its own, which stops this one first."""
    return shared(tmp_path_factory)


def pytest_unconfigure(config: pytest.Config) -> None:
    from planrun import server

    stop_shared()  # before the Prefect server it uses

    if "prefect" in sys.modules:  # send buffered logs and events before the server goes
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    pid = _STARTED.get("pid")
    if isinstance(pid, int):
        server.stop_pid(pid)
    home = _STARTED.get("home")
    if isinstance(home, Path):
        shutil.rmtree(home, ignore_errors=True)
