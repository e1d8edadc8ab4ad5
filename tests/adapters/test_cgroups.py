"""A step's control groups, made for real where the machine allows it (root, cgroup v1 or a
delegated v2 tree); each test that needs one skips, saying why, where none can be made."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from planrun.adapters import cgroups
from planrun.adapters.cgroups import StepGroup, make_step_group, remove_cgroup
from tests.helpers import launch

MIB = 1024 * 1024


def _group(memory_bytes: int = 0, processes: int = 0) -> StepGroup:
    group = make_step_group(memory_bytes, processes)
    if group is None:
        pytest.skip("no control group can be made here (not root, or no writable "
                    "hierarchy): the rlimit and sampling fallbacks are used instead")
    return group


def _run_in(group: StepGroup, *argv: str) -> tuple[int, str]:
    done, report = launch(list(argv), procs=group.procs_files())
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


