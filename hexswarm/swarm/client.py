"""`SwarmClient`: one client host, one connection per entry node, many submit requests.

A request through `/hexswarm/submit/1` is one new yamux stream; dialing a node costs a TCP connect,
multistream negotiation and a Noise handshake (several round trips and Python crypto).  A client that
sends many requests keeps its host and connections, so time to first token pays for the stream only.

    async with SwarmClient(addrs, identity=key, cert=cert) as client:
        final = await client.submit({"prompt": "Hi", "max_new_tokens": 16}, on_frame=print)

Requests may run concurrently from several trio tasks of one client (streams multiplex on the connection).
`submit` fails over across the entry addresses as `submit_with_failover` always did; the frames are the
submit protocol's (see swarm/submit.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

import trio

from hexswarm.errors import ProtocolError, UserError, first_leaf
from hexswarm.net import identity as identities
from hexswarm.net.framing import read_frame, write_frame
from hexswarm.net.host import dial, is_connected, make_host, parse_peer_multiaddr
from hexswarm.net.protocols import SUBMIT, close_quietly
from hexswarm.swarm.submit import MAX_SUBMIT_FRAME, REQUEST_TIMEOUT_S

DIAL_TIMEOUT_S = 10.0


class SwarmClient:
    def __init__(self, addrs: str | Sequence[str], identity=None, cert: dict | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, dial_timeout: float = DIAL_TIMEOUT_S):
        """`addrs`: entry nodes' /ip4/.../tcp/.../p2p/<PeerID> (tried in order on failover).
        `identity` and `cert`: the submitter's key and client certificate, where the swarm wants them."""
        self.addrs = [addrs] if isinstance(addrs, str) else list(addrs)
        if not self.addrs:
            raise UserError("a swarm client needs at least one entry address")
        self.peers = {a: parse_peer_multiaddr(a, "--peer") for a in self.addrs}
        self.identity = identity
        self.cert = cert
        self.timeout = timeout
        self.dial_timeout = dial_timeout
        self.host = None
        self._stack: AsyncExitStack | None = None
        self._dial_locks: dict[str, trio.Lock] = {}

    async def __aenter__(self) -> "SwarmClient":
        import multiaddr

        self.host = make_host(self.identity or identities.generate())
        self._stack = AsyncExitStack()
        # py-libp2p's swarm wants a listener to run: an ephemeral loopback port
        await self._stack.enter_async_context(self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        return self

    async def __aexit__(self, etype, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        try:
            return bool(await stack.__aexit__(etype, exc, tb))
        except Exception as e:  # the host's nursery wraps whatever passes through it in exception groups
            leaf = first_leaf(e)
            if leaf is exc or isinstance(leaf, UserError):
                raise leaf from None
            raise UserError(f"the client host failed: {type(leaf).__name__}: {leaf}") from None

    async def connect(self, addr: str) -> None:
        """Dial `addr` unless this client is connected to it already (one dial at a time per node)."""
        info = self.peers.get(addr) or self.peers.setdefault(addr, parse_peer_multiaddr(addr, "--peer"))
        lock = self._dial_locks.setdefault(addr, trio.Lock())
        async with lock:
            if is_connected(self.host, info.peer_id):
                return
            try:
                await dial(self.host, info, timeout=self.dial_timeout)
            except ConnectionError as e:
                raise UserError(f"cannot reach {addr}: {e}") from None

    async def submit_once(self, addr: str, request: dict, on_frame: Callable[[dict], None] | None = None,
                          timeout: float | None = None) -> dict:
        """One request through the node at `addr`, on a new stream of the kept connection; the final frame.
        Raises UserError when the node cannot be reached or the stream breaks."""
        from libp2p.custom_types import TProtocol

        if self.host is None:
            raise RuntimeError("use the client as `async with SwarmClient(...) as client`")
        if self.cert is not None:
            request = {**request, "cert": self.cert}
        await self.connect(addr)
        peer_id = self.peers[addr].peer_id
        try:
            stream = await self.host.new_stream(peer_id, [TProtocol(SUBMIT)])
        except Exception as e:  # the kept connection died: drop it, so the next request dials afresh
            await self._drop(peer_id)
            raise UserError(f"cannot open a stream to {addr}: {type(e).__name__}: {e}") from None
        try:
            await write_frame(stream, request)
            while True:
                frame = await read_frame(stream, timeout=timeout or self.timeout, max_size=MAX_SUBMIT_FRAME)
                if not isinstance(frame, dict):
                    raise UserError("the node sent a malformed reply")
                if on_frame is not None:
                    on_frame(frame)
                if "done" in frame or "error" in frame:
                    return frame
        except ProtocolError as e:
            raise UserError(f"the connection to {addr} broke: {e}") from None
        finally:
            await close_quietly(stream)

    async def submit(self, request: dict, on_frame: Callable[[dict], None] | None = None,
                     timeout: float | None = None, max_tries: int = 6) -> dict:
        """Submit through the first entry node that answers; if an entry dies mid-request, submit again
        with the same request id through the next one.  Tokens are merged by index, so the caller
        sees each token once even when the new entry's pipeline regenerates the first ones."""
        request = {**request, "request_id": request.get("request_id") or uuid.uuid4().hex}
        delivered = 0
        accepted = False
        tried: list[str] = []  # what each entry said, for the error that ends it

        def relay(frame: dict) -> None:
            nonlocal delivered, accepted
            accepted = accepted or "accepted" in frame
            if "token" in frame:
                if frame["index"] < delivered:
                    return  # already seen through an earlier entry
                delivered = frame["index"] + 1
            if on_frame is not None:
                on_frame(frame)

        # an accepted request is the swarm's to finish: its client keeps failing over until the request's
        # timeout (with every entry restarting, six quick tries were all spent on entries still down)
        deadline = trio.current_time() + (timeout or self.timeout)
        attempt = 0
        while True:
            addr = self.addrs[attempt % len(self.addrs)]
            if accepted:  # the swarm took it once: the next entry resumes it, never refuses it as busy
                request = {**request, "resumed": True}
            try:
                return await self.submit_once(addr, request, relay, timeout)
            except UserError as e:  # unreachable or broke mid-stream: the next entry
                tried = [*tried[-(max_tries - 1):], str(e)]
                attempt += 1
                if attempt >= max_tries and not (accepted and trio.current_time() < deadline):
                    break
                await trio.sleep(min(2.0, 0.25 * attempt))
        raise UserError(f"no entry node finished request {request['request_id']}: " + "; ".join(tried))

    async def _drop(self, peer_id) -> None:
        try:
            await self.host.disconnect(peer_id)
        except Exception:  # noqa: BLE001 - already gone
            pass
