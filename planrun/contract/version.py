"""The contract's version, and how a reader treats data of another version.

Everything planrun writes for a later reader (event payloads, checkpoints, the bridge's
saved views) carries ``v``. A reader accepts its own version, upgrades data written before
versions existed (no ``v``: the same fields as version 1), and refuses any other version
with :class:`~planrun.errors.ContractError` naming both versions: data from a newer
planrun is never half-read.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from planrun.errors import ContractError

CONTRACT_VERSION = 1


class Versioned(BaseModel):
    """A model written for a later reader: ``v`` is the contract version it was written in."""

    model_config = ConfigDict(extra="ignore")

    v: int = CONTRACT_VERSION

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("v", 0)
        if version == CONTRACT_VERSION:
            return data
        if version == 0:  # written before versions: version 1's fields
            return {**data, "v": CONTRACT_VERSION}
        raise ContractError(f"{cls.__name__} of contract version {version!r} cannot be read: "
                            f"this planrun reads version {CONTRACT_VERSION} "
                            "(was it written by a newer planrun?)")

    @classmethod
    def read(cls, data: Any) -> Self:
        """``data`` as this model; :class:`~planrun.errors.ContractError` when it is not
        one (another version, a missing or mistyped field), saying what is wrong."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise cls._invalid(exc) from exc

    @classmethod
    def read_json(cls, text: str | bytes) -> Self:
        """``read`` for JSON text."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise cls._invalid(exc) from exc

    @classmethod
    def _invalid(cls, exc: ValidationError) -> ContractError:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        return ContractError(f"not a valid {cls.__name__}: {problems}")
