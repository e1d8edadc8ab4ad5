"""The one interface every tool adapter implements.

An adapter validates its parameters (a pydantic model whose JSON Schema is the schema of
the step's ``with:`` block), estimates a duration, executes with a timeout, classifies its
library's errors into planrun's categories and reports its health. ``Adapter.run`` is the
public entry: it enforces validation, the timeout and error translation, so that an
adapter only implements ``execute`` (the core) and ``classify`` (the edge).
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from planrun.adapters.usage import StepUsage
from planrun.errors import ConfigurationError, ResourceError, StepError, TransientError
from planrun.policy import LevelPolicy, Trust, current_trust, load_policy
from planrun.redact import Redactor

if TYPE_CHECKING:
    from planrun.adapters.workspace import Workspace


class Params(BaseModel):
    """Base of every adapter's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=Params)


@dataclass
class StepContext:
    """What an adapter may know about the attempt it runs in.

    ``reduce_usage`` is set when the previous attempt failed with a ``resource`` error:
    the adapter should ask for less (smaller pages, fewer results). ``memory_mb`` is the
    plan's per-step memory limit, if any. ``trust`` is who wrote the plan and ``policy``
    the operator's rules for that trust level (docs/policy.md): adapters check what they
    reach against it where the step executes. ``usage`` takes what the tool measures of
    its own work (a program's process tree, bytes it wrote: docs/resources.md).
    ``redactor`` masks the run's secrets in what a tool publishes itself (an artifact).
    """

    run_id: str
    step_id: str
    workspace: Workspace
    attempt: int = 1
    previous_error: StepError | None = None
    memory_mb: int | None = None
    trust: Trust = field(default_factory=current_trust)
    policy: LevelPolicy = field(default_factory=lambda: load_policy().level(current_trust()))
    logger: logging.Logger | logging.LoggerAdapter[Any] = field(
        default_factory=lambda: logging.getLogger("planrun.step"))
    usage: StepUsage = field(default_factory=StepUsage)
    redactor: Redactor = field(default_factory=Redactor)
    #: The step's Prefect task run, for what a tool attaches to it (an artifact).
    task_run_id: UUID | None = None

    @property
    def reduce_usage(self) -> bool:
        return self.previous_error is not None and self.previous_error.category == "resource"


@dataclass(frozen=True)
class Health:
    """An adapter's own view of whether it can work now."""

    ok: bool
    detail: str = ""


class Adapter(ABC, Generic[P]):
    """A tool: ``name`` is what plans write in ``tool:``; ``Params`` its ``with:`` model."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    summary: ClassVar[str] = ""
    default_estimate_s: ClassVar[float] = 1.0
    #: The timeout when the plan sets none: tools that wait on others should not wait forever.
    default_timeout_s: ClassVar[float | None] = None
    #: Whether the work happens inside planrun's process (the engine then measures it and
    #: watches its memory); False for tools whose work is a program they start and measure.
    in_process: ClassVar[bool] = True

    @classmethod
    def parameter_schema(cls) -> dict[str, Any]:
        """The JSON Schema of this tool's ``with:`` block, generated from ``Params``."""
        schema = cls.Params.model_json_schema()
        schema.setdefault("additionalProperties", False)
        return schema

    def validate(self, params: dict[str, Any]) -> P:
        """Parse ``params`` into the model, or raise ConfigurationError naming each problem."""
        try:
            return self.Params.model_validate(params)  # type: ignore[return-value]
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'with'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigurationError(
                f"invalid parameters for {self.name}: {problems}",
                hint=f"fix the step's 'with:' block; `planrun tools` shows {self.name}'s schema",
            ) from None

    def estimate(self, params: P) -> float:
        """Expected duration in seconds, before any history exists."""
        return self.default_estimate_s

    @abstractmethod
    async def execute(self, params: P, ctx: StepContext) -> Any:
        """Do the work of one attempt and return a JSON-able output."""

    def classify(self, exc: Exception) -> StepError:
        """Translate a library exception that ``execute`` let escape into a StepError."""
        if isinstance(exc, PermissionError):
            from planrun.errors import AccessError

            return AccessError(str(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return TransientError(f"{type(exc).__name__}: {exc}")
        return TransientError(
            f"{self.name} failed unexpectedly: {type(exc).__name__}: {exc}",
            hint="an unexpected error in the tool; it was retried - report it if it persists",
        )

    def _within_ceiling(self, output: Any, ceiling: int | None) -> Any:
        """``output``, unless its JSON is larger than the policy's ``output_bytes`` ceiling
        (docs/policy.md): a plan cannot make a tool hand back more than the operator allows."""
        if ceiling is None:
            return output
        size = len(json.dumps(output, default=str).encode())
        if size > ceiling:
            raise ResourceError(
                f"{self.name} returned {size} bytes, over the policy's output ceiling of "
                f"{ceiling} bytes",
                hint="ask the tool for less (fewer results, a smaller page, max_output_bytes),"
                     " or ask the operator to raise output_bytes")
        return output

    def call_host(self, params: Mapping[str, Any]) -> str | None:
        """The host a call with ``params`` reaches, for the operator's per-host limits
        (docs/limits.md); None when the tool reaches no host of its own choosing."""
        return None

    async def refresh_credentials(self) -> None:
        """Called before retrying a ``permission`` error; adapters with tokens renew them."""

    async def health(self) -> Health:
        """Whether the tool can work now (binary present, service reachable...)."""
        return Health(ok=True)

    async def run(self, raw: dict[str, Any], ctx: StepContext, timeout: float | None) -> Any:
        """Validate ``raw``, execute within ``timeout`` seconds and translate errors.

        Cancellation (a critical failure elsewhere, a person cancelling) propagates as
        ``asyncio.CancelledError``; ``execute`` must release what it holds on it.
        """
        params = self.validate(raw)
        timeout = timeout if timeout is not None else self.default_timeout_s
        try:
            async with asyncio.timeout(timeout) as scope:
                output = await self.execute(params, ctx)
            return self._within_ceiling(output, ctx.policy.ceilings.output_bytes)
        except StepError:
            raise
        except TimeoutError as exc:
            if scope.expired():
                raise TransientError(
                    f"{self.name} did not finish within its timeout of {timeout:g}s",
                    hint="the step was stopped; raise its 'timeout:' if the work needs longer",
                ) from exc
            raise self.classify(exc) from exc
        except Exception as exc:  # noqa: BLE001 - the edge: every library error is translated
            raise self.classify(exc) from exc
