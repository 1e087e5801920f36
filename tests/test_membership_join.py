"""A node joining a swarm (issue 16): it takes its bootstrap peer's table as signed records at once, and a
new connection carries only each side's own latest record, not the whole recent-message cache."""

from __future__ import annotations

import trio

from hexswarm.swarm.config import config_from_dict
from hexswarm.swarm.node import Node
from hexswarm.swarm.peer_table import PeerState, PeerTable
from hexswarm.swarm.records import NodeRecord
from netutil import CPU_DEVICE

# A heartbeat far longer than the test: every record seen here comes from a node's start, its greeting
# of a new peer, or a table taken on joining.
SLOW = {"heartbeat_s": 30.0, "down_after_s": 90.0, "drop_after_s": 300.0, "probe_s": 60.0, "probe_bytes": 0}


def _node(tmp_path, name, **keys) -> Node:
    cfg = config_from_dict(
        {"listen": ["/ip4/127.0.0.1/tcp/0"], "data_dir": str(tmp_path / name), "devices": CPU_DEVICE, "swarm": "join",
         **SLOW, **keys},
        tmp_path,
    )
    return Node(cfg)


async def _until(predicate, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def _joined_pair(nursery, tmp_path) -> tuple[Node, Node]:
    """Nodes a and b (joined through a), once each lists the other."""
    a = _node(tmp_path, "a")
    await nursery.start(a.run)
    b = _node(tmp_path, "b", bootstrap=[a.addrs[0]])
    await nursery.start(b.run)
    await _until(lambda: a.peer_id_str in b.table and b.peer_id_str in a.table, 15)
    return a, b


def test_a_newcomer_takes_the_table_of_its_bootstrap_peer(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            a, b = await _joined_pair(nursery, tmp_path)
            # a's record leaves b's recent-message cache (3 gossipsub heartbeats of 1 s): gossip would not bring
            # it to a newcomer for another 30 s heartbeat
            await trio.sleep(4.0)
            c = _node(tmp_path, "c", bootstrap=[b.addrs[0]])
            await nursery.start(c.run)
            await _until(lambda: a.peer_id_str in c.table, 5)
            entry = c.table.get(a.peer_id_str)
            assert entry.state == PeerState.UP
            # counted as heard when b heard it, not when c was told
            assert c.table.seconds_since_seen(entry) >= 4.0
            for node in (a, b, c):
                node.stop()

    trio.run(main)


class _CountingNode(Node):
    """Notes (forwarder, publisher) of every gossip message it receives, duplicates included."""

    def _replay_own_records_only(self) -> None:
        from libp2p.peer.id import ID

        super()._replay_own_records_only()
        self.received: list[tuple[str, str]] = []
        push = self.pubsub.push_msg

        async def counted(forwarder, msg):
            self.received.append((str(forwarder), ID(msg.from_id).to_base58()))
            await push(forwarder, msg)

        self.pubsub.push_msg = counted


def test_a_new_connection_carries_only_each_sides_own_record(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            a, b = await _joined_pair(nursery, tmp_path)
            # at once: a's record is still in b's recent-message cache, which py-libp2p would replay whole
            c = _CountingNode(config_from_dict({"listen": ["/ip4/127.0.0.1/tcp/0"], "data_dir": str(tmp_path / "c"),
                                                "devices": CPU_DEVICE, "swarm": "join", "bootstrap": [b.addrs[0]],
                                                **SLOW}, tmp_path))
            await nursery.start(c.run)
            await _until(lambda: c.peer_id_str in b.table and b.peer_id_str in c.table and a.peer_id_str in c.table, 10)
            await trio.sleep(1.0)  # anything else b would send has arrived by now
            assert {publisher for forwarder, publisher in c.received if forwarder == b.peer_id_str} == {b.peer_id_str}
            for node in (a, b, c):
                node.stop()

    trio.run(main)


def _rec(peer: str, seq: int) -> NodeRecord:
    return NodeRecord(peer, b"k" * 32, "s", [], [], [], {}, 1, seq, 0.0, {})


def test_a_record_heard_second_hand_keeps_its_age():
    now = [100.0]
    table = PeerTable(10.0, 60.0, lambda: now[0])
    table.observe(_rec("p", 1), age_s=7.0)
    assert table.seconds_since_seen(table.get("p")) == 7.0
    now[0] += 3.5
    assert [c.new for c in table.sweep()] == [PeerState.DOWN]  # 10.5 s since p was heard
    assert table.observe(_rec("q", 1), age_s=10.0) is None and "q" not in table  # already past down_after
    table.observe(_rec("p", 2))  # a newer record first hand: up again, heard now
    now[0] += 1.0
    table.observe(_rec("p", 3), age_s=5.0)  # newer still, heard before p's last record: taken, the later time kept
    assert table.get("p").record.seq == 3 and table.seconds_since_seen(table.get("p")) == 1.0


def test_discovery_dials_a_few_peers_at_a_time_and_the_first_peer_id_first(tmp_path):
    from hexswarm.swarm import node as node_mod

    async def main():
        nodes = sorted((_node(tmp_path, f"p{i}") for i in range(3 * node_mod.DIAL_CONCURRENCY + 1)),
                       key=lambda n: n.peer_id_str)
        node = nodes[len(nodes) // 2]  # half the others sort before it, half after
        others = [n for n in nodes if n is not node]
        in_flight, most, order = [0], [0], []

        async def slow_connect(peer_id, addrs, timeout):
            order.append(peer_id)
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            await trio.sleep(0.05)
            in_flight[0] -= 1

        node.nat.connect = slow_connect
        async with trio.open_nursery() as nursery:
            node._nursery = nursery
            node._dial_new({o.peer_id_str: [f"/ip4/127.0.0.1/tcp/1/p2p/{o.peer_id_str}"] for o in others})
            assert len(node._dialing) == len(others)  # every one is on its way...
        assert most[0] == node_mod.DIAL_CONCURRENCY  # ...a few at a time
        assert not node._dialing
        # a peer whose PeerID sorts before ours is given time to dial us first (it dials at once by the same rule)
        first = [p > node.peer_id_str for p in order]
        assert sorted(first, reverse=True) == first and len(order) == len(others)

    trio.run(main)


def test_a_gossiped_record_is_verified_once_between_validator_and_table(tmp_path, monkeypatch):
    from libp2p.peer.id import ID

    from hexswarm.net import codec
    from hexswarm.swarm import node as node_mod
    from hexswarm.swarm.records import sign_record

    a, b = _node(tmp_path, "a"), _node(tmp_path, "b")
    signed = sign_record(b.make_record(), b.identity)
    opened = []
    real_open = node_mod.open_record
    monkeypatch.setattr(node_mod, "open_record", lambda msg: opened.append(1) or real_open(msg))

    class GossipMsg:
        data = codec.encode(signed)
        from_id = ID.from_base58(b.peer_id_str).to_bytes()

    async def main():
        assert a._inventory_valid("forwarder", GossipMsg())
        await a._on_inventory(codec.decode(GossipMsg.data), b.peer_id_str)
        assert b.peer_id_str in a.table and len(opened) == 1  # the validator's verification, kept for the table
        # a record not validated first (or not the same bytes) is verified on delivery
        signed2 = sign_record(b.make_record(), b.identity)
        await a._on_inventory(signed2, b.peer_id_str)
        assert len(opened) == 2 and a.table.get(b.peer_id_str).record.seq == 2

    trio.run(main)



def test_the_mesh_degree_follows_the_table_as_peers_join(tmp_path):
    from types import SimpleNamespace

    from hexswarm.swarm import node as node_mod

    node = _node(tmp_path, "n")
    node.gossipsub = SimpleNamespace(degree=0, degree_low=0, degree_high=0, heartbeat_interval=0.0)
    node._apply(node.make_record())  # its own, as a running node's table holds
    for i in range(node.config.heartbeat_peers - 1):  # up to heartbeat_peers in all: a small swarm
        node._apply(_rec(f"p{i}", 1))
    g = node.gossipsub
    assert (g.degree, g.degree_low, g.degree_high) == node_mod.GOSSIP_DEGREE
    node._apply(_rec("one-more", 1))  # a larger swarm at once, not at the next heartbeat
    assert (g.degree, g.degree_low, g.degree_high) == node_mod.GOSSIP_DEGREE_AT_SCALE
    assert g.heartbeat_interval == node_mod.GOSSIP_HEARTBEAT_S * node.table.scale > node_mod.GOSSIP_HEARTBEAT_S


def test_a_node_takes_the_table_of_a_peer_that_announces_a_larger_one(tmp_path):
    from hexswarm.swarm.records import sign_record

    async def main():
        async with trio.open_nursery() as nursery:
            a = _node(tmp_path, "a")
            await nursery.start(a.run)
            b = _node(tmp_path, "b", bootstrap=[a.addrs[0]])
            await nursery.start(b.run)
            c = _node(tmp_path, "c", bootstrap=[a.addrs[0]])
            await nursery.start(c.run)
            await _until(lambda: all(len(n.table) == 3 for n in (a, b, c)), 15)
            # b hears of ten peers that a and c cannot hear from (they publish nothing here)
            unheard = [_node(tmp_path, f"u{i}") for i in range(10)]
            for u in unheard:
                record = u.make_record()
                b._apply(record, sign_record(record, u.identity))
            with trio.fail_after(10):
                while not all(u.peer_id_str in c.table for u in unheard):
                    await b._publish_record()  # announces 13 peers (hb_scale 13/8); again while the mesh forms
                    await trio.sleep(0.5)
            assert all(u.peer_id_str in a.table for u in unheard)
            for node in (a, b, c):
                node.stop()

    trio.run(main)
