"""A fresh PostgreSQL database and an empty Redis database for a test session, on the
servers named by ``PLANRUN_TEST_POSTGRES`` and ``PLANRUN_TEST_REDIS`` (default: this
machine's, 127.0.0.1:5432 database ``test`` and 127.0.0.1:6379). Where one is not
reachable, the tests that need it are skipped, saying which and why."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES = os.environ.get("PLANRUN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("PLANRUN_TEST_REDIS", "redis://127.0.0.1:6379")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new database ``planrun_test_<random>``, dropped afterwards."""
    import asyncpg

    name = f"planrun_test_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(POSTGRES, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL is not usable at {POSTGRES} (set PLANRUN_TEST_POSTGRES): "
                    f"{exc}")
    try:
        yield urlunsplit(urlsplit(POSTGRES)._replace(path=f"/{name}"))
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """The URL of a Redis database (0-15) that holds no key, emptied afterwards: two Prefect
    servers on one Redis database would share their streams and background jobs."""
    import redis

    base = REDIS.rstrip("/")
    try:
        for number in range(15, 0, -1):
            client = redis.Redis.from_url(f"{base}/{number}", socket_connect_timeout=5)
            with contextlib.closing(client):
                if client.dbsize() == 0:
                    break
        else:
            pytest.skip(f"Redis at {REDIS} has no empty database (1-15) for the tests")
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not usable at {REDIS} (set PLANRUN_TEST_REDIS): {exc}")
    try:
        yield f"{base}/{number}"
    finally:
        with contextlib.closing(redis.Redis.from_url(f"{base}/{number}")) as client:
            client.flushdb()
