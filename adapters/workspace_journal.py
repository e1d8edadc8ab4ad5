"""The workspace's rollback journal: the originals of the paths a run changed, and what a
rollback undid.

``Journal`` keeps each recorded path's original (its bytes and mode, or that it was absent
or a directory) in a backup directory, with ``journal.json`` beside the copies, so a
rollback also works from a new process. It puts an original back (``restore``), and keeps
what the run had left at a path it put back (``keep_for_redo``: a hard link, or the fact
that the path was absent or a directory) for ``redo`` (docs/retry.md).

The journal neither locks nor confines: ``Workspace`` (``adapters/workspace.py``) resolves
the paths and calls it under its locks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from planrun.adapters.atomic import atomic_copy, atomic_write, fsync_file
from planrun.errors import PlanrunError

__all__ = ["JOURNAL", "REDO", "Journal", "Original", "Undone", "fingerprint"]

JOURNAL = "journal.json"
#: What the last rollback undid, for ``redo``: a directory inside the backup directory.
REDO = "redo"

log = logging.getLogger("planrun.workspace")


@dataclass(frozen=True)
class Undone:
    """What a rollback found at a path it put back (the run's version), and what it left
    there (``restored``, a fingerprint): ``redo`` puts the run's version back only over
    exactly that."""

    kind: Literal["absent", "file", "dir"]
    restored: str
    backup: str | None = None  # file name inside the redo directory
    mode: int | None = None


@dataclass(frozen=True)
class Original:
    """What a recorded path was before the run changed it."""

    kind: Literal["absent", "file", "dir"]
    backup: str | None = None  # file name inside the backup directory
    mode: int | None = None
    #: What this run left there (``fingerprint``); None: unknown (a change cut short),
    #: and a rollback then puts the original back whatever is there.
    written: str | None = None


class Journal:
    """The originals of the paths recorded under ``real_root``, kept in ``backup_dir``.

    ``backup_dir`` is made as a temporary directory when it is None (and removed when the
    journal is discarded); a journal already there is read, so a Journal built after a
    restart holds what an earlier one recorded.
    """

    def __init__(self, real_root: Path, backup_dir: Path | None) -> None:
        self.real_root = real_root
        self.backup_dir = Path(backup_dir).absolute() if backup_dir is not None else None
        self._own_backup_dir = backup_dir is None
        self.originals: dict[str, Original] = self._load()

    def snapshot(self, path: Path) -> Original | None:
        """Copy ``path``'s original into the backup directory (nothing to copy for an
        absent path or a directory); None when it is neither of these nor a regular file."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Original("absent")
        if stat.S_ISDIR(st.st_mode):
            return Original("dir")
        if not stat.S_ISREG(st.st_mode):
            return None
        name = f"{secrets.token_hex(8)}.orig"
        shutil.copyfile(path, self.backups() / name, follow_symlinks=False)
        fsync_file(self.backups() / name)
        return Original("file", name, stat.S_IMODE(st.st_mode))

    def restore(self, rel: str, original: Original) -> bool:
        """Put ``original`` back at ``rel``; False when the path already is the original
        (or a directory the run created is not empty)."""
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
        backup = self.backups() / original.backup
        if _same_file(target, backup, original.mode):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # fails (and is reported) if the run filled it
        atomic_copy(backup, target, mode=original.mode)
        return True

    def keep_for_redo(self, rel: str) -> Undone | None:
        """What the run left at ``rel``, kept for ``redo``: a file as a hard link (the
        rollback replaces the path, so the link keeps the run's bytes). None for what is
        neither a regular file nor a directory (a symbolic link is not followed, ever)."""
        path = self.real_root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Undone("absent", "")
        if stat.S_ISDIR(st.st_mode):
            return Undone("dir", "")
        if not stat.S_ISREG(st.st_mode):
            return None
        name = f"{secrets.token_hex(8)}.run"
        try:
            os.link(path, self.redo_dir() / name, follow_symlinks=False)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(path, self.redo_dir() / name, follow_symlinks=False)
        return Undone("file", "", name, stat.S_IMODE(st.st_mode))

    def put_back(self, target: Path, entry: Undone) -> None:
        """Put the run's version ``entry`` (kept by ``keep_for_redo``) back at ``target``."""
        if entry.kind == "absent":
            _remove(target)
        elif entry.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        else:
            assert entry.backup is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(self.redo_dir() / entry.backup, target, mode=entry.mode)

    def redo_dir(self) -> Path:
        """The directory of what the last rollback undid (made if missing)."""
        path = self.backups() / REDO
        path.mkdir(exist_ok=True)
        return path

    def save_redo(self, undone: dict[str, Undone]) -> None:
        """Write what a rollback undid, for ``redo`` (from this process or another)."""
        data = {"root": str(self.real_root), "entries": {r: asdict(u) for r, u in undone.items()}}
        atomic_write(self.redo_dir() / JOURNAL, json.dumps(data, indent=1).encode())

    def load_redo(self) -> dict[str, Undone]:
        """What the last rollback undid, by path; empty when nothing was."""
        if self.backup_dir is None:
            return {}
        try:
            data = json.loads((self.backup_dir / REDO / JOURNAL).read_bytes())
        except FileNotFoundError:
            return {}
        if data.get("root") != str(self.real_root):
            raise PlanrunError(f"the run's files were rolled back in the workspace "
                               f"{data.get('root')}, not {self.real_root}: retry it with "
                               "that workspace (--workspace, or PLANRUN_WORKSPACE)")
        return {rel: Undone(**u) for rel, u in data["entries"].items()}

    def backups(self) -> Path:
        """The backup directory (made if missing; a temporary one if none was given)."""
        if self.backup_dir is None:
            self.backup_dir = Path(tempfile.mkdtemp(prefix="planrun-backup-"))
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        return self.backup_dir

    def save(self) -> None:
        """Write the journal of ``originals`` beside their copies."""
        entries = {rel: asdict(o) for rel, o in self.originals.items()}
        data = {"root": str(self.real_root), "entries": entries}
        atomic_write(self.backups() / JOURNAL, json.dumps(data, indent=1).encode())

    def _load(self) -> dict[str, Original]:
        if self.backup_dir is None:
            return {}
        try:
            data = json.loads((self.backup_dir / JOURNAL).read_bytes())
        except FileNotFoundError:
            return {}
        if data.get("root") != str(self.real_root):
            raise PlanrunError(f"the backup directory {self.backup_dir} belongs to the "
                               f"workspace {data.get('root')}, not {self.real_root}")
        return {rel: Original(**o) for rel, o in data["entries"].items()}

    def discard(self) -> None:
        """Forget every original and delete their copies and the journal (a temporary
        backup directory goes whole; what the last rollback undid stays for ``redo``)."""
        if self.backup_dir is not None and self.backup_dir.exists():
            if self._own_backup_dir:
                shutil.rmtree(self.backup_dir, ignore_errors=True)
                self.backup_dir = None
            else:
                for original in self.originals.values():
                    if original.backup:
                        with suppress(FileNotFoundError):
                            (self.backup_dir / original.backup).unlink()
                with suppress(FileNotFoundError):
                    (self.backup_dir / JOURNAL).unlink()
                with suppress(OSError):
                    self.backup_dir.rmdir()
        self.originals = {}


def fingerprint(path: Path) -> str:
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
