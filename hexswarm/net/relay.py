"""NAT traversal on one py-libp2p host: circuit relay v2, DCUtR hole punching and AutoNAT, as shipped
by py-libp2p 0.8.1 (`libp2p.relay.circuit_v2`, `libp2p.host.autonat`), with the defects found here
worked around (docs/net.md, "NAT traversal"):

* a relay given `data=0` ("no limit" in the spec) refuses every relayed byte: limits are set large;
* the AutoNAT server dials the requester back over the connection the request came on, so every
  requester is told it is reachable: the dial-back here comes from a fresh host of its own;
* the swarm never dials `/p2p-circuit` addresses: relayed dials go through the relay transport;
* the relay's bookkeeping of open circuits is keyed by PeerID, so a circuit that ends closes the
  streams of another circuit of the same peer: each circuit here closes only its own streams.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from libp2p.host.autonat.autonat import AutoNATService

from hexswarm.net.host import DIAL_TIMEOUT_S, make_host

log = logging.getLogger("hexswarm.relay")

CIRCUIT = "/p2p-circuit"
# Large rather than 0: 0 means "no limit" in the spec, but py-libp2p's per-reservation byte counter
# treats it as a zero budget and resets the circuit on its first byte.
NO_LIMIT_BYTES = 1 << 60
MAX_RESERVATIONS = 1024
MAX_CIRCUITS_PER_PEER = 64


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_addrs(relay_addrs: list[str], me: str) -> list[str]:
    """Our addresses through a relay: each of its direct addresses (`.../p2p/<relay>`) + /p2p-circuit/p2p/<me>."""
    return [f"{a}{CIRCUIT}/p2p/{me}" for a in relay_addrs if not is_circuit(a) and "/p2p/" in a]


class Reachability:
    UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"


class RelayStack:
    """Circuit relay v2 (hop when `hop`, stop and client always), DCUtR and AutoNAT on `host`."""

    def __init__(self, host: Any, hop: bool, hole_punch: bool = True):
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.resources import RelayLimits
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport

        self.host = host
        self.hop = hop
        self.hole_punch = hole_punch
        limits = RelayLimits(duration=0, data=NO_LIMIT_BYTES, max_circuit_conns=MAX_CIRCUITS_PER_PEER,
                             max_reservations=MAX_RESERVATIONS)
        self.protocol = _relay_protocol()(host, limits=limits, allow_hop=hop)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles, limits=limits))
        self.autonat = _AutoNAT(host)
        self.dcutr = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.hole_punch:
                from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

                self.dcutr = DCUtRProtocol(self.host)
                async with background_trio_service(self.dcutr):
                    task_status.started()
                    await trio.sleep_forever()
            task_status.started()
            await trio.sleep_forever()

    async def reserve(self, relay_id: Any) -> bool:
        """Reserve a slot on a connected relay (refreshed by py-libp2p before it expires)."""
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

        with trio.move_on_after(DIAL_TIMEOUT_S * 2):
            try:
                stream = await self.host.new_stream(relay_id, [PROTOCOL_ID])
                try:
                    return await self.transport.reserve(stream, relay_id, self._nursery)
                finally:
                    await stream.close()
            except Exception as e:  # noqa: BLE001 - py-libp2p raises StreamFailure, SwarmException ...
                # a relay that died since it was last seen up: measured, its StreamFailure ended the node
                log.debug("cannot reserve on %s: %s: %s", relay_id, type(e).__name__, e)
                return False
        return False

    def has_reservation(self, relay_id: Any) -> bool:
        import time

        return self.transport._reservations.get(relay_id, 0) > time.time()

    async def dial(self, addr: str, timeout: float = DIAL_TIMEOUT_S * 2) -> None:
        """Connect to a peer through the relay in circuit address `addr`; raises ConnectionError."""
        import multiaddr

        with trio.move_on_after(timeout):
            try:
                await self.transport.dial(multiaddr.Multiaddr(addr))
            except Exception as e:
                raise ConnectionError(f"through relay: {type(e).__name__}: {e}") from None
            return
        raise ConnectionError(f"no relayed connection within {timeout:g} s")

    async def check_reachability(self, servers: list[Any]) -> str:
        """Ask `servers` (AutoNAT) to dial us back; PUBLIC once any succeeds, PRIVATE when all fail."""
        from libp2p.host.autonat.autonat import AutoNATStatus

        self.autonat.confirmations = max(1, min(3, len(servers)))
        status = await self.autonat.check_reachability(servers)
        return {AutoNATStatus.PUBLIC: Reachability.PUBLIC, AutoNATStatus.PRIVATE: Reachability.PRIVATE}.get(
            status, Reachability.UNKNOWN)


class _Unkept(dict):
    """A dict that keeps nothing: py-libp2p's per-peer circuit table, disabled (see _relay_protocol)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


@functools.cache
def _relay_protocol() -> type:
    """py-libp2p's CircuitV2Protocol with per-circuit clean-up.  Stock, `_active_relays[peer]` holds the
    streams of the newest circuit of `peer`, and the end of any circuit of that peer closes them: with
    two circuits through one relay (B->A and C->A, or both ends dialing at once after a relay died)
    the first to end takes the other down (docs/net.md, defect 4)."""
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    class PerCircuitRelay(CircuitV2Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._active_relays = _Unkept()

        async def _relay_data(self, src_stream: Any, dst_stream: Any, *args: Any, **kwargs: Any) -> None:
            try:
                await super()._relay_data(src_stream, dst_stream, *args, **kwargs)
            finally:  # this circuit's own streams: the other direction then ends too
                await self._close_stream(src_stream)
                await self._close_stream(dst_stream)

    return PerCircuitRelay


def is_relayed(conn: Any) -> bool:
    try:
        return any(is_circuit(str(a)) for a in conn.get_transport_addresses())
    except Exception:
        return False


def connection_kind(host: Any, peer_id: Any) -> str | None:
    """"direct" when any connection to `peer_id` is not relayed, "relayed" when all are, None without one."""
    conns = host.get_network().connections.get(peer_id, []) or []
    if not conns:
        return None
    return "relayed" if all(is_relayed(c) for c in conns) else "direct"


async def drop_relayed(host: Any, peer_id: Any, muxed_conn: Any = None) -> int:
    """Close relayed connections to `peer_id` (only the one carrying `muxed_conn`, when given) whose streams
    failed: py-libp2p keeps some of them listed after their relay died (seen on the side that did not dial),
    and every new stream to the peer then fails on them instead of a new connection being made."""
    closed = 0
    for conn in list(host.get_network().connections.get(peer_id, []) or []):
        if is_relayed(conn) and (muxed_conn is None or conn.muxed_conn is muxed_conn):
            with trio.move_on_after(5):
                try:
                    await conn.close()
                except Exception as e:
                    log.debug("closing relayed connection to %s: %s", peer_id, e)
            closed += 1
    if closed:
        log.info("closed %d relayed connection(s) to %s whose streams failed", closed, peer_id)
    return closed


def route_of(host: Any, peer_id: Any, stream: Any) -> str:
    """How `stream` reaches `peer_id`: its connection's transport address (a relayed one names the relay)."""
    for conn in host.get_network().connections.get(peer_id, []) or []:
        if conn.muxed_conn is stream.muxed_conn:
            try:
                return " ".join(str(a) for a in conn.get_transport_addresses()) or "unknown"
            except Exception:
                return "unknown"
    return "unknown"


def _direct_remote_ips(host: Any, peer_id: Any):
    """The IPs we reach `peer_id` at over its direct (not relayed) connections, in the network's order."""
    for conn in host.get_network().connections.get(peer_id, []) or []:
        if is_relayed(conn):
            continue
        try:
            address = conn.muxed_conn.secured_conn.get_remote_address()
        except Exception:
            address = None
        if address:
            yield address[0]


def remote_ip(host: Any, peer_id: Any) -> str | None:
    """The IP we reach `peer_id` at over a direct (not relayed) connection, or None."""
    return next(_direct_remote_ips(host, peer_id), None)


def listed_ips(addrs: list[str]) -> set[str]:
    """The IPs of the direct (not relayed) addresses among `addrs` (a peer's record), normalized."""
    out = set()
    for a in addrs:
        if is_circuit(a):
            continue
        parts = a.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            ip = _normal_ip(parts[2])
            if ip:
                out.add(ip)
    return out


def _normal_ip(text: str) -> str | None:
    import ipaddress

    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def direct_data_ip(host: Any, peer_id: Any, addrs: list[str] | None) -> tuple[str | None, str]:
    """Where the direct data path may reach `peer_id`: (IP, "") at an IP the peer lists, (IP, why) at one it
    does not, (None, why) with no direct connection.

    The data port is one the peer opened on its own interfaces, so it is surely reachable only at an IP the
    peer lists itself (`addrs`: its record's addresses): a LAN, loopback, a public host, a connection we
    dialed to one of its addresses.  A connection that reaches the peer at another IP arrives at a NAT's
    public side: a punched connection, where no punch opened the data port and a connect hangs until its
    timeout, or a host behind a 1:1 NAT (a cloud VM's public IP), where it connects at once.  The caller
    tries such an IP only briefly."""
    seen = []
    listed = listed_ips(addrs or [])
    for ip in _direct_remote_ips(host, peer_id):
        if _normal_ip(ip) in listed:
            return ip, ""
        seen.append(ip)
    if not seen:
        return None, "no direct connection (relayed or closed)"
    if addrs is None:
        return seen[0], f"connected at {seen[0]}, but no record of its addresses"
    return seen[0], (f"connected at {seen[0]}, which it does not list (a NAT's public side: a punched or "
                     "NAT-mapped connection, where its data port may not be reachable)")


class _AutoNAT(AutoNATService):
    """py-libp2p's AutoNAT, with the dial-back made from a fresh host: the stock server calls
    host.connect, which returns the requester's own open connection, so it never dials at all."""

    def __init__(self, host: Any):
        super().__init__(host, serve=True)

    async def _try_dial(self, peer_id: Any, addrs: list[bytes]) -> bytes | None:
        import multiaddr
        from libp2p.peer.peerinfo import PeerInfo

        from hexswarm.net import identity

        probe = make_host(identity.generate())
        async with probe.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            for raw in addrs:
                with trio.move_on_after(DIAL_TIMEOUT_S):
                    try:
                        await probe.connect(PeerInfo(peer_id, [multiaddr.Multiaddr(raw)]))
                        return bytes(raw)
                    except Exception as e:
                        log.debug("AutoNAT dial-back to %s at %s failed: %s", peer_id, multiaddr.Multiaddr(raw), e)
        return None
