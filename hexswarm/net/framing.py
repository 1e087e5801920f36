"""Codec frames on a libp2p stream: read exactly N bytes under a deadline, write a frame.

Every failure a peer can cause (EOF mid-frame, reset, timeout, oversized
length, undecodable body) surfaces as a ProtocolError subclass, so callers
have one thing to catch.
"""

from __future__ import annotations

from typing import Any

import trio

from hexswarm.errors import ProtocolError
from hexswarm.net import codec

DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_WRITE_TIMEOUT_S = 10.0
# yamux hands out at most one window per read; asking for more is harmless.
_READ_CHUNK = 1 << 20


class StreamClosed(ProtocolError):
    """The stream ended (EOF or reset) before a whole frame arrived."""


class FrameTimeout(ProtocolError):
    """No whole frame within the read timeout."""


async def _read_exactly(stream, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = await stream.read(min(n - got, _READ_CHUNK))
        except Exception as e:  # EOF, reset, muxer or connection gone: all one to us
            raise StreamClosed(f"stream closed after {got} of {n} bytes ({type(e).__name__})") from None
        if not chunk:
            raise StreamClosed(f"stream closed after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_exactly(stream, n: int, timeout: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    with trio.move_on_after(timeout) as scope:
        return await _read_exactly(stream, n)
    assert scope.cancelled_caught
    raise FrameTimeout(f"no {n} bytes within {timeout:g} s")


async def read_frame(
    stream, timeout: float = DEFAULT_READ_TIMEOUT_S, max_size: int = codec.DEFAULT_MAX_FRAME, tensors: bool = False
) -> Any:
    """Read and decode one frame; the timeout covers header and body together (tensors: codec.decode)."""
    with trio.move_on_after(timeout):
        header = await _read_exactly(stream, codec.FRAME_HEADER.size)
        body = await _read_exactly(stream, codec.frame_length(header, max_size))
        return codec.decode(body, max_size, tensors)
    raise FrameTimeout(f"no whole frame within {timeout:g} s")


async def write_frame(
    stream, obj: Any, timeout: float = DEFAULT_WRITE_TIMEOUT_S, max_size: int = codec.DEFAULT_MAX_FRAME
) -> None:
    await write_frames(stream, [obj], timeout, max_size)


async def write_frames(
    stream, objs: list, timeout: float = DEFAULT_WRITE_TIMEOUT_S, max_size: int = codec.DEFAULT_MAX_FRAME
) -> None:
    """Several frames in one write (one muxer frame and one encryption on a libp2p stream)."""
    data = b"".join(codec.frame(obj, max_size) for obj in objs)
    with trio.move_on_after(timeout):
        try:
            await stream.write(data)
        except Exception as e:
            raise StreamClosed(f"cannot write: {type(e).__name__}: {e}") from None
        return
    raise FrameTimeout(f"could not write {len(data)} bytes within {timeout:g} s")


class FrameWriter:
    """The frames of one stream, written by one task (`run`): whatever was queued while the previous
    write was in flight goes out in the next single write.  A busy node so makes fewer, larger writes
    (measured: one libp2p frame per token per request saturated an entry node's event loop at 64
    streams); an idle one writes each frame at once.  A write that fails cancels `scope` (the work
    that produces the frames) and is kept in `error`."""

    def __init__(self, stream, scope: trio.CancelScope, timeout: float = DEFAULT_WRITE_TIMEOUT_S):
        self.stream, self.scope, self.timeout = stream, scope, timeout
        self.error: ProtocolError | None = None
        self._send, self._receive = trio.open_memory_channel(float("inf"))

    def put(self, obj: Any) -> None:
        self._send.send_nowait(obj)

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        async for first in self._receive:
            batch = [first]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await write_frames(self.stream, batch, self.timeout)
            except ProtocolError as e:
                self.error = e
                self.scope.cancel()
                return
