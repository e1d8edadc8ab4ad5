"""planrun.bridge_token: which token a bridge requires and a client presents, and the
errors a person gets when the token file cannot be made or read."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from planrun import bridge_token
from planrun.errors import PlanrunError, UsageError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    monkeypatch.delenv(bridge_token.ENV, raising=False)
    return tmp_path


def test_the_first_ensure_makes_a_private_token_file_that_later_calls_reuse(home: Path) -> None:
    token = bridge_token.ensure()
    file = home / bridge_token.FILE_NAME
    assert file.read_text() == token + "\n" and len(token) >= 40
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert bridge_token.ensure() == token and bridge_token.for_client() == token
    assert [p.name for p in home.iterdir()] == [bridge_token.FILE_NAME]  # no drafts left


def test_a_client_without_a_token_file_or_variable_presents_none(home: Path) -> None:
    assert bridge_token.for_client() is None


def test_an_explicit_token_wins_everywhere(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bridge_token.ENV, "chosen-secret")
    assert bridge_token.ensure() == "chosen-secret"
    assert bridge_token.for_client() == "chosen-secret"
    assert not (home / bridge_token.FILE_NAME).exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.8.9.10"])
def test_a_loopback_bridge_uses_the_token_file(home: Path, host: str) -> None:
    assert bridge_token.for_bind(host) == (home / bridge_token.FILE_NAME).read_text().strip()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "my-laptop"])
def test_a_bridge_beyond_loopback_needs_an_explicit_token(home: Path, host: str) -> None:
    with pytest.raises(UsageError, match=f"listen on {host}, beyond this machine, without "
                                         "an explicit token: set PLANRUN_TOKEN"):
        bridge_token.for_bind(host)


def test_a_bridge_beyond_loopback_uses_the_explicit_token(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bridge_token.ENV, "chosen-secret")
    assert bridge_token.for_bind("0.0.0.0") == "chosen-secret"


def test_an_empty_token_file_says_to_delete_it(home: Path) -> None:
    (home / bridge_token.FILE_NAME).write_text("\n")
    with pytest.raises(PlanrunError, match="is empty: delete it and start `planrun up`"):
        bridge_token.ensure()


def test_a_token_file_that_cannot_be_read_is_named_with_the_reason(home: Path) -> None:
    (home / bridge_token.FILE_NAME).mkdir()
    with pytest.raises(PlanrunError, match="cannot read the bridge token .*bridge.token: "
                                           "Is a directory"):
        bridge_token.for_client()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs")
def test_a_token_file_that_cannot_be_created_is_named_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_HOME", "/sys/kernel")  # sysfs: no new files, even for root
    monkeypatch.delenv(bridge_token.ENV, raising=False)
    with pytest.raises(PlanrunError, match="cannot create the bridge token "
                                           "/sys/kernel/bridge.token: Permission denied"):
        bridge_token.ensure()
