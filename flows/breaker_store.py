"""Where circuit breakers keep their shared state: Prefect Variables (flows/breakers.py).

Three operations, each one request to the Prefect server: read a variable, write one
(create or replace), and ``claim`` one: create it only if no variable has that name. The
server's unique constraint on variable names makes ``claim`` an atomic test-and-set
across every process that uses the server (``POST /variables/`` answers 409 to the
loser), which is what the breakers build their single transitions on.
``MemoryStore`` is the in-memory store beside it, for unit tests.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from planrun.contract.breakers import VARIABLE_PREFIX

#: Every breaker variable's name starts with this (docs/policy.md, "Circuit breakers").
PREFIX = VARIABLE_PREFIX
PAGE = 200


class BreakerStore(Protocol):
    """Shared JSON values by name."""

    async def read(self, name: str) -> dict[str, Any] | None:
        """The value of ``name``, or None when there is none."""
        ...

    async def write(self, name: str, value: dict[str, Any]) -> None:
        """Set ``name`` to ``value``, creating it if needed."""
        ...

    async def claim(self, name: str, value: dict[str, Any]) -> bool:
        """Create ``name`` with ``value``; False (and nothing changed) if it exists."""
        ...

    async def delete(self, name: str) -> None:
        """Remove ``name`` if it exists."""
        ...

    async def read_all(self) -> dict[str, dict[str, Any]]:
        """Every breaker value, by name."""
        ...

    async def latest(self, prefix: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """The ``limit`` values whose names start with ``prefix``, last name first."""
        ...


class PrefectStore:
    """Breaker state as Prefect Variables of the server ``PREFECT_API_URL`` names."""

    async def read(self, name: str) -> dict[str, Any] | None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            variable = await client.read_variable_by_name(name)
        value = variable.value if variable is not None else None
        return value if isinstance(value, dict) else None

    async def write(self, name: str, value: dict[str, Any]) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate

        async with get_client() as client:
            try:
                await client.update_variable(VariableUpdate(name=name, value=value))
            except httpx.HTTPStatusError as exc:  # update_variable does not translate a 404
                if exc.response.status_code != 404:
                    raise
                try:
                    await client.create_variable(VariableCreate(name=name, value=value))
                except ObjectAlreadyExists:  # created meanwhile: this write is the later one
                    await client.update_variable(VariableUpdate(name=name, value=value))

    async def claim(self, name: str, value: dict[str, Any]) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import VariableCreate

        async with get_client() as client:
            try:
                await client.create_variable(VariableCreate(name=name, value=value))
            except ObjectAlreadyExists:
                return False
        return True

    async def delete(self, name: str) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            try:
                await client.delete_variable_by_name(name)
            except ObjectNotFound:
                pass

    async def read_all(self) -> dict[str, dict[str, Any]]:
        from prefect.client.orchestration import get_client

        found: dict[str, dict[str, Any]] = {}
        offset = 0
        async with get_client() as client:
            while True:
                response = await client.request(  # type: ignore[call-overload]
                    "POST", "/variables/filter",
                    json={"variables": {"name": {"like_": f"{PREFIX}%"}},
                          "offset": offset, "limit": PAGE, "sort": "NAME_ASC"})
                page = response.json()
                offset += len(page)
                found.update({v["name"]: v["value"] for v in page
                              if isinstance(v.get("value"), dict)})
                if len(page) < PAGE:
                    return found


    async def latest(self, prefix: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            response = await client.request(  # type: ignore[call-overload]
                "POST", "/variables/filter",
                json={"variables": {"name": {"like_": f"{prefix}%"}}, "limit": limit,
                      "sort": "NAME_DESC"})
        return [(v["name"], v["value"]) for v in response.json()
                if isinstance(v.get("value"), dict)]


class MemoryStore:
    """The same operations on a dict, for tests of one process."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.requests = 0

    async def read(self, name: str) -> dict[str, Any] | None:
        self.requests += 1
        return self.values.get(name)

    async def write(self, name: str, value: dict[str, Any]) -> None:
        self.requests += 1
        self.values[name] = value

    async def claim(self, name: str, value: dict[str, Any]) -> bool:
        self.requests += 1
        if name in self.values:
            return False
        self.values[name] = value
        return True

    async def delete(self, name: str) -> None:
        self.requests += 1
        self.values.pop(name, None)

    async def read_all(self) -> dict[str, dict[str, Any]]:
        self.requests += 1
        return dict(self.values)

    async def latest(self, prefix: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        self.requests += 1
        names = sorted((n for n in self.values if n.startswith(prefix)), reverse=True)
        return [(n, self.values[n]) for n in names[:limit]]
