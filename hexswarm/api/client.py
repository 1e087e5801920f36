"""`SwarmClient`: one client host, one connection per entry node, many submit requests.

Dialing a node costs a TCP connect, multistream negotiation and a Noise handshake (several round trips and
Python crypto).  A client that sends many requests keeps its host and one connection per entry, and one
`/hexswarm/submit/3` session on it (serve/submit_session.py) that carries all its requests to that entry: a
request costs no stream, and the tokens of all of them from one engine step arrive in one write.  An entry
without submit/3 (an older install) gets a `/hexswarm/submit/2` stream per request instead.

    async with SwarmClient(addrs, identity=key, cert=cert) as client:
        final = await client.submit({"prompt": "Hi", "max_new_tokens": 16}, on_frame=print)

Requests may run concurrently from several trio tasks of one client (they multiplex on the session).
`submit` fails over across the entry addresses as `submit_with_failover` always did; the frames are the
submit protocol's (see serve/submit.py).

An entry that dies or freezes does not take the request with it: on a session (and a submit/2 stream) the entry
sends a keepalive frame whenever it has nothing else to send, so one silent for `silent_s` is an entry that stopped
answering; the client resets it and submits the same request (same id, same seed) through the next
entry, marked `resumed` once any entry accepted it.  Tokens are delivered to the caller once each, by index.
Each submission carries `timeout_s`, what is left of the caller's timeout: the entry ends the request then, and
refuses a new one it cannot serve well within it (a `busy` error, before anything is accepted).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

import trio

from hexswarm.errors import ProtocolError, UserError, first_leaf
from hexswarm.net import identity as identities
from hexswarm.net.error_codes import MEANINGS
from hexswarm.net.framing import FrameTimeout, read_frame, write_frame
from hexswarm.net.host import dial, is_connected, make_host, parse_peer_multiaddr
from hexswarm.net.protocols import SUBMIT, SUBMIT2, SUBMIT3, close_quietly, reset_quietly
from hexswarm.serve.submit import MAX_SUBMIT_FRAME, REQUEST_TIMEOUT_S
from hexswarm.serve.submit_session import ClientSession, SessionLost

DIAL_TIMEOUT_S = 10.0
# an entry that sent nothing for this long (not even a keepalive, every 2 s: serve/submit.py KEEPALIVE_S) is
# dead or frozen; long enough that an entry whose event loop stalls for seconds under load is not left
SILENT_S = 15.0
# error codes after which an accepted request is submitted through the next entry rather than given up: that
# entry could not take it now (full, no head, no layout), or this stream was replaced by a resubmission
RETRY_CODES = frozenset(code for code, m in MEANINGS.items() if m.retry)
SESSION_RETRY_S = 60.0  # an entry that refused a submit/3 session is offered one again after this long


class StreamRefused(UserError):
    """The entry negotiated none of the protocols offered (an older install, or a stream it refused)."""


class SwarmClient:
    def __init__(self, addrs: str | Sequence[str], identity=None, cert: dict | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, dial_timeout: float = DIAL_TIMEOUT_S, silent_s: float = SILENT_S):
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
        self.silent_s = silent_s
        self.host = None
        self._stack: AsyncExitStack | None = None
        self._dial_locks: dict[str, trio.Lock] = {}
        self._session_locks: dict[str, trio.Lock] = {}  # one session opened at a time per entry
        self.sessions: dict[str, ClientSession] = {}  # addr -> its submit/3 session, while it lives
        # entry -> when to offer it submit/3 again: it refused a session (an older install, or a stream refused during
        # negotiation), so its requests take a submit/2 stream each meanwhile
        self._no_session: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> "SwarmClient":
        import multiaddr

        self.host = make_host(self.identity or identities.generate())
        self._stack = AsyncExitStack()
        # py-libp2p's swarm wants a listener to run: an ephemeral loopback port
        await self._stack.enter_async_context(self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())  # the sessions' readers
        return self

    async def __aexit__(self, etype, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        self._nursery.cancel_scope.cancel()
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

    async def _open_stream(self, addr: str, protocols: list[str]):
        """A new stream to `addr` on the kept connection (dialed if need be); UserError if none within
        `silent_s`, StreamRefused if the entry negotiated none of `protocols` (for a caller to fall back)."""
        from libp2p.custom_types import TProtocol

        await self.connect(addr)
        peer_id = self.peers[addr].peer_id
        # a frozen node keeps its connection but never negotiates the stream (py-libp2p waits 30 s)
        with trio.move_on_after(self.silent_s):
            try:
                return await self.host.new_stream(peer_id, [TProtocol(p) for p in protocols])
            except Exception as e:
                cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
                why = f"cannot open a stream to {addr}: {type(e).__name__}: {e}{cause}"
                if type(e).__name__ == "StreamFailure":
                    # negotiation failed: says nothing about the connection, which other streams may use
                    raise StreamRefused(why) from None
                # the kept connection died: drop it, so the next request dials afresh
                await self._drop(peer_id)
                raise UserError(why) from None
        raise UserError(f"no stream to {addr} within {self.silent_s:g} s")  # frozen, or too busy to answer

    async def _session(self, addr: str) -> ClientSession | None:
        """The live submit/3 session with `addr`, opened if need be; None for an entry without submit/3."""
        if self._no_session.get(addr, -math.inf) > trio.current_time():
            return None
        async with self._session_locks.setdefault(addr, trio.Lock()):
            session = self.sessions.get(addr)
            if session is not None and session.lost is None:
                return session
            try:
                stream = await self._open_stream(addr, [SUBMIT3])
            except StreamRefused:
                self._no_session[addr] = trio.current_time() + SESSION_RETRY_S
                return None
            session = self.sessions[addr] = ClientSession(stream, addr, self.silent_s)
            self._nursery.start_soon(session.run, self._session_lost)
            return session

    def _session_lost(self, session: ClientSession) -> None:
        if self.sessions.get(session.addr) is session:
            del self.sessions[session.addr]

    async def submit_once(self, addr: str, request: dict, on_frame: Callable[[dict], None] | None = None,
                          timeout: float | None = None) -> dict:
        """One request through the node at `addr` on the kept connection: on this client's submit/3 session with
        it, or (an entry without sessions) a submit/2 stream of its own; the final frame.
        Raises UserError when the node cannot be reached, the session or stream breaks, or the node sends
        nothing, not even a keepalive, for `silent_s`; keepalive frames are not passed to `on_frame`."""
        if self.host is None:
            raise RuntimeError("use the client as `async with SwarmClient(...) as client`")
        if self.cert is not None:
            request = {**request, "cert": self.cert}
        deadline = trio.current_time() + (timeout or self.timeout)
        session = await self._session(addr)
        if session is None:
            return await self._submit_on_stream(addr, request, on_frame, deadline)
        try:
            n, frames = session.open(request)
        except SessionLost as e:
            raise UserError(str(e)) from None
        finished = False
        try:
            with trio.move_on_at(deadline):  # one scope for the whole request, not one per frame
                while True:
                    frame = await frames.receive()
                    if isinstance(frame, SessionLost):
                        raise UserError(str(frame))
                    if on_frame is not None:
                        on_frame(frame)
                    if "done" in frame or "error" in frame:
                        finished = True
                        return frame
            raise UserError(f"no reply from {addr} within the request's timeout")
        finally:
            session.close(n, finished)

    async def _submit_on_stream(self, addr: str, request: dict, on_frame, deadline: float) -> dict:
        """submit_once on a submit/2 (or /1) stream of its own."""
        stream = await self._open_stream(addr, [SUBMIT2, SUBMIT])
        # an entry that speaks submit/2 is never silent for long while it lives
        keepalive = str(stream.get_protocol()) == SUBMIT2
        finished = False
        try:
            await write_frame(stream, request, timeout=self.silent_s)
            while True:
                left = deadline - trio.current_time()
                limit = min(self.silent_s, left) if keepalive else left
                try:
                    frame = await read_frame(stream, timeout=max(0.001, limit), max_size=MAX_SUBMIT_FRAME)
                except FrameTimeout:
                    if left <= limit:
                        raise UserError(f"no reply from {addr} within the request's timeout") from None
                    raise UserError(f"{addr} sent nothing for {self.silent_s:g} s (dead or frozen)") from None
                if not isinstance(frame, dict):
                    raise UserError("the node sent a malformed reply")
                if "keepalive" in frame:
                    continue
                if on_frame is not None:
                    on_frame(frame)
                if "done" in frame or "error" in frame:
                    finished = True
                    return frame
        except ProtocolError as e:
            raise UserError(f"the connection to {addr} broke: {e}") from None
        finally:
            if finished:
                await close_quietly(stream)
            else:  # the entry sees its client gone at once (and stops the request's work) when it wakes
                await reset_quietly(stream)

    async def submit(self, request: dict, on_frame: Callable[[dict], None] | None = None,
                     timeout: float | None = None, max_tries: int = 6, addrs: Sequence[str] | None = None) -> dict:
        """Submit through the first entry node that answers; if an entry dies mid-request, submit again
        with the same request id through the next one.  Tokens are merged by index, so the caller
        sees each token once even when the new entry's pipeline regenerates the first ones.
        `addrs`: the entries to try for this request, in order (default: the client's)."""
        order = list(addrs or self.addrs)
        request = {**request, "request_id": request.get("request_id") or uuid.uuid4().hex}
        delivered = 0
        have: list[int] = []  # the tokens delivered so far, in order (streamed requests)
        accepted = False
        tried: list[str] = []  # what each entry said, for the error that ends it

        def relay(frame: dict) -> None:
            nonlocal delivered, accepted
            accepted = accepted or "accepted" in frame
            if "token" in frame:
                if frame["index"] < delivered:
                    return  # already seen through an earlier entry
                delivered = frame["index"] + 1
                if frame["index"] == len(have):
                    have.append(frame["token"])
            if on_frame is not None:
                on_frame(frame)

        # an accepted request is the swarm's to finish: its client keeps failing over until the request's
        # timeout (with every entry restarting, six quick tries were all spent on entries still down)
        deadline = trio.current_time() + (timeout or self.timeout)
        attempt = 0
        while True:
            addr = order[attempt % len(order)]
            if accepted:  # the swarm took it once: the next entry resumes it, never refuses it as busy, and its
                # pipeline continues after the tokens this client has (not generating them again)
                request = {**request, "resumed": True, "resume_tokens": list(have)}
            left = deadline - trio.current_time()
            try:
                final = await self.submit_once(addr, request | {"timeout_s": max(1.0, left)}, relay, left)
                code = (final.get("error") or {}).get("code") if isinstance(final.get("error"), dict) else None
                if not (accepted and code in RETRY_CODES):
                    return final
                # an accepted request that this entry could not take now: the next entry, until the timeout
                error = f"{addr}: {code}: {final['error'].get('message')}"
            except UserError as e:  # unreachable, broke mid-stream or went silent: the next entry
                error = str(e)
            tried = [*tried[-(max_tries - 1):], error]
            attempt += 1
            if trio.current_time() >= deadline or (attempt >= max_tries and not accepted):
                break
            await trio.sleep(min(2.0, 0.25 * attempt, max(0.0, deadline - trio.current_time())))
        raise UserError(f"no entry node finished request {request['request_id']}: " + "; ".join(tried))

    async def _drop(self, peer_id) -> None:
        try:
            await self.host.disconnect(peer_id)
        except Exception:  # noqa: BLE001 - already gone
            pass


async def submit_to(addr: str, request: dict, on_frame: Callable[[dict], None] | None = None,
                    timeout: float = REQUEST_TIMEOUT_S, client_identity=None, cert: dict | None = None) -> dict:
    """Client side: send one request to the node at `addr` over a connection of its own; returns the
    final frame.  For many requests keep one `SwarmClient`: no dial per request.
    Raises UserError when the node cannot be reached or the connection breaks."""
    async with SwarmClient([addr], identity=client_identity, cert=cert, timeout=timeout) as client:
        return await client.submit_once(addr, request, on_frame)


async def submit_with_failover(addrs: list[str], request: dict, on_frame: Callable[[dict], None] | None = None,
                               timeout: float = REQUEST_TIMEOUT_S, client_identity=None, cert: dict | None = None,
                               max_tries: int = 6) -> dict:
    """One request through the first entry node that answers, failing over to the next ones
    (`SwarmClient.submit`), on a client of its own."""
    async with SwarmClient(addrs, identity=client_identity, cert=cert, timeout=timeout) as client:
        return await client.submit(request, on_frame, max_tries=max_tries)
