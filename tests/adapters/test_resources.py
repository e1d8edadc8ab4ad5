"""What a step's program used, its limits and its priority, and the disk checks of the file
tools, with real processes and a real small file system (docs/resources.md).

The accounting tests run both in the sandbox and unconfined. Tests that need a control
group or a mount skip, saying why, where the machine does not allow them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from planrun.adapters import cgroups, sandbox
from planrun.adapters.base import StepContext
from planrun.adapters.cgroups import make_step_group
from planrun.adapters.files import FileWrite, workspace_health
from planrun.adapters.shell import ShellRun
from planrun.adapters.usage import RunWrites, StepUsage
from planrun.adapters.watch import NICE, TreeWatch
from planrun.adapters.workspace import Workspace
from planrun.errors import ResourceError
from planrun.policy import LevelPolicy, Trust
from tests.helpers import unique_digits, wait_for

MIB = 1024 * 1024
PY = shutil.which("python3", path=sandbox.DEFAULT_PATH) or "python3"
UNCONFINED = LevelPolicy(allow_private=True, sandbox="off")


def _needs_groups() -> None:
    group = make_step_group()
    if group is None:
        pytest.skip("no control group can be made here (not root, or no writable hierarchy)")
    group.remove()


def run(ctx: StepContext, timeout: float = 60, **params: Any) -> Any:
    return asyncio.run(ShellRun().run(params, ctx, timeout=timeout))


@pytest.fixture(params=["sandboxed", "unconfined"])
def either(request: pytest.FixtureRequest, make_ctx: Callable[..., StepContext]
           ) -> Callable[..., StepContext]:
    """A context factory, in the sandbox and out of it."""
    def make(**fields: Any) -> StepContext:
        if request.param == "unconfined":
            fields = {"trust": Trust.LOCAL, "policy": UNCONFINED, **fields}
        return make_ctx(**fields)
    return make


WORKLOAD = textwrap.dedent("""
    import time
    block = bytearray(b"x") * (100 * 2**20)
    with open("written.bin", "wb") as out:
        out.write(bytes(2**20))
        out.flush()
    started = time.process_time()
    while time.process_time() - started < 0.5:
        pass
""")


def test_a_programs_memory_cpu_and_writes_are_recorded(either: Callable[..., StepContext]
                                                       ) -> None:
    ctx = either()
    assert run(ctx, argv=[PY, "-c", WORKLOAD])["exit_code"] == 0
    used = ctx.usage.programs
    assert used is not None
    assert used.peak_memory_bytes >= 100 * MIB
    assert used.cpu_s >= 0.4
    assert used.written_bytes >= MIB


def test_the_whole_tree_is_counted(either: Callable[..., StepContext]) -> None:
    ctx = either()
    script = ("import subprocess, sys\n"
              f"subprocess.run([sys.executable, '-c', {WORKLOAD!r}], check=True)\n")
    assert run(ctx, argv=[PY, "-c", script])["exit_code"] == 0
    used = ctx.usage.programs
    assert used is not None
    assert used.peak_memory_bytes >= 100 * MIB and used.cpu_s >= 0.4
    assert used.written_bytes >= MIB


def test_without_control_groups_the_launcher_and_samples_still_account(
        either: Callable[..., StepContext], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.ROOT_ENV, "/nonexistent")  # a machine without cgroups
    assert cgroups.make_step_group(64 * MIB, 5) is None
    ctx = either()
    assert run(ctx, argv=[PY, "-c", WORKLOAD])["exit_code"] == 0
    used = ctx.usage.programs
    assert used is not None
    assert used.peak_memory_bytes >= 100 * MIB  # the largest process's resident set
    assert used.cpu_s >= 0.4 and used.written_bytes >= MIB


def test_without_control_groups_memory_is_limited_per_process(
        make_ctx: Callable[..., StepContext], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.ROOT_ENV, "/nonexistent")
    with pytest.raises(ResourceError, match="ran out of memory under its limit of 64 MiB"):
        run(make_ctx(memory_mb=64), argv=[PY, "-c", "block = bytearray(b'x') * 2**28"])


def test_a_memory_hungry_tree_is_killed_at_its_limit(either: Callable[..., StepContext]
                                                     ) -> None:
    _needs_groups()
    ctx = either(memory_mb=64)
    hungry = f"{PY} -c 'block = bytearray(b\"x\") * (300 * 2**20)'; sleep 30"
    with pytest.raises(ResourceError, match="killed at its memory limit of 64 MiB") as caught:
        run(ctx, argv=["sh", "-c", hungry])
    assert caught.value.category == "resource"
    assert ctx.usage.programs is not None
    assert ctx.usage.programs.peak_memory_bytes <= 64 * MIB


def test_the_cpu_limit_holds_for_the_whole_tree(ctx: StepContext) -> None:
    _needs_groups()
    burn = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.7: pass"
    three = f"for i in 1 2 3; do {PY} -c '{burn}' & done; wait; sleep 30"
    with pytest.raises(ResourceError, match="CPU limit of 1s"):
        run(ctx, argv=["sh", "-c", three], cpu_seconds=1)  # each alone stays under 1 s


def test_a_long_running_program_is_reniced_and_its_group_weighs_less(ctx: StepContext
                                                                      ) -> None:
    digits = unique_digits()
    spinner = f"n = {digits}\nwhile True: pass"
    probe = make_step_group()
    cpu_groups = probe is not None and not probe.v2 and "cpu" in probe.dirs
    if probe is not None:
        probe.remove()

    def spinning() -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if len(cmdline) == 3 and cmdline[1] == "-c" and cmdline[2] == spinner:
                return proc
        return None

    async def scenario() -> None:
        task = asyncio.ensure_future(ShellRun().run({"argv": [PY, "-c", spinner]}, ctx,
                                                    timeout=60))
        try:
            proc = await asyncio.to_thread(wait_for, spinning, 30, "the spinner")
            await asyncio.to_thread(wait_for, lambda: proc.nice() == NICE, 30,
                                    "the spinner to be reniced")
            if cpu_groups:  # cgroup v1 with a cpu hierarchy, as on the machine it was built
                lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
                path = next(line.split(":", 2)[2] for line in lines if ":cpu:" in line)
                assert "/planrun/" in path
                group = Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
                await asyncio.to_thread(wait_for, lambda: (group / "cpu.shares").read_text()
                                        .strip() == "110", 10, "the group's lower weight")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_program_is_reniced_only_once_it_has_run_a_second() -> None:
    digits = unique_digits()
    parent = subprocess.Popen(["sh", "-c", f"sleep 30.{digits}; true"])
    try:
        sleeper = wait_for(lambda: parent_children(parent.pid), 10, "the sleep")[0]
        watch = TreeWatch(parent.pid, None)
        watch.look(elapsed=0.5)
        assert psutil.Process(sleeper).nice() == 0
        watch.look(elapsed=1.0)
        assert psutil.Process(sleeper).nice() == NICE
        assert watch.sampled_peak > 0  # no group here: the tree's memory is sampled
    finally:
        parent.kill()
        for pid in parent_children(parent.pid):
            os.kill(pid, 9)
        parent.wait()


def parent_children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


# -- the disk -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root only), unmounted after it."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def write(ctx: StepContext, path: str, content: str) -> Any:
    return asyncio.run(FileWrite().run({"path": path, "content": content}, ctx, timeout=30))


def test_a_write_that_would_leave_too_little_free_space_is_refused(small_disk: Path,
                                                                   tmp_path: Path) -> None:
    ws = Workspace(small_disk / "ws", backup_dir=tmp_path / "backups")
    ctx = StepContext(run_id="r", step_id="s", workspace=ws, policy=LevelPolicy())
    assert write(ctx, "fits.txt", "x" * 1024)["bytes"] == 1024
    (small_disk / "filler").write_bytes(bytes(1880 * 1024))  # the disk is nearly full
    with pytest.raises(ResourceError, match="refused to write 65536 bytes") as caught:
        write(ctx, "big.txt", "x" * 65536)
    assert caught.value.category == "resource"
    assert "min_free_mb" in caught.value.hint
    assert not (ws.root / "big.txt").exists()


def test_a_program_does_not_start_on_a_nearly_full_disk_and_the_tools_say_so(
        small_disk: Path) -> None:
    ws = Workspace(small_disk / "ws")
    (small_disk / "filler").write_bytes(bytes(1990 * 1024))
    assert not workspace_health(ws.root, LevelPolicy()).ok
    ctx = StepContext(run_id="r", step_id="s", workspace=ws, policy=UNCONFINED,
                      trust=Trust.LOCAL)
    with pytest.raises(ResourceError, match="kept free"):
        run(ctx, argv=["true"])


def test_the_file_tools_stop_at_the_runs_quota(make_ctx: Callable[..., StepContext],
                                               ws: Workspace) -> None:
    writes = RunWrites()
    policy = LevelPolicy(workspace_quota_mb=1)
    first = make_ctx(policy=policy, usage=StepUsage(writes))
    write(first, "a.txt", "x" * (600 * 1024))
    second = make_ctx(policy=policy, usage=StepUsage(writes))  # another step of the run
    with pytest.raises(ResourceError, match="workspace quota of 1 MiB") as caught:
        write(second, "b.txt", "x" * (600 * 1024))
    assert "workspace_quota_mb" in caught.value.hint
    assert not (ws.root / "b.txt").exists()
    assert writes.written == 600 * 1024


def test_a_program_that_takes_the_run_over_its_quota_fails(
        make_ctx: Callable[..., StepContext]) -> None:
    ctx = make_ctx(policy=LevelPolicy(workspace_quota_mb=1))
    script = ("for name in ('a', 'b'):\n"
              "    with open(name, 'wb') as out:\n"
              "        out.write(bytes(700 * 1024))\n")
    with pytest.raises(ResourceError, match="over the run's workspace quota of 1 MiB"):
        run(ctx, argv=[PY, "-c", script])  # each file under the file-size cap, both over


def test_no_file_may_be_larger_than_what_is_left_of_the_quota(
        make_ctx: Callable[..., StepContext], ws: Workspace) -> None:
    ctx = make_ctx(policy=LevelPolicy(workspace_quota_mb=1))
    with pytest.raises(ResourceError, match="larger than its limit of 1 MiB"):
        run(ctx, argv=["sh", "-c", "head -c 3000000 /dev/zero > big"])
    assert (ws.root / "big").stat().st_size <= MIB
