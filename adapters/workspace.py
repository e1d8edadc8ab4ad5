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
retried, so the retry goes on from the files as the run left them (docs/retry.md). The
journal's storage (the backup directory, the copies, putting them back) is
``adapters/workspace_journal.py``; this module decides when, under the locks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from planrun.adapters.workspace_journal import Journal, Original, Undone, fingerprint
from planrun.errors import ConfigurationError, PlanrunError, ResourceError

if TYPE_CHECKING:
    from planrun.policy import LevelPolicy

__all__ = ["SAFE_PATH_PATTERN", "RelativePath", "Workspace", "default_workspace_root",
           "path_problem"]

WORKSPACE_ENV = "PLANRUN_WORKSPACE"
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
        self._lock = threading.Lock()
        #: The originals of the paths the run changed (``adapters/workspace_journal.py``).
        self.journal = Journal(self.real_root, backup_dir)
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
            if rel in self.journal.originals:
                return
            self.journal.originals[rel] = self._snapshot(self.real_root / rel)
            self.journal.save()

    def wrote(self, path: Path) -> None:
        """Remember what this run left at ``path`` after a change ``record`` preceded: a
        rollback puts the original back only while the path is still exactly that."""
        rel = self.relative(path)
        with self._lock:
            original = self.journal.originals.get(rel)
            if original is None:
                return
            self.journal.originals[rel] = replace(
                original, written=fingerprint(self.real_root / rel))
            self.journal.save()

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
            return sorted(self.journal.originals)

    def rollback(self) -> list[str]:
        """Put every recorded path back as it was; return those that changed, sorted.

        Files are restored atomically, files and directories that did not exist are
        removed (a directory only if empty). A path that is no longer what this run left
        there is not touched: it is listed in ``left``. Backups are discarded when all
        succeeded.
        """
        with self.locked(), self._lock:
            restored, failed, self.left = [], [], []
            undone: dict[str, Undone] = {}
            # Deepest first: files a run created go before the directories it created.
            for rel in sorted(self.journal.originals, key=lambda r: (-r.count("/"), r)):
                original = self.journal.originals[rel]
                try:
                    if original.written is not None \
                            and fingerprint(self.real_root / rel) != original.written:
                        log.warning("rollback left %s: another run changed it since", rel)
                        self.left.append(rel)
                        continue
                    found = self.journal.keep_for_redo(rel)
                    if self.journal.restore(rel, original):
                        restored.append(rel)
                        if found is not None:
                            undone[rel] = replace(found,
                                                  restored=fingerprint(self.real_root / rel))
                    elif found is not None and found.backup:
                        (self.journal.redo_dir() / found.backup).unlink()
                except OSError as exc:
                    log.warning("rollback of %s failed: %s", rel, exc)
                    failed.append(f"{rel} ({exc.strerror or exc})")
            if failed:
                raise PlanrunError(f"rollback could not restore: {', '.join(failed)}; "
                                   f"the originals are kept in {self.journal.backup_dir}")
            if undone:  # else an earlier rollback's, not redone yet, stays
                self.journal.save_redo(undone)
            self.journal.discard()
        return sorted(restored)

    def redo(self) -> list[str]:
        """Put back what the last rollback undid (the run is retried: it goes on from the
        files as it left them), at each path that is still exactly as the rollback left it;
        the others are listed in ``left``. Their originals are recorded again, so a later
        rollback undoes them once more. The paths put back, sorted."""
        undone = self.journal.load_redo()
        if not undone:
            return []
        with self.locked(), self._lock:
            redone, self.left = [], []
            # Shallowest first: directories the run made before the files in them.
            for rel in sorted(undone, key=lambda r: (r.count("/"), r)):
                entry, target = undone[rel], self.real_root / rel
                if fingerprint(target) != entry.restored:
                    log.warning("retry left %s as it is: changed since the rollback", rel)
                    self.left.append(rel)
                    continue
                if rel not in self.journal.originals:
                    self.journal.originals[rel] = self._snapshot(target)
                self.journal.put_back(target, entry)
                self.journal.originals[rel] = replace(self.journal.originals[rel],
                                                      written=fingerprint(target))
                redone.append(rel)
            self.journal.save()
            shutil.rmtree(self.journal.redo_dir(), ignore_errors=True)
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
            self.journal.discard()

    def _snapshot(self, path: Path) -> Original:
        original = self.journal.snapshot(path)
        if original is None:
            raise ConfigurationError(
                f"refused to change {self.relative(path)!r}: it is not a regular file",
                hint="file tools change regular files only",
            )
        return original
