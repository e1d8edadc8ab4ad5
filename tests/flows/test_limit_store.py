"""The limits' shared store (flows/limit_store.py) on a real SQLite file: turns granted in
arrival order, a dead process's turn taken back (a real process, killed), exact GCRA
reservations with their burst. Two stores on one file stand for two processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from planrun.flows.limit_store import Place, Rate, SqliteLimitStore
from tests.helpers import wait_for


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "limits.sqlite3"


def test_turns_are_granted_in_arrival_order_and_each_waiter_knows_how_many_are_ahead(
        path: Path) -> None:
    one, two = SqliteLimitStore(path), SqliteLimitStore(path)
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
        path: Path) -> None:
    store = SqliteLimitStore(path)
    holder, _ = store.join({"tool:shell.run": 1, "all": 3}, "a")
    blocked, _ = store.join({"tool:shell.run": 1, "all": 3}, "b")
    other, queue = store.join({"tool:http.request": 5, "all": 3}, "c")
    assert queue.granted == {holder, other}
    assert queue.waiting == {blocked: Place("tool:shell.run", 1, 0)}
    late, queue = store.join({"all": 3}, "d")  # the third slot of `all`
    assert late in queue.granted
    full, queue = store.join({"all": 3}, "e")
    assert queue.waiting[full] == Place("all", 3, 1)  # `blocked` wants `all` too, ahead


def test_a_turn_of_a_killed_process_is_taken_back(path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from planrun.flows.limit_store import SqliteLimitStore
        ticket, queue = SqliteLimitStore(Path({str(path)!r})).join({{"tool:x": 1}}, "held")
        print(ticket, ticket in queue.granted, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            ticket, granted = holder.stdout.readline().split()
            assert granted == "True"
            store = SqliteLimitStore(path)
            mine, queue = store.join({"tool:x": 1}, "waiting")
            assert mine in queue.waiting  # the live process holds the only slot
        finally:
            holder.kill()
            holder.wait()
    assert mine in store.sweep().granted
    assert store.leave([int(ticket)]).granted == {mine}  # its turn is gone already


def test_a_turn_whose_lease_was_not_renewed_is_taken_back(path: Path) -> None:
    # Its process may live in another PID namespace or machine, where its pid means nothing.
    gone = SqliteLimitStore(path, lease_s=0.05)
    stale, _ = gone.join({"tool:x": 1}, "held")
    store = SqliteLimitStore(path)
    mine, queue = store.join({"tool:x": 1}, "waiting")
    assert mine in queue.waiting
    assert wait_for(lambda: mine in store.sweep().granted, 10, "the lease to run out")
    assert stale not in gone.granted()


def test_a_turn_whose_pid_now_belongs_to_another_process_is_taken_back(path: Path) -> None:
    store = SqliteLimitStore(path)
    stale, _ = store.join({"tool:x": 1}, "held")
    store._connect().execute("UPDATE turns SET pid_start = pid_start - 100 WHERE ticket = ?",
                             (stale,))  # the same pid, started at another time: reused
    mine, queue = store.join({"tool:x": 1}, "waiting")
    assert queue.granted == {mine}


def test_a_rate_lets_its_burst_go_at_once_then_spaces_calls_exactly(path: Path) -> None:
    one, two = SqliteLimitStore(path), SqliteLimitStore(path)
    rate = {"tool:http.request": Rate(per_s=10, burst=3)}
    before = time.time()
    times = [store.reserve(rate)[0] for store in (one, two, one, two, one, two)]
    after = time.time()
    assert all(before <= at <= after for at in times[:3])  # the burst: each goes as it asks
    start = times[0]
    assert [at - start for at in times[3:]] == [pytest.approx(0.1 * n, abs=1e-6)
                                               for n in (1, 2, 3)]


def test_a_call_under_two_rates_waits_for_the_stricter_and_asks_the_other_then(
        path: Path) -> None:
    store = SqliteLimitStore(path)
    tool, host = {"tool:http.request": Rate(100, 10)}, {"host:example.org": Rate(2, 1)}
    first, rest = store.reserve({**tool, **host})
    assert rest == {}  # both allowed it now: counted by both
    second, rest = store.reserve({**tool, **host})
    assert second - first == pytest.approx(0.5, abs=1e-6)
    assert rest == tool  # the tool counts it when it goes, not now
    # so the tool's calls of other hosts are not held back behind it
    assert store.reserve(tool)[0] <= time.time()


def test_an_idle_spell_banks_no_more_calls_than_the_burst(path: Path) -> None:
    store = SqliteLimitStore(path)
    rate = {"tool:x": Rate(per_s=1000, burst=1)}
    store.reserve(rate)
    time.sleep(0.05)  # 50 calls' worth of idle time
    now = time.time()
    assert store.reserve(rate)[0] >= now
    assert store.reserve(rate)[0] >= now + 0.001 - 1e-6


def test_processes_opening_a_new_store_at_the_same_moment_all_get_their_turn(
        path: Path) -> None:
    """Creating the file (WAL, tables) is not covered by SQLite's busy timeout: without the
    lock file, some of these processes failed with "database is locked" and went unlimited."""
    start = time.time() + 1.0
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from planrun.flows.limit_store import SqliteLimitStore
        time.sleep(max(0.0, {start} - time.time()))  # all open the new file at once
        ticket, queue = SqliteLimitStore(Path({str(path)!r})).join({{"tool:x": 100}}, "r/s")
        print(ticket in queue.granted)
    """)
    children = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [child.communicate(timeout=60) for child in children]
    assert [(out.strip(), err) for out, err in results] == [("True", "")] * 8
