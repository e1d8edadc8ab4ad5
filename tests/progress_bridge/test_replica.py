"""Several bridges on one PostgreSQL message store (the real one; skipped, saying why,
where there is none): one commits, every one serves the same seqs, and when the one that
commits stops another takes over while its clients stay connected."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from planrun.progress_bridge.replica import Replica
from planrun.progress_bridge.source import FakeEventSource
from planrun.progress_bridge.store_pg import PgMessageStore
from planrun.progress_bridge.upstream import Upstream

from ..databases import postgres_database
from .clients import receive_until, seqs
from .conftest import QUIET, BridgeFactory, ServedBridge, wait_for
from .events import nth


@pytest.fixture
def dsn() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def replica_bridge(bridge_factory: BridgeFactory, dsn: str) -> tuple[ServedBridge, Replica]:
    replica = Replica(Upstream(FakeEventSource(), QUIET), dsn)
    return bridge_factory(store=PgMessageStore(dsn), upstream=replica), replica


async def push(bridge: ServedBridge, replica: Replica, n: int) -> None:
    source = replica.source
    assert isinstance(source, FakeEventSource)
    assert await bridge.call(source.push(nth("r", n))), f"event {n} was not new"


def client(url: str) -> connect:
    return connect(url, proxy=None, open_timeout=5)


def test_every_bridge_serves_the_same_seqs_and_another_takes_over_committing(
        bridge_factory: BridgeFactory, dsn: str) -> None:
    first, first_replica = replica_bridge(bridge_factory, dsn)
    wait_for(first_replica.committing.is_set, 10, "the first bridge to commit")
    second, second_replica = replica_bridge(bridge_factory, dsn)

    async def main() -> None:
        async with client(second.ws_url("r", after=0)) as watcher, \
                client(first.ws_url("r", after=0)) as at_first:
            wait_for(lambda: second.hub.subscribers("r") == 1 == first.hub.subscribers("r"),
                     5, "a client on each bridge")
            for n in range(1, 6):
                await push(first, first_replica, n)
            from_second = await receive_until(watcher, 5)
            from_first = await receive_until(at_first, 5)
            assert seqs(from_second) == [1, 2, 3, 4, 5]
            assert from_second == from_first  # the same messages, the same text
            assert not second_replica.committing.is_set()
            view = second.state.views.get("r")
            assert view is not None and view.to_json() == first.state.views["r"].to_json()

            first.stop()  # its session ends, and its lock with it
            wait_for(second_replica.committing.is_set, 15, "the second bridge to take over")
            for n in range(6, 9):
                await push(second, second_replica, n)
            assert seqs(await receive_until(watcher, 8)) == [6, 7, 8]
        # The first bridge's client resumes on the other one and misses nothing.
        async with client(second.ws_url("r", after=5)) as resumed:
            assert seqs(await receive_until(resumed, 8)) == [6, 7, 8]
        stored = await second.store.after("r", 0)
        assert [m.seq for m in stored] == list(range(1, 9))
        assert json.loads(stored[0].wire)["type"] == "run.started"

    asyncio.run(main())
