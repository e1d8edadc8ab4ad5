"""A run's secrets: inputs declared ``secret: true`` and ``{{ secrets.NAME }}``.

Where they come from (docs/secrets.md):

- ``{{ secrets.NAME }}`` reads the Prefect Secret block ``NAME`` (lower-case, ``_`` as
  ``-``), else the environment variable ``PLANRUN_SECRET_NAME`` (upper-case) of the
  process that runs the plan; nothing else of the environment. A secret that is neither
  fails the step that reads it (``configuration``), not the plan's validation.
- A secret input never becomes a flow-run parameter: the parameter is a reference,
  ``{"$secret": "planrun-input-<hex>"}`` (a Secret block the bridge made for the run,
  deleted when the run ends) or ``{"$secret": "local:<hex>"}`` (a value ``planrun run``
  holds in its own memory, :func:`held_inputs`).

Every value is resolved where the run executes and registered in the run's
:class:`~planrun.redact.Redactor`, so it is masked wherever it would be shown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from planrun import templates
from planrun.errors import UsageError
from planrun.plan_schemas.model import Plan
from planrun.redact import Redactor, watch_logs

REF_KEY = "$secret"
ENV_PREFIX = "PLANRUN_SECRET_"
INPUT_BLOCK_PREFIX = "planrun-input-"
LOCAL_PREFIX = "local:"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_INPUT_BLOCK = re.compile(r"^planrun-input-[0-9a-f]{32}$")
_LOCAL = re.compile(r"^local:[0-9a-f]{32}$")

#: Secret inputs of ``planrun run``, by reference: in this process's memory only.
_HELD: ContextVar[Mapping[str, Any] | None] = ContextVar("planrun_held_secrets", default=None)


# -- what a plan declares ----------------------------------------------------------------

def secret_input_names(specs: Mapping[str, Any]) -> list[str]:
    """The inputs of ``specs`` (a plan's ``inputs``) declared ``secret: true``."""
    return [name for name, spec in specs.items()
            if isinstance(spec, Mapping) and spec.get("secret") is True]


def definition_problem(spec: Mapping[str, Any]) -> str | None:
    """What is wrong with an input definition's ``secret``, if anything."""
    secret = spec.get("secret", False)
    if not isinstance(secret, bool):
        return "'secret' is true or false"
    if secret and "default" in spec:
        return ("a secret input cannot have a default (a plan is no place for a secret); "
                "pass it when running, or read it with {{ secrets.NAME }}")
    return None


def name_problem(name: str) -> str | None:
    """What is wrong with ``secrets.NAME``'s name, if anything."""
    if not _NAME.match(name):
        return (f"secrets.{name}: a secret's name is a letter, then letters, digits or _ "
                "(at most 63)")
    if block_name(name).startswith(INPUT_BLOCK_PREFIX):
        return f"secrets.{name}: names starting planrun_input are the inputs of other runs"
    return None


def block_name(name: str) -> str:
    """The Prefect Secret block ``secrets.NAME`` reads."""
    return name.lower().replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable ``secrets.NAME`` reads when there is no block."""
    return ENV_PREFIX + name.upper()


def referenced_names(plan: Plan) -> set[str]:
    """Every ``secrets.NAME`` the plan's templates read (validation refused the rest)."""
    texts: list[str] = []
    for step in plan.steps:
        texts += [text for _, text in templates.strings(step.with_)]
        if isinstance(step.when, str):
            texts.append(templates.condition(step.when))
        if step.fallback is not None:
            texts += [text for _, text in templates.strings(step.fallback.with_)]
    names = set()
    for text in texts:
        refs, _ = templates.references(text)
        names |= {r.name for r in refs if r.root == "secrets" and r.name != templates.DYNAMIC}
    return names


# -- secret inputs as references ---------------------------------------------------------

def reference_of(value: Any) -> str | None:
    """The name in ``{"$secret": name}``; None for any other value."""
    if isinstance(value, Mapping) and list(value) == [REF_KEY] \
            and isinstance(value[REF_KEY], str):
        return value[REF_KEY]
    return None


@contextlib.contextmanager
def held_inputs(specs: Mapping[str, Any], inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``inputs`` with each secret one replaced by a ``local:`` reference, whose value this
    process holds (in a context variable) until the block ends."""
    held, params = dict(_HELD.get() or {}), dict(inputs)
    for name in secret_input_names(specs):
        if name in params:
            ref = LOCAL_PREFIX + uuid.uuid4().hex
            held[ref], params[name] = params[name], {REF_KEY: ref}
    token = _HELD.set(held)
    try:
        yield params
    finally:
        _HELD.reset(token)


async def stored_inputs(specs: Mapping[str, Any],
                        inputs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``inputs`` with each secret one stored in a new Prefect Secret block and replaced by
    its reference; and the blocks' names (for :func:`forget` if the run never starts)."""
    from prefect.blocks.system import Secret

    params, blocks = dict(inputs), []
    try:
        for name in secret_input_names(specs):
            if name in params:
                block = INPUT_BLOCK_PREFIX + uuid.uuid4().hex
                stored: Any = Secret(value=json.dumps(params[name]))  # type: ignore[arg-type]
                await stored.asave(block)
                blocks.append(block)
                params[name] = {REF_KEY: block}
    except BaseException:
        await forget(blocks)
        raise
    return params, blocks


def input_blocks(inputs: Any) -> list[str]:
    """The Secret blocks the references in ``inputs`` name: the run deletes them at its end."""
    refs = (reference_of(value) for value in (inputs.values() if isinstance(inputs, dict) else ()))
    return [ref for ref in refs if ref is not None and _INPUT_BLOCK.match(ref)]


async def forget(blocks: list[str]) -> None:
    """Delete the secret inputs' blocks (ones already gone are fine)."""
    from prefect.blocks.system import Secret

    for block in blocks:
        with contextlib.suppress(Exception):  # gone already, or the API is: nothing to keep
            await Secret.adelete(block)  # type: ignore[misc]


async def _input_value(name: str, ref: str) -> Any:
    if _LOCAL.match(ref):
        held = _HELD.get() or {}
        if ref not in held:
            raise UsageError(f"secret input '{name}' is held by another process; pass it "
                             "again to run the plan")
        return held[ref]
    if not _INPUT_BLOCK.match(ref):
        raise UsageError(f"secret input '{name}': {REF_KEY} must name a planrun-input-… "
                         "block made for this run")
    raw = await _block_value(ref)
    if raw is None:
        raise UsageError(f"secret input '{name}' is no longer stored (its run ended, or it "
                         "was never submitted): submit the plan again")
    return json.loads(raw) if isinstance(raw, str) else raw


async def _block_value(block: str) -> Any | None:
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        loaded: Any = await Secret.aload(block)
    except (ValueError, ObjectNotFound):
        return None
    return loaded.value.get_secret_value()


# -- the run's secrets -------------------------------------------------------------------

class SecretMissing(templates.TemplateError):
    """A template read ``secrets.NAME`` that is neither a block nor in the environment."""


class SecretsView:
    """``secrets`` as templates see it: ``secrets.NAME`` or ``secrets['NAME']``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            raise SecretMissing(
                f"secret '{name}' is not set: create a Prefect Secret block named "
                f"'{block_name(name)}' or set {env_name(name)} for the process that runs "
                "the plan (docs/secrets.md)")
        return self._values[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]


@dataclass
class RunSecrets:
    """One run's resolved secrets: its redactor (every value registered) and what
    ``secrets`` shows its templates."""

    redactor: Redactor = field(default_factory=Redactor)
    named: dict[str, Any] = field(default_factory=dict)
    #: The Secret blocks that carried this run's secret inputs to it (from the bridge).
    stored: list[str] = field(default_factory=list)

    def view(self) -> SecretsView:
        return SecretsView(self.named)

    async def forget_stored(self) -> None:
        """Delete the blocks of the secret inputs: the run has ended, so no resume needs
        them, and they go before the end is announced (nothing is left to find then)."""
        await forget(self.stored)
        self.stored = []


async def load(plan: Plan, params: dict[str, Any]) -> tuple[dict[str, Any], RunSecrets]:
    """The run's inputs with their references resolved, and its secrets: every value
    registered in the redactor, which masks them in this process's logs from now on.

    A reference where no secret input is declared, or one that cannot be resolved, is a
    UsageError; a missing ``secrets.NAME`` fails only the step that reads it.
    """
    if not isinstance(params, dict):
        raise UsageError("the run's inputs must be a mapping of names to values")
    found = RunSecrets(stored=input_blocks(params))
    watch_logs(found.redactor)
    secret = set(secret_input_names(plan.inputs))
    inputs = dict(params)
    for name, value in params.items():
        ref = reference_of(value)
        if ref is None and name not in secret:
            continue
        if name not in secret:
            raise UsageError(f"input '{name}' is not declared secret: pass its value")
        inputs[name] = await _input_value(name, ref) if ref is not None else value
        found.redactor.add(inputs[name])
    for name in sorted(referenced_names(plan)):
        value = await _named_value(name)
        if value is not None:
            found.named[name] = value
            found.redactor.add(value)
    return inputs, found


async def _named_value(name: str) -> Any | None:
    if name_problem(name) is not None:
        return None
    value = await _block_value(block_name(name))
    return value if value is not None else os.environ.get(env_name(name))
