"""The direct data path: frames encrypted and authenticated in order; tickets single-use; tampering ends the link."""

from __future__ import annotations

import os

import pytest
import trio

from hexswarm.errors import ProtocolError
from hexswarm.net.direct import DirectOpener, DirectSender


class Pipe:
    """An in-memory one-way byte stream with trio's SocketStream methods the path uses."""

    def __init__(self):
        self.send, self.recv = trio.open_memory_channel(1000)
        self.buf = b""

    async def send_all(self, data: bytes) -> None:
        await self.send.send(data)

    async def receive_some(self, n: int) -> bytes:
        if not self.buf:
            self.buf = await self.recv.receive()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def test_frames_round_trip_in_order():
    async def main():
        key = os.urandom(32)
        pipe = Pipe()
        sender, opener = DirectSender(pipe, key), DirectOpener(key, 1 << 20, 5)
        for i in range(5):
            await sender.send({"kind": "forward", "i": i}, 1 << 20)
        assert [(await opener.read(pipe))["i"] for _ in range(5)] == list(range(5))

    trio.run(main)


@pytest.mark.parametrize("attack", ["flip", "replay", "wrong-key", "oversize"])
def test_tampered_replayed_or_foreign_frames_are_refused(attack):
    async def main():
        key = os.urandom(32)
        pipe = Pipe()
        sender = DirectSender(pipe, key)
        await sender.send({"kind": "a"}, 1 << 20)
        frame = await pipe.recv.receive()
        if attack == "flip":
            frame = frame[:-1] + bytes([frame[-1] ^ 1])
        elif attack == "replay":  # the same frame twice: the second has a stale counter
            await pipe.send.send(frame)
        elif attack == "oversize":
            frame = (1 << 30).to_bytes(4, "big") + frame[4:]
        await pipe.send.send(frame)
        opener = DirectOpener(os.urandom(32) if attack == "wrong-key" else key, 1 << 20, 5)
        if attack == "replay":
            await opener.read(pipe)
        with pytest.raises(ProtocolError):
            await opener.read(pipe)

    trio.run(main)
