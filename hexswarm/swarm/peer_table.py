"""The live peer table: latest record per peer and its up/down state, by heartbeat silence.

Pure logic on an injected clock (seconds, monotonic) so it tests without a
network. States: UP (heard within down_after_s), DOWN (silent longer), and
dropped (silent longer than drop_after_s: removed from the table). A peer
heard again with a newer record is UP again. Records older than or equal to
the newest seen from that peer (by incarnation, seq) are replays and ignored,
even after a drop.

Scale: every record is gossiped to every node, so a node's inventory work per
second grows with N / heartbeat.  With `heartbeat_peers` = P set, a table that
knows N > P peers (itself included) has ``scale = N / P``: the node heartbeats
every heartbeat_s * scale, and the silence thresholds are multiplied alike, by
the larger of this table's scale and the scale the peer announced in its last
record (``records.announced_scale``), so a peer that knows more of the swarm
(and so heartbeats more slowly) is not marked down early.  At N <= P the scale
is 1 and nothing changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from hexswarm.swarm.records import NodeRecord, announced_scale

Clock = Callable[[], float]


def membership_scale(known: int, heartbeat_peers: int) -> float:
    """How much slower than configured a node that knows `known` peers (itself included) heartbeats,
    and how much longer it waits before a silent peer is down or dropped: 1 up to `heartbeat_peers`
    peers, then known / heartbeat_peers (0: always 1)."""
    if heartbeat_peers <= 0 or known <= heartbeat_peers:
        return 1.0
    return known / heartbeat_peers


class PeerState(str, Enum):
    UP = "up"
    DOWN = "down"
    DROPPED = "dropped"  # only reported in changes; dropped peers leave the table


@dataclass
class PeerEntry:
    record: NodeRecord
    state: PeerState
    last_seen: float  # clock time of the newest accepted record
    up_since: float  # clock time it last came up (joined, or came back after being down)

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True)
class StateChange:
    peer_id: str
    old: PeerState | None  # None: a peer new to the table
    new: PeerState


class PeerTable:
    def __init__(self, down_after_s: float, drop_after_s: float, clock: Clock = time.monotonic,
                 heartbeat_peers: int = 0):
        if not 0 < down_after_s < drop_after_s:
            raise ValueError("need 0 < down_after_s < drop_after_s")
        self.down_after_s = down_after_s
        self.drop_after_s = drop_after_s
        self.heartbeat_peers = heartbeat_peers
        self._clock = clock
        self._entries: dict[str, PeerEntry] = {}
        # Newest (incarnation, seq) per peer, kept past drops to refuse replays.
        self._newest: dict[str, tuple[int, int]] = {}

    def observe(self, record: NodeRecord, age_s: float = 0.0) -> StateChange | None:
        """Take a verified record; returns the state change it caused, if any.

        age_s: how long ago the record was heard, where it comes second hand (a peer's table, sent to a
        newcomer): the peer then counts as heard age_s ago, so it is marked down when it would have been
        had the record come by gossip.  A record already past the down threshold is not taken.
        """
        newest = self._newest.get(record.peer_id)
        if newest is not None and record.order <= newest:
            return None
        age_s = max(0.0, age_s)
        if age_s and age_s >= self.down_after_s * max(self.scale, announced_scale(record)):
            return None
        self._newest[record.peer_id] = record.order
        now = self._clock()
        seen = now - age_s
        entry = self._entries.get(record.peer_id)
        if entry is None:
            self._entries[record.peer_id] = PeerEntry(record, PeerState.UP, seen, now)
            return StateChange(record.peer_id, None, PeerState.UP)
        if seen < entry.last_seen:  # a newer record heard earlier than the one we hold: keep the later time
            seen = entry.last_seen
        old = entry.state
        if old != PeerState.UP:
            entry.up_since = now
        entry.record, entry.last_seen, entry.state = record, seen, PeerState.UP
        return StateChange(record.peer_id, old, PeerState.UP) if old != PeerState.UP else None

    def sweep(self) -> list[StateChange]:
        """Apply timeouts; call it often (e.g. every heartbeat / 2)."""
        now = self._clock()
        changes = []
        scale = self.scale
        for peer_id, entry in list(self._entries.items()):
            silent = now - entry.last_seen
            factor = max(scale, announced_scale(entry.record))
            if silent > self.drop_after_s * factor:
                del self._entries[peer_id]
                changes.append(StateChange(peer_id, entry.state, PeerState.DROPPED))
            elif silent > self.down_after_s * factor and entry.state == PeerState.UP:
                entry.state = PeerState.DOWN
                changes.append(StateChange(peer_id, PeerState.UP, PeerState.DOWN))
        return changes

    @property
    def scale(self) -> float:
        """This table's membership scale (membership_scale of the peers it holds, itself included)."""
        return membership_scale(len(self._entries), self.heartbeat_peers)

    def down_after(self, entry: PeerEntry) -> float:
        """Silence after which this peer is marked down: down_after_s times the larger of this table's
        scale and the one the peer announced."""
        return self.down_after_s * max(self.scale, announced_scale(entry.record))

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._entries.get(peer_id)

    def entries(self) -> list[PeerEntry]:
        return sorted(self._entries.values(), key=lambda e: e.peer_id)

    def up(self) -> list[PeerEntry]:
        return [e for e in self.entries() if e.state == PeerState.UP]

    def seconds_since_seen(self, entry: PeerEntry) -> float:
        return self._clock() - entry.last_seen

    def seconds_up(self, entry: PeerEntry) -> float:
        return self._clock() - entry.up_since

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
