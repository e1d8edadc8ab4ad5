"""Several bridges on one PostgreSQL message store: one commits, all serve.

Every bridge given the same PostgreSQL store (``--store postgresql://…``) serves clients of
every run with the same gap-free ``seq``, so a client can resume with ``?after=`` on any
of them. Exactly one of them, the one holding PostgreSQL's advisory lock :data:`LOCK_KEY`,
follows Prefect's events and commits messages (its upstream runs as on a lone bridge).
Each commit is announced on :data:`~progress_bridge.store_pg.CHANNEL`; the others listen,
read what was committed after what they last published, publish it to their own clients
and take the run's saved view. When the committing bridge dies its session ends and the
lock with it: the first other bridge to take the lock (each tries every
:data:`TAKEOVER_S`) publishes what it had not yet, reads the store's counters and cursor
again, and becomes the one that commits, reconciling from the cursor whatever Prefect
sent meanwhile. docs/production.md, "Several bridges".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Final

import psycopg

from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.source import EventSource
from planrun.progress_bridge.state import BridgeState
from planrun.progress_bridge.store_pg import CHANNEL
from planrun.progress_bridge.upstream import Upstream

log = logging.getLogger(__name__)

#: PostgreSQL advisory lock held by the bridge that commits (any 64-bit number that no
#: other application of the database uses: "planrun" in ASCII).
LOCK_KEY: Final = 0x706C616E72756E
#: The lock's connection is named this, then the bridge's process id.
LOCK_NAME: Final = "planrun bridge"
#: How often a serving bridge tries to take over committing.
TAKEOVER_S: Final = 1.0


class Replica:
    """A bridge's upstream on a shared store: ``upstream`` once this bridge holds the
    lock; until then, the other bridge's commits published to this one's clients."""

    def __init__(self, upstream: Upstream, dsn: str) -> None:
        self.upstream = upstream
        self.dsn = dsn
        #: Set while this bridge is the one that commits.
        self.committing = asyncio.Event()
        self._published: dict[str, int] = {}  # per run: the last seq this hub was given

    @property
    def source(self) -> EventSource:
        return self.upstream.source

    async def __call__(self, state: BridgeState) -> None:
        try:
            await self._run(state)
        except (psycopg.Error, OSError) as exc:
            log.error("the shared message store failed: %s; this bridge no longer follows "
                      "its runs (restart it)", exc)
            raise

    async def _run(self, state: BridgeState) -> None:
        # Named, so that an operator sees which bridge commits (pg_stat_activity, pg_locks).
        lock = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, application_name=f"{LOCK_NAME} {os.getpid()}")
        try:
            self._published = {run: state.store.last_seq(run) for run in state.store.runs()}
            self._load_views(state, state.store.run_states())
            await self._serve_until_locked(state, lock)
            state.store.reload()
            await self._catch_up(state, list(state.store.runs()))
            log.info("this bridge now commits the shared message store's runs")
            self.committing.set()
            await self.upstream(state)
        finally:
            with contextlib.suppress(psycopg.Error):
                await lock.close()

    async def _serve_until_locked(self, state: BridgeState,
                                  lock: psycopg.AsyncConnection) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen:
            await listen.execute(f"LISTEN {CHANNEL}")
            while not await _try_lock(lock):
                async for note in listen.notifies(timeout=TAKEOVER_S):
                    run_id = note.payload.rpartition(" ")[0]  # "<run id> <last seq>"
                    await self._catch_up(state, [run_id])

    async def _catch_up(self, state: BridgeState, run_ids: list[str]) -> None:
        """Publish the runs' messages committed since this bridge last published, in
        order, and take their saved views."""
        for run_id in run_ids:
            messages = await state.store.after(run_id, self._published.get(run_id, 0))
            if not messages:
                continue
            for message in messages:
                state.hub.publish(message)
            self._published[run_id] = messages[-1].seq
            state.store.noted(run_id, messages[-1].seq)
            text = state.store.run_state(run_id)
            if text is not None:
                self._load_views(state, {run_id: text})

    @staticmethod
    def _load_views(state: BridgeState, saved: dict[str, str]) -> None:
        for run_id, text in saved.items():
            state.views[run_id] = RunView.from_json(text)


async def _try_lock(lock: psycopg.AsyncConnection) -> bool:
    cursor = await lock.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
    row = await cursor.fetchone()
    return bool(row and row[0])
