"""No tracebacks on bad input (issue 8, item 8): what ``planrun validate`` and
``planrun run`` show for each reported case, and the bridge's answer to it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import cli
from tests.progress_bridge.conftest import ServedBridge

SELF_REF = """\
version: 1
name: self-ref
inputs: {x: {"$ref": "#"}}
steps:
  - {id: a, tool: core.echo, with: {value: hi}}
"""


def refused(proc: object, *words: str) -> str:
    """Assert a clean refusal (exit 2, no traceback, every word shown); the message."""
    stderr, stdout, code = proc.stderr, proc.stdout, proc.returncode  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stdout, stderr)
    shown = stdout + stderr
    for word in words:
        assert word in shown, shown
    return str(shown)


def test_an_input_that_refers_to_itself_is_a_validation_problem(tmp_path: Path) -> None:
    plan = tmp_path / "self-ref.yaml"
    plan.write_text(SELF_REF, encoding="utf-8")
    refused(cli("validate", str(plan)), "self-ref.yaml:3:", "inputs.x",
            "$ref leads back to itself")
    refused(cli("run", str(plan), "--json"), "$ref leads back to itself")


def test_dev_zero_is_refused_after_reading_no_more_than_a_plan_may_hold() -> None:
    started = time.monotonic()
    refused(cli("validate", "/dev/zero", timeout=60), "/dev/zero:1:1: plan: the file is more "
            "than 5242880 bytes; a plan may be at most 5242880 bytes")
    assert time.monotonic() - started < 30


def test_a_huge_file_is_refused_without_being_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as sparse:
        sparse.truncate(50 * 1024 ** 3)  # 50 GB of holes: reading it would take minutes
    refused(cli("validate", str(huge), timeout=60), "the file is 53687091200 bytes")


def test_a_named_pipe_without_a_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    refused(cli("validate", str(fifo), timeout=60), "plan.fifo:1:1: plan:")


def test_a_named_pipe_that_never_ends_is_cut_at_the_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "endless.fifo"
    os.mkfifo(fifo)
    stop = threading.Event()
    # Opened for reading and writing, the pipe has a writer before planrun opens it.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)

    def feed() -> None:
        chunk = b"# endless\n" * 10_000
        while not stop.is_set():
            try:
                os.write(fd, chunk)
            except BlockingIOError:  # full until planrun reads; wait on its reading
                stop.wait(0.001)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        refused(cli("validate", str(fifo), timeout=60), "the file is more than 5242880 bytes")
    finally:
        stop.set()
        feeder.join(10)
        os.close(fd)


def test_a_directory_is_refused_with_a_message(tmp_path: Path) -> None:
    refused(cli("validate", str(tmp_path)), "cannot read the file: it is a directory")


@pytest.fixture
def bridge(tmp_path: Path) -> object:
    served = ServedBridge(tmp_path).start()
    yield served
    served.stop()


@pytest.mark.parametrize("plan", [
    SELF_REF,
    {"version": 1, "name": "self-ref", "inputs": {"x": {"$ref": "#"}},
     "steps": [{"id": "a", "tool": "core.echo", "with": {"value": "hi"}}]},
    SELF_REF.replace("value: hi", 'value: "{{ \'x\'|center(10**9) }}{{ 1.a }}"'),
], ids=["yaml-text", "object", "with-template"])
def test_the_bridge_answers_a_self_referring_input_with_422(bridge: ServedBridge,
                                                            plan: object) -> None:
    answer = httpx.post(f"{bridge.http}/v1/runs", json={"plan": plan}, headers=bridge.auth,
                        timeout=30)
    assert answer.status_code == 422, answer.text
    messages = [e["message"] for e in answer.json()["errors"]]
    assert any("$ref leads back to itself" in m for m in messages), messages
