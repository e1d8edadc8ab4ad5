"""Each finished step of a run, kept where a later process of the same run finds it.

A run's flow body starts again from the top when a paused run is resumed, when a run
waits for an approval, and when a crashed run is recovered: each time in a new process.
Steps that had finished (completed, failed, skipped) are restored from their checkpoint
and not executed again; only a step that was in flight runs a second time.

A checkpoint is the step's record (status, attempts, times, input, output, error, reason,
its Prefect task run's id) as JSON in Prefect's default result storage (local files under
``~/.prefect/storage`` by default; shared storage when Prefect is configured with it) under the key
``planrun-<run id>-<step id>``. The key is the plan run's and the step's, not Prefect's
default cache key, which includes the flow run id and the task's inputs. It is written
before the step's finish is announced, so nothing announced as finished is run again.
A checkpoint that was written but cannot be read back (a storage error, or data that does
not validate) stops the run (``CheckpointUnreadable``) instead of running its step again.
In local storage a checkpoint is written whole or not at all (a new file renamed over the
old one), in the event loop: a small file costs less than a hop to a worker thread.

A run that had ended and whose flow body starts again under a new retry request (the
``planrun.retry`` label that ``planrun retry`` and the bridge's ``/retry`` set before they
schedule the flow run again; docs/retry.md) is retried: it restores its completed steps,
and runs the failed, skipped and cancelled ones again. A start after the end without a new
request (a recovery of a run that crashed just after it ended) restores every step and
ends as it had. Each checkpoint names the retry that kept it, so a step that failed before a
retry is not restored after it (when the retry is resumed or recovered), while one that
failed in it is.

The nonce of each approval gate's latest asking is kept here too
(``planrun-gate-<run id>-<step id>``): a place no step can write (docs/approvals.md).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from planrun.contract.checkpoint import GateCheckpoint, RunCheckpoint, StepCheckpoint
from planrun.contract.status import StepStatus
from planrun.errors import CheckpointUnreadable, PlanrunError
from planrun.redact import Redactor
from planrun.report import StepRecord

log = logging.getLogger("planrun.checkpoints")

def key(run_id: str, step_id: str) -> str:
    return f"planrun-{run_id}-{step_id}"


def gate_key(run_id: str, step_id: str) -> str:
    """Where the nonce of a step's gate is kept (``planrun-gate-``: never a step's key, as
    run ids are UUIDs)."""
    return f"planrun-gate-{run_id}-{step_id}"


def to_data(record: StepRecord) -> dict[str, Any]:
    """The checkpoint of ``record`` as JSON data (``planrun.contract.checkpoint``)."""
    return record.to_checkpoint().model_dump(mode="json")


class Checkpoints:
    """The checkpoints of one run, as JSON files in Prefect's default result storage."""

    def __init__(self, run_id: str, redactor: Redactor | None = None) -> None:
        self.run_id = run_id
        self.redactor = redactor or Redactor()  # the run's secrets never reach storage
        self._storage: Any = None
        self._run = RunCheckpoint(segment=0)
        #: This start of the flow body is the first of a retry (the run had ended).
        self.retrying = False

    @property
    def retry(self) -> int:
        """How many times the run has been retried (0: never)."""
        return self._run.retry

    async def begin(self, retry_request: Callable[[], Awaitable[str | None]]) -> int:
        """Count this start of the run's flow body (1 on the first): the run's own
        checkpoint keeps the count, as Prefect's ``run_count`` stays 1 across a resume.
        A start after the run had ended, under a retry request (``retry_request()``, asked
        only then) it has not taken yet, begins a retry (``retrying``)."""
        found = await self._read(self._name)
        last = RunCheckpoint.read(found) if found else RunCheckpoint(segment=0)
        request = await retry_request() if last.ended else None
        self.retrying = request is not None and request != last.request
        self._run = RunCheckpoint(segment=last.segment + 1, ended=last.ended and not self.retrying,
                                  retry=last.retry + self.retrying,
                                  request=request if self.retrying else last.request)
        await self._write(self._name, self._run.model_dump(mode="json"))
        return self._run.segment

    async def end(self) -> None:
        """Keep that the run has ended: a later start of its flow body is a retry."""
        self._run = self._run.model_copy(update={"ended": True})
        await self._write(self._name, self._run.model_dump(mode="json"))

    @property
    def _name(self) -> str:
        return f"planrun-{self.run_id}"

    async def save(self, record: StepRecord) -> None:
        """Keep ``record`` if it is a finished state worth keeping."""
        if record.status.kept:  # a cancelled step ran only partly: it runs again
            await self._write(key(self.run_id, record.id), self._data(record))

    def saved_at_once(self, record: StepRecord) -> bool:
        """``save`` without a wait, when the storage is a local directory (Prefect's
        default): nothing can then cut the write short, and it costs the step no turn of
        the event loop. False, having kept nothing, when ``save`` must be awaited."""
        if not record.status.kept:
            return True
        return self._written_here(key(self.run_id, record.id), self._data(record))

    def _data(self, record: StepRecord) -> dict[str, Any]:
        data = to_data(record) | {"retry": self.retry}
        masked: dict[str, Any] = self.redactor.mask(data)
        return masked

    async def load(self, records: dict[str, StepRecord]) -> list[str]:
        """Restore every step of ``records`` that has a checkpoint (after a retry: every
        completed step, and the others only if this retry kept them); the ids restored.

        A checkpoint never written is not an error. One that exists but cannot be read or
        does not validate raises ``CheckpointUnreadable`` naming its step: the step may
        have completed, and running it again could repeat what it did.
        """
        async def one(step_id: str) -> str | None:
            try:
                found = await self._read(key(self.run_id, step_id))
                if found is None:
                    return None
                kept = StepCheckpoint.read(found)
                if kept.status != StepStatus.COMPLETED and kept.retry < self.retry:
                    return None  # it finished without success before a retry: it runs again
                records[step_id].restore(kept)
            except CheckpointUnreadable as exc:
                raise CheckpointUnreadable(exc.reason, step_id) from exc
            except (PlanrunError, LookupError, TypeError, ValueError) as exc:
                raise CheckpointUnreadable(str(exc) or type(exc).__name__, step_id) from exc
            return step_id

        restored = await asyncio.gather(*(one(sid) for sid in records))
        return [sid for sid in restored if sid is not None]

    async def save_asking(self, step_id: str, nonce: str) -> None:
        """Keep the nonce of the step's gate as it is asked now; it replaces the one of any
        earlier asking, whose answers then no longer count (docs/approvals.md)."""
        await self._write(gate_key(self.run_id, step_id),
                          GateCheckpoint(nonce=nonce).model_dump(mode="json"))

    async def asking(self, step_id: str) -> str | None:
        """The nonce of the step's gate as last asked; None if it never was (or the asking
        was forgotten)."""
        found = await self._read(gate_key(self.run_id, step_id))
        return (GateCheckpoint.read(found).nonce or None) if found else None

    async def forget_asking(self, step_id: str) -> None:
        """Forget the step's gate's last asking: no answer to it counts any more, and the
        gate is asked anew (a retry asks again at a gate it had skipped)."""
        await self.save_asking(step_id, "")

    async def _storage_block(self) -> Any:
        if self._storage is None:
            from prefect.results import aget_default_result_storage

            self._storage = await aget_default_result_storage()
        return self._storage

    async def _write(self, name: str, data: dict[str, Any]) -> None:
        block = await self._storage_block()
        if not self._written_here(name, data):
            await _call(block, "write_path", name, json.dumps(data, default=str).encode())

    def _written_here(self, name: str, data: dict[str, Any]) -> bool:
        """Write ``data`` under ``name`` if the storage, already known, is a local
        directory; whether it was."""
        from prefect.filesystems import LocalFileSystem

        block = self._storage
        if not isinstance(block, LocalFileSystem):
            return False
        _replace(Path(block.basepath or ".").expanduser() / name,
                 json.dumps(data, default=str).encode())
        return True

    async def _read(self, name: str) -> dict[str, Any] | None:
        """The JSON object kept under ``name``; None if nothing was ever written there."""
        try:
            content = await _call(await self._storage_block(), "read_path", name)
        except Exception as exc:  # noqa: BLE001 - each storage has its own errors
            if _missing(exc):
                return None
            raise CheckpointUnreadable(f"{type(exc).__name__}: {exc}") from exc
        try:
            data = json.loads(content)
        except ValueError as exc:  # cut short by a crash, or overwritten by something else
            raise CheckpointUnreadable(f"not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CheckpointUnreadable(f"not a JSON object but {type(data).__name__}")
        return data


def _missing(exc: Exception) -> bool:
    """Whether a storage's read error says only that nothing is there: each storage says
    so its own way (Prefect's local storage: a ValueError "… does not exist"; fsspec:
    FileNotFoundError; cloud SDKs: a NotFound / NoSuchKey error)."""
    if isinstance(exc, FileNotFoundError):
        return True
    name = type(exc).__name__
    return "NotFound" in name or "NoSuchKey" in name or "does not exist" in str(exc)


def _replace(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` whole: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


async def _call(block: Any, method: str, *args: Any) -> Any:
    """A storage block's method: its explicit async form (``awrite_path``) when it has one."""
    found = getattr(block, f"a{method}", None) or getattr(block, method)
    result = found(*args)
    return await result if inspect.isawaitable(result) else result

