"""Reading checkpoints back (flows.checkpoints) from a storage block that fails on purpose:
a checkpoint never written is not an error; one that cannot be read stops the run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from planrun.contract.status import StepStatus
from planrun.errors import CheckpointUnreadable
from planrun.flows.checkpoints import Checkpoints, key
from planrun.report import StepRecord


class Storage:
    """A storage block: files by name, or the error a read of a name raises."""

    def __init__(self, files: dict[str, bytes], errors: dict[str, Exception]) -> None:
        self.files, self.errors = files, errors

    async def read_path(self, name: str) -> bytes:
        if name in self.errors:
            raise self.errors[name]
        if name not in self.files:
            raise ValueError(f"Path /storage/{name} does not exist.")
        return self.files[name]


def load(files: dict[str, bytes], errors: dict[str, Exception] | None = None
         ) -> tuple[list[str], dict[str, StepRecord]]:
    store = Checkpoints("r")
    store._storage = Storage({key("r", k): v for k, v in files.items()},
                             {key("r", k): v for k, v in (errors or {}).items()})
    records = {sid: StepRecord(id=sid, tool="core.echo") for sid in ("a", "b")}
    return asyncio.run(store.load(records)), records


def saved(status: str) -> bytes:
    return json.dumps({"status": status, "attempts": 1}).encode()


def test_a_checkpoint_never_written_is_not_an_error() -> None:
    restored, records = load({"a": saved("completed")})
    assert restored == ["a"]
    assert records["a"].status == StepStatus.COMPLETED
    assert records["b"].status == StepStatus.PENDING


@pytest.mark.parametrize(("files", "errors", "why"), [
    ({}, {"b": PermissionError(13, "Permission denied")},
     "PermissionError: [Errno 13] Permission denied"),
    ({"b": b'{"status": "compl'}, {}, "not JSON"),
    ({"b": b'["completed"]'}, {}, "not a JSON object but list"),
    ({"b": b'{"status": "finished-ish"}'}, {}, "status"),
])


def test_a_checkpoint_that_cannot_be_read_names_its_step(
        files: dict[str, bytes], errors: dict[str, Exception], why: str) -> None:
    with pytest.raises(CheckpointUnreadable) as caught:
        load({"a": saved("completed"), **files}, errors)
    assert caught.value.step_id == "b"
    message = str(caught.value)
    assert message.startswith("cannot read the checkpoint of step b: ")
    assert why.lower() in message.lower()
    assert message.endswith("; the run stops so that a completed step is not run twice")


def test_a_storage_saying_not_found_its_own_way_is_a_missing_checkpoint() -> None:
    class NoSuchKey(Exception):
        pass

    restored, _ = load({}, {"a": FileNotFoundError("gone"), "b": NoSuchKey("b")})
    assert restored == []


def test_a_local_checkpoint_is_replaced_whole_and_read_back(tmp_path: Path) -> None:
    """Prefect's local storage: written in place of the old file (never truncated first,
    so a crash leaves one or the other), leaving nothing else beside it."""
    from prefect.filesystems import LocalFileSystem

    store = Checkpoints("r")
    store._storage = LocalFileSystem(basepath=str(tmp_path))
    record = StepRecord(id="a", tool="core.echo", status=StepStatus.FAILED, attempts=1)

    async def go() -> dict[str, StepRecord]:
        await store.save(record)
        first = (tmp_path / key("r", "a")).read_bytes()
        record.status, record.attempts = StepStatus.COMPLETED, 2
        await store.save(record)
        assert (tmp_path / key("r", "a")).read_bytes() != first
        records = {"a": StepRecord(id="a", tool="core.echo")}
        await store.load(records)
        return records

    records = asyncio.run(go())
    assert records["a"].status == StepStatus.COMPLETED and records["a"].attempts == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [key("r", "a")]


def test_a_checkpoint_in_a_local_directory_is_kept_at_once(tmp_path: Path) -> None:
    """Prefect's default storage, a local directory: a step's checkpoint is written
    without a wait (no turn of the loop, nothing a cancel could cut short) and reads back;
    another storage is left to ``save``, with nothing written."""
    from prefect.filesystems import LocalFileSystem

    store = Checkpoints("r")
    done = StepRecord(id="a", tool="core.echo", status=StepStatus.COMPLETED, output=7)
    assert not store.saved_at_once(done)  # the storage is not known yet
    store._storage = LocalFileSystem(basepath=str(tmp_path))
    assert store.saved_at_once(done)
    assert json.loads((tmp_path / key("r", "a")).read_text())["output"] == 7
    cancelled = StepRecord(id="b", tool="core.echo", status=StepStatus.CANCELLED)
    assert store.saved_at_once(cancelled)  # nothing to keep: a cancelled step runs again
    assert not (tmp_path / key("r", "b")).exists()
    records = {sid: StepRecord(id=sid, tool="core.echo") for sid in ("a", "b")}
    assert asyncio.run(store.load(records)) == ["a"]
    assert records["a"].output == 7

    other = Checkpoints("r")
    other._storage = Storage({}, {})
    assert not other.saved_at_once(done)
