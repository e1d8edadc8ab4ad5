"""The workspace: confinement of paths, atomic writes, and the rollback journal."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from planrun.adapters.atomic import atomic_copy, atomic_write
from planrun.adapters.workspace import (
    SAFE_PATH_PATTERN,
    Workspace,
    default_workspace_root,
    path_problem,
)
from planrun.adapters.workspace_journal import JOURNAL
from planrun.errors import ConfigurationError, PlanrunError
from tests.helpers import wait_for


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*.tmp")]


# -- confinement ----------------------------------------------------------------------------

def test_root_is_created(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert ws.real_root == (tmp_path / "a" / "b").resolve()


def test_resolve_keeps_relative_paths_under_the_root(ws: Workspace) -> None:
    assert ws.resolve("notes/today.md") == ws.real_root / "notes" / "today.md"
    assert ws.resolve("./a//b/") == ws.real_root / "a" / "b"
    assert ws.resolve(".") == ws.real_root
    assert ws.resolve("...") == ws.real_root / "..."


@pytest.mark.parametrize("rel", ["..", "../x", "a/../../x", "a/..", "a/../b"])
def test_resolve_refuses_parent_components(ws: Workspace, rel: str) -> None:
    with pytest.raises(ConfigurationError, match=r"contains '\.\.'"):
        ws.resolve(rel)


@pytest.mark.parametrize("rel", ["/etc/passwd", "/", "//x"])
def test_resolve_refuses_absolute_paths(ws: Workspace, rel: str) -> None:
    with pytest.raises(ConfigurationError, match="absolute"):
        ws.resolve(rel)


@pytest.mark.parametrize(("rel", "why"), [("", "empty"), ("a\x00b", "NUL")])
def test_resolve_refuses_empty_paths_and_nul_bytes(ws: Workspace, rel: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        ws.resolve(rel)


def test_refusal_hint_says_paths_are_relative_to_the_named_root(ws: Workspace) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ws.resolve("../secret")
    assert "relative to the workspace root" in caught.value.hint
    assert str(ws.root) in caught.value.hint
    assert caught.value.category == "configuration"


def test_resolve_refuses_a_symlink_to_a_file_outside(ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (ws.root / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        ws.resolve("link.txt")


def test_resolve_refuses_a_new_file_under_a_symlinked_dir_outside(
        ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (ws.root / "dir").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        ws.resolve("dir/new.txt")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        ws.resolve("dir/deeper/new.txt")


def test_resolve_refuses_a_dangling_symlink_that_points_outside(
        ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "dangling").symlink_to(tmp_path / "not-yet")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        ws.resolve("dangling")


def test_resolve_follows_symlinks_that_stay_inside(ws: Workspace) -> None:
    (ws.root / "real").mkdir()
    (ws.root / "alias").symlink_to(ws.root / "real")
    assert ws.resolve("alias/f.txt") == ws.real_root / "real" / "f.txt"


def test_a_root_reached_through_a_symlink_still_confines(tmp_path: Path) -> None:
    (tmp_path / "real-root").mkdir()
    (tmp_path / "root-link").symlink_to(tmp_path / "real-root")
    ws = Workspace(tmp_path / "root-link")
    assert ws.resolve("x.txt") == (tmp_path / "real-root" / "x.txt").resolve()
    with pytest.raises(ConfigurationError):
        ws.resolve("../real-root/x.txt")


@pytest.mark.parametrize("rel", ["a", "a/b.txt", "...", "a..b", ".hidden", "..a/b", "a/b..",
                                 "", "/a", "..", "a/../b", "a/..", "../", "x\x00y"])
def test_schema_pattern_agrees_with_path_problem(rel: str) -> None:
    assert (re.search(SAFE_PATH_PATTERN, rel) is not None) == (path_problem(rel) is None)


# -- default root ---------------------------------------------------------------------------

def test_default_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("PLANRUN_WORKSPACE", str(tmp_path / "configured"))
    assert default_workspace_root() == tmp_path / "configured"


def test_default_root_is_workspace_in_the_current_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PLANRUN_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_workspace_root() == tmp_path / "workspace"


# -- atomic writes --------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    inode = target.stat().st_ino
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != inode  # a new file was renamed over the old one
    assert _temp_files(tmp_path) == []


def test_atomic_write_sets_the_mode_it_is_given(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, b"x", mode=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_failed_atomic_write_keeps_the_original_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("original")
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing-source", target)
    assert target.read_text() == "original"
    assert _temp_files(tmp_path) == []


# -- record and rollback --------------------------------------------------------------------

def test_record_keeps_the_original_as_a_file_in_the_backup_dir(
        ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "a.txt").write_text("original")
    ws.record(ws.resolve("a.txt"))
    backups = [p for p in (tmp_path / "backups").iterdir() if p.name != JOURNAL]
    assert [p.read_text() for p in backups] == ["original"]
    assert (tmp_path / "backups" / JOURNAL).is_file()
    assert ws.recorded() == ["a.txt"]


def test_rollback_restores_modified_and_deleted_files_and_removes_created_ones(
        ws: Workspace) -> None:
    (ws.root / "modified.txt").write_text("before")
    (ws.root / "deleted.txt").write_text("keep me")
    for rel in ("modified.txt", "deleted.txt", "new/created.txt", "new"):
        ws.record(ws.resolve(rel))
    atomic_write(ws.root / "modified.txt", b"after")
    (ws.root / "deleted.txt").unlink()
    (ws.root / "new").mkdir()
    atomic_write(ws.root / "new" / "created.txt", b"fresh")

    restored = ws.rollback()

    assert restored == ["deleted.txt", "modified.txt", "new", "new/created.txt"]
    assert (ws.root / "modified.txt").read_text() == "before"
    assert (ws.root / "deleted.txt").read_text() == "keep me"
    assert not (ws.root / "new").exists()
    assert _temp_files(ws.root) == []


def test_record_keeps_only_the_first_original(ws: Workspace) -> None:
    target = ws.root / "a.txt"
    target.write_text("first")
    ws.record(target)
    atomic_write(target, b"second")
    ws.record(target)  # a later step changes it again
    atomic_write(target, b"third")
    assert ws.rollback() == ["a.txt"]
    assert target.read_text() == "first"


def test_rollback_restores_the_mode(ws: Workspace) -> None:
    target = ws.root / "script.sh"
    target.write_text("echo hi")
    target.chmod(0o750)
    ws.record(target)
    atomic_write(target, b"echo bye", mode=0o600)
    ws.rollback()
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert target.read_text() == "echo hi"


def test_rollback_leaves_out_paths_that_did_not_change(ws: Workspace) -> None:
    (ws.root / "same.txt").write_text("same")
    ws.record(ws.root / "same.txt")
    ws.record(ws.root / "never-created.txt")
    assert ws.rollback() == []
    assert (ws.root / "same.txt").read_text() == "same"


def test_rollback_works_from_a_new_workspace_after_a_restart(tmp_path: Path) -> None:
    first = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    (first.root / "a.txt").write_text("original")
    first.record(first.root / "a.txt")
    atomic_write(first.root / "a.txt", b"changed")
    del first

    again = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    assert again.rollback() == ["a.txt"]
    assert (again.root / "a.txt").read_text() == "original"


def test_commit_discards_the_backups(ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "a.txt").write_text("original")
    ws.record(ws.root / "a.txt")
    atomic_write(ws.root / "a.txt", b"kept")
    ws.commit()
    assert not (tmp_path / "backups").exists() or not any((tmp_path / "backups").iterdir())
    assert ws.recorded() == []
    assert ws.rollback() == []
    assert (ws.root / "a.txt").read_text() == "kept"


def test_a_temporary_backup_dir_is_made_and_removed(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    (ws.root / "a.txt").write_text("x")
    ws.record(ws.root / "a.txt")
    backup_dir = ws.journal.backup_dir
    assert backup_dir is not None and backup_dir.is_dir()
    assert not backup_dir.is_relative_to(ws.real_root)
    ws.commit()
    assert not backup_dir.exists()


def test_record_refuses_paths_outside_the_root(ws: Workspace, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        ws.record(tmp_path / "outside.txt")
    assert ws.recorded() == []


def test_rollback_does_not_write_through_a_symlink_planted_outside(
        ws: Workspace, tmp_path: Path) -> None:
    (ws.root / "sub").mkdir()
    (ws.root / "sub" / "a.txt").write_text("original")
    ws.record(ws.root / "sub" / "a.txt")
    # After the record, the run swaps the directory for a link out of the root.
    (ws.root / "sub" / "a.txt").unlink()
    (ws.root / "sub").rmdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", ws.root / "sub")
    with pytest.raises(PlanrunError, match="rollback could not restore"):
        ws.rollback()
    assert list((tmp_path / "elsewhere").iterdir()) == []


# -- runs sharing a workspace ---------------------------------------------------------------

def test_rollback_leaves_a_path_another_run_changed_after_this_run_wrote_it(
        ws: Workspace) -> None:
    target = ws.root / "x.txt"
    ws.record(target)
    atomic_write(target, b"this run")
    ws.wrote(target)
    atomic_write(target, b"another run")  # a later write by someone else

    assert ws.rollback() == []
    assert target.read_text() == "another run"
    assert ws.left == ["x.txt"]
    assert ws.left_note() == "rollback left x.txt: another run changed it after this run did"


def test_rollback_puts_back_a_path_still_as_this_run_left_it(ws: Workspace) -> None:
    target = ws.root / "x.txt"
    target.write_text("before")
    ws.record(target)
    atomic_write(target, b"this run")
    ws.wrote(target)

    assert ws.rollback() == ["x.txt"]
    assert target.read_text() == "before"
    assert ws.left == [] and ws.left_note() is None


def test_the_lock_is_shared_with_other_processes(ws: Workspace, tmp_path: Path) -> None:
    held, letting_go = tmp_path / "held", tmp_path / "letting-go"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(ws.real_root)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(held)!r}, 'w').close()\n"
        "time.sleep(0.5)\n"
        f"open({str(letting_go)!r}, 'w').close()\n")])  # then it exits: the lock is free
    try:
        wait_for(held.exists, 20, "the other process to take the lock")
        with ws.locked():
            assert letting_go.exists()  # our turn came only once it let go
    finally:
        holder.wait(20)


# -- redo (a retried run goes on from its files as it left them) ---------------------------

def _run_that_changes_three_paths(ws: Workspace) -> None:
    (ws.root / "modified.txt").write_text("before")
    (ws.root / "deleted.txt").write_text("keep me")
    for rel in ("modified.txt", "deleted.txt", "new", "new/created.txt"):
        ws.record(ws.resolve(rel))
    atomic_write(ws.root / "modified.txt", b"after", mode=0o600)
    (ws.root / "deleted.txt").unlink()
    (ws.root / "new").mkdir()
    atomic_write(ws.root / "new" / "created.txt", b"fresh")
    for rel in ("modified.txt", "deleted.txt", "new", "new/created.txt"):
        ws.wrote(ws.resolve(rel))


def test_redo_after_a_restart_puts_back_what_the_rollback_undid(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    _run_that_changes_three_paths(ws)
    ws.rollback()
    assert (ws.root / "modified.txt").read_text() == "before"

    retried = Workspace(tmp_path / "ws", backup_dir=tmp_path / "backups")
    assert retried.redo() == ["deleted.txt", "modified.txt", "new", "new/created.txt"]
    assert (ws.root / "modified.txt").read_text() == "after"
    assert stat.S_IMODE((ws.root / "modified.txt").stat().st_mode) == 0o600
    assert not (ws.root / "deleted.txt").exists()
    assert (ws.root / "new" / "created.txt").read_text() == "fresh"
    assert retried.redo() == []  # once

    # The retry fails too: its rollback puts the originals back again.
    assert retried.rollback() == ["deleted.txt", "modified.txt", "new", "new/created.txt"]
    assert (ws.root / "modified.txt").read_text() == "before"
    assert (ws.root / "deleted.txt").read_text() == "keep me"
    assert not (ws.root / "new").exists()


def test_redo_leaves_a_path_changed_since_the_rollback(ws: Workspace) -> None:
    _run_that_changes_three_paths(ws)
    ws.rollback()
    atomic_write(ws.root / "modified.txt", b"another run")  # after the rollback

    assert ws.redo() == ["deleted.txt", "new", "new/created.txt"]
    assert (ws.root / "modified.txt").read_text() == "another run"
    assert ws.left == ["modified.txt"]


def test_redo_never_follows_a_symbolic_link_the_run_left(ws: Workspace, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("not for the workspace")
    link = ws.root / "link.txt"
    ws.record(link)
    link.symlink_to(secret)  # a command of the run made it

    assert ws.rollback() == ["link.txt"]
    assert ws.redo() == []
    assert not os.path.lexists(link)
    assert not any("not for the workspace" in p.read_text(errors="replace")
                   for p in ws.root.rglob("*") if p.is_file())
