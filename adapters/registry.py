"""The registry of tools, keyed by tool name and filled from the ``planrun.adapters``
entry-point group; checked once at start-up."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from functools import lru_cache
from importlib.metadata import entry_points

from planrun.adapters.base import Adapter
from planrun.errors import DuplicateTool, PlanrunError, UnknownTool

ENTRY_POINT_GROUP = "planrun.adapters"
ALLOWED_ENV = "PLANRUN_ALLOWED_TOOLS"


class Registry:
    """Adapters by tool name; a duplicate name is an error, an unknown one lists the rest.

    ``allowed`` holds glob patterns (``core.*``) of the tools this deployment lets plans
    use (``PLANRUN_ALLOWED_TOOLS``); ``None`` allows every registered tool. The operator's
    policy narrows them per trust level (planrun/policy_check.py, docs/policy.md).
    """

    def __init__(self, adapters: Iterable[type[Adapter]] = (),
                 allowed: list[str] | None = None) -> None:
        self._adapters: dict[str, Adapter] = {}
        self._origin: dict[str, str] = {}
        self.allowed = allowed
        for cls in adapters:
            self.register(cls)

    def register(self, cls: type[Adapter], origin: str | None = None) -> None:
        origin = origin or f"{cls.__module__}.{cls.__qualname__}"
        if cls.name in self._adapters:
            raise DuplicateTool(cls.name, self._origin[cls.name], origin)
        self._adapters[cls.name] = cls()
        self._origin[cls.name] = origin

    def names(self) -> list[str]:
        """Every tool this deployment allows, sorted."""
        return sorted(n for n in self._adapters if self.is_allowed(n))

    def is_allowed(self, name: str) -> bool:
        return self.allowed is None or any(fnmatch.fnmatchcase(name, p) for p in self.allowed)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._adapters and self.is_allowed(name)

    def get(self, name: str) -> Adapter:
        """The adapter for ``name``, or UnknownTool listing the known ones."""
        if name not in self:
            raise UnknownTool(name, self.names())
        return self._adapters[name]

    def adapters(self) -> list[Adapter]:
        return [self._adapters[n] for n in self.names()]


def _allowed_from_env() -> list[str] | None:
    raw = os.environ.get(ALLOWED_ENV, "").strip()
    return [p.strip() for p in raw.split(",") if p.strip()] or None


def load_registry() -> Registry:
    """A registry of every adapter installed under the entry-point group."""
    registry = Registry(allowed=_allowed_from_env())
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise PlanrunError(f"cannot load tool '{ep.name}' from {ep.value}: {exc}") from exc
        if getattr(cls, "name", None) != ep.name:
            raise PlanrunError(
                f"entry point '{ep.name}' ({ep.value}) names tool '{getattr(cls, 'name', None)}'"
            )
        registry.register(cls, origin=ep.value)
    return registry


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry, loaded once."""
    return load_registry()
