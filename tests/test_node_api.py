"""The Node API later features build on: handlers, requests, gossip topics, peer-change listeners."""

from __future__ import annotations

import pytest
import trio

from hexswarm.net.protocols import RemoteError, protocol_id
from hexswarm.swarm.config import config_from_dict
from hexswarm.swarm.node import Node
from netutil import CPU_DEVICE, FAST

ECHO = protocol_id("echo", 1)


def _node(tmp_path, name, **keys) -> Node:
    cfg = config_from_dict(
        {"listen": ["/ip4/127.0.0.1/tcp/0"], "data_dir": str(tmp_path / name), "devices": CPU_DEVICE, "swarm": "api", **FAST, **keys},
        tmp_path,
    )
    return Node(cfg)


def test_handlers_requests_topics_and_listeners(tmp_path):
    async def main():
        a = _node(tmp_path, "a")
        seen_changes = []
        a.on_peer_change.append(seen_changes.append)

        async def echo(msg, remote):
            return {"echo": msg, "from": str(remote)}

        a.register_handler(ECHO, echo)
        got = trio.Event()
        received = []
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            b = _node(tmp_path, "b", bootstrap=[a.addrs[0]])
            await nursery.start(b.run)

            async def on_chat(msg, publisher):
                received.append((msg, publisher))
                got.set()

            await a.subscribe(a.topic("chat"), on_chat)
            with trio.fail_after(20):
                while b.peer_id_str not in a.table or a.peer_id_str not in b.table:
                    await trio.sleep(0.1)
                reply = await b.request(a.peer_id_str, ECHO, [1, "two", b"3"])
                assert reply == {"echo": [1, "two", b"3"], "from": b.peer_id_str}
                with pytest.raises(RemoteError, match="bad_request"):
                    await b.request(a.peer_id_str, "/hexswarm/ping/1", "not a map")
                # Gossip needs the mesh to form: publish until it arrives.
                while not got.is_set():
                    await b.publish(b.topic("chat"), {"text": "hi"})
                    with trio.move_on_after(0.5):
                        await got.wait()
            assert received[0] == ({"text": "hi"}, b.peer_id_str)
            assert any(c.peer_id == b.peer_id_str for c in seen_changes)
            b.extra["stages"] = [0, 1]
            with trio.fail_after(10):
                while a.table.get(b.peer_id_str).record.extra.get("stages") != [0, 1]:
                    await trio.sleep(0.1)
            a.stop()
            b.stop()

    trio.run(main)


def test_allowlist_refuses_protocols_but_not_peer_listing(tmp_path):
    from hexswarm.net.identity import generate

    async def main():
        a = _node(tmp_path, "a", allow_peers=[generate().peer_id.to_base58()])
        a.register_handler(ECHO, lambda msg, remote: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            b = _node(tmp_path, "b", bootstrap=[a.addrs[0]])
            await nursery.start(b.run)
            with trio.fail_after(20):
                with pytest.raises(RemoteError, match="forbidden"):
                    await b.request(a.peer_id_str, ECHO, {})
                listing = await b.request(a.peer_id_str, "/hexswarm/peers/1", {})
            assert [p["peer_id"] for p in listing["peers"]] == [a.peer_id_str]
            a.stop()
            b.stop()

    trio.run(main)
