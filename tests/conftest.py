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
    "tests.test_page_controls", "tests.test_run_host",
    "tests.test_server", "tests.test_stack", "tests.test_resources_run",
    "tests.test_retry_runs", "tests.flows.test_breaker_runs", "tests.flows.test_limit_runs",
    "tests.flows.test_prefect_ui_graph", "tests.flows.test_prefect_ui_gate", "tests.test_terminal",
    "tests.test_agent_tools_run", "tests.test_production_stack", "tests.test_loop_runner",
    "tests.progress_bridge.test_guardrail_events", "tests.progress_bridge.test_upstream",
    "tests.progress_bridge.test_view",
    "tests.security.test_bad_input", "tests.security.test_bridge", "tests.security.test_gates",
    "tests.security.test_policy", "tests.security.test_secrets", "tests.security.test_shell",
    "tests.security.test_templates", "tests.security.test_workspace",
    "tests.adapters.test_browser", "tests.test_browser_run",
}


#: The longest modules, in seconds (each test's wall time summed per module, 2026-12-04,
#: ``scripts/test`` beside a one-core busy loop): they run first, longest first, so that the
#: workers end on short modules together instead of one of them on a long module while the
#: others are idle. Only the order depends on these numbers; a module missing here runs
#: after them.
LONGEST = {
    "tests.test_control": 184, "tests.test_retry_runs": 115, "tests.test_restart": 106,
    "tests.test_validate": 96, "tests.adapters.test_browser": 77,
    "tests.test_production_stack": 76, "tests.test_server": 70, "tests.test_cli_run": 67,
    "tests.test_page_controls": 67, "tests.test_run_host": 64,
    "tests.flows.test_breaker_runs": 61, "tests.test_terminal": 58, "tests.test_stack": 57,
    "tests.flows.test_limit_runs": 50, "tests.security.test_secrets": 44,
    "tests.security.test_bridge": 43, "tests.security.test_workspace": 43,
    "tests.test_examples": 41, "tests.progress_bridge.test_upstream": 38,
    "tests.flows.test_semantics": 31, "tests.test_policy": 31,
    "tests.progress_bridge.test_start": 31, "tests.test_validate_properties": 30,
    "tests.flows.test_limit_store": 29, "tests.flows.test_prefect_ui_gate": 25,
    "tests.security.test_gates": 22, "tests.security.test_policy": 20,
    "tests.test_production": 20, "tests.progress_bridge.test_view": 19,
    "tests.security.test_templates": 16, "tests.test_browser_run": 15,
    "tests.security.test_bad_input": 14,
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
