"""A direct, encrypted TCP data path between two peers that authenticated each other over libp2p.

py-libp2p costs ~22x a raw socket per small message on loopback (tools/bench_hop.py: yamux,
multistream and Noise in pure Python), and a decode step sends one small message per pipeline
hop.  So bulk pipeline traffic may leave libp2p once the peers know each other:

1. The sender asks the receiver over `/hexswarm/direct/2` (a libp2p request: Noise-encrypted,
   both PeerIDs authenticated, admission checked).  The receiver answers with a TCP port of its
   direct listener, a fresh 256-bit key and a single-use 16-byte ticket, bound to the sender's PeerID.
2. The sender connects, sends the ticket, then frames: 4-byte big-endian length + AES-256-GCM
   ciphertext of the codec body, with the frame counter as the nonce (so frames cannot be
   replayed, reordered or altered).  One direction only: sender -> receiver.
Any failure falls back to the libp2p stream.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
from typing import Any, Callable

import trio

from hexswarm.errors import ProtocolError
from hexswarm.net import codec, failures
from hexswarm.net.protocols import DIRECT
from hexswarm.net.ratelimit import PeerSlots

log = logging.getLogger("hexswarm.direct")

TICKET_BYTES = 16
TICKET_TTL_S = 30.0
MAX_PER_PEER = 4  # tickets outstanding and connections open per peer: one link per pair, plus overlap
HEADER = struct.Struct(">I")
TAG_BYTES = 16


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


class DirectSender:
    """One encrypted TCP connection to a receiver."""

    def __init__(self, stream: trio.SocketStream, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.stream = stream
        self.aead = AESGCM(key)
        self.counter = 0

    async def send(self, msg: Any, max_size: int) -> None:
        body = codec.encode(msg)
        if len(body) > max_size:
            raise ProtocolError(f"message of {len(body)} bytes exceeds the {max_size}-byte limit")
        sealed = self.aead.encrypt(_nonce(self.counter), body, None)
        self.counter += 1
        await self.stream.send_all(HEADER.pack(len(sealed)) + sealed)

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


async def open_direct(node, peer: str, host_ip: str, timeout: float = 5.0) -> DirectSender:
    """Ask `peer` for a ticket over libp2p and connect; raises on any failure."""
    with trio.fail_after(timeout):
        offer = await node.request(peer, DIRECT, {}, timeout=timeout)
        port, key, ticket = int(offer["port"]), offer["key"], offer["ticket"]
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(ticket, bytes) and len(ticket) == TICKET_BYTES):
            raise ProtocolError("malformed direct offer")
        stream = await trio.open_tcp_stream(host_ip, port)
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one frame per decode step: no batching delay
        except OSError:
            pass
        await stream.send_all(ticket)
        return DirectSender(stream, key)


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise ProtocolError("direct connection closed")
        buf += chunk
    return bytes(buf)


class DirectOpener:
    """Reads and authenticates the frames of one DirectSender, in order."""

    def __init__(self, key: bytes, max_frame: int, body_timeout: float):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key)
        self.counter = 0
        self.max_frame = max_frame
        self.body_timeout = body_timeout

    async def read(self, stream) -> Any:
        from cryptography.exceptions import InvalidTag

        (n,) = HEADER.unpack(await read_exactly(stream, HEADER.size))  # the caller bounds idle time
        if not TAG_BYTES <= n <= self.max_frame + TAG_BYTES:
            raise ProtocolError(f"direct frame of {n} bytes")
        with trio.fail_after(self.body_timeout):
            sealed = await read_exactly(stream, n)
        try:
            body = self.aead.decrypt(_nonce(self.counter), sealed, None)
        except InvalidTag:
            raise ProtocolError("direct frame failed authentication") from None
        self.counter += 1
        return codec.decode(body, self.max_frame, tensors=True)


class DirectReceiver:
    """This node's direct listener: hands out tickets, accepts ticketed connections, delivers frames."""

    def __init__(self, node, deliver: Callable[[dict, str], None], max_frame: int, body_timeout: float,
                 idle_s: float = math.inf):
        self.node = node
        self.deliver = deliver
        self.max_frame = max_frame
        self.body_timeout = body_timeout
        self.idle_s = idle_s  # a connection silent this long is closed (its sender closes idle ones sooner)
        self.port: int | None = None
        self._tickets: dict[bytes, tuple[str, bytes, float]] = {}  # ticket -> (peer, key, issued)
        self._open = PeerSlots(MAX_PER_PEER)

    async def run(self, listen_ip: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=listen_ip)
        self.port = listeners[0].socket.getsockname()[1]
        self.node.register_handler(DIRECT, self._offer)
        task_status.started(self.port)
        await trio.serve_listeners(self._on_connection, listeners)

    async def _offer(self, msg: Any, remote: Any) -> dict:
        now = time.monotonic()
        for t in [t for t, (_, _, at) in self._tickets.items() if now - at > TICKET_TTL_S]:
            del self._tickets[t]
        theirs = [t for t, (p, _, _) in self._tickets.items() if p == str(remote)]
        for t in theirs[: max(0, len(theirs) - MAX_PER_PEER + 1)]:  # the oldest go: a peer holds a few at most
            del self._tickets[t]
        ticket, key = os.urandom(TICKET_BYTES), os.urandom(32)
        self._tickets[ticket] = (str(remote), key, now)
        return {"port": self.port, "key": key, "ticket": ticket}

    async def _on_connection(self, stream: trio.SocketStream) -> None:
        peer = None
        try:
            with trio.fail_after(5):
                ticket = await read_exactly(stream, TICKET_BYTES)
            entry = self._tickets.pop(ticket, None)
            if entry is None or not self._open.acquire(entry[0]):
                return
            peer, key, _ = entry
            opener = DirectOpener(key, self.max_frame, self.body_timeout)
            while True:
                with trio.fail_after(self.idle_s):
                    msg = await opener.read(stream)
                if not self.node.is_allowed(peer):
                    raise ProtocolError(f"{peer} is no longer allowed")
                if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
                    raise ProtocolError("direct message is not a dict with a kind")
                self.deliver(msg, peer)
        except (ProtocolError, trio.TooSlowError, OSError, trio.BrokenResourceError) as e:
            log.debug("direct connection ended: %s", e)
        except Exception as e:  # never past this connection: the listener's nursery would end the node
            failures.unexpected("direct", peer, e)
        finally:
            if peer is not None:
                self._open.release(peer)
            with trio.move_on_after(1):
                await stream.aclose()
