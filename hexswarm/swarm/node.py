"""The node daemon: host + Kademlia DHT (server mode) + gossipsub inventory + heartbeats + probes.

A Node runs inside a trio nursery::

    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)      # returns once listening and subscribed
        ...                                # node.table, node.request(...), ...
        node.stop()

Discovery: the configured bootstrap peers are dialed (retried with back-off);
every node announces itself in the DHT as a provider of its swarm key and
looks the key up, dialing what it finds, so peers are learned through the
DHT and not only through the bootstrap peer. Records gossiped on
``hexswarm/<swarm>/inventory/1`` carry addresses, so peers also dial peers they
hear about. Peers of other swarms, and PeerIDs outside ``allow_peers`` when it
is set, never enter the table and are refused on the request protocols.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from hexswarm.errors import ProtocolError, UserError
from hexswarm.net import codec, failures, pubsub_fixes
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.host import (
    DIAL_TIMEOUT_S,
    Backoff,
    advertised_addrs,
    dial,
    is_connected,
    listen_multiaddrs,
    make_host,
    parse_peer_id,
    parse_peer_multiaddr,
)
from hexswarm.net.identity import Identity, load_or_create
from hexswarm.net.relay import connection_kind, drop_relayed
from hexswarm.net.protocols import (
    PEERS,
    PING,
    RECORDS,
    Handler,
    RemoteError,
    RequestError,
    StreamOpenFailed,
    request,
    serve,
)
from hexswarm.swarm.config import NodeConfig
from hexswarm.swarm.inventory import Device, inventory
from hexswarm.swarm.peer_table import PeerState, PeerTable, StateChange
from hexswarm.swarm.records import (
    SCALE_KEY,
    NodeRecord,
    announced_scale,
    bounded_links,
    new_incarnation,
    open_record,
    sign_record,
)

log = logging.getLogger("hexswarm.node")

GossipHandler = Callable[[Any, str], Awaitable[None]]  # (decoded msg, publisher PeerID)
MAX_GOSSIP_BYTES = 1 << 20
GOSSIPSUB_PROTOCOLS = ("/meshsub/1.1.0", "/meshsub/1.0.0")
DISCOVERY_INTERVAL_S = 3.0
PROVIDE_INTERVAL_S = 60.0
# py-libp2p's gossipsub keeps every message it ever saw for equivocation checks
# (never pruned); we clear it on this period so memory stays bounded.
GOSSIP_CACHE_PRUNE_S = 60.0
UNREACHABLE_WARN_EVERY_S = 30.0
MAX_DIAL_BACKOFF = 1024  # peers whose dial back-off is remembered; past that, only those still backing off
PROBE_FANOUT = 8  # peers probed per probe round (all of them in small swarms)
# Discovery dials in flight at once: a node that learns a whole table at once (joining a large swarm) dials
# its peers a few at a time instead of starting N handshakes together.  Membership needs only the gossip mesh,
# not a connection to every peer: with 2 rather than 4, 32 nodes starting at once on 2 cores converged in
# 20.1 and 20.9 s against 23.8-32.2 s (the handshakes left more of the CPU to the gossip).
DIAL_CONCURRENCY = 2
# A peer whose record announces a table this much larger than ours (at least; or 1/8 of ours) is asked for it,
# at most once a heartbeat.
SYNC_MARGIN = 2
# Two peers that learn of each other at once would both dial, and both pay for a second connection: the one
# whose PeerID sorts first dials at once, the other gives it this long before dialing itself.
DIAL_DEFER_S = 2.0
# A discovery dial has no caller waiting on it: it may take as long as py-libp2p's own phase timeouts
# (TCP, then the Noise and yamux upgrade); cancelling it mid-upgrade on a loaded host threw away a
# handshake the peer had completed (measured: ~5 per node while 32 nodes formed on 2 cores).
DISCOVERY_DIAL_TIMEOUT_S = 20.0
# gossipsub mesh degree (target, low, high) and heartbeat; at a membership scale > 1 (a swarm larger than
# heartbeat_peers) the leaner degree and a heartbeat slowed alike (peer_table.py): every record reaches a
# node about once per mesh peer, so the degree multiplies every node's inventory work.
GOSSIP_DEGREE = (6, 4, 12)
GOSSIP_DEGREE_AT_SCALE = (3, 2, 6)
GOSSIP_HEARTBEAT_S = 1.0


def lookup_interval(scale: float, idle_lookups: int) -> float:
    """Seconds between DHT lookups of the swarm key in a swarm of membership scale `scale` > 1, after
    `idle_lookups` lookups in a row that found no peer missing from the table."""
    return min(DISCOVERY_INTERVAL_S * scale * 2 ** min(idle_lookups, 16), PROVIDE_INTERVAL_S * scale)


class BootstrapFailed(UserError):
    pass


def _names_peer(addr: str, peer_id: str) -> bool:
    """Does `addr` parse and end in /p2p/<peer_id>? (records and DHT answers are other peers' words)"""
    try:
        return addr.endswith(f"/p2p/{peer_id}") and parse_peer_multiaddr(addr) is not None
    except UserError:
        return False


@dataclass
class LinkStats:
    rtt_ms: float
    mbps: float | None = None

    def to_wire(self) -> dict:
        return {"rtt_ms": round(self.rtt_ms, 3), "mbps": None if self.mbps is None else round(self.mbps, 1)}


def swarm_key(swarm: str) -> str:
    """The DHT provider key all members of a swarm announce (hex: py-libp2p decodes it to bytes)."""
    return hashlib.sha256(f"hexswarm/swarm/{swarm}".encode()).hexdigest()


class Node:
    def __init__(
        self,
        config: NodeConfig,
        identity: Identity | None = None,
        devices: list[Device] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.identity = identity or load_or_create(config.key_file)
        self.devices = devices if devices is not None else inventory(config.devices, config.data_dir)
        self.peer_id = self.identity.peer_id
        self.peer_id_str = self.peer_id.to_base58()
        self.table = PeerTable(config.down_after_s, config.drop_after_s, clock, config.heartbeat_peers)
        self._allowed = None if config.allow_peers is None else {*config.allow_peers, self.peer_id_str}
        self._bootstrap = [parse_peer_multiaddr(a, "bootstrap address") for a in config.bootstrap]
        self.host = make_host(self.identity)
        from hexswarm.swarm.nat import NatTraversal  # py-libp2p's relay modules: imported with the node

        self.nat = NatTraversal(self)
        self.links: dict[str, LinkStats] = {}
        # Small values later features announce in every record (e.g. loaded stages).
        self.extra: dict[str, Any] = {}
        # The engine's measured speed here (hexswarm.swarm.calibrate); set by the daemon once measured.
        self.calibration: dict[str, Any] = {}
        self.admission = self._load_admission(config)
        self.on_peer_change: list[Callable[[StateChange], None]] = []
        self.addrs: list[str] = []
        self.dht = self.pubsub = self.gossipsub = None
        self._incarnation = new_incarnation()
        self._seq = 0
        self._stop = trio.Event()
        self._failure: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        # PeerID -> (next dial time, back-off, the addresses that failed): new addresses (a relay
        # reservation, a restart) are dialed at once
        self._dial_backoff: dict[str, tuple[float, Backoff, list[str]]] = {}
        self._dialing: set[str] = set()
        self._dial_slots = trio.Semaphore(DIAL_CONCURRENCY)
        # PeerID -> the signed form of the record the table holds for it (ours too): sent to newcomers
        self._signed: dict[str, dict] = {}
        self._caught_up_at = -math.inf  # when we last asked a peer that knows more for its table (trio clock)
        self._catching_up = False
        # Set when a new peer enters the table: discovery dials it at once, so
        # the swarm does not hang on the bootstrap chain for a whole interval.
        self._discovery_wake = trio.Event()
        # inventory gossip received (first copies, valid or not) and our last record's size:
        # tools/swarm_scale.py reads them
        self.gossip_in = 0
        self.record_bytes = 0
        # records the inventory validator accepted, by signature, until delivered: verified once, not twice
        self._validated: dict[bytes, tuple[bytes, NodeRecord]] = {}
        self.register_handler(PING, self._on_ping, max_request=config.probe_bytes + 4096)
        self.register_handler(PEERS, self._on_peers, access="clients")
        # "clients": a newcomer's record may not have reached us yet, so its certificate comes in the
        # request (admitted here as for a client); the handler then answers admitted nodes only
        self.register_handler(RECORDS, self._on_records, access="clients")

    # --- public API -------------------------------------------------------

    @property
    def inventory_topic(self) -> str:
        return self.topic("inventory")

    def topic(self, name: str, version: int = 1) -> str:
        """This swarm's gossip topic ``hexswarm/<swarm>/<name>/<version>``."""
        return f"{self.config.topic_prefix}/{name}/{version}"

    @property
    def heartbeat_s(self) -> float:
        """The heartbeat in force: heartbeat_s, slowed in swarms larger than heartbeat_peers (peer_table.py)."""
        return self.config.heartbeat_s * self.table.scale

    def is_allowed(self, peer_id: Any) -> bool:
        """May this peer use our node-to-node protocols and reach us by gossip? (allowlist, and a
        node certificate: a client certificate never opens these)"""
        if self._allowed is not None and str(peer_id) not in self._allowed:
            return False
        return self.admission is None or self.admission.is_admitted(str(peer_id), "node")

    def admit_client(self, peer_id: Any, msg: Any) -> None:
        """Let `peer_id` act as a client (submit, read status): it needs a node or client certificate,
        already recorded or sent as `msg["cert"]`; PermissionError otherwise.  No-op without swarm_owner."""
        if self.admission is None or self.admission.is_admitted(str(peer_id), "client"):
            return
        cert = msg.get("cert") if isinstance(msg, dict) else None
        try:
            self.admission.admit(str(peer_id), cert, roles=("client", "node"))
        except ProtocolError as e:
            raise PermissionError(f"this swarm needs a client certificate: {e}") from None

    def _load_admission(self, config: NodeConfig):
        """With `swarm_owner` set, our own certificate must be valid before we start."""
        if config.swarm_owner is None:
            return None
        from hexswarm.net.admission import Admission

        admission = Admission(config.swarm_owner, config.swarm, self.peer_id_str)
        if config.admission_cert is None:
            raise UserError("key 'admission_cert': required when swarm_owner is set (get one with `hexswarm admit`)")
        try:
            cert = codec.decode(config.admission_cert.read_bytes(), 8192)
            admission.admit(self.peer_id_str, cert)
        except OSError as e:
            raise UserError(f"key 'admission_cert': cannot read {config.admission_cert}: {e.strerror}") from None
        except ProtocolError as e:
            raise UserError(f"key 'admission_cert': {config.admission_cert} is not valid for this node: {e}") from None
        self.extra["cert"] = cert
        return admission

    def register_handler(self, protocol: str, fn: Handler, *, access: str = "nodes", **options: Any) -> None:
        """Answer request/response `protocol` with ``async fn(msg, remote_peer_id) -> reply``.

        access: "nodes" (default): admitted, allowlisted nodes only; "clients": also clients with a
        client certificate when swarm_owner is set, anyone without it; "public": anyone without
        swarm_owner, nodes only with it.  `options` go to hexswarm.net.protocols.make_stream_handler
        (max_request, read_timeout, ...).
        """
        if access == "nodes":
            allow = self.is_allowed
        elif access == "public":
            allow = None if self.admission is None else self.is_allowed
        elif access == "clients":
            # checked once the request is read: a client may send its certificate in it
            allow, fn = None, self._clients_only(fn)
        else:
            raise ValueError(f"access must be nodes, clients or public, not {access!r}")
        serve(self.host, protocol, fn, allow=allow, **options)

    def _clients_only(self, fn: Handler) -> Handler:
        async def guarded(msg: Any, remote: Any) -> Any:
            try:
                self.admit_client(remote, msg)
            except PermissionError as e:
                raise RemoteError(ErrorCode.FORBIDDEN, str(e)) from None
            return await fn(msg, remote)

        return guarded

    async def request(self, peer_id: Any, protocol: str, msg: Any, timeout: float = 10.0, **options: Any) -> Any:
        """One request to a peer (PeerID or its base58 text); raises RequestError."""
        if isinstance(peer_id, str):
            peer_id = parse_peer_id(peer_id)
        try:
            return await request(self.host, peer_id, protocol, msg, timeout=timeout, **options)
        except StreamOpenFailed:
            if connection_kind(self.host, peer_id) == "relayed":
                await drop_relayed(self.host, peer_id)  # discovery then dials it again, through a live relay
            raise

    async def publish(self, topic: str, msg: Any) -> None:
        data = codec.encode(msg)
        if len(data) > MAX_GOSSIP_BYTES:
            raise ProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP_BYTES}")
        await self.pubsub.publish(topic, data)

    async def subscribe(self, topic: str, fn: GossipHandler) -> None:
        """Deliver each valid message on `topic` to ``async fn(msg, publisher_peer_id)``; call once running."""
        if self._nursery is None:
            raise RuntimeError("subscribe needs a running node")
        self.pubsub.set_topic_validator(topic, self._gossip_allowed, False)
        subscription = await self.pubsub.subscribe(topic)
        self._nursery.start_soon(self._deliver, topic, subscription, fn)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def stopped(self) -> None:
        """Return once stop() was called; raise the node's failure (e.g. BootstrapFailed) if it failed.

        Raising here matters to callers that cancel run() as soon as this
        returns: run() would otherwise be cancelled before it re-raises.
        """
        await self._stop.wait()
        if self._failure is not None:
            raise self._failure

    # --- lifecycle --------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stop() or cancellation; raises BootstrapFailed when the swarm cannot be joined."""
        from libp2p.custom_types import TProtocol
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.pubsub.gossipsub import GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        listen = listen_multiaddrs(self.config.listen)
        try:
            host_running = self.host.run(listen)
            await host_running.__aenter__()
        except OSError as e:
            raise UserError(f"cannot listen on {', '.join(self.config.listen)}: {e.strerror or e}") from None
        try:
            # py-libp2p logs a failed listen (port taken, address not local) and carries on.
            if len(self.host.get_transport_addrs()) < len(listen):
                raise UserError(
                    f"cannot listen on {', '.join(self.config.listen)} (address in use or not on this host)"
                )
            self.dht = KadDHT(self.host, DHTMode.SERVER)
            self.gossipsub = GossipSub(
                protocols=[TProtocol(p) for p in GOSSIPSUB_PROTOCOLS],
                degree=GOSSIP_DEGREE[0],
                degree_low=GOSSIP_DEGREE[1],
                degree_high=GOSSIP_DEGREE[2],
                heartbeat_interval=GOSSIP_HEARTBEAT_S,
                # py-libp2p's "adaptive gossip" rewrites the heartbeat to max(60, 0.75 x ours) s when its
                # health score (which counts peers of score 0 as unhealthy) is below 0.7: measured, the
                # gossipsub heartbeat went from 1 s to 60 s 30 s after start. Fixed parameters instead.
                adaptive_gossip_enabled=False,
                # Our own records are rate-bounded by heartbeat_s; the built-in
                # limit (10 msg/s per forwarder per topic) drops inventory in
                # swarms of more than a few nodes.
                spam_protection_enabled=False,
                # Several nodes per IP is normal here (tests, multi-daemon hosts).
                eclipse_protection_enabled=False,
            )
            pubsub_fixes.install()
            self.pubsub = Pubsub(self.host, self.gossipsub, strict_signing=True)
            self._replay_own_records_only()
            async with background_trio_service(self.pubsub), background_trio_service(
                self.gossipsub
            ), background_trio_service(self.dht):
                await self.pubsub.wait_until_ready()
                self.addrs = advertised_addrs(self.host)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.pubsub.set_topic_validator(self.inventory_topic, self._inventory_valid, False)
                    subscription = await self.pubsub.subscribe(self.inventory_topic)
                    nursery.start_soon(self._deliver, self.inventory_topic, subscription, self._on_inventory)
                    await nursery.start(self.nat.run)
                    await self._publish_record()
                    for loop in (self._heartbeat_loop, self._sweep_loop, self._discovery_loop, self._probe_loop):
                        nursery.start_soon(loop)
                    for info in self._bootstrap:
                        nursery.start_soon(self._keep_bootstrap, info)
                    log.info("node %s of swarm %r listening on %s", self.peer_id_str, self.config.swarm, " ".join(self.addrs))
                    task_status.started(self)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
                self._nursery = None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await host_running.__aexit__(None, None, None)
                except Exception as e:
                    log.debug("host shutdown: %s", e)
            # Here, not after the block: a caller may cancel run() once stopped() returns.
            log.info("node %s stopped", self.peer_id_str)
        if self._failure is not None:
            raise self._failure

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._stop.set()

    # --- records and the table -------------------------------------------

    def make_record(self) -> NodeRecord:
        self._seq += 1
        extra = dict(self.extra)
        scale = self.table.scale
        if scale > 1:  # peers size their silence thresholds for us by it; absent (as before) at 1
            extra[SCALE_KEY] = round(scale, 3)
        return NodeRecord(
            peer_id=self.peer_id_str,
            public_key=self.identity.public_bytes,
            swarm=self.config.swarm,
            addrs=[*self.addrs, *self.nat.circuit_addrs],
            devices=[d.to_wire() for d in self.devices],
            roles=list(self.config.roles),
            links=bounded_links({p: s.to_wire() for p, s in self.links.items()}),
            incarnation=self._incarnation,
            seq=self._seq,
            timestamp=time.time(),
            extra=extra,
            calibration=dict(self.calibration),
        )

    async def _publish_record(self) -> None:
        self._tune_gossip()
        record = self.make_record()
        try:
            signed = sign_record(record, self.identity)
        except ProtocolError as e:
            self._apply(record)
            log.debug("signing record: %s", e)
            return
        self._apply(record, signed)
        self.record_bytes = len(signed["body"])
        try:
            await self.pubsub.publish(self.inventory_topic, codec.encode(signed))
        except Exception as e:  # no peers yet, or a peer stream broke mid-write
            log.debug("publishing record: %s", e)

    def _tune_gossip(self) -> None:
        """gossipsub's degree and heartbeat for this swarm's size (as configured at scale 1)."""
        scale = self.table.scale
        degree = GOSSIP_DEGREE if scale <= 1 else GOSSIP_DEGREE_AT_SCALE
        self.gossipsub.degree, self.gossipsub.degree_low, self.gossipsub.degree_high = degree
        self.gossipsub.heartbeat_interval = GOSSIP_HEARTBEAT_S * scale

    def _accept_record(self, msg: Any, publisher: str) -> NodeRecord:
        """The verified record in `msg`, published by `publisher`, or ProtocolError saying why it is not one of ours."""
        record = self._verify_record(msg)
        if record.peer_id != publisher:
            raise ProtocolError(f"record of {record.peer_id} published by {publisher}")
        return record

    def _verify_record(self, msg: Any) -> NodeRecord:
        """The verified record in `msg` (signed by its own node, of our swarm, admitted), or ProtocolError."""
        record = open_record(msg)
        if record.swarm != self.config.swarm:
            raise ProtocolError(f"record of swarm {record.swarm!r}")
        if self.admission is not None:
            # the record's own certificate admits its sender (raises when it is missing or invalid)
            self.admission.admit(record.peer_id, record.extra.get("cert"))
        if not self.is_allowed(record.peer_id):
            raise ProtocolError(f"{record.peer_id} is not in allow_peers")
        return record

    def _apply(self, record: NodeRecord, signed: dict | None = None, age_s: float = 0.0) -> None:
        change = self.table.observe(record, age_s)
        entry = self.table.get(record.peer_id)
        if signed is not None and entry is not None and entry.record is record:
            self._signed[record.peer_id] = signed
        if change is not None:
            self._report(change)
            if change.peer_id != self.peer_id_str:
                self._discovery_wake.set()
            if change.old is None and self.gossipsub is not None:
                # the mesh degree for the swarm's size before the mesh fills, not at our next heartbeat: a mesh
                # grown at the small-swarm degree is pruned when the degree drops, and a pruned peer may not
                # graft back for a minute (gossipsub's prune back-off)
                self._tune_gossip()

    def _report(self, change: StateChange) -> None:
        if change.peer_id != self.peer_id_str:
            what = {None: "joined", PeerState.DOWN: "is back up"}.get(change.old, "is up")
            if change.new == PeerState.DOWN:
                entry = self.table.get(change.peer_id)
                what = f"is down (silent > {self.table.down_after(entry) if entry else self.config.down_after_s:g} s)"
            elif change.new == PeerState.DROPPED:
                what = f"dropped (silent > {self.config.drop_after_s * self.table.scale:g} s)"
                self.links.pop(change.peer_id, None)
                self._signed.pop(change.peer_id, None)
            log.info("peer %s %s", change.peer_id, what)
        for listener in self.on_peer_change:
            try:
                listener(change)
            except Exception:
                log.exception("peer-change listener failed")

    def _gossip_allowed(self, forwarder: Any, msg: Any) -> bool:
        from libp2p.peer.id import ID

        try:
            return self.is_allowed(ID(msg.from_id)) and len(msg.data) <= MAX_GOSSIP_BYTES
        except Exception:
            return False

    def _inventory_valid(self, forwarder: Any, msg: Any) -> bool:
        """Pubsub validator: invalid or foreign records are neither delivered nor forwarded."""
        from libp2p.peer.id import ID

        self.gossip_in += 1
        try:
            signed = codec.decode(msg.data, MAX_GOSSIP_BYTES)
            record = self._accept_record(signed, ID(msg.from_id).to_base58())
        except Exception as e:
            log.debug("rejected inventory gossip via %s: %s", forwarder, e)
            return False
        if len(self._validated) >= MAX_DIAL_BACKOFF:  # normally delivered at once; never unbounded
            self._validated.clear()
        self._validated[signed["sig"]] = (signed["body"], record)
        return True

    async def _deliver(self, topic: str, subscription: Any, fn: GossipHandler) -> None:
        from libp2p.peer.id import ID

        while True:
            message = await subscription.get()
            try:
                publisher = ID(message.from_id).to_base58()
                if not self.is_allowed(publisher):
                    continue
                await fn(codec.decode(message.data, MAX_GOSSIP_BYTES), publisher)
            except ProtocolError as e:
                log.debug("dropped message on %s: %s", topic, e)
            except Exception as e:
                failures.unexpected(f"gossip {topic}", publisher, e)

    async def _on_inventory(self, msg: Any, publisher: str) -> None:
        sig = msg.get("sig") if isinstance(msg, dict) else None
        body, record = self._validated.pop(sig, (None, None)) if isinstance(sig, bytes) else (None, None)
        if publisher == self.peer_id_str:
            return
        if record is None or body != msg.get("body") or record.peer_id != publisher:
            record = self._accept_record(msg, publisher)
        self._apply(record, msg)
        if self._knows_more(record) and not self._catching_up and trio.current_time() - self._caught_up_at >= self.heartbeat_s:
            self._catching_up = True
            self._nursery.start_soon(self._catch_up, parse_peer_id(record.peer_id))

    def _knows_more(self, record: NodeRecord) -> bool:
        """Does the sender of `record` know clearly more peers than our table holds?  Its announced heartbeat
        scale says how many it knows (scale x heartbeat_peers) once that is more than heartbeat_peers."""
        scale = announced_scale(record)
        if self.config.heartbeat_peers <= 0 or scale <= 1:  # at 1 it says no more than that it knows <= P peers
            return False
        theirs, ours = scale * self.config.heartbeat_peers, len(self.table)
        return theirs >= ours + max(SYNC_MARGIN, ours // 8)

    def _replay_own_records_only(self) -> None:
        """On the inventory topic, greet a newly subscribed peer with our own latest record only.

        py-libp2p replays every message of its recent-message cache (~1.5 heartbeats of every node's
        records) to each peer that subscribes, that is on every new connection: with every node
        connected to every other, O(N) records per connection and O(N^3) in a forming swarm, nearly
        all of them duplicates.  A newcomer asks one bootstrap peer for its table instead
        (_take_table); our own record still goes to each new peer at once, which forwards it to its
        mesh, so a node that joins is announced without waiting a heartbeat.  Other topics: as before.
        """
        router, replay = self.gossipsub, self.gossipsub.send_recent_messages
        me = self.peer_id.to_bytes()

        async def send_recent_messages(peer_id: Any, topic: str) -> None:
            if topic != self.inventory_topic:
                return await replay(peer_id, topic)
            stream = self.pubsub.peers.get(peer_id)
            ours = [m for m in map(router.mcache.get, router.mcache.window(topic)) if m is not None and m.from_id == me]
            if stream is None or not ours:
                return
            from libp2p.pubsub.pb import rpc_pb2

            newest = max(ours, key=lambda m: int.from_bytes(m.seqno, "big"))
            await self.pubsub.write_msg(stream, rpc_pb2.RPC(publish=[newest]))

        router.send_recent_messages = send_recent_messages

    async def _catch_up(self, peer_id: Any) -> None:
        """Take the table of a peer whose record says it knows clearly more peers than we do (one at a time, at
        most once a heartbeat): a node that missed peers catches up at once, e.g. in a swarm that starts all at
        once, where the bootstrap peers' tables were nearly empty when we joined, or after a partition heals."""
        self._caught_up_at = trio.current_time()
        try:
            await self._take_table(peer_id)
        finally:
            self._catching_up = False

    async def _take_table(self, peer_id: Any) -> None:
        """Take the table of `peer_id`: every record it holds up, verified here one by one, each counted as heard
        as long ago as that peer heard it.  Done with each bootstrap peer on connecting: a newcomer knows the
        swarm at once instead of after a heartbeat of every peer."""
        try:
            cert = self.extra.get("cert") if self.admission is not None else None
            reply = await self.request(peer_id, RECORDS, {} if cert is None else {"cert": cert}, timeout=10.0)
        except RequestError as e:
            log.debug("no table from %s: %s", peer_id, e)
            return
        items = reply.get("records") if isinstance(reply, dict) else None
        if not isinstance(items, list):
            log.debug("table from %s is not a list of records", peer_id)
            return
        new = 0
        for item in items:
            try:
                signed, age_s = item
                record = self._verify_record(signed)
                if not isinstance(age_s, (int, float)) or isinstance(age_s, bool) or not math.isfinite(age_s):
                    raise ProtocolError("age is not a number")
            except (ProtocolError, TypeError, ValueError) as e:
                log.debug("record in the table from %s: %s", peer_id, e)
                continue
            if record.peer_id != self.peer_id_str:
                new += record.peer_id not in self.table
                self._apply(record, signed, float(age_s))
        log.info("took the table of %s: %d records, %d peers new here", peer_id, len(items), new)

    # --- loops --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_s)
            await self._publish_record()

    async def _sweep_loop(self) -> None:
        last_prune = trio.current_time()
        while True:
            await trio.sleep(min(self.heartbeat_s, self.config.down_after_s * self.table.scale / 4))
            for change in self.table.sweep():
                self._report(change)
            if trio.current_time() - last_prune > GOSSIP_CACHE_PRUNE_S:
                self.gossipsub.equivocation_detection.clear()
                last_prune = trio.current_time()

    def _knows_peers(self) -> bool:
        return any(e.peer_id != self.peer_id_str for e in self.table.entries()) or bool(
            self.host.get_connected_peers()
        )

    async def _keep_bootstrap(self, info: Any) -> None:
        """Stay connected to one bootstrap peer; fail the node if the swarm cannot be joined in time."""
        backoff = Backoff(initial_s=0.5, max_s=10.0)
        started = trio.current_time()
        last_warning = -UNREACHABLE_WARN_EVERY_S
        joined = False
        while True:
            if is_connected(self.host, info.peer_id):
                backoff.reset()
                await trio.sleep(self.config.heartbeat_s)
                continue
            try:
                await dial(self.host, info)
                await self._on_connected(info.peer_id)
                log.info("connected to bootstrap peer %s", info.peer_id)
                self._nursery.start_soon(self._take_table, info.peer_id)
                joined = True
                continue
            except ConnectionError as e:
                error = e
            joined = joined or self._knows_peers()
            now = trio.current_time()
            if not joined and now - started > self.config.bootstrap_timeout_s:
                self._fail(
                    BootstrapFailed(
                        f"cannot reach bootstrap peer {info.addrs[0] if info.addrs else ''}/p2p/{info.peer_id} "
                        f"({error}) and no other peer is known after {self.config.bootstrap_timeout_s:g} s"
                    )
                )
                return
            delay = backoff.next_delay()
            if joined and now - last_warning > UNREACHABLE_WARN_EVERY_S:
                log.warning("bootstrap peer %s unreachable (%s); still retrying, other peers are known", info.peer_id, error)
                last_warning = now
            elif not joined:
                log.info("bootstrap peer %s unreachable (%s); retry in %.1f s", info.peer_id, error, delay)
            await trio.sleep(delay)

    async def _on_connected(self, peer_id: Any) -> None:
        try:
            await self.dht.add_peer(peer_id)
        except Exception as e:
            log.debug("DHT routing table refused %s: %s", peer_id, e)

    async def _discovery_loop(self) -> None:
        key = swarm_key(self.config.swarm)
        next_provide = last_lookup = -math.inf
        idle_lookups = 0  # lookups in a row that named no peer missing from our table (used at scale > 1)
        while True:
            # Peers we hold records of first: no network round trip needed.
            self._dial_new({e.peer_id: e.record.addrs for e in self.table.entries()})
            now, scale = trio.current_time(), self.table.scale
            if self.host.get_connected_peers() and now >= next_provide:
                try:
                    if await self.dht.provide(key):
                        next_provide = now + PROVIDE_INTERVAL_S * scale
                except Exception as e:
                    log.debug("DHT provide failed: %s", e)
            # at scale 1 a lookup every round (every DISCOVERY_INTERVAL_S, and when a new peer wakes us);
            # in larger swarms every DISCOVERY_INTERVAL_S x scale, doubling (up to PROVIDE_INTERVAL_S x
            # scale) while lookups find no peer our table lacks: every node asks the same k peers (those
            # nearest the swarm key), and gossip already brings every member's record
            if scale <= 1 or now - last_lookup >= lookup_interval(scale, idle_lookups):
                last_lookup = now
                try:
                    with trio.move_on_after(DIAL_TIMEOUT_S * 2):
                        providers = {i.peer_id.to_base58(): [f"{a}/p2p/{i.peer_id}" for a in i.addrs]
                                     for i in await self.dht.find_providers(key)}
                        self._dial_new(providers)
                        unknown = [p for p in providers if p != self.peer_id_str and p not in self.table]
                        idle_lookups = 0 if unknown else idle_lookups + 1
                except Exception as e:
                    log.debug("DHT find_providers failed: %s", e)
            with trio.move_on_after(DISCOVERY_INTERVAL_S * scale):
                await self._discovery_wake.wait()
            self._discovery_wake = trio.Event()

    def _dial_new(self, candidates: dict[str, list[str]]) -> None:
        """Start dialing each allowed, unconnected candidate (PeerID -> its addresses) whose back-off has passed."""
        for peer_id, addrs in candidates.items():
            addrs = [a for a in addrs if _names_peer(a, peer_id)]
            if not addrs or peer_id == self.peer_id_str or not self.is_allowed(peer_id):
                continue
            if peer_id in self._dialing or is_connected(self.host, parse_peer_id(peer_id)) or not self._dial_due(peer_id, addrs):
                continue
            self._dialing.add(peer_id)
            self._nursery.start_soon(self._dial_discovered, peer_id, addrs)

    def _dial_due(self, peer_id: str, addrs: list[str]) -> bool:
        next_at, _, failed = self._dial_backoff.get(peer_id, (0.0, None, addrs))
        return trio.current_time() >= next_at or not set(addrs) <= set(failed)

    async def connect_peer(self, peer_id: str) -> None:
        """Connect to a peer of the table the way discovery does (direct, else through a relay it
        names); ConnectionError when that fails or its record is unknown."""
        entry = self.table.get(peer_id)
        if entry is None:
            raise ConnectionError(f"no record of {peer_id}")
        await self.nat.connect(peer_id, [a for a in entry.record.addrs if _names_peer(a, peer_id)])

    async def _dial_discovered(self, peer_id: str, addrs: list[str]) -> None:
        try:
            if peer_id < self.peer_id_str:
                await trio.sleep(DIAL_DEFER_S)
            async with self._dial_slots:
                if is_connected(self.host, parse_peer_id(peer_id)):  # it dialed us meanwhile
                    return
                await self.nat.connect(peer_id, addrs, timeout=DISCOVERY_DIAL_TIMEOUT_S)  # direct, else a relay
            self._dial_backoff.pop(peer_id, None)
            await self._on_connected(parse_peer_id(peer_id))
            log.info("connected to peer %s", peer_id)
        except ConnectionError as e:
            _, backoff, _ = self._dial_backoff.get(peer_id, (0.0, None, []))
            backoff = backoff or Backoff(initial_s=1.0, max_s=30.0)
            self._dial_backoff[peer_id] = (trio.current_time() + backoff.next_delay(), backoff, addrs)
            if len(self._dial_backoff) > MAX_DIAL_BACKOFF:  # discovery may name any number of peers
                now = trio.current_time()
                self._dial_backoff = {p: v for p, v in self._dial_backoff.items() if v[0] > now}
            log.debug("dial to discovered peer %s failed: %s", peer_id, e)
        finally:
            self._dialing.discard(peer_id)

    async def _probe_loop(self) -> None:
        rounds = 0
        while True:
            await trio.sleep(self.config.probe_s * self.table.scale)
            peers = sorted(e.peer_id for e in self.table.up() if e.peer_id != self.peer_id_str)
            # At most PROBE_FANOUT peers a round, in turn: a node's probe work stays O(1) per round
            # instead of O(N) (O(N^2) swarm-wide: measured, it starved gossip at 32 nodes on 2 cores);
            # each link is measured every ceil(N / PROBE_FANOUT) rounds.
            cycle = max(1, -(-len(peers) // PROBE_FANOUT))
            # throughput every 4th visit of each peer: it costs probe_bytes per peer
            measure_throughput = self.config.probe_bytes > 0 and (rounds // cycle) % 4 == 0
            start = (rounds % cycle) * PROBE_FANOUT
            rounds += 1
            async with trio.open_nursery() as nursery:
                for peer_id in peers[start:start + PROBE_FANOUT]:
                    nursery.start_soon(self._probe, peer_id, measure_throughput)
            for gone in set(self.links) - set(peers):
                self.links.pop(gone, None)

    async def _probe(self, peer_id: str, measure_throughput: bool) -> None:
        timeout = min(5.0, self.config.probe_s)
        try:
            start = trio.current_time()
            await self.request(peer_id, PING, {"pad": b""}, timeout=timeout)
            rtt = trio.current_time() - start
            mbps = self.links[peer_id].mbps if peer_id in self.links else None
            if measure_throughput:
                start = trio.current_time()
                await self.request(peer_id, PING, {"pad": bytes(self.config.probe_bytes)}, timeout=timeout)
                # Whole round trip, latency included: a lower bound, never absurd on fast links.
                mbps = self.config.probe_bytes * 8 / (trio.current_time() - start) / 1e6
            self.links[peer_id] = LinkStats(rtt * 1000, mbps)
        except RequestError as e:
            log.debug("probe of %s failed: %s", peer_id, e)

    # --- protocol handlers ------------------------------------------------

    async def _on_records(self, msg: Any, remote: Any) -> dict:
        """Our table as signed records, for a peer that joins through us: [[signed record, seconds since we
        heard it], ...] of every peer up (ours included)."""
        if not isinstance(msg, dict):
            raise ProtocolError("records wants a map")
        if not self.is_allowed(remote):
            raise RemoteError(ErrorCode.FORBIDDEN, "the table is for nodes of this swarm")
        records = []
        for entry in self.table.up():
            signed = self._signed.get(entry.peer_id)
            if signed is not None and entry.peer_id != str(remote):
                records.append([signed, round(self.table.seconds_since_seen(entry), 3)])
        return {"records": records}

    async def _on_ping(self, msg: Any, remote: Any) -> dict:
        if not isinstance(msg, dict) or not isinstance(msg.get("pad", b""), bytes):
            raise ProtocolError("ping wants {pad: bytes}")
        return {"n": len(msg.get("pad", b""))}

    async def _on_peers(self, msg: Any, remote: Any) -> dict:
        if not isinstance(msg, dict):
            raise ProtocolError("peers wants a map")
        stats = {"gossip_in": self.gossip_in, "reachability": self.nat.reachability,
                 "time": time.time(),  # wall clock: `hexswarm doctor` compares clocks
                 # membership load (tools/swarm_scale.py): the heartbeat in force, this process's CPU seconds
                 "heartbeat_s": round(self.heartbeat_s, 3), "cpu_s": round(time.process_time(), 3),
                 "record_bytes": self.record_bytes}
        if msg.get("summary") is True:  # counts only: a poll of every node of a large swarm stays cheap
            up = self.table.up()
            return {"self": self.peer_id_str, "swarm": self.config.swarm, "known": len(self.table), "up": len(up),
                    "stats": stats}
        return {"self": self.peer_id_str, "swarm": self.config.swarm, "peers": self.peer_views(), "stats": stats}

    def peer_views(self) -> list[dict]:
        """The table as plain maps (what `hexswarm peers` prints)."""
        views = []
        for entry in self.table.entries():
            record = entry.record
            link = self.links.get(entry.peer_id)
            is_self = entry.peer_id == self.peer_id_str
            views.append(
                {
                    "peer_id": entry.peer_id,
                    "addrs": record.addrs,
                    "swarm": record.swarm,
                    "roles": record.roles,
                    "devices": record.devices,
                    "state": entry.state.value,
                    "last_seen_s": round(self.table.seconds_since_seen(entry), 3),
                    "latency_ms": 0.0 if is_self else (round(link.rtt_ms, 3) if link else None),
                    "mbps": None if is_self or link is None else link.mbps,
                    # how this node holds a connection to it now: "direct", "relayed" or None
                    "route": None if is_self else connection_kind(self.host, parse_peer_id(entry.peer_id)),
                    "self": is_self,
                    "links": record.links,
                    "extra": record.extra,
                    "calibration": record.calibration,
                }
            )
        return views
