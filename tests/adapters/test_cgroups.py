"""A step's control groups, made for real where the machine allows it (root, cgroup v1 or a
delegated v2 tree); each test that needs one skips, saying why, where none can be made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planrun.adapters import cgroups
from planrun.adapters.cgroups import StepGroup, make_step_group, remove_cgroup
from planrun.adapters.launcher import launch_argv, read_report
from planrun.adapters.sandbox import Limits

MIB = 1024 * 1024


def _group(memory_bytes: int = 0, processes: int = 0) -> StepGroup:
    group = make_step_group(memory_bytes, processes)
    if group is None:
        pytest.skip("no control group can be made here (not root, or no writable "
                    "hierarchy): the rlimit and sampling fallbacks are used instead")
    return group


def _run_in(group: StepGroup, *argv: str) -> tuple[int, str]:
    read, write = os.pipe()
    try:
        done = subprocess.run(launch_argv(list(argv), Limits(), write, group.procs_files()),
                              pass_fds=(write,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(write)
    report = read_report(read)
    os.close(read)
    assert report.failure is None, report
    return done.returncode, done.stderr


def test_a_step_group_is_made_in_every_controller_and_removed() -> None:
    group = _group(memory_bytes=64 * MIB, processes=5)
    try:
        assert set(group.dirs) >= {"memory", "pids"}
        assert group.memory_limited
        assert (group.dirs["pids"] / "pids.max").read_text().strip() == "7"  # + bubblewrap's
        for path in group.dirs.values():
            assert path.parent.name == cgroups.FOLDER and path.is_dir()
    finally:
        assert group.remove()
    assert not any(path.exists() for path in group.dirs.values())


def test_the_group_counts_the_peak_memory_and_cpu_of_the_whole_tree() -> None:
    group = _group()
    try:
        code, said = _run_in(group, sys.executable, "-c", (
            "import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', "
            "'b = bytearray(60 * 2**20); import time; time.sleep(0.5)'])\n"
            "b = bytearray(60 * 2**20)\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            "child.wait()"))
        assert code == 0, said
        peak, cpu = group.peak_memory(), group.cpu_s()
        assert peak is not None and peak >= 120 * MIB  # both processes' blocks at once
        assert cpu is not None and cpu >= 0.3
    finally:
        group.remove()


def test_the_memory_limit_kills_the_tree_and_is_counted() -> None:
    group = _group(memory_bytes=40 * MIB)
    try:
        code, _ = _run_in(group, sys.executable, "-c", "b = bytearray(200 * 2**20)")
        assert code == -9
        assert group.oom_kills() >= 1
    finally:
        group.remove()


def test_lowering_the_weight_writes_nice_10s_share() -> None:
    group = _group()
    try:
        if "cpu" not in group.dirs:
            pytest.skip("no cpu controller here")
        assert group.lower_weight()
        name = "cpu.weight" if group.v2 else "cpu.shares"
        expected = cgroups.LOW_WEIGHT if group.v2 else cgroups.LOW_SHARES
        assert int((group.dirs["cpu"] / name).read_text()) == expected
    finally:
        group.remove()


def test_removing_a_cgroup_that_is_already_gone_succeeds(tmp_path: Path) -> None:
    assert remove_cgroup(tmp_path / "gone", within=0)


def test_a_cgroup_that_stays_busy_is_reported_after_the_wait(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("")  # a plain directory: rmdir keeps failing
    assert not remove_cgroup(busy, within=0.05)
    assert busy.exists()


def test_a_group_without_its_files_answers_none(tmp_path: Path) -> None:
    group = StepGroup({"memory": tmp_path / "m", "cpuacct": tmp_path / "c"})
    assert (group.peak_memory(), group.cpu_s(), group.oom_kills(), group.pids()) == \
        (None, None, 0, [])
    assert not group.lower_weight()


def test_a_spare_made_ahead_is_the_next_steps_group_and_used_once() -> None:
    _group().remove()  # skips where no group can be made
    cgroups._spares.clear()
    cgroups.make_spare()
    cgroups.make_spare()  # one is kept, not two
    assert len(cgroups._spares) == 1
    spare = dict(cgroups._spares[0][1])
    group = make_step_group(64 * MIB, 5)
    assert group is not None
    try:
        assert dict(group.dirs) == spare and not cgroups._spares
        assert group.memory_limited  # the step's own limits are set on the spare
        assert (group.dirs["pids"] / "pids.max").read_text().strip() == "7"
        other = _group()
        assert set(other.dirs.values()).isdisjoint(spare.values())  # a new one after it
        assert other.remove()
    finally:
        assert group.remove()


def test_a_spare_is_not_taken_by_a_forked_child_nor_under_another_root(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _group().remove()
    cgroups._spares.clear()
    cgroups.make_spare()
    spare = cgroups._spares[0][1]
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: a group of its own, not its parent's spare
            group = make_step_group()
            ok = group is not None and set(group.dirs.values()).isdisjoint(spare.values())
            if group is not None:
                group.remove()
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1"
        os.waitpid(pid, 0)
        os.close(read)
        assert all(path.is_dir() for path in spare.values())  # still there for us
        monkeypatch.setenv(cgroups.ROOT_ENV, "/nonexistent")
        assert make_step_group() is None  # the spare was made under the real root
    finally:
        cgroups._remove_spares()
    assert not any(path.exists() for path in spare.values())
