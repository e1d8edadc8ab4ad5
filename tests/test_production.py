"""``planrun up --database … --redis … --workers N`` before anything starts: the URLs it
accepts and converts, the settings the Prefect server gets, and the one line (with the
right exit code) a bad URL or an unreachable database or Redis costs. The stack itself
runs in tests/test_production_stack.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from planrun.errors import PlanrunError, UsageError
from planrun.production import Production, database_url, shown
from tests.databases import postgres_database
from tests.helpers import cli
from tests.stack import free_port

PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize("given", [
    "postgresql://u:pw@db.example:5432/prefect", "postgres://u:pw@db.example:5432/prefect",
    "postgresql+asyncpg://u:pw@db.example:5432/prefect",
])
def test_a_postgresql_url_becomes_the_asyncpg_url_prefect_wants(given: str) -> None:
    assert database_url(given) == "postgresql+asyncpg://u:pw@db.example:5432/prefect"


@pytest.mark.parametrize(("given", "says"), [
    ("mysql://u@db/prefect", "--database wants a PostgreSQL URL"),
    ("sqlite:///prefect.db", "--database wants a PostgreSQL URL"),
    ("db.example:5432", "--database wants a PostgreSQL URL"),
    ("postgresql://db.example", "--database names no host or no database"),
    ("postgresql:///prefect", "--database names no host or no database"),
    ("postgresql://u:secret@db.example:port/prefect", "--database is not a URL"),
])
def test_a_url_that_is_not_a_postgresql_database_is_a_usage_error(given: str,
                                                                   says: str) -> None:
    with pytest.raises(UsageError, match=says) as caught:
        database_url(given)
    assert "secret" not in str(caught.value)


def test_a_password_is_never_shown() -> None:
    assert shown("postgresql+asyncpg://u:s3cr%40t@db:5432/p") == "postgresql+asyncpg://u:***@db:5432/p"
    assert shown("redis://:pw@redis:6379/0") == "redis://:***@redis:6379/0"
    assert shown("redis://redis:6379/0") == "redis://redis:6379/0"


def test_the_server_gets_prefects_redis_settings_only_with_redis() -> None:
    alone = Production.parse(PG).server_env()
    assert alone == {"PREFECT_API_DATABASE_CONNECTION_URL":
                     "postgresql+asyncpg://postgres@127.0.0.1:5432/test"}
    both = Production.parse(PG, "redis://127.0.0.1:6379/3").server_env()
    assert both["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert both["PREFECT_MESSAGING_CACHE"] == "prefect_redis.messaging"
    assert both["PREFECT_REDIS_MESSAGING_URL"] == "redis://127.0.0.1:6379/3"
    assert both["PREFECT_SERVER_DOCKET_URL"] == "redis://127.0.0.1:6379/3"
    assert both["PREFECT_SERVER_EVENTS_CAUSAL_ORDERING"] == "prefect_redis.ordering"
    assert both["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"


def test_runners_get_the_database_for_the_limits_store() -> None:
    assert Production.parse(PG, "redis://127.0.0.1:6379/3").runner_env() == {
        "PLANRUN_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test"}


def test_prefect_redis_provides_the_modules_the_settings_name() -> None:
    import importlib

    names = {value for key, value in Production.parse(PG, "redis://h:6379/0").server_env()
             .items() if value.startswith("prefect_redis.")}
    for name in names:
        importlib.import_module(name)


def test_a_database_nothing_listens_for_is_named_in_one_line() -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(PlanrunError, match=r"^cannot reach PostgreSQL at 127\.0\.0\.1:\d+: "):
        Production.parse(closed).check()


def test_a_redis_nothing_listens_for_is_named_in_one_line() -> None:
    with pytest.raises(PlanrunError, match=r"^cannot reach Redis at 127\.0\.0\.1:\d+: "):
        Production.parse(PG, f"redis://127.0.0.1:{free_port()}/0").check()


def _up(*args: str) -> tuple[int, str]:
    """``planrun up ARGS`` that must refuse at once: its exit code and what it said."""
    done = cli("up", "--port", str(free_port()), *args, timeout=60,
               env={"PREFECT_API_URL": ""})  # as if unset: these refuse before a server
    assert done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


def test_up_with_a_bad_database_url_says_so_in_one_line_and_exits_2() -> None:
    code, said = _up("--database", "mysql://root:hunter2@db/prefect")
    assert code == 2
    assert said == ("planrun: --database wants a PostgreSQL URL (postgresql://user@host:5432/"
                    "name), not mysql://root:***@db/prefect\n")


def test_up_with_an_unreachable_database_says_so_in_one_line_and_exits_1() -> None:
    port = free_port()
    code, said = _up("--database", f"postgresql://postgres@127.0.0.1:{port}/test")
    assert code == 1
    assert said.startswith(f"planrun: cannot reach PostgreSQL at 127.0.0.1:{port}: ")
    assert said.count("\n") == 1


def test_up_with_redis_but_no_database_is_a_usage_error() -> None:
    code, said = _up("--redis", "redis://127.0.0.1:6379/0")
    assert code == 2
    assert said == ("planrun: --redis goes with --database: Redis messaging is for a Prefect "
                    "server on PostgreSQL\n")


def test_up_with_database_refuses_a_prefect_api_url_that_names_another_server() -> None:
    done = cli("up", "--port", str(free_port()), "--database", PG, timeout=60,
               env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 2
    assert done.stderr == ("planrun: --database starts a Prefect server of the stack's own, "
                           "and PREFECT_API_URL names another one: unset it or drop "
                           "--database\n")


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_up_wants_a_whole_number_of_workers(workers: str) -> None:
    code, said = _up("--workers", workers)
    assert code == 2
    assert said.splitlines()[-1] == ("planrun: error: argument --workers: wants a whole "
                                  f"number of at least 1, not {workers!r}")


def test_up_wants_a_whole_number_of_runs_per_runner() -> None:
    done = cli("up", "--port", str(free_port()), timeout=60,
               env={"PREFECT_RUNNER_PROCESS_LIMIT": "many"})
    assert done.returncode == 2
    assert done.stderr == ("planrun: PREFECT_RUNNER_PROCESS_LIMIT is the number of runs each "
                           "runner executes at once (a whole number of at least 1), not "
                           "'many'\n")


def test_a_server_that_exits_while_starting_costs_one_line_naming_its_log(
        tmp_path: Path) -> None:
    """An address this machine does not have: Prefect's server exits at once."""
    with postgres_database() as database:
        done = cli("up", "--port", str(free_port()), "--database", database, timeout=120,
                   env={"PREFECT_API_URL": "", "PLANRUN_HOME": str(tmp_path),
                        "PLANRUN_SERVER_HOST": "192.0.2.1"})
    assert done.returncode == 1
    log = tmp_path / "logs" / "server.log"
    assert done.stderr.startswith("planrun: the Prefect server exited with status 1 while "
                                  "starting: ")
    assert done.stderr.endswith(f" (its log: {log})\n") and done.stderr.count("\n") == 1
