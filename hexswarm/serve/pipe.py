"""One-way messages between peers over long-lived libp2p streams (`/hexswarm/pipe/2`).

Pipeline traffic (activations, sampled tokens, token events) is many small
messages per second between the same few peers, so each sender keeps one
stream per destination open and writes length-prefixed codec frames to it in
order; opening a stream per message would add a multistream negotiation round
trip to every decode step.  Messages are dicts with a "kind"; the receiver
decodes each into its typed value (serve/messages.py: every kind checked there, in one place)
and hands that to the callback registered for its class.

`send` may be called from worker threads: it only queues the message.

A link whose libp2p connection closes (a relay that carried it died, a peer that went away) is
forgotten at once, not at its next write, and `on_link_broken(peer)` is called: frames written to
it just before may be lost, which the serving layer turns into a resume of the requests in flight.
The next message to that peer opens a new link, dialing the peer first (through a relay if that is
how it is reached) when no connection is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hexswarm.errors import ProtocolError
from hexswarm.net import codec, failures
from hexswarm.net.framing import read_exactly, write_frame
from hexswarm.net.protocols import PIPE, close_quietly, remote_peer_id, reset_quietly
from hexswarm.net.ratelimit import PeerSlots
from hexswarm.serve.messages import UnknownKind

log = logging.getLogger("hexswarm.pipe")

MAX_PIPE_FRAME = 512 * 1024 * 1024  # a long prefill's activations
BODY_TIMEOUT_S = 60.0
QUEUE_DEPTH = 4096
# A sender closes a link it has not used for IDLE_CLOSE_S (the next message opens a new one); a
# receiver closes a link silent for twice that, so a silent peer holds no stream for ever and a
# live sender is never cut mid-use.
IDLE_CLOSE_S = 120.0
MAX_INBOUND_PER_PEER = 4  # one link per peer pair, and a new one may overlap a closing one
DIRECT_RETRY_S = 60.0  # after a failed direct-path attempt, links to that peer use the libp2p stream this long
# The direct path at an IP the peer does not list (a NAT's public side): a punched connection's data port is not
# open there (the connect hangs), a 1:1 NAT's (a cloud VM's public IP) is; tried this long, not open_direct's 5 s.
UNLISTED_DIRECT_TIMEOUT_S = 2.0

Decode = Callable[[dict, str], object]  # (message, sender) -> its typed value; ProtocolError when malformed
Receiver = Callable[[object, str], object]  # (typed message, sender PeerID text); must not block
SendFailed = Callable[[str, list[dict]], None]  # (peer, undelivered messages)
LinkBroken = Callable[[str], None]  # (peer): a link to or from it broke; messages on it may be lost


class MessagePipe:
    def __init__(self, node, on_send_failed: SendFailed | None = None, direct: bool = False,
                 idle_close_s: float = IDLE_CLOSE_S, on_link_broken: LinkBroken | None = None,
                 decode: Decode | None = None):
        self.node = node
        self.decode = decode  # PipelineDecoder.decode; set before the pipe runs
        self.idle_close_s = idle_close_s
        self._inbound = PeerSlots(MAX_INBOUND_PER_PEER)
        # pipeline frames over a direct AES-GCM TCP connection keyed over libp2p (net/direct.py)
        self.direct = direct
        self._direct_failed: dict[str, float] = {}  # peer -> trio time of its last failed direct attempt
        self.receivers: dict[type, Receiver] = {}  # typed message class -> its consumer
        self.on_send_failed = on_send_failed
        self.on_link_broken = on_link_broken
        self._out: dict[str, trio.MemorySendChannel] = {}
        # the libp2p streams of live links, to tell which links a closed connection took with it
        self._out_streams: dict[str, object] = {}
        self._in_streams: dict[str, set] = {}
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def on(self, message_class: type, fn: Receiver) -> None:
        self.receivers[message_class] = fn

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.custom_types import TProtocol

        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.node.host.set_stream_handler(TProtocol(PIPE), self._on_stream)
            self.node.host.get_network().register_notifee(_ConnectionWatch(self))
            if self.direct:
                from hexswarm.net.direct import DirectReceiver

                receiver = DirectReceiver(self.node, self._deliver, MAX_PIPE_FRAME, BODY_TIMEOUT_S,
                                          idle_s=2 * self.idle_close_s)
                await nursery.start(receiver.run, first_ipv4(self.node.config.listen) or "127.0.0.1")
            task_status.started()
            await trio.sleep_forever()

    # ---- sending ------------------------------------------------------------------------
    def send(self, peer: str, msg: dict) -> None:
        """Queue msg for peer; safe from any thread.  A message to ourselves is delivered locally."""
        if self._token is None:
            raise RuntimeError("pipe not running")
        try:
            if trio.lowlevel.current_trio_token() is self._token:
                self._send_here(peer, msg)
                return
        except RuntimeError:
            pass
        self._token.run_sync_soon(self._send_here, peer, msg)

    def _send_here(self, peer: str, msg: dict) -> None:
        if peer == self.node.peer_id_str:
            self._deliver(msg, peer)
            return
        channel = self._out.get(peer)
        if channel is None:
            channel, receive = trio.open_memory_channel(QUEUE_DEPTH)
            self._out[peer] = channel
            self._nursery.start_soon(self._writer, peer, channel, receive)
        try:
            channel.send_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.warning("pipe to %s is full or closed; message %s dropped", peer, msg.get("kind"))
            if self.on_send_failed:
                self.on_send_failed(peer, [msg])

    async def _writer(self, peer: str, channel: trio.MemorySendChannel, receive: trio.MemoryReceiveChannel) -> None:
        stream = sender = None
        pending: list[dict] = []
        try:
            sender = await self._open_direct(peer)
            if sender is None:
                stream = await self._open_stream(peer)
                self._out_streams[peer] = stream
            while True:
                msg = None
                with trio.move_on_after(self.idle_close_s):  # only the wait: never a write half done
                    try:
                        msg = await receive.receive()
                    except trio.EndOfChannel:  # retired by _connection_closed; nothing was left queued
                        return
                if msg is None:
                    self._retire_idle(peer, channel, receive)
                    return
                pending = [msg]
                if sender is not None:
                    await sender.send(msg, MAX_PIPE_FRAME)
                else:
                    await write_frame(stream, msg, timeout=BODY_TIMEOUT_S, max_size=MAX_PIPE_FRAME)
                pending = []
        except (Exception, trio.TooSlowError) as e:
            log.warning("pipe to %s broke: %s: %s", peer, type(e).__name__, e)
            if self.node is not None:
                from hexswarm.net.host import parse_peer_id
                from hexswarm.net.relay import connection_kind, drop_relayed

                # a relayed connection whose stream broke, or on which no stream could be opened (the link
                # failed before it had one): gone for good, so the next link dials afresh
                peer_id = parse_peer_id(peer)
                if stream is not None:
                    await drop_relayed(self.node.host, peer_id, stream.muxed_conn)
                elif connection_kind(self.node.host, peer_id) == "relayed":
                    await drop_relayed(self.node.host, peer_id)
            # not yet forgotten: nobody has announced this link's end (_connection_closed did, if it was)
            unannounced = self._out.get(peer) is channel
            if unannounced:
                del self._out[peer]
            while True:  # whatever was queued behind the failure did not go out either
                try:
                    pending.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if self.on_send_failed and pending:
                try:
                    self.on_send_failed(peer, pending)
                except Exception as e:  # never past this task: the pipe's nursery would end the node
                    failures.unexpected("pipe send-failure handler", peer, e)
            if unannounced:
                self._link_broken(peer)
        finally:
            if stream is not None and self._out_streams.get(peer) is stream:
                del self._out_streams[peer]
            if stream is not None:
                await close_quietly(stream)
            if sender is not None:
                await sender.aclose()

    def _retire_idle(self, peer: str, channel: trio.MemorySendChannel, receive: trio.MemoryReceiveChannel) -> None:
        """Forget an idle link (its stream is closed by the caller); a message that raced in is re-sent
        over a new one."""
        if self._out.get(peer) is channel:
            del self._out[peer]
        late = []
        while True:
            try:
                late.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        for msg in late:
            self._send_here(peer, msg)

    async def _open_stream(self, peer: str):
        from libp2p.custom_types import TProtocol

        from hexswarm.net.host import parse_peer_id

        from hexswarm.net.host import is_connected

        peer_id = parse_peer_id(peer)
        # py-libp2p refuses a peer for 60 s after a failed dial (its negative cache): a stage peer that
        # restarted would get no pipe for a minute (seen in tools/chaos.py)
        self.node.host.get_network().unblock_peer(peer_id)
        if not is_connected(self.node.host, peer_id):
            # the swarm's own dial knows no relays: a peer behind a NAT whose relayed connection just
            # closed is dialed the way discovery dials it (direct, then through each relay it names)
            await self.node.connect_peer(peer)
        with trio.fail_after(10):
            stream = await self.node.host.new_stream(peer_id, [TProtocol(PIPE)])
        from hexswarm.net.relay import route_of

        log.info("pipe to %s: libp2p stream over %s", peer, route_of(self.node.host, peer_id, stream))
        return stream

    async def _open_direct(self, peer: str):
        """A direct connection to peer, or None (then the libp2p stream carries the frames)."""
        if not self.direct:
            return None
        from hexswarm.net.host import parse_peer_id
        from hexswarm.net.relay import direct_data_ip

        now = trio.current_time()
        failed_at = self._direct_failed.get(peer)
        if failed_at is not None and now - failed_at < DIRECT_RETRY_S:
            log.info("pipe to %s: the direct path failed %.0f s ago; using the libp2p stream", peer, now - failed_at)
            return None
        # the IP a live non-relayed connection reaches the peer at; one the peer does not list itself is a NAT's
        # public side (a punched connection: no punch opened the data port there), tried only briefly
        entry = self.node.table.get(peer)
        ip, why = direct_data_ip(self.node.host, parse_peer_id(peer), entry.record.addrs if entry else None)
        if ip is None:
            log.info("pipe to %s: no direct path (%s); using the libp2p stream", peer, why)
            return None
        from hexswarm.net.direct import open_direct

        timeout = {} if not why else {"timeout": UNLISTED_DIRECT_TIMEOUT_S}
        if why:
            log.info("pipe to %s: %s; trying the direct path for %g s only", peer, why, UNLISTED_DIRECT_TIMEOUT_S)
        try:
            sender = await open_direct(self.node, peer, ip, **timeout)
            log.info("pipe to %s: direct encrypted path to %s", peer, ip)
            self._direct_failed.pop(peer, None)
            return sender
        except (Exception, trio.TooSlowError) as e:
            # remembered: each new link to this peer would pay the same wait (up to open_direct's timeout); only
            # failures of the last DIRECT_RETRY_S are kept (peers come and go: the table stays bounded)
            now = trio.current_time()
            self._direct_failed = {p: t for p, t in self._direct_failed.items() if now - t < DIRECT_RETRY_S}
            self._direct_failed[peer] = now
            log.info("no direct path to %s (%s: %s); using the libp2p stream (not tried again for %.0f s)",
                     peer, type(e).__name__, e, DIRECT_RETRY_S)
            return None

    # ---- receiving ----------------------------------------------------------------------
    async def _on_stream(self, stream) -> None:
        sender = str(remote_peer_id(stream))
        if not self.node.is_allowed(sender) or not self._inbound.acquire(sender):
            await reset_quietly(stream)
            return
        self._in_streams.setdefault(sender, set()).add(stream)
        try:
            while True:
                header = await read_exactly(stream, codec.FRAME_HEADER.size, timeout=2 * self.idle_close_s)
                body = await read_exactly(stream, codec.frame_length(header, MAX_PIPE_FRAME), timeout=BODY_TIMEOUT_S)
                msg = codec.decode(body, MAX_PIPE_FRAME, tensors=True)
                if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
                    raise ProtocolError("pipe message is not a dict with a kind")
                self._deliver(msg, sender)
        except ProtocolError as e:
            log.debug("pipe from %s ended: %s", sender, e)
        except Exception as e:
            failures.unexpected("pipe", sender, e)
        finally:
            self._inbound.release(sender)
            streams = self._in_streams.get(sender, set())
            streams.discard(stream)
            if not streams:
                self._in_streams.pop(sender, None)
            await reset_quietly(stream)

    # ---- links that break ---------------------------------------------------------------
    def _connection_closed(self, peer: str, muxed_conn) -> None:
        """A libp2p connection to `peer` closed: the links that ran over it are gone."""
        out = self._out_streams.get(peer)
        hit_out = out is not None and getattr(out, "muxed_conn", None) is muxed_conn
        hit_in = any(getattr(s, "muxed_conn", None) is muxed_conn for s in self._in_streams.get(peer, ()))
        if not (hit_out or hit_in):
            return  # another connection to the peer (a duplicate, a relayed one replaced by a punched one)
        log.info("pipe link %s %s closed with its connection", "to" if hit_out else "from", peer)
        if hit_out:
            # the next message opens a new link instead of being written into the dead stream; the old
            # writer ends once it has failed whatever was already queued on it
            channel = self._out.pop(peer, None)
            if channel is not None:
                channel.close()
        self._link_broken(peer)

    def _link_broken(self, peer: str) -> None:
        if self.on_link_broken is not None:
            try:
                self.on_link_broken(peer)
            except Exception as e:  # never past the caller: it runs in the pipe's (or the swarm's) tasks
                failures.unexpected("pipe link-broken handler", peer, e)

    def _deliver(self, msg: dict, sender: str) -> None:
        """Decode a message (from the libp2p stream, the direct path, or ourselves) and hand its typed value to
        the receiver of its class."""
        try:
            value = self.decode(msg, sender)
            fn = self.receivers.get(type(value))
            if fn is None:
                raise UnknownKind(f"no receiver for {type(value).__name__}")
            fn(value, sender)
        except UnknownKind as e:  # a kind a newer peer sends: not an attack, not worth a warning
            log.debug("pipe message of unknown kind %r from %s dropped: %s", msg.get("kind"), sender, e)
        except ProtocolError as e:  # a malformed message costs one log line, never the connection or the node
            log.warning("bad %s message from %s: %s", msg.get("kind"), sender, e)
        except Exception as e:
            failures.unexpected(f"pipe {msg.get('kind')}", sender, e)


class _ConnectionWatch:
    """py-libp2p network notifee: tells the pipe when a connection closes."""

    def __init__(self, pipe: MessagePipe):
        self.pipe = pipe

    async def disconnected(self, network, conn) -> None:
        muxed = getattr(conn, "muxed_conn", None)
        peer = getattr(muxed, "peer_id", None)
        if peer is not None:
            self.pipe._connection_closed(str(peer), muxed)

    async def connected(self, network, conn) -> None:
        pass

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


def first_ipv4(addrs: list[str]) -> str | None:
    """The IPv4 address of the first /ip4/ multiaddr in `addrs` (advertised addrs list non-loopback first)."""
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            return parts[2]
    return None
