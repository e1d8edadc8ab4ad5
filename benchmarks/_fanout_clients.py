"""The WebSocket client processes of bench_fanout.py: :func:`client_worker` runs in each
(``bench_fanout.py --worker N``), :class:`Worker` is the parent's side of one.

A client process connects its clients to the run id it reads on stdin, says
``connected``, reads until every client has the run-end message (or the parent says
``stop``), and writes every delivery's seq and receive time and a summary per client to a
file for the parent.
"""

from __future__ import annotations

import asyncio
import base64
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

    def record(self, text: str | bytes, received: float,
               types: dict[int, tuple[str, str, str | None]]) -> None:
        """Count one message received at ``received``; ``ended`` once it ends the run."""
        message = json.loads(text)
        kind = message["type"]
        if kind == "heartbeat":
            self.heartbeats += 1
            return
        seq = message["seq"]
        self.seqs.append(seq)
        self.times.append(received)
        if seq not in types:
            types[seq] = (kind, message["ts"], message.get("step_id"))
        if kind in RUN_END_TYPES:
            self.ended = True

    async def read(self, types: dict[int, tuple[str, str, str | None]]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in self.ws:
                self.record(text, time.time(), types)
                if self.ended:
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


class RawClient(Client, asyncio.Protocol):
    """A client on a bare asyncio connection: parses frames and inflates by hand, as cheap
    in CPU as Python allows (a browser does this in C++), so that on 2 cores the clients
    take less of the machine from the bridge than ``websockets``' full clients do."""

    __slots__ = ("buffer", "inflate", "shaken", "transport", "types", "window_bits")

    def __init__(self, types: dict[int, tuple[str, str, str | None]]) -> None:
        super().__init__()
        self.types = types
        self.buffer = b""
        self.shaken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.window_bits: int | None = None  # agreed deflate; None: plain frames
        self.inflate: Any = None  # kept across messages unless no context takeover
        self.transport: Any = None

    @property
    def finished(self) -> bool:
        return self.ended or self.error is not None or self.closed is not None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.closed = "connection lost"
        if not self.shaken.done():
            self.shaken.set_exception(ConnectionError("connection lost in the handshake"))
        if not self.ws.done():
            self.ws.set_result(None)

    def data_received(self, data: bytes) -> None:
        received = time.time()
        buffer = self.buffer + data if self.buffer else data
        if not self.shaken.done():
            head, found, buffer = buffer.partition(b"\r\n\r\n")
            if not found:
                self.buffer = head
                return
            self._handshake(head.decode("latin-1"))
        at = 0
        size_all = len(buffer)
        while size_all - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            size, start = second & 0x7F, at + 2
            if size == 126:
                if size_all - at < 4:
                    break
                size, start = int.from_bytes(buffer[at + 2:at + 4]), at + 4
            elif size == 127:
                if size_all - at < 10:
                    break
                size, start = int.from_bytes(buffer[at + 2:at + 10]), at + 10
            if size_all - start < size:
                break
            payload = buffer[start:start + size]
            at = start + size
            opcode = first & 0x0F
            if opcode == 1:
                if first & 0x40:
                    payload = self._inflate(payload)
                self.record(payload, received, self.types)
            elif opcode == 9:  # ping: a masked pong with the same payload
                self.transport.write(_masked(0x8A, payload))
            elif opcode == 8:
                code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
                self.closed = f"{code} {payload[2:].decode(errors='replace')}"
            if self.finished:
                self._close()
                return
        self.buffer = buffer[at:]

    def _handshake(self, head: str) -> None:
        if not head.startswith("HTTP/1.1 101"):
            self.shaken.set_exception(ConnectionError(head.split("\r\n")[0]))
            return
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "deflate" in value:
                self.window_bits = 15
                for param in value.split(";"):
                    key, _, number = param.strip().partition("=")
                    if key == "server_max_window_bits":
                        self.window_bits = int(number)
                    elif key == "server_no_context_takeover":
                        self.inflate = False  # a new inflater for each message
        self.shaken.set_result(None)

    def _inflate(self, payload: bytes) -> bytes:
        import zlib

        inflate = self.inflate
        if not inflate:  # None: the first message; False: a new inflater for each
            inflate = zlib.decompressobj(wbits=-(self.window_bits or 15))
            if self.inflate is None:
                self.inflate = inflate  # context kept from message to message
        return bytes(inflate.decompress(payload + b"\x00\x00\xff\xff"))

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_masked(0x88, (1000).to_bytes(2)))
            self.transport.close()


def _masked(first: int, payload: bytes) -> bytes:
    """A client's frame (clients must mask; a zero mask is a valid one)."""
    return bytes([first, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


async def raw_connect(client: RawClient, port: int, path: str, compression: bool) -> None:
    loop = asyncio.get_running_loop()
    client.ws = loop.create_future()  # set when the connection is gone
    await loop.create_connection(lambda: client, "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    extensions = ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                  if compression else "")
    client.transport.write(
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
         f"{extensions}\r\n").encode())
    await asyncio.wait_for(client.shaken, 120)


async def client_worker(n: int, port: int, out: str, compression: bool,
                        concurrency: int, kind: str = "raw") -> None:
    from websockets.asyncio.client import connect

    _raise_nofile()
    loop = asyncio.get_running_loop()
    say(ready=True)
    run_id = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
    path = f"/v1/runs/{run_id}/ws?after=0&token={TOKEN}"
    types: dict[int, tuple[str, str, str | None]] = {}
    clients = [RawClient(types) if kind == "raw" else Client() for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)
    readers: list[asyncio.Future[Any]] = []

    async def open_one(client: Client) -> None:
        async with gate:
            try:
                if isinstance(client, RawClient):
                    await raw_connect(client, port, path, compression)
                else:
                    client.ws = await connect(f"ws://127.0.0.1:{port}{path}", proxy=None,
                                              open_timeout=120,
                                              compression="deflate" if compression else None,
                                              ping_interval=None, ping_timeout=None,
                                              close_timeout=5, max_size=None)
            except Exception as exc:  # noqa: BLE001 - reported
                client.error = f"connect: {type(exc).__name__}: {exc}"
                return
        if isinstance(client, RawClient):
            readers.append(client.ws)
        else:
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
    for client in clients:
        if isinstance(client, RawClient) and client.transport is not None:
            client.transport.close()
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

    def __init__(self, n: int, port: int, compression: bool, concurrency: int,
                 kind: str = "raw") -> None:
        fd, self.out = tempfile.mkstemp(prefix="bench-fanout-", suffix=".json")
        os.close(fd)
        self.args = [sys.executable, str(BENCH / "bench_fanout.py"), "--worker", str(n),
                     "--port", str(port), "--out", self.out,
                     "--concurrency", str(concurrency), "--client-kind", kind]
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
