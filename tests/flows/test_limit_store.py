"""The limits' shared stores, each test on both: the SQLite file (flows/limit_store.py)
and the PostgreSQL database (flows/limit_store_pg.py, skipped saying why where PostgreSQL
is absent). Turns granted in arrival order, a dead process's turn taken back (a real
process, killed), exact GCRA reservations with their burst. Two stores on one file or
database stand for two processes; the last tests use real processes: two of them never
hold more than the limit at once together, nor go faster than a rate."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planrun.flows.limit_store import Place, Rate
from tests.helpers import wait_for
from tests.limit_stores import KINDS, Stores, stores


@pytest.fixture(params=KINDS)
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    with stores(request.param, tmp_path) as opened:
        yield opened


def test_turns_are_granted_in_arrival_order_and_each_waiter_knows_how_many_are_ahead(
        made: Stores) -> None:
    one, two = made.open(), made.open()
    tickets = []
    for store in (one, two, one, two, one):
        ticket, _ = store.join({"tool:shell.run": 2}, "run/step")
        tickets.append(ticket)
    first, second, third, fourth, fifth = tickets
    queue = one.sweep()
    assert queue.granted == {first}
    assert queue.waiting == {third: Place("tool:shell.run", 2, 0),
                             fifth: Place("tool:shell.run", 2, 2)}
    assert two.granted() == {second}
    after = one.leave([first])  # the next in line is granted in the same transaction
    assert after.granted == {third} and after.waiting == {fifth: Place("tool:shell.run", 2, 1)}
    two.leave([second])
    assert two.granted() == {fourth}
    assert one.sweep().waiting == {fifth: Place("tool:shell.run", 2, 0)}


def test_a_turn_blocked_on_one_key_does_not_hold_back_a_later_turn_without_it(
        made: Stores) -> None:
    store = made.open()
    holder, _ = store.join({"tool:shell.run": 1, "all": 3}, "a")
    blocked, _ = store.join({"tool:shell.run": 1, "all": 3}, "b")
    other, queue = store.join({"tool:http.request": 5, "all": 3}, "c")
    assert queue.granted == {holder, other}
    assert queue.waiting == {blocked: Place("tool:shell.run", 1, 0)}
    late, queue = store.join({"all": 3}, "d")  # the third slot of `all`
    assert late in queue.granted
    full, queue = store.join({"all": 3}, "e")
    assert queue.waiting[full] == Place("all", 3, 1)  # `blocked` wants `all` too, ahead


def test_a_turn_of_a_killed_process_is_taken_back(made: Stores) -> None:
    with made.spawn("""
        import time
        ticket, queue = store.join({"tool:x": 1}, "held")
        print(ticket, ticket in queue.granted, flush=True)
        time.sleep(600)
        """) as holder:
        try:
            assert holder.stdout is not None
            ticket, granted = holder.stdout.readline().split()
            assert granted == "True"
            store = made.open()
            mine, queue = store.join({"tool:x": 1}, "waiting")
            assert mine in queue.waiting  # the live process holds the only slot
        finally:
            holder.kill()
            holder.wait()
    assert mine in store.sweep().granted
    assert store.leave([int(ticket)]).granted == {mine}  # its turn is gone already


def test_a_turn_whose_lease_was_not_renewed_is_taken_back(made: Stores) -> None:
    # Its process may live in another PID namespace or machine, where its pid means nothing.
    # Both stores are open before the lease starts, and the lease is long beside the one
    # call between the joins (opening a PostgreSQL connection on a loaded machine took
    # longer than a 50 ms lease, so the turn was taken back before the test looked).
    gone, store = made.open(lease_s=1.0), made.open()
    stale, _ = gone.join({"tool:x": 1}, "held")
    mine, queue = store.join({"tool:x": 1}, "waiting")
    assert mine in queue.waiting
    assert wait_for(lambda: mine in store.sweep().granted, 10, "the lease to run out")
    assert stale not in gone.granted()


def test_a_turn_whose_pid_now_belongs_to_another_process_is_taken_back(made: Stores) -> None:
    store = made.open()
    stale, _ = store.join({"tool:x": 1}, "held")
    made.execute(store, "UPDATE turns SET pid_start = pid_start - 100 WHERE ticket = ?",
                 stale)  # the same pid, started at another time: reused
    mine, queue = store.join({"tool:x": 1}, "waiting")
    assert queue.granted == {mine}


def test_a_rate_lets_its_burst_go_at_once_then_spaces_calls_exactly(made: Stores) -> None:
    one, two = made.open(), made.open()
    rate = {"tool:http.request": Rate(per_s=10, burst=3)}
    calls = []  # (asked, may go at, answered)
    for store in (one, two, one, two, one, two):
        asked = time.time()
        calls.append((asked, store.reserve(rate)[0], time.time()))
    # GCRA with a 0.1 s interval and a 0.2 s tolerance, from the times the stores gave: a
    # call due later than it was answered waits until exactly then; any other goes as it
    # asks (on a loaded machine a call may ask late, and then need not wait).
    eps, theoretical = made.precision, calls[0][1]
    for n, (asked, at, answered) in enumerate(calls):
        due = theoretical - 0.2
        if due > answered:
            assert at == pytest.approx(due, abs=eps), (n, calls)
        else:
            assert asked - eps <= at <= answered + eps, (n, calls)
        assert n < 3 or at >= calls[0][1] + 0.1 * (n - 2) - eps, (n, calls)  # never early
        theoretical = max(theoretical, at) + 0.1


def test_a_call_under_two_rates_waits_for_the_stricter_and_asks_the_other_then(
        made: Stores) -> None:
    store = made.open()
    tool, host = {"tool:http.request": Rate(100, 10)}, {"host:example.org": Rate(2, 1)}
    first, rest = store.reserve({**tool, **host})
    assert rest == {}  # both allowed it now: counted by both
    second, rest = store.reserve({**tool, **host})
    assert second - first == pytest.approx(0.5, abs=made.precision)
    assert rest == tool  # the tool counts it when it goes, not now
    # so the tool's calls of other hosts are not held back behind it
    assert store.reserve(tool)[0] <= time.time()


def test_an_idle_spell_banks_no_more_calls_than_the_burst(made: Stores) -> None:
    store = made.open()
    rate = {"tool:x": Rate(per_s=1000, burst=1)}
    store.reserve(rate)
    time.sleep(0.05)  # 50 calls' worth of idle time
    now = time.time()
    assert store.reserve(rate)[0] >= now
    assert store.reserve(rate)[0] >= now + 0.001 - 1e-6


def test_processes_opening_a_new_store_at_the_same_moment_all_get_their_turn(
        made: Stores) -> None:
    """Creating the file (WAL, tables) is not covered by SQLite's busy timeout: without the
    lock file, some of these processes failed with "database is locked" and went unlimited.
    Two processes creating Postgres's tables at once fail the same way (a duplicate key in
    its catalogue) without the advisory lock."""
    start = time.time() + 1.0
    script = made.script(f"""
        import time
        time.sleep(max(0.0, {start} - time.time()))  # all open the new store at once
        ticket, queue = store.join({{"tool:x": 100}}, "r/s")
        print(ticket in queue.granted)
    """)
    children = [subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(8)]
    results = [child.communicate(timeout=60) for child in children]
    assert [(out.strip(), err) for out, err in results] == [("True", "")] * 8


def test_a_store_used_in_a_forked_child_leaves_its_parents_session_working(
        made: Stores) -> None:
    """A run's process is forked from its runner's fork server: the child must not end the
    connection it inherited (libpq says goodbye on the socket it shares with its parent)."""
    store = made.open()
    held, _ = store.join({"tool:x": 1}, "parent")
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        code = 1
        try:
            ticket, queue = store.join({"tool:x": 1}, "child")
            code = 0 if ticket in queue.waiting else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's turn stays (its process is gone: the next pass takes it back), and this
    # process's session still answers.
    assert store.leave([held]).granted == set()
    assert store.granted() == set()


#: One process of the next test: five holders of a slot of tool.x (limit 2) through the
#: limiter, each recording when it held its slot; it starts when the test says "go".
HOLDERS = """
    import asyncio, json, sys, time
    from planrun.flows.limits import Ask, Limiter
    from planrun.flows.load import LoadGauge
    from planrun.policy_limits import OperatorLimits

    settings = OperatorLimits.model_validate({"tools": {"tool.x": {"concurrency": 2}}})
    limiter = Limiter(lambda: store, lambda: settings,
                      LoadGauge(lambda: settings.load, memory=lambda: 0.0, cpu=lambda: 0.0))

    async def holder(i):
        async with limiter.hold(Ask("tool.x", step_id=str(i)), lambda waiting: None):
            start = time.time()
            await asyncio.sleep(0.2)
            return start, time.time()

    async def holders():
        return await asyncio.gather(*(holder(i) for i in range(5)))

    store.granted()  # connected before the start
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(holders())), flush=True)
"""


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most ``spans`` (start, end) that overlap at one moment."""
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = running = 0
    for _, change in edges:  # at one moment, an end comes before a start
        running += change
        most = max(most, running)
    return most


def together(made: Stores, body: str, processes: int = 2) -> list[Any]:
    """Run ``body`` in ``processes`` processes at once: each prints "ready" once its store
    is open, all are told "go" together, and each prints its results as JSON."""
    children = [made.spawn(body) for _ in range(processes)]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0] * processes
    return [json.loads(out) for out in outputs]


def test_two_processes_never_hold_more_than_the_limit_together(made: Stores) -> None:
    # Each alone would hold 2 at once: unshared, the two would hold 4.
    spans = [(start, end) for results in together(made, HOLDERS) for start, end in results]
    assert len(spans) == 10
    assert most_at_once(spans) == 2


#: One process of the next test: five reservations of one rate, each moment printed.
RESERVATIONS = """
    import json, sys
    from planrun.flows.limit_store import Rate

    rate = {"host:api.example.org": Rate(per_s=20, burst=2)}
    store.granted()  # connected before the start
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps([store.reserve(rate)[0] for _ in range(5)]), flush=True)
"""


def test_two_processes_together_go_no_faster_than_a_rate(made: Stores) -> None:
    moments = sorted(at for results in together(made, RESERVATIONS) for at in results)
    assert len(moments) == 10
    # GCRA at 20/s, burst 2: any k + 1 calls in a row span at least (k - 1) / 20 s. Each
    # alone would let 2 go at once: unshared, 4 would.
    too_close = [(i, j) for i in range(10) for j in range(i + 1, 10)
                 if moments[j] - moments[i] < (j - i - 1) / 20 - made.precision]
    assert too_close == []
