"""Atomic file replacement: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` at once: a reader sees the old file or the new one.

    A temporary file in the same directory is written, fsynced and renamed over ``path``;
    ``mode`` sets its permissions (None: a new file's default, after the umask).
    """
    _atomic_replace(path, lambda out: out.write(data), mode)


def atomic_copy(source: Path, path: Path, mode: int | None = None) -> None:
    """Replace ``path`` with a copy of ``source``, atomically as ``atomic_write``."""
    def fill(out: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out)

    _atomic_replace(path, fill, mode)


def _atomic_replace(path: Path, fill: Callable[[IO[bytes]], object], mode: int | None) -> None:
    tmp = path.parent / f".{path.name[:64]}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; some file systems refuse fsync on a directory.
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
