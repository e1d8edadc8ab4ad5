"""WebSocket frames built once per message and written to every client as they are.

With 1,000 clients on one run, building (and compressing) each message's frame once per
client was most of the bridge's work (BENCHMARKS.md, fan-out). A server-to-client frame
is not masked, and a message compressed without context takeover does not depend on what
the connection sent before, so one message's frame is the same bytes for every client
whose connection agreed on the same compression window. The bridge's WebSocket protocol
(:class:`FanoutProtocol`, uvicorn's websockets protocol with ``server_no_context_takeover``
always agreed) hands the route a :class:`FrameWriter` in the ASGI scope's extensions; the
route writes a batch of prebuilt frames with one call. docs/stream.md, "Fan-out".
"""

from __future__ import annotations

import functools
import struct
import zlib
from typing import Any, Final

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.server import ServerProtocol

from planrun.contract.stream import Message

#: The ASGI scope extension under which :class:`FanoutProtocol` offers its writer.
EXTENSION: Final = "planrun.frames"

#: Window bits of the deflate the bridge agrees to (uvicorn's choice too): 4 KiB.
WINDOW_BITS: Final = 12
_TEXT_FIN: Final = 0x81  # FIN + text opcode
_RSV1: Final = 0x40  # "this message is compressed" (RFC 7692)
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


@functools.lru_cache(maxsize=8192)
def frame(text: str, window_bits: int | None) -> bytes:
    """The unmasked text frame carrying ``text``, deflated with ``window_bits`` (None: not
    compressed; RFC 7692 lets a sender leave any message uncompressed, so does a window
    zlib cannot honour)."""
    payload = text.encode()
    first = _TEXT_FIN
    if window_bits is not None and window_bits >= 9:  # zlib raises a raw window of 8 to 9
        deflate = zlib.compressobj(wbits=-window_bits, memLevel=5)
        payload = deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = payload.removesuffix(_DEFLATE_TAIL)
        first |= _RSV1
    return _header(first, len(payload)) + payload


def _header(first: int, size: int) -> bytes:
    if size < 126:
        return struct.pack("!BB", first, size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


class FrameWriter:
    """Writes prebuilt frames straight to one client's connection."""

    def __init__(self, protocol: FanoutProtocol) -> None:
        self._protocol = protocol
        #: The deflate window agreed in the handshake; None when the client did not offer
        #: compression.
        self.window_bits = next((extension.local_max_window_bits
                                 for extension in protocol.conn.extensions
                                 if isinstance(extension, PerMessageDeflate)
                                 and extension.local_no_context_takeover), None)

    def frames(self, messages: list[Message]) -> bytes:
        """The frames of ``messages`` for this client, back to back."""
        return b"".join([frame(message.wire, self.window_bits) for message in messages])

    def write_nowait(self, frames: bytes) -> bool:
        """Write ``frames`` if the client's socket buffer has room now; False (nothing
        written) when it is full or the client is gone or closing."""
        protocol = self._protocol
        if not protocol.writable.is_set() or protocol.disconnected or protocol.close_sent \
                or protocol.transport.is_closing():
            return False
        protocol.transport.write(frames)
        return True

    async def write(self, frames: bytes) -> None:
        """Write ``frames`` once the client's socket buffer has room, as uvicorn's own
        ``send`` does; raises uvicorn's ``ClientDisconnected`` when the client is gone or
        closing."""
        await self._protocol.writable.wait()
        if not self.write_nowait(frames):
            raise ClientDisconnected()


class FanoutProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol that always agrees to ``server_no_context_takeover``
    (each message compressed on its own) and offers a :class:`FrameWriter` to the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extensions = []
        if self.config.ws_per_message_deflate:
            extensions = [ServerPerMessageDeflateFactory(
                server_no_context_takeover=True, server_max_window_bits=WINDOW_BITS,
                client_max_window_bits=WINDOW_BITS, compress_settings={"memLevel": 5})]
        self.conn = ServerProtocol(extensions=extensions, max_size=self.config.ws_max_size,
                                   logger=self.conn.logger)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)  # agrees on the extensions
        scope = getattr(self, "scope", None)  # only a handshake that can be accepted has one
        if scope is not None:
            scope["extensions"][EXTENSION] = FrameWriter(self)
