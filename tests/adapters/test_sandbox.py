"""The sandbox's parts: limits, bubblewrap's options and the probe (the control groups
and the launcher are in test_cgroups.py and test_launcher.py).

What a program inside the sandbox can and cannot do is tested with real programs in
tests/adapters/test_shell.py and, as attacks, in tests/security/test_shell.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from planrun.adapters import sandbox
from planrun.adapters.executables import allowed_argv, allows, resolve_program
from planrun.adapters.sandbox import Limits, step_limits
from planrun.errors import ConfigurationError
from planrun.policy import Ceilings, LevelPolicy

MIB = 1024 * 1024


# -- limits ---------------------------------------------------------------------------------

def test_a_sandboxed_step_gets_the_default_process_and_file_limits() -> None:
    limits = step_limits(None, None, Ceilings(), sandboxed=True)
    assert limits == Limits(processes=256, file_bytes=1024 * MIB)


def test_the_lower_of_the_plans_value_and_the_policys_ceiling_applies() -> None:
    ceilings = Ceilings(memory_mb=300, cpu_seconds=5, processes=10, file_mb=2)
    assert step_limits(500, 60, ceilings, sandboxed=True) == Limits(
        memory_bytes=300 * MIB, cpu_seconds=5, file_bytes=2 * MIB, processes=10)
    assert step_limits(100, 2, ceilings, sandboxed=True).memory_bytes == 100 * MIB
    assert step_limits(100, 2, ceilings, sandboxed=True).cpu_seconds == 2


def test_an_unconfined_step_gets_only_memory_and_cpu_limits() -> None:
    assert step_limits(None, None, Ceilings(), sandboxed=False) == Limits()
    assert not Limits().any
    assert step_limits(64, 3, Ceilings(), sandboxed=False) == Limits(
        memory_bytes=64 * MIB, cpu_seconds=3)


# -- bubblewrap's options -------------------------------------------------------------------

def _options(tmp_path: Path, policy: LevelPolicy | None = None, **env: str) -> list[str]:
    return sandbox.bwrap_options(workspace=tmp_path, cwd=tmp_path, env=env,
                                 policy=policy or LevelPolicy())


def _pairs(options: list[str], flag: str) -> list[str]:
    return [options[i + 1] for i, option in enumerate(options) if option == flag]


def test_the_sandbox_unshares_everything_and_runs_as_nobody(tmp_path: Path) -> None:
    options = _options(tmp_path)
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                 "--clearenv"):
        assert flag in options
    assert _pairs(options, "--uid") == ["65534"] and _pairs(options, "--gid") == ["65534"]
    assert "--share-net" not in options
    assert "/etc/resolv.conf" not in options


def test_the_network_is_shared_only_when_the_policy_says_so(tmp_path: Path) -> None:
    options = _options(tmp_path, LevelPolicy(sandbox_network=True))
    assert "--share-net" in options
    assert "/etc/resolv.conf" in options and "/etc/ssl" in options


def test_the_workspace_is_the_only_writable_bind_and_the_root_is_read_only(
        tmp_path: Path) -> None:
    options = _options(tmp_path)
    assert _pairs(options, "--bind") == [str(tmp_path)]
    assert _pairs(options, "--remount-ro") == ["/"]
    assert _pairs(options, "--chdir") == [str(tmp_path)]


def test_the_policys_binds_are_read_only_unless_marked_rw(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "cache").mkdir()
    options = _options(tmp_path / "ws", LevelPolicy(
        binds=[str(tmp_path / "tools"), f"{tmp_path / 'cache'}:rw"]))
    assert str(tmp_path / "tools") in _pairs(options, "--ro-bind")
    assert _pairs(options, "--bind")[0] == str(tmp_path / "cache")


def test_a_bind_missing_on_this_machine_is_a_configuration_error_naming_it(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist") as caught:
        _options(tmp_path, LevelPolicy(binds=["/no/such/dir:rw"]))
    assert "'/no/such/dir:rw'" in caught.value.message
    assert "docs/sandbox.md" in caught.value.hint


def test_the_environment_is_path_home_lang_and_the_steps_env(tmp_path: Path) -> None:
    env = sandbox.sandbox_env(tmp_path, {"GREETING": "hi", "PATH": "/usr/bin"})
    assert env["HOME"] == str(tmp_path) and env["GREETING"] == "hi"
    assert env["PATH"] == "/usr/bin"  # the step's env wins
    assert set(env) <= {"PATH", "HOME", "LANG", "GREETING"}


# -- the probe ------------------------------------------------------------------------------

def test_the_probe_finds_the_installed_bubblewrap_working() -> None:
    assert sandbox.sandbox_problem() is None
    assert sandbox.probed()


def test_the_probe_says_when_bubblewrap_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, str(tmp_path / "bwrap"))
    assert sandbox.sandbox_problem() == f"{tmp_path / 'bwrap'} is not installed"


def test_the_probe_says_when_bubblewrap_cannot_make_a_sandbox(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(sandbox.BWRAP_ENV, str(fake))
    assert sandbox.sandbox_problem() == (
        f"{fake} could not create a sandbox: bwrap: No permissions to create new namespace")


def test_the_probe_says_when_the_bubblewrap_file_cannot_run_at_all(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "bwrap"
    broken.write_bytes(b"\x00not a program")
    broken.chmod(0o755)
    monkeypatch.setenv(sandbox.BWRAP_ENV, str(broken))
    assert sandbox.sandbox_problem() == f"{broken} could not run: [Errno 8] Exec format error: " \
        f"'{broken}'"


# -- executables ----------------------------------------------------------------------------

def test_a_rule_without_a_slash_names_a_program_in_a_system_directory() -> None:
    assert allows("echo", "/usr/bin/echo")
    assert allows("python3*", "/usr/bin/python3.11")
    assert not allows("echo", "/tmp/ws/echo")
    assert not allows("echo", "/usr/bin/curl")


def test_a_rule_with_a_slash_is_matched_against_the_resolved_path() -> None:
    assert allows("/opt/tools/*", "/opt/tools/lint")
    assert not allows("/usr/bin/echo", "/bin/sh")


def test_the_program_is_resolved_on_the_path_or_against_the_working_directory(
        tmp_path: Path) -> None:
    assert resolve_program("sh", str(tmp_path), "/usr/bin:/bin") == "/usr/bin/sh"
    assert resolve_program("/usr/bin/echo/../../bin/sh", "/", "") == "/usr/bin/sh"
    assert resolve_program("../../bin/sh", "/usr/lib", "") == "/bin/sh"
    with pytest.raises(FileNotFoundError):
        resolve_program("no-such-program-xyz", str(tmp_path), "/usr/bin")


def test_the_checked_path_is_what_runs() -> None:
    assert allowed_argv(["echo", "hi"], "/", "/usr/bin", ["echo"]) == ["/usr/bin/echo", "hi"]
    assert allowed_argv(["echo", "hi"], "/", "/usr/bin", None) == ["echo", "hi"]


