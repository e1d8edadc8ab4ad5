"""The workspace: the one directory tree file tools may touch, and its rollback journal.

A plan is not trusted, so every path a step names goes through ``Workspace.resolve``:
relative, no ``..``, and no symbolic link that leads out of the root. Before a step
changes or deletes a file it calls ``Workspace.record``; the first original of each path
is copied into the backup directory (with a journal beside it, so a rollback also works
from a new process), and ``rollback`` puts every recorded path back as it was.

Runs may share a workspace, in one process or several. A change (``record``, the change,
``wrote``) and a rollback each hold the workspace's lock (``locked``), and the journal
keeps what this run left at each path: a rollback puts a path back only while it is still
exactly that, and otherwise leaves it (``left``), since another run changed it since and
undoing that run's file is worse than keeping ours (docs/approvals.md, "Workspaces").

A rollback keeps what the run had left at each path it put back (a hard link, or the fact
that the path was absent or a directory), and ``redo`` puts that back when the run is
retried, so the retry goes on from the files as the run left them (docs/retry.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field

from planrun.adapters.atomic import atomic_copy, atomic_write, fsync_file

if TYPE_CHECKING:
    from planrun.policy import LevelPolicy

from planrun.errors import ConfigurationError, PlanrunError, ResourceError

__all__ = ["JOURNAL", "SAFE_PATH_PATTERN", "RelativePath", "Workspace", "atomic_copy",
           "atomic_write", "default_workspace_root", "path_problem"]

WORKSPACE_ENV = "PLANRUN_WORKSPACE"
JOURNAL = "journal.json"
#: What the last rollback undid, for ``redo``: a directory inside the backup directory.
REDO = "redo"
#: How long a change or a rollback waits for another run's turn with the workspace.
LOCK_WAIT_S = 30.0

#: JSON Schema form of ``path_problem``: not empty, not absolute, no ``..``, no NUL byte.
SAFE_PATH_PATTERN = r"^(?!/)(?!(?:.*/)?\.\.(?:/|$))[^\x00]+$"

log = logging.getLogger("planrun.workspace")


def default_workspace_root(policy: LevelPolicy | None = None) -> Path:
    """The policy's ``workspace_root`` (docs/policy.md: the operator's word for plans of that
    trust level) if set, else ``$PLANRUN_WORKSPACE``, else ``./workspace`` of the current
    directory."""
    if policy is not None and policy.workspace_root:
        return Path(policy.workspace_root).expanduser()
    configured = os.environ.get(WORKSPACE_ENV, "").strip()
    return Path(configured) if configured else Path.cwd() / "workspace"


def path_problem(rel: str) -> str | None:
    """Why ``rel`` is not a workspace-relative path, judged by its text alone; None if it is."""
    if not rel:
        return "the path is empty"
    if "\x00" in rel:
        return "the path contains a NUL byte"
    if rel.startswith("/"):
        return "the path is absolute"
    if ".." in PurePosixPath(rel).parts:
        return "the path contains '..'"
    return None


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def _check_relative(value: str) -> str:
    # A template is checked by Workspace.resolve once it is rendered.
    problem = None if _is_template(value) else path_problem(value)
    if problem:
        raise ValueError(f"{problem}: paths are relative to the workspace root, "
                         "like 'notes/today.md'")
    return value


#: A parameter naming a path inside the workspace; checked statically (JSON Schema
#: ``pattern`` for ``planrun validate``, a validator at run time).
RelativePath = Annotated[
    str,
    AfterValidator(_check_relative),
    Field(json_schema_extra={"pattern": SAFE_PATH_PATTERN}),
]


@dataclass(frozen=True)
class _Undone:
    """What a rollback found at a path it put back (the run's version), and what it left
    there (``restored``, a fingerprint): ``redo`` puts the run's version back only over
    exactly that."""

    kind: Literal["absent", "file", "dir"]
    restored: str
    backup: str | None = None  # file name inside the redo directory
    mode: int | None = None


@dataclass(frozen=True)
class _Original:
    """What a recorded path was before the run changed it."""

    kind: Literal["absent", "file", "dir"]
    backup: str | None = None  # file name inside the backup directory
    mode: int | None = None
    #: What this run left there (``_fingerprint``); None: unknown (a change cut short),
    #: and a rollback then puts the original back whatever is there.
    written: str | None = None


class Workspace:
    """A root directory that confines file tools, with a journal to roll a run back.

    ``backup_dir`` holds the originals of changed files; a temporary directory is made
    when it is None. A journal there lets a Workspace built later (after a restart) roll
    back what an earlier one recorded.
    """

    def __init__(self, root: Path, backup_dir: Path | None = None) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.real_root = Path(os.path.realpath(self.root))
        self._backup_dir = Path(backup_dir).absolute() if backup_dir is not None else None
        self._own_backup_dir = backup_dir is None
        self._lock = threading.Lock()
        self._originals: dict[str, _Original] = self._load_journal()
        #: Paths the last rollback left because another run changed them since.
        self.left: list[str] = []

    # -- confinement ----------------------------------------------------------------------

    def resolve(self, rel: str) -> Path:
        """The real path ``rel`` names inside the root, or ConfigurationError saying why not.

        Symbolic links are followed (for a file that does not exist yet, its parent's);
        the result must stay inside the root's real path.
        """
        problem = path_problem(rel)
        if problem:
            raise self._refusal(rel, problem)
        real = Path(os.path.realpath(self.real_root / rel))
        if not real.is_relative_to(self.real_root):
            raise self._refusal(rel, "it leads outside the workspace through a symbolic link")
        return real

    def relative(self, path: Path) -> str:
        """``path`` (inside the root) as a root-relative POSIX path; ``.`` for the root."""
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.real_root):
            raise self._refusal(str(path), "it is outside the workspace")
        return real.relative_to(self.real_root).as_posix()

    def _refusal(self, rel: str, why: str) -> ConfigurationError:
        return ConfigurationError(
            f"refused path {rel!r}: {why}",
            hint=f"paths are relative to the workspace root {self.root}: write them like "
                 "'notes/today.md', without a leading '/', without '..', and not through "
                 "a symbolic link that leads out of the root",
            details={"path": rel, "workspace_root": str(self.root)},
        )

    # -- journal ----------------------------------------------------------------------------

    def record(self, path: Path) -> None:
        """Remember ``path``'s original before it is changed or deleted; once per path.

        The original (its bytes and mode, or that it did not exist) is copied into the
        backup directory and the journal is written before this returns.
        """
        rel = self.relative(path)
        with self._lock:
            if rel in self._originals:
                return
            self._originals[rel] = self._snapshot(self.real_root / rel)
            self._save_journal()

    def wrote(self, path: Path) -> None:
        """Remember what this run left at ``path`` after a change ``record`` preceded: a
        rollback puts the original back only while the path is still exactly that."""
        rel = self.relative(path)
        with self._lock:
            original = self._originals.get(rel)
            if original is None:
                return
            self._originals[rel] = replace(original,
                                           written=_fingerprint(self.real_root / rel))
            self._save_journal()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the workspace's lock, shared with every process: a change between its
        ``record`` and ``wrote``, or a rollback, never interleaves with another.

        The lock is ``flock`` on the root directory itself: every process agrees on it,
        a plan cannot delete or replace it, and no file of planrun's sits in the plan's
        tree. A plan that holds it (a command calling flock) delays others by at most
        ``LOCK_WAIT_S``; then they fail with a resource error.
        """
        fd = os.open(self.real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ResourceError(
                            f"the workspace {self.root} stayed locked for {LOCK_WAIT_S:g}s",
                            hint="another run (or a command) holds it; try again when "
                                 "it is done") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def recorded(self) -> list[str]:
        """The root-relative paths recorded so far, sorted."""
        with self._lock:
            return sorted(self._originals)

    def rollback(self) -> list[str]:
        """Put every recorded path back as it was; return those that changed, sorted.

        Files are restored atomically, files and directories that did not exist are
        removed (a directory only if empty). A path that is no longer what this run left
        there is not touched: it is listed in ``left``. Backups are discarded when all
        succeeded.
        """
        with self.locked(), self._lock:
            restored, failed, self.left = [], [], []
            undone: dict[str, _Undone] = {}
            # Deepest first: files a run created go before the directories it created.
            for rel in sorted(self._originals, key=lambda r: (-r.count("/"), r)):
                original = self._originals[rel]
                try:
                    if original.written is not None \
                            and _fingerprint(self.real_root / rel) != original.written:
                        log.warning("rollback left %s: another run changed it since", rel)
                        self.left.append(rel)
                        continue
                    found = self._keep_for_redo(rel)
                    if self._restore(rel, original):
                        restored.append(rel)
                        if found is not None:
                            undone[rel] = replace(found,
                                                  restored=_fingerprint(self.real_root / rel))
                    elif found is not None and found.backup:
                        (self._redo_dir() / found.backup).unlink()
                except OSError as exc:
                    log.warning("rollback of %s failed: %s", rel, exc)
                    failed.append(f"{rel} ({exc.strerror or exc})")
            if failed:
                raise PlanrunError(f"rollback could not restore: {', '.join(failed)}; "
                                   f"the originals are kept in {self._backup_dir}")
            if undone:  # else an earlier rollback's, not redone yet, stays
                self._save_redo(undone)
            self._discard()
        return sorted(restored)

    def redo(self) -> list[str]:
        """Put back what the last rollback undid (the run is retried: it goes on from the
        files as it left them), at each path that is still exactly as the rollback left it;
        the others are listed in ``left``. Their originals are recorded again, so a later
        rollback undoes them once more. The paths put back, sorted."""
        undone = self._load_redo()
        if not undone:
            return []
        with self.locked(), self._lock:
            redone, self.left = [], []
            # Shallowest first: directories the run made before the files in them.
            for rel in sorted(undone, key=lambda r: (r.count("/"), r)):
                entry, target = undone[rel], self.real_root / rel
                if _fingerprint(target) != entry.restored:
                    log.warning("retry left %s as it is: changed since the rollback", rel)
                    self.left.append(rel)
                    continue
                if rel not in self._originals:
                    self._originals[rel] = self._snapshot(target)
                self._put_back(target, entry)
                self._originals[rel] = replace(self._originals[rel],
                                               written=_fingerprint(target))
                redone.append(rel)
            self._save_journal()
            shutil.rmtree(self._redo_dir(), ignore_errors=True)
        return sorted(redone)

    def left_note(self) -> str | None:
        """What the last rollback left, for the run's report; None if nothing."""
        if not self.left:
            return None
        return (f"rollback left {', '.join(sorted(self.left))}: another run changed "
                f"{'it' if len(self.left) == 1 else 'them'} after this run did")

    def commit(self) -> None:
        """Keep the changes: forget every recorded original and delete the backups."""
        with self._lock:
            self._discard()

    def _snapshot(self, path: Path) -> _Original:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return _Original("absent")
        if stat.S_ISDIR(st.st_mode):
            return _Original("dir")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(
                f"refused to change {self.relative(path)!r}: it is not a regular file",
                hint="file tools change regular files only",
            )
        name = f"{secrets.token_hex(8)}.orig"
        shutil.copyfile(path, self._backups() / name, follow_symlinks=False)
        fsync_file(self._backups() / name)
        return _Original("file", name, stat.S_IMODE(st.st_mode))

    def _restore(self, rel: str, original: _Original) -> bool:
        target = self.real_root / rel
        if not Path(os.path.realpath(target.parent)).is_relative_to(self.real_root):
            raise OSError(0, "its directory now leads outside the workspace", str(target))
        if original.kind == "absent":
            return _remove(target)
        if original.kind == "dir":
            if os.path.lexists(target):
                return False
            target.mkdir(parents=True)
            return True
        assert original.backup is not None
        backup = self._backups() / original.backup
        if _same_file(target, backup, original.mode):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # fails (and is reported) if the run filled it
        atomic_copy(backup, target, mode=original.mode)
        return True

    def _keep_for_redo(self, rel: str) -> _Undone | None:
        """What the run left at ``rel``, kept for ``redo``: a file as a hard link (the
        rollback replaces the path, so the link keeps the run's bytes). None for what is
        neither a regular file nor a directory (a symbolic link is not followed, ever)."""
        path = self.real_root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return _Undone("absent", "")
        if stat.S_ISDIR(st.st_mode):
            return _Undone("dir", "")
        if not stat.S_ISREG(st.st_mode):
            return None
        name = f"{secrets.token_hex(8)}.run"
        try:
            os.link(path, self._redo_dir() / name, follow_symlinks=False)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(path, self._redo_dir() / name, follow_symlinks=False)
        return _Undone("file", "", name, stat.S_IMODE(st.st_mode))

    def _put_back(self, target: Path, entry: _Undone) -> None:
        if entry.kind == "absent":
            _remove(target)
        elif entry.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        else:
            assert entry.backup is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(self._redo_dir() / entry.backup, target, mode=entry.mode)

    def _redo_dir(self) -> Path:
        path = self._backups() / REDO
        path.mkdir(exist_ok=True)
        return path

    def _save_redo(self, undone: dict[str, _Undone]) -> None:
        data = {"root": str(self.real_root), "entries": {r: asdict(u) for r, u in undone.items()}}
        atomic_write(self._redo_dir() / JOURNAL, json.dumps(data, indent=1).encode())

    def _load_redo(self) -> dict[str, _Undone]:
        if self._backup_dir is None:
            return {}
        try:
            data = json.loads((self._backup_dir / REDO / JOURNAL).read_bytes())
        except FileNotFoundError:
            return {}
        if data.get("root") != str(self.real_root):
            raise PlanrunError(f"the run's files were rolled back in the workspace "
                               f"{data.get('root')}, not {self.real_root}: retry it with "
                               "that workspace (--workspace, or PLANRUN_WORKSPACE)")
        return {rel: _Undone(**u) for rel, u in data["entries"].items()}

    def _backups(self) -> Path:
        if self._backup_dir is None:
            self._backup_dir = Path(tempfile.mkdtemp(prefix="planrun-backup-"))
        self._backup_dir.mkdir(parents=True, exist_ok=True)
        return self._backup_dir

    def _save_journal(self) -> None:
        entries = {rel: asdict(o) for rel, o in self._originals.items()}
        data = {"root": str(self.real_root), "entries": entries}
        atomic_write(self._backups() / JOURNAL, json.dumps(data, indent=1).encode())

    def _load_journal(self) -> dict[str, _Original]:
        if self._backup_dir is None:
            return {}
        try:
            data = json.loads((self._backup_dir / JOURNAL).read_bytes())
        except FileNotFoundError:
            return {}
        if data.get("root") != str(self.real_root):
            raise PlanrunError(f"the backup directory {self._backup_dir} belongs to the "
                               f"workspace {data.get('root')}, not {self.real_root}")
        return {rel: _Original(**o) for rel, o in data["entries"].items()}

    def _discard(self) -> None:
        if self._backup_dir is not None and self._backup_dir.exists():
            if self._own_backup_dir:
                shutil.rmtree(self._backup_dir, ignore_errors=True)
                self._backup_dir = None
            else:
                for original in self._originals.values():
                    if original.backup:
                        with suppress(FileNotFoundError):
                            (self._backup_dir / original.backup).unlink()
                with suppress(FileNotFoundError):
                    (self._backup_dir / JOURNAL).unlink()
                with suppress(OSError):
                    self._backup_dir.rmdir()
        self._originals = {}


def _fingerprint(path: Path) -> str:
    """What is at ``path`` now, exactly enough to tell another run's change: kind, inode
    (a write replaces the file, so even the same bytes written by another run differ),
    size, modification time and the SHA-256 of a file's bytes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISDIR(st.st_mode):
        return f"dir:{st.st_ino}"
    if not stat.S_ISREG(st.st_mode):
        return f"other:{st.st_ino}:{st.st_mode}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return f"file:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"


def _remove(path: Path) -> bool:
    """Remove what a run created at ``path``: a file or link, or an empty directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        try:
            path.rmdir()
        except OSError:
            log.warning("rollback kept %s: the directory is not empty", path)
            return False
        return True
    path.unlink()
    return True


def _same_file(target: Path, backup: Path, mode: int | None) -> bool:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or (mode is not None and stat.S_IMODE(st.st_mode) != mode):
        return False
    if st.st_size != os.path.getsize(backup):
        return False
    with open(target, "rb") as a, open(backup, "rb") as b:
        while True:
            chunk = a.read(1 << 16)
            if chunk != b.read(1 << 16):
                return False
            if not chunk:
                return True
