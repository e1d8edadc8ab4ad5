"""The production configuration of ``planrun up``: Prefect's server on PostgreSQL, with
Redis messaging when asked for (docs/production.md).

``planrun up --database postgresql://… [--redis redis://…]`` starts its own Prefect server
with the settings of Prefect's scaled self-hosted set-up: the database in
``PREFECT_API_DATABASE_CONNECTION_URL`` (a ``postgresql+asyncpg://`` URL: a plain
``postgresql://`` one is converted), and with Redis the message broker, its cache, the
events' causal ordering, concurrency leases and the background services' coordination
(Docket) in Redis, through the ``prefect-redis`` package. Only that server gets these
settings: runners and the bridge talk to its API. Runners get the database's URL for one
thing, the limits' store (``Production.runner_env``, docs/limits.md).

Both are checked before anything starts, so a mistyped URL or a database that is down
costs one line, not a server that fails in its log.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

from planrun.errors import PlanrunError, UsageError

#: How long the reachability checks wait for an answer.
CONNECT_TIMEOUT_S = 5.0
#: The stack's database, for ``planrun up`` and for every planrun process of the stack:
#: their limits' store lives there too (docs/limits.md).
DATABASE_ENV = "PLANRUN_DATABASE_URL"
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
REDIS_SCHEMES = ("redis", "rediss")


@dataclass(frozen=True)
class Production:
    """Where the production stack keeps its state.

    database: the Prefect server's PostgreSQL, as a ``postgresql+asyncpg://`` URL.
    redis: Redis for the server's messaging, or None for Prefect's in-memory broker
        (one server process: enough on one machine).
    """

    database: str
    redis: str | None = None

    @classmethod
    def parse(cls, database: str, redis: str | None = None) -> Production:
        """From the URLs a person typed; ``UsageError`` naming what is wrong with them."""
        return cls(database=database_url(database),
                   redis=redis_url(redis) if redis is not None else None)

    def server_env(self) -> dict[str, str]:
        """The Prefect server's settings for this configuration."""
        env = {"PREFECT_API_DATABASE_CONNECTION_URL": self.database}
        if self.redis is not None:
            env |= {"PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
                    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
                    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
                    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
                    "PREFECT_REDIS_MESSAGING_URL": self.redis,
                    "PREFECT_SERVER_DOCKET_URL": self.redis}
        return env

    def runner_env(self) -> dict[str, str]:
        """What each runner (and so each of its runs) gets: the database, where the limits'
        store of every machine of the stack lives (docs/limits.md)."""
        return {DATABASE_ENV: self.database}

    def check(self) -> None:
        """Raise ``PlanrunError`` with one line when the database or Redis cannot be used."""
        asyncio.run(_check_database(self.database))
        if self.redis is not None:
            _check_redis(self.redis)


def database_url(text: str) -> str:
    """``text`` as the ``postgresql+asyncpg://`` URL Prefect's server wants."""
    parts = _split(text, "--database")
    if parts.scheme not in DATABASE_SCHEMES:
        raise UsageError("--database wants a PostgreSQL URL (postgresql://user@host:5432/name), "
                         f"not {shown(text)}")
    if not parts.hostname or not parts.path.strip("/"):
        raise UsageError(f"--database names no host or no database: {shown(text)} "
                         "(postgresql://user@host:5432/name)")
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))


def libpq_url(url: str) -> str:
    """``url`` as libpq (asyncpg's checks, psycopg) takes it: ``postgresql://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def redis_url(text: str) -> str:
    """``text`` checked as a Redis URL (``redis://host:6379/0``, ``rediss://`` for TLS)."""
    parts = _split(text, "--redis")
    if parts.scheme not in REDIS_SCHEMES or not parts.hostname:
        raise UsageError(f"--redis wants a Redis URL (redis://host:6379/0), not: {shown(text)}")
    return text


def shown(url: str) -> str:
    """``url`` with its password hidden, to print or log."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def where(url: str) -> str:
    """``host:port`` of ``url``, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or ''}".rstrip(":")


def _split(text: str, option: str) -> SplitResult:
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"{option} is not a URL ({exc}): {shown(text)}") from exc
    return parts


async def _check_database(url: str) -> None:
    import asyncpg

    at = f"PostgreSQL at {where(url)}"
    try:
        connection = await asyncpg.connect(libpq_url(url), timeout=CONNECT_TIMEOUT_S)
    except asyncpg.InvalidCatalogNameError as exc:
        raise PlanrunError(f"{at}: {exc}: create it first (createdb)") from exc
    except (asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidPasswordError) as exc:
        raise PlanrunError(f"{at} refused the connection: {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise PlanrunError(f"cannot reach {at}: {_reason(exc)}") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise PlanrunError(f"cannot use {at}: {_reason(exc)}") from exc
    await connection.close()


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                  socket_timeout=CONNECT_TIMEOUT_S)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise PlanrunError(f"Redis at {where(url)} refused the connection: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise PlanrunError(f"cannot reach Redis at {where(url)}: {_reason(exc)}") from exc
    except redis.RedisError as exc:
        raise PlanrunError(f"cannot use Redis at {where(url)}: {_reason(exc)}") from exc
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    """An exception as one line (a timeout has no message of its own)."""
    text = " ".join(str(exc).split())
    return text or f"no answer within {CONNECT_TIMEOUT_S:.0f}s ({type(exc).__name__})"
