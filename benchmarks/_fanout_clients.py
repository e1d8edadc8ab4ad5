"""The WebSocket client processes of bench_fanout.py: :func:`client_worker` runs in each
(``bench_fanout.py --worker N``), :class:`Worker` is the parent's side of one.

A client process connects its clients to the run id it reads on stdin, says
``connected``, reads until every client has the run-end message (or the parent says
``stop``), and writes every delivery's seq and receive time and a summary per client to a
file for the parent.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from array import array
from typing import Any

from _bridge import _raise_nofile
from _common import BENCH, ROOT, RUN_END_TYPES, TOKEN

# The client processes ---------------------------------------------------------------------

def say(**fields: Any) -> None:
    sys.stdout.write("@@ " + json.dumps(fields) + "\n")
    sys.stdout.flush()


class Client:
    __slots__ = ("closed", "ended", "error", "heartbeats", "seqs", "times", "ws")

    def __init__(self) -> None:
        self.ws: Any = None
        self.seqs = array("i")
        self.times = array("d")
        self.heartbeats = 0
        self.ended = False
        self.error: str | None = None
        self.closed: str | None = None

    async def read(self, types: dict[int, tuple[str, str, str | None]]) -> None:
        from websockets.exceptions import ConnectionClosed

        seqs, times = self.seqs, self.times
        try:
            async for text in self.ws:
                received = time.time()
                message = json.loads(text)
                kind = message["type"]
                if kind == "heartbeat":
                    self.heartbeats += 1
                    continue
                seq = message["seq"]
                seqs.append(seq)
                times.append(received)
                if seq not in types:
                    types[seq] = (kind, message["ts"], message.get("step_id"))
                if kind in RUN_END_TYPES:
                    self.ended = True
                    break
        except ConnectionClosed as exc:
            frame = exc.rcvd
            self.closed = f"{frame.code} {frame.reason}" if frame else "closed, no frame"
        except Exception as exc:  # noqa: BLE001 - reported
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                await asyncio.wait_for(self.ws.close(), 10)
            except Exception:  # noqa: BLE001
                pass


async def client_worker(n: int, port: int, out: str, compression: bool,
                        concurrency: int) -> None:
    from websockets.asyncio.client import connect

    _raise_nofile()
    loop = asyncio.get_running_loop()
    say(ready=True)
    run_id = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
    url = f"ws://127.0.0.1:{port}/v1/runs/{run_id}/ws?after=0&token={TOKEN}"
    clients = [Client() for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)
    types: dict[int, tuple[str, str, str | None]] = {}
    readers: list[asyncio.Task[None]] = []

    async def open_one(client: Client) -> None:
        async with gate:
            try:
                client.ws = await connect(url, proxy=None, open_timeout=120,
                                          compression="deflate" if compression else None,
                                          ping_interval=None, ping_timeout=None,
                                          close_timeout=5, max_size=None)
            except Exception as exc:  # noqa: BLE001 - reported
                client.error = f"connect: {type(exc).__name__}: {exc}"
                return
        readers.append(asyncio.ensure_future(client.read(types)))

    t_start = time.time()
    await asyncio.gather(*(open_one(c) for c in clients))
    connected_at = time.time()
    say(connected=sum(1 for c in clients if c.error is None), t=connected_at,
        connect_s=connected_at - t_start)
    # The clients' own collector would pause every reader at once; refcounting frees the
    # messages anyway.
    gc.collect()
    gc.freeze()
    gc.disable()
    stop = loop.run_in_executor(None, sys.stdin.readline)  # the parent's "stop": give up
    waiting = asyncio.ensure_future(asyncio.gather(*readers))
    await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
    gc.enable()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    if not waiting.cancelled():
        waiting.exception()  # retrieved: a reader cancelled by a "stop" is not an error

    summaries = []
    seqs_all, times_all = array("i"), array("d")
    for client in clients:
        seqs = list(client.seqs)
        last = max(seqs, default=0)
        seen = set(seqs)
        summaries.append({"messages": len(seqs), "last_seq": last,
                          "duplicates": len(seqs) - len(seen),
                          "missing": len(set(range(1, last + 1)) - seen),
                          "in_order": all(a < b for a, b in zip(seqs, seqs[1:], strict=False)),
                          "ended": client.ended, "error": client.error,
                          "closed": client.closed, "heartbeats": client.heartbeats})
        seqs_all.extend(client.seqs)
        times_all.extend(client.times)
    with open(out + ".bin", "wb") as binary:
        seqs_all.tofile(binary)
        times_all.tofile(binary)
    with open(out, "w") as fh:
        json.dump({"clients": summaries, "deliveries": len(seqs_all),
                   "messages": {s: [k, stamp, sid] for s, (k, stamp, sid) in types.items()},
                   "connected_at": connected_at}, fh)
    say(done=out)


# The parent's side ----------------------------------------------------------------------------

class Worker:
    """One client process, driven through stdin/stdout lines."""

    def __init__(self, n: int, port: int, compression: bool, concurrency: int) -> None:
        fd, self.out = tempfile.mkstemp(prefix="bench-fanout-", suffix=".json")
        os.close(fd)
        self.args = [sys.executable, str(BENCH / "bench_fanout.py"), "--worker", str(n),
                     "--port", str(port), "--out", self.out,
                     "--concurrency", str(concurrency)]
        if not compression:
            self.args.append("--no-compression")
        self.proc: Any = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 24)
        await self.answer("ready")

    async def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def answer(self, key: str) -> dict[str, Any]:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("a client process exited")
            if line.startswith(b"@@ "):
                data: dict[str, Any] = json.loads(line[3:])
                if key in data:
                    return data

    def result(self) -> dict[str, Any]:
        """The worker's summary, with ``seqs`` and ``times``: every delivery's seq and
        receive time."""
        with open(self.out) as fh:
            data: dict[str, Any] = json.load(fh)
        n = data["deliveries"]
        seqs, times = array("i"), array("d")
        with open(self.out + ".bin", "rb") as fh:
            seqs.fromfile(fh, n)
            times.fromfile(fh, n)
        os.unlink(self.out)
        os.unlink(self.out + ".bin")
        data["seqs"], data["times"] = seqs, times
        return data

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.stdin.close()  # EOF ends the worker's wait for a "stop"
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
