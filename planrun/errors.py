"""Every planrun error, in one tree.

    PlanrunError                  base of everything planrun raises on purpose
     ├── PlanInvalid              a plan (or its inputs) failed validation; carries every Problem
     ├── UsageError               the command line or API was used wrongly
     ├── PolicyInvalid            the operator's policy file is malformed (never "allow all")
     ├── UnknownTool              no adapter has this tool name (lists the known ones)
     ├── DuplicateTool            two adapters claim the same tool name
     ├── ContractError            data one layer wrote for another does not validate
     │                            (another contract version, a missing field: docs/run-report.md)
     ├── CheckpointUnreadable     a step's checkpoint exists but cannot be read: the run stops
     ├── NotFound                 no such run (or not a planrun run): HTTP 404
     ├── Conflict                 the run's state does not allow this control now: HTTP 409
     ├── LimitStoreUnusable       the limits' shared database cannot be used: calls go unlimited
     └── StepError                one attempt of a step failed; carries category, hint,
          │                       step_id, tool and retry_after as fields
          ├── TransientError      timeout, connection reset, HTTP 5xx       → retried with backoff
          ├── ConfigurationError  bad parameter, missing binary, HTTP 400   → not retried
          ├── AccessError         HTTP 401/403, EACCES                       → one retry
          ├── ResourceError       HTTP 429, out of memory, disk full        → retried, use less
          └── LogicError          contradictory request, non-zero exit      → not retried

Adapters translate their libraries' exceptions into a StepError subclass at the edge,
most specific first, with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar


class Category(StrEnum):
    """The five error categories (docs/errors.md); each has a default retry policy."""

    TRANSIENT = "transient"
    CONFIGURATION = "configuration"
    PERMISSION = "permission"
    RESOURCE = "resource"
    LOGIC = "logic"


DEFAULT_HINTS: dict[Category, str] = {
    Category.TRANSIENT: "a temporary problem; it was retried with backoff - try again later",
    Category.CONFIGURATION: "correct the step's parameters or the tool's configuration",
    Category.PERMISSION: "check the credentials and permissions the tool uses",
    Category.RESOURCE: "the tool ran out of a resource or was rate limited; "
    "ask for less or wait before trying again",
    Category.LOGIC: "the request cannot succeed as written; change what the step asks for",
}


class PlanrunError(Exception):
    """Base class of every error planrun raises on purpose."""


@dataclass(frozen=True, order=True)
class Problem:
    """One validation problem, located in the plan file.

    ``path`` is the location inside the plan (``steps[2].with.url``); ``line`` and
    ``column`` are 1-based positions in the file, 0 when unknown.
    """

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"


class PlanInvalid(PlanrunError):
    """A plan failed validation; ``problems`` holds every problem found, sorted."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(PlanrunError):
    """The command line or the API was used wrongly (bad --input, missing file...)."""


class PolicyInvalid(PlanrunError):
    """The operator's policy file cannot be used; ``problems`` are ``file:line:col: path:
    message`` lines. Nothing runs under a policy that could not be read."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(f"the policy {file} is not valid (docs/policy.md):\n"
                         + "\n".join(problems))


class UnknownTool(PlanrunError):
    """No adapter is registered under ``tool``; ``known`` lists the ones that are."""

    def __init__(self, tool: str, known: list[str]) -> None:
        self.tool = tool
        self.known = known
        super().__init__(f"unknown tool '{tool}'; known tools: {', '.join(known)}")


class DuplicateTool(PlanrunError):
    """Two adapters were registered under the same tool name."""

    def __init__(self, tool: str, first: str, second: str) -> None:
        self.tool = tool
        super().__init__(f"tool '{tool}' is registered twice: by {first} and by {second}")


class ContractError(PlanrunError):
    """Data one layer wrote for another (an event payload, a checkpoint, a saved view) is
    not what the contract of ``planrun.contract`` says: the message names the model, the
    field and why, or the two contract versions."""


class CheckpointUnreadable(PlanrunError):
    """A checkpoint was written but cannot be read back (a storage error) or does not
    validate. The run stops rather than run a finished step (a ``shell.run``, a
    ``file.write``) a second time. ``step_id`` names the step (None for the run's own
    checkpoint); ``reason`` says what went wrong."""

    def __init__(self, reason: str, step_id: str | None = None) -> None:
        self.reason = reason
        self.step_id = step_id
        what = f"the checkpoint of step {step_id}" if step_id else "the run's checkpoint"
        super().__init__(f"cannot read {what}: {reason}; the run stops so that a completed "
                         "step is not run twice")


class NotFound(PlanrunError):
    """No run by that id, or it is not a planrun run; the message says which."""


class LimitStoreUnusable(PlanrunError):
    """The limits' shared store (its PostgreSQL database) cannot be used now: down, full,
    refusing the login. The limiter lets the call go unlimited with a warning (limits never
    stop a run for their own failure). The message names the server, never its password."""


class Conflict(PlanrunError):
    """A control (pause, resume, cancel, an answer) the run's state does not allow now;
    ``reason`` says why, for a person."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StepError(PlanrunError):
    """One attempt of a step failed.

    What the raiser knows travels as fields: ``category`` picks the retry policy,
    ``hint`` tells a person what to do, ``retry_after`` (seconds) is a server's request
    to wait, ``details`` is extra data for the run report.
    """

    category: ClassVar[Category] = Category.LOGIC

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        retry_after: float | None = None,
        step_id: str | None = None,
        tool: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or DEFAULT_HINTS[self.category]
        self.retry_after = retry_after
        self.step_id = step_id
        self.tool = tool
        self.details = details or {}

    def to_report(self) -> dict[str, Any]:
        """The ``error`` object of the run report; ``details`` only when the tool gave some."""
        report: dict[str, Any] = {"category": str(self.category), "message": self.message,
                                  "hint": self.hint}
        if self.details:
            report["details"] = self.details
        return report

    def __reduce__(self) -> Any:
        # Prefect may pickle exceptions with task states; keep the fields across it.
        return (
            _rebuild_step_error,
            (type(self), self.message, self.hint, self.retry_after, self.step_id,
             self.tool, self.details),
        )


def _rebuild_step_error(cls: type[StepError], message: str, hint: str | None,
                        retry_after: float | None, step_id: str | None, tool: str | None,
                        details: dict[str, Any]) -> StepError:
    return cls(message, hint=hint, retry_after=retry_after, step_id=step_id, tool=tool,
               details=details)


class TransientError(StepError):
    """A temporary failure: timeout, connection reset, HTTP 5xx."""

    category = Category.TRANSIENT


class ConfigurationError(StepError):
    """A bad parameter, a missing binary, HTTP 400/404: the user must correct something."""

    category = Category.CONFIGURATION


class AccessError(StepError):
    """Credentials or permissions were refused: HTTP 401/403, EACCES."""

    category = Category.PERMISSION


class ResourceError(StepError):
    """Out of a resource or rate limited: HTTP 429, out of memory, disk full."""

    category = Category.RESOURCE


class LogicError(StepError):
    """The request cannot succeed as written: a contradiction, a command's non-zero exit."""

    category = Category.LOGIC


ERROR_CLASSES: dict[Category, type[StepError]] = {
    Category.TRANSIENT: TransientError,
    Category.CONFIGURATION: ConfigurationError,
    Category.PERMISSION: AccessError,
    Category.RESOURCE: ResourceError,
    Category.LOGIC: LogicError,
}


def step_error(category: Category | str, message: str, **fields: Any) -> StepError:
    """Build the StepError subclass of ``category``."""
    return ERROR_CLASSES[Category(category)](message, **fields)
