"""``python -m planrun.progress_bridge``: serve the bridge under uvicorn (``planrun up`` runs this).

It follows the Prefect server at ``PREFECT_API_URL``, keeps its message log under
``--data`` and starts submitted runs as runs of the ``planrun/plan-runner`` deployment.
Clients present the token of :mod:`planrun.bridge_token` (``PLANRUN_TOKEN``, else the
token file, made on first start); listening beyond loopback needs ``PLANRUN_TOKEN``.
``PLANRUN_MAX_QUEUED`` and ``PLANRUN_MAX_MEMORY_PERCENT`` say when submissions must wait
(``progress_bridge.admission``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import uvicorn

from planrun import bridge_token
from planrun.errors import PlanrunError
from planrun.progress_bridge.admission import Admission
from planrun.progress_bridge.app import BridgeServer, create_app
from planrun.progress_bridge.deployment import PlanDeployment
from planrun.progress_bridge.hub import Hub
from planrun.progress_bridge.ratelimit import DEFAULT_BURST, DEFAULT_PER_S
from planrun.progress_bridge.store import MessageStore, StoreError
from planrun.progress_bridge.upstream import PrefectUpstream, Upstream, UpstreamSettings

if TYPE_CHECKING:
    from planrun.progress_bridge.replica import Replica

DEFAULT_PORT = 8765
WILDCARDS = ("0.0.0.0", "::", "")  # every address: its clients name it as they please


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m planrun.progress_bridge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("PLANRUN_BRIDGE_PORT", DEFAULT_PORT)))
    parser.add_argument("--data", type=Path, required=True, help="the message log's directory")
    parser.add_argument("--store", default=os.environ.get("PLANRUN_BRIDGE_STORE"),
                        help="the message log in PostgreSQL (postgresql://…), shared with "
                             "every bridge given the same: one commits, all serve "
                             "(docs/production.md); also $PLANRUN_BRIDGE_STORE")
    parser.add_argument("--allow-host", action="append", default=_env_list("PLANRUN_ALLOWED_HOSTS"),
                        help="a Host (name or name:port) accepted besides loopback "
                             "(also $PLANRUN_ALLOWED_HOSTS, comma-separated)")
    parser.add_argument("--allow-origin", action="append",
                        default=_env_list("PLANRUN_ALLOWED_ORIGINS"),
                        help="a browser origin allowed besides the bridge's own "
                             "(also $PLANRUN_ALLOWED_ORIGINS, comma-separated)")
    parser.add_argument("--rate", type=float,
                        default=float(os.environ.get("PLANRUN_RATE_PER_S", DEFAULT_PER_S)),
                        help="requests a second per client address; 0: no limit")
    parser.add_argument("--burst", type=int,
                        default=int(os.environ.get("PLANRUN_RATE_BURST", DEFAULT_BURST)))
    args = parser.parse_args(argv)
    try:
        token = bridge_token.for_bind(args.host)
        admission = Admission.from_env()
    except (PlanrunError, ValueError) as exc:
        parser.exit(2, f"planrun bridge: {exc}\n")
    if not _prefect_api_url():
        parser.exit(2, "planrun bridge: no Prefect server to follow: set PREFECT_API_URL "
                       "(`planrun up` starts the bridge with it; docs/production.md)\n")
    hosts = [*args.allow_host, *([args.host] if args.host not in WILDCARDS else [])]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call
    upstream = PrefectUpstream(UpstreamSettings(
        recover_attempts=int(os.environ.get("PLANRUN_RECOVER_ATTEMPTS", "2")),
        dead_after_s=float(os.environ.get("PLANRUN_DEAD_AFTER_S", "60"))))
    try:
        store, follower = _store(args.store, args.data, upstream)
    except (PlanrunError, StoreError) as exc:
        parser.exit(2, f"planrun bridge: {exc}\n")
    deployment = PlanDeployment()
    try:
        restart = _Restart()
        app = create_app(store, Hub(), token, allowed_hosts=hosts,
                         allowed_origins=args.allow_origin, rate_per_s=args.rate,
                         rate_burst=args.burst, upstream=follower,
                         submit=deployment, admission=admission, upstream_failed=restart)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=5, ws_max_size=1 << 16)
        restart.server = BridgeServer(config)
        asyncio.run(_serve(restart.server, deployment))
    finally:
        store.close()
    if restart.failed:
        sys.exit(1)


class _Restart:
    """The bridge stopped following Prefect (an error nothing foresaw): its server stops
    as on SIGTERM (clients are told 1001 and resume elsewhere or after), and the bridge
    exits 1, so that ``planrun up`` or the operator's supervisor starts it again; a new
    start reads the runs in flight anew."""

    def __init__(self) -> None:
        self.failed = False
        self.server: BridgeServer | None = None

    def __call__(self, _error: BaseException) -> None:
        self.failed = True
        if self.server is not None:
            self.server.should_exit = True


async def _serve(server: BridgeServer, deployment: PlanDeployment) -> None:
    async with deployment:  # its API client, for as long as the bridge serves
        await server.serve()


def _store(url: str | None, data: Path, upstream: Upstream
           ) -> tuple[MessageStore, Upstream | Replica]:
    """The message log (``url``: PostgreSQL, shared; else SQLite under ``data``) and the
    upstream that goes with it."""
    if not url:
        return MessageStore(data), upstream
    from planrun.production import DATABASE_SCHEMES, libpq_url, shown
    from planrun.progress_bridge.replica import Replica  # noqa: F811 - psycopg: only here
    from planrun.progress_bridge.store_pg import PgMessageStore

    if urlsplit(url).scheme not in DATABASE_SCHEMES:
        raise PlanrunError(f"--store wants a PostgreSQL URL (postgresql://user@host:5432/name), "
                           f"not {shown(url)}")
    dsn = libpq_url(url)
    return PgMessageStore(dsn), Replica(upstream, dsn)


def _prefect_api_url() -> str | None:
    """The Prefect API the bridge follows: without one, Prefect's client would start a
    temporary server of its own, in vain (the runs are on another)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL  # a profile's, read only in this case

    return PREFECT_API_URL.value()


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


if __name__ == "__main__":
    main()
