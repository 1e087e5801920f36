"""Membership at scale (issue 16), without a network: the heartbeat and silence thresholds that grow with
the swarm, the bound on a record's links, and whole yamux frame writes under cancellation."""

from __future__ import annotations

import pytest
import trio

from hexswarm.net import host as host_mod
from hexswarm.net import identity
from hexswarm.swarm.config import NodeConfig
from hexswarm.swarm.peer_table import PeerState, PeerTable, membership_scale
from hexswarm.swarm.records import (
    MAX_RECORD_BYTES,
    MAX_RECORD_LINKS,
    MAX_SCALE,
    SCALE_KEY,
    NodeRecord,
    announced_scale,
    bounded_links,
    open_record,
    sign_record,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rec(peer: str, seq: int = 1, extra: dict | None = None) -> NodeRecord:
    return NodeRecord(peer, b"k" * 32, "s", [], [], [], {}, 1, seq, 0.0, extra or {})


# --- the scale rule ---------------------------------------------------------------


def test_scale_is_one_up_to_heartbeat_peers_then_grows_with_n():
    assert [membership_scale(n, 16) for n in (0, 1, 2, 4, 16)] == [1.0] * 5
    assert membership_scale(17, 16) == 17 / 16
    assert membership_scale(32, 16) == 2.0
    assert membership_scale(64, 8) == 8.0
    assert membership_scale(1000, 8) == 125.0
    assert membership_scale(10_000, 0) == 1.0  # 0: never slows


def test_default_config_keeps_small_swarms_as_they_were():
    cfg = NodeConfig()
    assert cfg.heartbeat_peers == 8
    for n in range(1, cfg.heartbeat_peers + 1):
        assert membership_scale(n, cfg.heartbeat_peers) == 1.0


def test_table_scale_counts_itself_and_every_known_peer():
    clock = FakeClock()
    table = PeerTable(10, 120, clock, heartbeat_peers=4)
    for i in range(4):
        table.observe(_rec(f"p{i}"))
    assert table.scale == 1.0
    table.observe(_rec("p4"))
    table.observe(_rec("p5"))
    assert table.scale == 6 / 4
    assert table.down_after(table.get("p0")) == 10 * 6 / 4


# --- thresholds -------------------------------------------------------------------


def test_small_table_marks_down_and_drops_exactly_as_before():
    clock = FakeClock()
    table = PeerTable(2, 10, clock, heartbeat_peers=16)
    table.observe(_rec("p"))
    clock.now += 2.05
    assert [c.new for c in table.sweep()] == [PeerState.DOWN]
    clock.now += 8.0
    assert [c.new for c in table.sweep()] == [PeerState.DROPPED]


def test_large_table_waits_scale_times_longer():
    clock = FakeClock()
    table = PeerTable(10, 120, clock, heartbeat_peers=2)
    for i in range(4):  # scale 2
        table.observe(_rec(f"p{i}"))
    clock.now += 19.9
    assert table.sweep() == []
    clock.now += 0.2  # 20.1 s > 10 x 2
    assert {c.new for c in table.sweep()} == {PeerState.DOWN}
    clock.now += 239.0 - 20.1
    assert table.sweep() == []
    clock.now += 1.2  # 240.1 s > 120 x 2
    assert {c.new for c in table.sweep()} == {PeerState.DROPPED}


def test_a_peer_that_announces_a_slower_heartbeat_is_given_its_time():
    clock = FakeClock()
    table = PeerTable(10, 120, clock, heartbeat_peers=16)  # this table: scale 1
    table.observe(_rec("slow", extra={SCALE_KEY: 4.0}))
    table.observe(_rec("plain"))
    clock.now += 10.5
    assert [(c.peer_id, c.new) for c in table.sweep()] == [("plain", PeerState.DOWN)]
    clock.now += 29.0  # 39.5 s
    assert table.sweep() == []
    clock.now += 1.0  # 40.5 s > 10 x 4
    assert [(c.peer_id, c.new) for c in table.sweep()] == [("slow", PeerState.DOWN)]


@pytest.mark.parametrize("value, expected", [
    (None, 1.0), (2.5, 2.5), (0.5, 1.0), (-3, 1.0), (True, 1.0), ("8", 1.0), (float("nan"), 1.0),
    (float("inf"), 1.0), (1e9, MAX_SCALE), (3, 3.0),
])
def test_announced_scale_is_a_bounded_number(value, expected):
    extra = {} if value is None else {SCALE_KEY: value}
    assert announced_scale(_rec("p", extra=extra)) == expected


# --- record size ------------------------------------------------------------------


def _links(n: int) -> dict[str, dict]:
    return {f"12D3KooW{i:044d}": {"rtt_ms": float(n - i), "mbps": 1000.0} for i in range(n)}


def test_links_are_kept_whole_up_to_the_bound_then_the_nearest():
    small = _links(MAX_RECORD_LINKS)
    assert bounded_links(small) == small
    big = _links(1000)
    kept = bounded_links(big)
    assert len(kept) == MAX_RECORD_LINKS
    assert max(v["rtt_ms"] for v in kept.values()) == MAX_RECORD_LINKS  # the lowest round-trip times
    ties = {"b": {"rtt_ms": 1.0}, "a": {"rtt_ms": 1.0}, "c": {"rtt_ms": None}}
    assert list(bounded_links(ties, limit=2)) == ["a", "b"]  # ties by PeerID, unmeasured last


@pytest.mark.parametrize("peers", [10, 1_000, 10_000])
def test_a_record_stays_small_whatever_the_swarm_size(peers):
    ident = identity.generate()
    record = NodeRecord(
        peer_id=ident.peer_id.to_base58(), public_key=ident.public_bytes, swarm="s",
        addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{ident.peer_id.to_base58()}"],
        devices=[{"kind": "cuda", "name": "H100", "index": 0, "memory_gib": 80.0, "tflops": 989.0,
                  "mem_bw_gbs": 3350.0, "capability": [9, 0]}] * 8,
        roles=["worker"], links=bounded_links(_links(peers)), incarnation=1, seq=1, timestamp=0.0,
        extra={SCALE_KEY: round(membership_scale(peers, 8), 3)},
    )
    signed = sign_record(record, ident)
    assert len(signed["body"]) < 8 * 1024 < MAX_RECORD_BYTES
    assert open_record(signed).extra[SCALE_KEY] == membership_scale(peers, 8)


def test_without_the_bound_a_large_swarm_record_would_not_even_sign():
    ident = identity.generate()
    record = NodeRecord(ident.peer_id.to_base58(), ident.public_bytes, "s", [], [], [], _links(1200), 1, 1, 0.0)
    with pytest.raises(Exception, match="exceeds"):
        sign_record(record, ident)


# --- whole frame writes -----------------------------------------------------------


class _FakeSecured:
    """Encrypts (takes a nonce) at once, then sends after a while, as Noise over a busy socket does."""

    def __init__(self, send_s: float):
        self.send_s = send_s
        self.nonces = 0
        self.sent: list[bytes] = []
        self.closed = False

    async def write(self, data: bytes) -> None:
        self.nonces += 1
        await trio.sleep(self.send_s)
        self.sent.append(data)

    async def close(self) -> None:
        self.closed = True


class _FakeYamux:
    async def _write_frame(self, data: bytes) -> None:  # py-libp2p's shape: lock, write, checkpoint
        async with self._write_lock:
            await self.secured_conn.write(data)
        await trio.lowlevel.checkpoint()


def _muxer(send_s: float) -> object:
    cls = type("Muxer", (_FakeYamux,), {})
    host_mod._shield_frame_writes(cls)
    host_mod._shield_frame_writes(cls)  # idempotent
    m = cls()
    m._write_lock, m.secured_conn = trio.Lock(), _FakeSecured(send_s)
    return m


def test_a_cancelled_write_still_sends_its_whole_frame():
    async def main():
        m = _muxer(send_s=0.2)
        with trio.move_on_after(0.05) as scope:
            await m._write_frame(b"frame-1")
        assert scope.cancelled_caught  # the caller is cancelled all the same...
        assert m.secured_conn.sent == [b"frame-1"]  # ...after its frame went out: no nonce is skipped
        await m._write_frame(b"frame-2")
        assert m.secured_conn.sent == [b"frame-1", b"frame-2"] and m.secured_conn.nonces == 2

    trio.run(main)


def test_a_stuck_write_closes_the_connection(monkeypatch):
    from libp2p.network.connection.exceptions import RawConnError

    monkeypatch.setattr(host_mod, "FRAME_WRITE_TIMEOUT_S", 0.1)

    async def main():
        m = _muxer(send_s=60)
        with pytest.raises(RawConnError):
            await m._write_frame(b"frame")
        assert m.secured_conn.closed and m.secured_conn.sent == []

    trio.run(main)


def test_py_libp2p_yamux_is_shielded_once_a_host_exists():
    from libp2p.stream_muxer.yamux.yamux import Yamux

    host_mod.make_host(identity.generate())
    assert getattr(Yamux._write_frame, "_hexswarm_shielded", False)


def test_yamux_credits_reads_back_in_batches_and_bulk_data_still_flows():
    """Small messages read a byte of varint at a time (as gossipsub reads) send no WINDOW_UPDATE until half the
    window is consumed; a transfer of several windows still completes (the sender is never left waiting)."""
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

    proto, small, bulk = TProtocol("/test/window/1"), 200, 4 * DEFAULT_WINDOW_SIZE + 12345
    updates = []
    received = {}

    async def main():
        a, b = host_mod.make_host(identity.generate()), host_mod.make_host(identity.generate())
        send_update = YamuxStream.send_window_update

        async def counted(self, increment, skip_lock=False):
            if self.conn is b_conn[0]:
                updates.append(increment)
            await send_update(self, increment, skip_lock)

        done = trio.Event()

        async def handler(stream):
            b_conn[0] = stream.muxed_conn
            for _ in range(small):  # a 1-byte length, then the body: two reads per message
                n = (await stream.read(1))[0]
                body = await stream.read(n)
                while len(body) < n:
                    body += await stream.read(n - len(body))
            received["small_updates"] = len(updates)
            data = b""
            while len(data) < bulk:
                data += await stream.read(bulk - len(data))
            received["bulk"] = data
            done.set()

        b_conn = [None]
        b.set_stream_handler(proto, handler)
        addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
        async with a.run([addr]), b.run([addr]):
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            YamuxStream.send_window_update = counted
            try:
                with trio.fail_after(20):
                    stream = await a.new_stream(b.get_id(), [proto])
                    for i in range(small):
                        await stream.write(bytes([100]) + bytes([i % 256]) * 100)
                    await stream.write(bytes(range(256)) * (bulk // 256) + bytes(bulk % 256))
                    await done.wait()
            finally:
                YamuxStream.send_window_update = send_update

    trio.run(main)
    assert received["small_updates"] == 0  # 20 KiB read: far below half the window
    assert received["bulk"] == bytes(range(256)) * (bulk // 256) + bytes(bulk % 256)
    # the bulk transfer was credited back (all but at most one window: else the sender would have stalled),
    # in few updates (how few depends on the read sizes: a large read credits several half-windows at once)
    assert sum(updates) >= bulk - DEFAULT_WINDOW_SIZE
    assert 1 <= len(updates) < 20


def test_dht_lookups_slow_down_with_scale_and_while_they_find_nothing_new():
    from hexswarm.swarm.node import DISCOVERY_INTERVAL_S, PROVIDE_INTERVAL_S, lookup_interval

    assert lookup_interval(2.0, 0) == 2 * DISCOVERY_INTERVAL_S
    assert lookup_interval(2.0, 1) == 4 * DISCOVERY_INTERVAL_S
    assert lookup_interval(2.0, 50) == 2 * PROVIDE_INTERVAL_S  # capped
    assert lookup_interval(125.0, 0) == 125 * DISCOVERY_INTERVAL_S


# --- tools/swarm_scale.py helpers -------------------------------------------------


def _swarm_scale():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "swarm_scale.py"
    spec = importlib.util.spec_from_file_location("swarm_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swarm_scale_bootstraps_through_several_peers_and_reads_tables_from_logs(tmp_path):
    tool = _swarm_scale()
    assert tool.bootstrap_of(0, "multi") == [] and tool.bootstrap_of(1, "multi") == [0]
    assert tool.bootstrap_of(9, "multi") == [2, 4, 8] and tool.bootstrap_of(9, "hub") == [0]
    assert tool.bootstrap_of(9, "tree") == [4]
    log = tmp_path / "n0.log"
    log.write_text("06:00:00 INFO    hexswarm.node: peer A joined\n06:00:01 INFO    hexswarm.node: peer B joined\n")
    tables = tool.LogTables([log])
    assert tables.read() == [3]
    with open(log, "a") as f:
        f.write("06:00:09 INFO    hexswarm.node: peer A is down (silent > 20 s)\n06:00:10 INFO    hexswarm.node: peer")
    assert tables.read() == [2] and tables.downs == 1
    with open(log, "a") as f:  # the line finished later is read whole
        f.write(" A is back up\n06:00:11 INFO    hexswarm.node: peer B dropped (silent > 240 s)\n")
    assert tables.read() == [2] and tables.up == [{"A"}]
