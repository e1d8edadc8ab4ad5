"""The ``file.*`` tools: read, write, delete and list files inside the workspace root.

Every path goes through ``Workspace.resolve`` (relative, no ``..``, no symbolic link out of
the root). A change is recorded in the workspace journal before it happens, so a failed
run can be rolled back, and a write replaces the file atomically. Each change holds the
workspace's lock and tells the journal what it left (``Workspace.wrote``), so another
run's rollback never undoes it. Symbolic links inside the root are followed: writing or
deleting through one changes the file it names.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import shutil
import stat
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import Field

from planrun.adapters.atomic import atomic_write
from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.usage import ensure_room, kept_free
from planrun.adapters.workspace import RelativePath, Workspace, default_workspace_root
from planrun.errors import AccessError, ConfigurationError, ResourceError, StepError
from planrun.policy import LevelPolicy, current_trust, load_policy

MAX_READ_BYTES = 10 * 1024 * 1024
MAX_LIST_ENTRIES = 10_000

T = TypeVar("T")
P = TypeVar("P", bound=Params)


def _display(rel: str) -> str:
    """``rel`` as the tools report it: ``a//b/`` → ``a/b``, the root → ``.``."""
    return PurePosixPath(rel).as_posix()


class _FileTool(Adapter[P]):
    """What the file tools share: one translation of OSError into categories."""

    default_estimate_s = 0.05

    def classify(self, exc: Exception) -> StepError:
        if isinstance(exc, OSError):
            return classify_os_error(self.name, exc) or super().classify(exc)
        return super().classify(exc)

    async def health(self) -> Health:
        """The workspace root exists (or can be made), is writable, and its disk has room."""
        policy = load_policy().level(current_trust())
        return await asyncio.to_thread(workspace_health, default_workspace_root(policy), policy)


def workspace_health(root: Path, policy: LevelPolicy | None = None) -> Health:
    """Whether the file tools can work in ``root`` now: with less free space than the
    policy keeps free (docs/resources.md), every write would be refused."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the root is made on first use: its parent must allow it
    if not existing.is_dir():
        return Health(ok=False, detail=f"the workspace root {root} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Health(ok=False, detail=f"{existing} is not writable by planrun's user "
                                       f"(workspace root {root})")
    disk = shutil.disk_usage(existing)
    free = disk.free
    if free <= kept_free(disk.total, policy or LevelPolicy()):
        return Health(ok=False, detail=f"only {free // 1024 ** 2} MiB free on the disk of the "
                                       f"workspace root {root}, no more than the policy "
                                       "keeps free")
    return Health(ok=True, detail=f"workspace {root}, {free // 1024 ** 2} MiB free")


def classify_os_error(tool: str, exc: OSError) -> StepError | None:
    """The planrun error for a file system error, most specific first; None if unknown."""
    where = exc.filename or "the file"
    code = exc.errno
    if code == errno.ENOENT:
        return ConfigurationError(
            f"{tool}: no such file or directory: {where}",
            hint="check the path (relative to the workspace root); file.list shows what is there",
        )
    if code in (errno.EACCES, errno.EPERM):
        return AccessError(
            f"{tool}: permission denied on {where}",
            hint="give planrun's user access to the file, or use another path",
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(
            f"{tool}: no space left on the device or quota exceeded writing {where}",
            hint="free disk space or raise the quota, or write less",
        )
    if code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EFBIG):
        return ResourceError(f"{tool}: {exc.strerror}: {where}",
                             hint="the system is out of a resource; try again with less")
    if code == errno.EISDIR:
        return ConfigurationError(f"{tool}: {where} is a directory",
                                  hint="name a file; file.list lists a directory")
    if code == errno.ENOTDIR:
        return ConfigurationError(f"{tool}: a part of {where} is a file, not a directory",
                                  hint="check the path; file.list shows what is there")
    if code in (errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS):
        return ConfigurationError(f"{tool}: {exc.strerror}: {where}",
                                  hint="use another path inside the workspace")
    return None


async def _to_completion(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking change in a thread; on cancellation wait for it, then re-raise.

    A cancelled step must not leave a write that lands after the run was rolled back.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with suppress(Exception):
            await task
        raise


# -- file.read ------------------------------------------------------------------------------

class ReadParams(Params):
    path: RelativePath = Field(description="File to read, relative to the workspace root.")
    max_bytes: int = Field(
        default=MAX_READ_BYTES, ge=1, le=10 * MAX_READ_BYTES,
        description="Refuse files larger than this many bytes (default 10 MiB).",
    )


class FileRead(_FileTool[ReadParams]):
    """Reads a UTF-8 text file: ``{"path", "content", "size"}`` (size in bytes)."""

    name = "file.read"
    Params = ReadParams
    summary = "read a UTF-8 text file from the workspace"

    async def execute(self, params: ReadParams, ctx: StepContext) -> dict[str, Any]:
        path = ctx.workspace.resolve(params.path)
        data = await asyncio.to_thread(_read_capped, path, params.max_bytes)
        if len(data) > params.max_bytes:
            raise ConfigurationError(
                f"file.read: {params.path!r} is larger than max_bytes={params.max_bytes}",
                hint="raise the step's max_bytes, or read a smaller file",
            )
        return {"path": _display(params.path), "content": _text(params.path, data),
                "size": len(data)}


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """Up to ``max_bytes + 1`` bytes of a regular file (one more tells it is too big)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise ConfigurationError(f"file.read: {path} is not a regular file",
                                     hint="file.read reads regular files only")
        return f.read(max_bytes + 1)


def _text(rel: str, data: bytes) -> str:
    bad = data.find(b"\x00")
    if bad < 0:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = exc.start
    raise ConfigurationError(
        f"file.read: {rel!r} is not UTF-8 text (binary data at byte {bad})",
        hint="file.read reads text files; process binary files with shell.run",
    )


# -- file.write -----------------------------------------------------------------------------

class WriteParams(Params):
    path: RelativePath = Field(
        description="File to write, relative to the workspace root; "
                    "missing parent directories are created.")
    content: str = Field(description="Text to write, encoded as UTF-8.")
    append: bool = Field(default=False,
                         description="Add to the end of the file instead of replacing it.")


class FileWrite(_FileTool[WriteParams]):
    """Writes text atomically: ``{"path", "bytes"}`` (bytes written by this step)."""

    name = "file.write"
    Params = WriteParams
    summary = "write (or append to) a text file in the workspace, atomically"

    async def execute(self, params: WriteParams, ctx: StepContext) -> dict[str, Any]:
        path = ctx.workspace.resolve(params.path)
        data = params.content.encode("utf-8")
        await _to_completion(_write, ctx, path, data, params.append)
        return {"path": _display(params.path), "bytes": len(data)}


async def write_workspace_file(ctx: StepContext, tool: str, path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` (already resolved in ``ctx.workspace``) for ``tool``, as
    ``file.write`` does: within the run's quota and the disk's room, recorded for a
    rollback, atomically, counted as the step's."""
    await _to_completion(_write, ctx, path, data, False, tool)


def _write(ctx: StepContext, path: Path, data: bytes, append: bool,
           tool: str = "file.write") -> None:
    with ctx.workspace.locked():  # one write at a time: each sees the others' bytes
        _check_room(ctx, path, data, append, tool)
        _write_locked(ctx.workspace, path, data, append)
        ctx.usage.wrote(len(data))


def _check_room(ctx: StepContext, path: Path, data: bytes, append: bool,
                tool: str = "file.write") -> None:
    """Refuse the write before anything changes: over the run's quota (what the step
    adds counts), or leaving too little free space (what the disk takes: the new file, the
    backup of the old one, and for an append the old bytes rewritten)."""
    ctx.usage.may_write(tool, len(data), ctx.policy.workspace_quota_mb)
    try:
        old = os.stat(path).st_size
    except OSError:
        old = 0
    need = len(data) + old + (old if append else 0)
    ensure_room(tool, path.parent, need, ctx.policy)


def _write_locked(ws: Workspace, path: Path, data: bytes, append: bool) -> None:
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists() and parent != ws.real_root:
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        ws.record(directory)  # so a rollback removes the directories this run created
        directory.mkdir(exist_ok=True)
        ws.wrote(directory)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    ws.record(path)
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
        old = path.read_bytes() if append else b""
    except FileNotFoundError:
        mode, old = None, b""
    atomic_write(path, old + data, mode=mode)
    ws.wrote(path)


# -- file.delete ----------------------------------------------------------------------------

class DeleteParams(Params):
    path: RelativePath = Field(description="File to delete, relative to the workspace root.")
    missing_ok: bool = Field(default=False,
                             description="Succeed (deleted: false) if the file does not exist.")


class FileDelete(_FileTool[DeleteParams]):
    """Deletes a file (recorded first, so a rollback brings it back): ``{"path", "deleted"}``."""

    name = "file.delete"
    Params = DeleteParams
    summary = "delete a file in the workspace"

    async def execute(self, params: DeleteParams, ctx: StepContext) -> dict[str, Any]:
        path = ctx.workspace.resolve(params.path)
        deleted = await _to_completion(_delete, ctx.workspace, path, params.missing_ok)
        return {"path": _display(params.path), "deleted": deleted}


def _delete(ws: Workspace, path: Path, missing_ok: bool) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    with ws.locked():
        ws.record(path)
        path.unlink()
        ws.wrote(path)
    return True


# -- file.list ------------------------------------------------------------------------------

EntryType = Literal["file", "dir", "symlink", "other"]


class ListParams(Params):
    path: RelativePath = Field(default=".",
                               description="Directory to list, relative to the workspace root.")
    pattern: str = Field(
        default="*",
        description="Glob the entries must match: on the name (`*.md`), or on the path below "
                    "`path` when it contains a `/` (`docs/*.md`).")
    recursive: bool = Field(default=False, description="Also list every subdirectory.")
    max_entries: int = Field(default=MAX_LIST_ENTRIES, ge=1, le=100 * MAX_LIST_ENTRIES,
                             description="Stop after this many entries (truncated: true).")


class FileList(_FileTool[ListParams]):
    """Lists a directory: ``{"path", "entries": [{"path", "type", "size"}], "truncated"}``.

    Entries are sorted by path; symbolic links are reported as ``symlink`` and never
    followed; ``size`` is the byte size of files and null for anything else.
    """

    name = "file.list"
    Params = ListParams
    summary = "list files in a workspace directory"

    async def execute(self, params: ListParams, ctx: StepContext) -> dict[str, Any]:
        base = ctx.workspace.resolve(params.path)
        entries, truncated = await asyncio.to_thread(
            _list, base, PurePosixPath(params.path), params.pattern, params.recursive,
            params.max_entries)
        return {"path": _display(params.path), "entries": entries, "truncated": truncated}


def _list(base: Path, shown: PurePosixPath, pattern: str, recursive: bool,
          limit: int) -> tuple[list[dict[str, Any]], bool]:
    if not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(base))
    on_path = "/" in pattern
    entries: list[dict[str, Any]] = []
    pending = [PurePosixPath()]
    while pending:
        below = pending.pop()
        with os.scandir(base / below) as scan:
            for entry in scan:
                rel = below / entry.name
                kind = _entry_type(entry)
                if recursive and kind == "dir":
                    pending.append(rel)
                if not fnmatch.fnmatchcase(rel.as_posix() if on_path else entry.name, pattern):
                    continue
                if len(entries) == limit:
                    return sorted(entries, key=lambda e: e["path"]), True
                size = entry.stat(follow_symlinks=False).st_size if kind == "file" else None
                entries.append({"path": (shown / rel).as_posix(), "type": kind, "size": size})
    return sorted(entries, key=lambda e: e["path"]), False


def _entry_type(entry: os.DirEntry[str]) -> EntryType:
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    return "other"
