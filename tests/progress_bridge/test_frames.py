"""Frames built once per message: every client of a run gets the same bytes, compressed as
agreed in its handshake, read here from raw sockets as a browser's would be."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import zlib
from pathlib import Path

import pytest

from planrun.contract.stream import Message
from planrun.progress_bridge.follow import BATCH, follow
from planrun.progress_bridge.frames import frame
from planrun.progress_bridge.hub import Disconnected, Hub
from planrun.progress_bridge.store import MessageStore

from .clients import draft
from .conftest import ServedBridge, wait_for

#: What Chrome and Firefox offer.
BROWSER_DEFLATE = "permessage-deflate; client_max_window_bits"


class RawClient:
    """A WebSocket client on a bare socket: the handshake's answer and every frame's bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 response: str) -> None:
        self.reader, self.writer, self.response = reader, writer, response

    @classmethod
    async def connect(cls, bridge: ServedBridge, path: str, extensions: str | None
                      ) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{bridge.port}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", f"Authorization: Bearer {bridge.token}"]
        if extensions:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(10):
            response = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert response.startswith("HTTP/1.1 101"), response
        return cls(reader, writer, response)

    def header(self, name: str) -> str:
        for line in self.response.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return ""

    async def frame(self) -> bytes:
        """The next frame, header and all."""
        async with asyncio.timeout(10):
            head = await self.reader.readexactly(2)
            size, extra = head[1] & 0x7F, b""
            if size == 126:
                extra = await self.reader.readexactly(2)
                size = int.from_bytes(extra)
            elif size == 127:
                extra = await self.reader.readexactly(8)
                size = int.from_bytes(extra)
            return head + extra + await self.reader.readexactly(size)

    def close(self) -> None:
        self.writer.close()


def text_of(data: bytes, window_bits: int = 15) -> str:
    """The text a client reads from one unmasked, unfragmented text frame."""
    assert data[0] & 0x0F == 1 and data[0] & 0x80, "a final text frame"
    assert not data[1] & 0x80, "server frames are not masked"
    size = data[1] & 0x7F
    payload = data[2 + {126: 2, 127: 8}.get(size, 0):]
    if data[0] & 0x40:  # compressed (RFC 7692): raw deflate without its empty-block tail
        payload = zlib.decompressobj(wbits=-window_bits).decompress(payload + b"\x00\x00\xff\xff")
    return payload.decode()


@pytest.mark.parametrize("size", [10, 300, 70_000])
def test_a_frame_carries_its_text_compressed_or_not(size: int) -> None:
    text = json.dumps({"type": "progress", "pad": "x" * size, "n": list(range(50))})
    plain, deflated = frame(text, None), frame(text, 12)
    assert text_of(plain) == text and not plain[0] & 0x40
    assert text_of(deflated, 12) == text and deflated[0] & 0x40
    assert len(deflated) < len(plain)
    assert frame(text, 12) is deflated  # built once
    assert not frame(text, 8)[0] & 0x40  # zlib cannot keep to a 256-byte window: sent plain


def test_every_client_gets_the_same_bytes_and_its_agreed_compression(
        bridge: ServedBridge) -> None:
    async def main() -> None:
        path = f"/v1/runs/r/ws?after=0&token={bridge.token}"
        browsers = [await RawClient.connect(bridge, path, BROWSER_DEFLATE) for _ in range(2)]
        plain = await RawClient.connect(bridge, path, None)
        wait_for(lambda: bridge.hub.subscribers("r") == 3, 5, "three subscribers")
        try:
            for client in browsers:
                agreed = client.header("Sec-WebSocket-Extensions")
                assert "permessage-deflate" in agreed and "server_no_context_takeover" in agreed
            assert plain.header("Sec-WebSocket-Extensions") == ""
            sent = [await bridge.emit("r", n, summary_bytes=400) for n in range(1, 4)]
            for message in sent:
                first, second = await browsers[0].frame(), await browsers[1].frame()
                assert first == second  # one frame, built once, for both
                assert first[0] & 0x40, "compressed, as agreed"
                assert text_of(first, 12) == message.wire
                unpacked = await plain.frame()
                assert not unpacked[0] & 0x40 and text_of(unpacked) == message.wire
        finally:
            for client in [*browsers, plain]:
                client.close()

    asyncio.run(main())


def test_a_batch_stops_at_its_size_and_a_cut_comes_after_what_was_queued(
        tmp_path: Path) -> None:
    async def main() -> None:
        store = MessageStore(tmp_path)
        try:
            hub = Hub()
            sub = hub.subscribe("r")
            queued = BATCH + 6
            for seq in range(1, queued + 1):
                hub.publish(draft(seq).numbered("r", seq))
            sub.close("gone", 4408)
            stream = follow(sub, store, 0, heartbeat_s=60)
            batches: list[list[Message]] = []
            with pytest.raises(Disconnected, match="gone"):
                async with asyncio.timeout(5):
                    async for batch in stream:
                        batches.append(batch)
            assert [len(batch) for batch in batches] == [BATCH, 6]
            assert [m.seq for batch in batches for m in batch] == list(range(1, queued + 1))
        finally:
            store.close()

    asyncio.run(main())
