"""The bridge's bearer token: made once, kept under the data directory, read by the CLI.

The bridge and ``planrun up`` call :func:`ensure` (the first one creates the file); the
CLI calls :func:`for_client`. ``PLANRUN_TOKEN``, when set, wins everywhere and is an
*explicit* token, the only kind that lets the bridge listen beyond loopback
(docs/http-api.md, "Authentication and origins").
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from pathlib import Path

from planrun import server
from planrun.errors import PlanrunError, UsageError

ENV = "PLANRUN_TOKEN"
FILE_NAME = "bridge.token"
TOKEN_BYTES = 32


def path() -> Path:
    """Where the token lives: ``<data directory>/bridge.token``."""
    return server.data_dir() / FILE_NAME


def explicit() -> str | None:
    """The token set by the operator (``PLANRUN_TOKEN``), if any."""
    return os.environ.get(ENV) or None


def ensure() -> str:
    """The token to require: ``PLANRUN_TOKEN``, else the token file, created on first use
    (random, mode 0600 from its first byte on, never overwritten)."""
    return explicit() or _read_or_create(path())


def for_bind(host: str) -> str:
    """The token a bridge listening on ``host`` requires: any (:func:`ensure`) on
    loopback; beyond it only an explicit one, since a token in a file on this machine
    cannot reach the other machines' clients safely and was not chosen by anyone."""
    if _is_loopback(host):
        return ensure()
    token = explicit()
    if token is None:
        raise UsageError(f"the bridge would listen on {host}, beyond this machine, without "
                         f"an explicit token: set {ENV} to a long random secret (for "
                         "example `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                         ") and give it to the clients, or listen on 127.0.0.1")
    return token


def for_client() -> str | None:
    """The token the CLI presents: ``PLANRUN_TOKEN``, else the token file if it exists."""
    token = explicit()
    if token:
        return token
    with contextlib.suppress(FileNotFoundError):
        return _read(path())
    return None


def _is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _read_or_create(file: Path) -> str:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    draft = file.with_name(f".{FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        # Written whole under another name with mode 0600 from its creation, then linked
        # into place: a reader never sees it half written or readable by others, and of
        # two starters racing, the second to link reads the first one's token.
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.link(draft, file)
    except FileExistsError:
        return _read(file)
    except OSError as exc:
        raise PlanrunError(f"cannot create the bridge token {file}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(draft)
    return token


def _read(file: Path) -> str:
    try:
        token = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PlanrunError(f"cannot read the bridge token {file}: {exc.strerror}") from None
    if not token:
        raise PlanrunError(f"the bridge token file {file} is empty: delete it and start "
                           "`planrun up` again to make a new one")
    return token
