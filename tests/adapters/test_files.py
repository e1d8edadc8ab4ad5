"""The file tools on a real workspace: confinement, atomic writes, rollback, errors."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from planrun.adapters.base import Adapter, StepContext
from planrun.adapters.files import FileDelete, FileList, FileRead, FileWrite, _to_completion
from planrun.adapters.workspace import Workspace
from planrun.errors import AccessError, ConfigurationError, ResourceError, StepError

TOOLS: list[type[Adapter[Any]]] = [FileRead, FileWrite, FileDelete, FileList]


def run(tool: Adapter[Any], ctx: StepContext, **params: Any) -> Any:
    return asyncio.run(tool.run(params, ctx, timeout=10))


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*.tmp")]


# -- static checks (what `planrun validate` sees) -------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", ""])
def test_unsafe_paths_fail_the_parameter_model_and_schema(tool: type[Adapter[Any]],
                                                          path: str) -> None:
    params = {"path": path, "content": "x"} if tool is FileWrite else {"path": path}
    with pytest.raises(ConfigurationError, match="path"):
        tool().validate(params)
    assert list(Draft202012Validator(tool.parameter_schema()).iter_errors(params))


@pytest.mark.parametrize("tool", TOOLS)
def test_templated_paths_pass_the_static_check(tool: type[Adapter[Any]]) -> None:
    params = {"path": "{{ inputs.dir }}/../{{ steps.a.output.name }}"}
    if tool is FileWrite:
        params["content"] = "x"
    assert tool().validate(params).path == params["path"]  # type: ignore[attr-defined]


def test_a_rendered_template_is_still_confined(ctx: StepContext) -> None:
    # A value that still holds "{{" after rendering skips the model check; resolve refuses.
    with pytest.raises(ConfigurationError, match=r"'\.\.'"):
        run(FileRead(), ctx, path="{{x}}/../../etc/passwd")


# -- file.read ------------------------------------------------------------------------------

def test_read_returns_path_content_and_size(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "notes").mkdir()
    (ws.root / "notes" / "a.md").write_text("héllo\n", encoding="utf-8")
    out = run(FileRead(), ctx, path="./notes//a.md")
    assert out == {"path": "notes/a.md", "content": "héllo\n", "size": 7}


def test_read_of_a_missing_file_is_a_configuration_error(ctx: StepContext) -> None:
    with pytest.raises(ConfigurationError, match="no such file") as caught:
        run(FileRead(), ctx, path="missing.txt")
    assert "missing.txt" in caught.value.message
    assert "file.list" in caught.value.hint


def test_read_of_binary_data_is_a_configuration_error(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (ws.root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name in ("image.png", "latin1.txt"):
        with pytest.raises(ConfigurationError, match="not UTF-8 text"):
            run(FileRead(), ctx, path=name)


def test_read_refuses_files_over_max_bytes(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "big.txt").write_text("x" * 101)
    with pytest.raises(ConfigurationError, match="larger than max_bytes=100"):
        run(FileRead(), ctx, path="big.txt", max_bytes=100)
    assert run(FileRead(), ctx, path="big.txt", max_bytes=101)["size"] == 101


def test_read_of_a_directory_is_a_configuration_error(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        run(FileRead(), ctx, path="dir")


def test_read_through_a_symlink_out_of_the_root_is_refused(
        ctx: StepContext, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("top secret")
    (ws.root / "innocent.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ConfigurationError, match="outside the workspace") as caught:
        run(FileRead(), ctx, path="innocent.txt")
    assert "top secret" not in str(caught.value)


def test_read_under_a_symlinked_directory_out_of_the_root_is_refused(
        ctx: StepContext, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key").write_text("k")
    (ws.root / "docs").symlink_to(tmp_path / "private")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(FileRead(), ctx, path="docs/key")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_read_of_an_unreadable_file_is_an_access_error(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "locked.txt").write_text("x")
    (ws.root / "locked.txt").chmod(0)
    with pytest.raises(AccessError, match="permission denied"):
        run(FileRead(), ctx, path="locked.txt")


# -- file.write -----------------------------------------------------------------------------

def test_write_creates_parent_dirs_and_reports_bytes(ctx: StepContext, ws: Workspace) -> None:
    out = run(FileWrite(), ctx, path="out/deep/r.txt", content="día")
    assert out == {"path": "out/deep/r.txt", "bytes": 4}
    assert (ws.root / "out" / "deep" / "r.txt").read_text(encoding="utf-8") == "día"


def test_write_is_atomic_and_leaves_no_temp_files(ctx: StepContext, ws: Workspace) -> None:
    target = ws.root / "f.txt"
    target.write_text("old")
    inode = target.stat().st_ino
    run(FileWrite(), ctx, path="f.txt", content="new")
    assert target.read_text() == "new"
    assert target.stat().st_ino != inode  # renamed into place, not rewritten in place
    assert _temp_files(ws.root) == []


def test_write_appends(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "log.txt").write_text("one\n")
    out = run(FileWrite(), ctx, path="log.txt", content="two\n", append=True)
    assert out["bytes"] == 4
    assert (ws.root / "log.txt").read_text() == "one\ntwo\n"
    run(FileWrite(), ctx, path="fresh.txt", content="x", append=True)
    assert (ws.root / "fresh.txt").read_text() == "x"


def test_write_keeps_the_mode_of_an_existing_file(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "run.sh").write_text("echo 1")
    (ws.root / "run.sh").chmod(0o751)
    run(FileWrite(), ctx, path="run.sh", content="echo 2")
    assert stat.S_IMODE((ws.root / "run.sh").stat().st_mode) == 0o751


def test_write_through_a_symlink_out_of_the_root_is_refused(
        ctx: StepContext, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "victim.txt").write_text("untouched")
    (ws.root / "link.txt").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(FileWrite(), ctx, path="link.txt", content="pwned")
    assert (tmp_path / "victim.txt").read_text() == "untouched"
    assert (ws.root / "link.txt").is_symlink()


def test_write_under_a_symlinked_directory_out_of_the_root_is_refused(
        ctx: StepContext, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (ws.root / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(FileWrite(), ctx, path="out/sub/new.txt", content="x")
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert ws.recorded() == []


def test_write_onto_a_directory_is_a_configuration_error(ctx: StepContext,
                                                          ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        run(FileWrite(), ctx, path="dir", content="x")


def test_write_under_a_file_is_a_configuration_error(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "plain").write_text("x")
    with pytest.raises(ConfigurationError):
        run(FileWrite(), ctx, path="plain/child.txt", content="x")


def test_a_rollback_undoes_writes_and_created_directories(ctx: StepContext,
                                                          ws: Workspace) -> None:
    (ws.root / "kept.txt").write_text("original")
    run(FileWrite(), ctx, path="kept.txt", content="changed")
    run(FileWrite(), ctx, path="kept.txt", content="changed again", append=True)
    run(FileWrite(), ctx, path="new/dir/created.txt", content="x")
    assert ws.rollback() == ["kept.txt", "new", "new/dir", "new/dir/created.txt"]
    assert (ws.root / "kept.txt").read_text() == "original"
    assert sorted(p.name for p in ws.root.iterdir()) == ["kept.txt"]


def test_a_cancelled_change_finishes_before_the_cancel_is_seen() -> None:
    # A write in a thread cannot be interrupted; the step waits for it so that nothing
    # lands after a rollback.
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def change() -> None:
        started.set()
        release.wait(5)
        finished.set()

    async def scenario() -> None:
        task = asyncio.ensure_future(_to_completion(change))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # still waiting for the change
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()

    asyncio.run(scenario())


# -- file.delete ----------------------------------------------------------------------------

def test_delete_removes_the_file_and_a_rollback_brings_it_back(ctx: StepContext,
                                                               ws: Workspace) -> None:
    (ws.root / "doomed.txt").write_text("precious")
    assert run(FileDelete(), ctx, path="doomed.txt") == {"path": "doomed.txt", "deleted": True}
    assert not (ws.root / "doomed.txt").exists()
    assert ws.rollback() == ["doomed.txt"]
    assert (ws.root / "doomed.txt").read_text() == "precious"


def test_delete_of_a_missing_file(ctx: StepContext) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        run(FileDelete(), ctx, path="ghost.txt")
    assert run(FileDelete(), ctx, path="ghost.txt", missing_ok=True) == {
        "path": "ghost.txt", "deleted": False}


def test_delete_of_a_directory_is_refused(ctx: StepContext, ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        run(FileDelete(), ctx, path="dir")
    assert (ws.root / "dir").is_dir()


def test_delete_through_a_symlink_out_of_the_root_is_refused(
        ctx: StepContext, ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "victim.txt").write_text("x")
    (ws.root / "link").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(FileDelete(), ctx, path="link")
    assert (tmp_path / "victim.txt").exists()


# -- file.list ------------------------------------------------------------------------------

@pytest.fixture
def tree(ws: Workspace, tmp_path: Path) -> Workspace:
    (ws.root / "b.txt").write_text("bb")
    (ws.root / "a.md").write_text("a")
    (ws.root / "docs").mkdir()
    (ws.root / "docs" / "guide.md").write_text("guide")
    (ws.root / "docs" / "deep").mkdir()
    (ws.root / "docs" / "deep" / "x.md").write_text("xyz")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "leak.md").write_text("leak")
    (ws.root / "escape").symlink_to(tmp_path / "outside")
    return ws


def test_list_gives_sorted_entries_with_type_and_size(ctx: StepContext, tree: Workspace) -> None:
    out = run(FileList(), ctx)
    assert out == {"path": ".", "truncated": False, "entries": [
        {"path": "a.md", "type": "file", "size": 1},
        {"path": "b.txt", "type": "file", "size": 2},
        {"path": "docs", "type": "dir", "size": None},
        {"path": "escape", "type": "symlink", "size": None},
    ]}


def test_list_recursive_with_a_pattern_never_follows_links_out(ctx: StepContext,
                                                               tree: Workspace) -> None:
    out = run(FileList(), ctx, pattern="*.md", recursive=True)
    assert [e["path"] for e in out["entries"]] == ["a.md", "docs/deep/x.md", "docs/guide.md"]


def test_list_of_a_subdirectory_with_a_path_pattern(ctx: StepContext, tree: Workspace) -> None:
    out = run(FileList(), ctx, path="docs", pattern="deep/*", recursive=True)
    assert out["path"] == "docs"
    assert [e["path"] for e in out["entries"]] == ["docs/deep/x.md"]


def test_list_of_a_symlinked_directory_out_of_the_root_is_refused(
        ctx: StepContext, tree: Workspace) -> None:
    with pytest.raises(ConfigurationError, match="outside the workspace"):
        run(FileList(), ctx, path="escape")


def test_list_stops_at_max_entries(ctx: StepContext, tree: Workspace) -> None:
    out = run(FileList(), ctx, recursive=True, max_entries=2)
    assert out["truncated"] is True
    assert len(out["entries"]) == 2


def test_list_of_a_file_or_missing_dir_is_a_configuration_error(ctx: StepContext,
                                                                tree: Workspace) -> None:
    for path in ("a.md", "nowhere"):
        with pytest.raises(ConfigurationError):
            run(FileList(), ctx, path=path)


# -- the error edge -------------------------------------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("code", "expected"), [
    (errno.EACCES, AccessError), (errno.EPERM, AccessError),
    (errno.ENOSPC, ResourceError), (errno.EDQUOT, ResourceError),
    (errno.ENOENT, ConfigurationError), (errno.EISDIR, ConfigurationError),
])
def test_os_errors_map_to_categories(tool: type[Adapter[Any]], code: int,
                                     expected: type[StepError]) -> None:
    error = tool().classify(OSError(code, os.strerror(code), "/ws/f.txt"))
    assert type(error) is expected
    assert "/ws/f.txt" in error.message
    assert error.hint
