"""A node's reachability across NATs: whom to ask (AutoNAT), where to reserve (relays), how to dial.

* Reachability (`reachability: auto`): every REACHABILITY_EVERY_S the node asks up to three peers it
  is directly connected to to dial it back (AutoNAT, a fresh dialer on their side); while the answer stays
  the same, half as often each time, down to every REACHABILITY_MAX_EVERY_S.  `public` / `private` in the
  config skip the question.
* Relays: while not known to be public, the node reserves a slot on every up peer whose record has
  the `relay` role, and its record then carries `<relay addr>/p2p-circuit/p2p/<self>` next to its
  direct addresses.
* Dialing a peer: its direct addresses first, then each of its circuit addresses.  Once two peers
  are connected through a relay, DCUtR (py-libp2p) tries to punch a direct connection.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from hexswarm.errors import UserError
from hexswarm.net.host import DIAL_TIMEOUT_S, dial, is_connected, parse_peer_id
from hexswarm.net.relay import CIRCUIT, Reachability, RelayStack, circuit_addrs, is_circuit

log = logging.getLogger("hexswarm.nat")

RESERVE_EVERY_S = 2.0
REACHABILITY_EVERY_S = 60.0
# An answer that did not change is asked for again half as often each time, up to this (go-libp2p's AutoNAT
# refreshes a confident answer every 15 min): every AutoNAT request makes each server dial back from a fresh
# host (new keys, a full handshake): at 60 s, measured ~90 such connections a minute in a 32-node swarm.
REACHABILITY_MAX_EVERY_S = 960.0
AUTONAT_SERVERS = 3
DIRECT_TIMEOUT_WITH_RELAYS_S = 2.0


def next_reachability_check(every: float, changed: bool) -> float:
    """Seconds until the next AutoNAT round, after one `every` s after the last that did (not) change the answer."""
    return REACHABILITY_EVERY_S if changed else min(2 * every, REACHABILITY_MAX_EVERY_S)


class NatTraversal:
    def __init__(self, node: Any):
        self.node = node
        config = node.config
        self.stack = RelayStack(node.host, hop="relay" in config.roles, hole_punch=config.hole_punch)
        self.reachability = {"auto": Reachability.UNKNOWN}.get(config.reachability, config.reachability)
        self.circuit_addrs: list[str] = []
        self._relays: dict[str, list[str]] = {}  # relay PeerID -> our circuit addresses through it

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.stack.run)
            task_status.started()
            last_check, every = -REACHABILITY_EVERY_S, REACHABILITY_EVERY_S
            while True:
                if self.node.config.reachability == "auto" and trio.current_time() - last_check > every:
                    before = self.reachability
                    if await self._check_reachability():
                        last_check = trio.current_time()
                        every = next_reachability_check(every, changed=self.reachability != before)
                if self.reachability != Reachability.PUBLIC:
                    await self._keep_reservations()
                elif self.circuit_addrs:
                    self._relays.clear()
                    self._update_addrs()
                await trio.sleep(RESERVE_EVERY_S)

    # --- reachability -----------------------------------------------------------------------
    async def _check_reachability(self) -> bool:
        """One AutoNAT round; False when no directly connected peer could be asked."""
        from hexswarm.net.relay import remote_ip

        servers = [parse_peer_id(e.peer_id) for e in self.node.table.up() if e.peer_id != self.node.peer_id_str]
        servers = [s for s in servers if remote_ip(self.node.host, s) is not None][:AUTONAT_SERVERS]
        if not servers:
            return False
        with trio.move_on_after(30):
            status = await self.stack.check_reachability(servers)
            if status != self.reachability:
                log.info("reachability: %s (AutoNAT, %d peers asked)", status, len(servers))
            self.reachability = status
        return True

    # --- relays -----------------------------------------------------------------------------
    def relay_peers(self) -> dict[str, list[str]]:
        """Up peers with the relay role -> their direct addresses."""
        return {
            e.peer_id: [a for a in e.record.addrs if not is_circuit(a)]
            for e in self.node.table.up()
            if "relay" in e.record.roles and e.peer_id != self.node.peer_id_str
        }

    async def _keep_reservations(self) -> None:
        relays = self.relay_peers()
        for relay in set(self._relays) - set(relays):
            relay_id = parse_peer_id(relay)
            # a relay whose records are late (a loaded machine) but that still holds our slot over a live
            # connection stays in our record: dropping it re-published our addresses and made peers re-dial
            if not (self.stack.has_reservation(relay_id) and is_connected(self.node.host, relay_id)):
                del self._relays[relay]
        for relay, addrs in relays.items():
            relay_id = parse_peer_id(relay)
            if relay in self._relays and self.stack.has_reservation(relay_id):
                continue
            try:
                await self.connect(relay, addrs)
                if await self.stack.reserve(relay_id):
                    self._relays[relay] = circuit_addrs(addrs, self.node.peer_id_str)
                    log.info("reserved a relay slot on %s", relay)
                    continue
            except ConnectionError as e:
                log.debug("relay %s unreachable: %s", relay, e)
            self._relays.pop(relay, None)
        self._update_addrs()

    def _update_addrs(self) -> None:
        addrs = [a for addrs in self._relays.values() for a in addrs]
        if addrs != self.circuit_addrs:
            self.circuit_addrs = addrs
            log.info("relayed addresses: %s", " ".join(addrs) or "none")

    # --- dialing ----------------------------------------------------------------------------
    def _relay_connected(self, circuit: str) -> bool:
        try:
            return is_connected(self.node.host, parse_peer_id(circuit.split(CIRCUIT)[0].rsplit("/p2p/", 1)[-1]))
        except UserError:
            return False

    async def connect(self, peer: str, addrs: list[str], timeout: float = DIAL_TIMEOUT_S) -> None:
        """Connect to `peer`: its direct addresses (within `timeout`), else through each relay it names;
        ConnectionError."""
        from hexswarm.net.host import parse_peer_multiaddr

        direct = [parse_peer_multiaddr(a).addrs[0] for a in addrs if not is_circuit(a)]
        relayed = [a for a in addrs if is_circuit(a) and f"/p2p/{self.node.peer_id_str}/" not in a]
        # relays we hold a connection to first: a relay that died is still named in records for a while,
        # and a dial to it can take the whole dial timeout
        relayed.sort(key=lambda a: not self._relay_connected(a))
        errors = []
        if direct:
            from libp2p.peer.peerinfo import PeerInfo

            try:
                # a peer that names relays is likely behind a NAT that drops our SYNs: do not wait long
                await dial(self.node.host, PeerInfo(parse_peer_id(peer), direct),
                           timeout=DIRECT_TIMEOUT_WITH_RELAYS_S if relayed else timeout)
                return
            except ConnectionError as e:
                errors.append(str(e))
        for addr in relayed:
            try:
                await self.stack.dial(addr)
                log.info("connected to %s through a relay: %s", peer, addr)
                return
            except ConnectionError as e:
                errors.append(str(e))
        raise ConnectionError("; ".join(errors) or "no address")
