"""py-libp2p pubsub's per-message costs cut (hexswarm/net/pubsub_fixes.py): the same bytes, errors and limits."""

from __future__ import annotations

import pytest
import trio
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.utils.varint import encode_uvarint

from hexswarm.net import pubsub_fixes


class _Stream:
    """Hands out the given chunks, one per read (at most n bytes), then EOF."""

    def __init__(self, *chunks: bytes):
        self.chunks = [bytearray(c) for c in chunks]
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        if not self.chunks:
            return b""
        out = bytes(self.chunks[0][:n])
        del self.chunks[0][:n]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return out


def _framed(*messages: bytes) -> bytes:
    return b"".join(encode_uvarint(len(m)) + m for m in messages)


def test_messages_are_read_whole_from_whatever_chunks_arrive():
    big = bytes(range(256)) * 3  # a two-byte length
    wire = _framed(b"one", big, b"", b"three")

    async def main():
        whole = _Stream(wire)
        got = [await pubsub_fixes.read_varint_prefixed(whole, 1 << 20) for _ in range(4)]
        assert got == [b"one", big, b"", b"three"] and whole.reads == 1  # one read for four messages
        # split anywhere, the length prefix included
        for cut in range(1, len(wire)):
            split = _Stream(wire[:cut], wire[cut:])
            assert [await pubsub_fixes.read_varint_prefixed(split, 1 << 20) for _ in range(4)] == got

    trio.run(main)


def test_the_limits_and_errors_are_py_libp2ps():
    async def main():
        with pytest.raises(MessageTooLarge):
            await pubsub_fixes.read_varint_prefixed(_Stream(_framed(b"x" * 100)), 99)
        with pytest.raises(IncompleteReadError):
            await pubsub_fixes.read_varint_prefixed(_Stream(), 10)  # EOF before a length
        with pytest.raises(IncompleteReadError):
            await pubsub_fixes.read_varint_prefixed(_Stream(_framed(b"abcdef")[:4]), 10)  # EOF mid-message
        with pytest.raises(ParseError):
            await pubsub_fixes.read_varint_prefixed(_Stream(b"\xff" * 11), 10)

    trio.run(main)


def test_our_signed_peer_record_is_rebuilt_only_now_and_then(monkeypatch):
    built = []

    def build(host):
        built.append(host)
        return b"env%d" % len(built), True

    class Host:
        pass

    host = Host()
    assert pubsub_fixes.local_record(build, host) == (b"env1", True)
    assert pubsub_fixes.local_record(build, host) == (b"env1", False) and len(built) == 1
    monkeypatch.setattr(pubsub_fixes, "LOCAL_RECORD_REUSE_S", 0.0)
    assert pubsub_fixes.local_record(build, host) == (b"env2", True)


def test_install_wires_py_libp2ps_pubsub_once():
    import libp2p.pubsub.gossipsub as gossipsub_mod
    import libp2p.pubsub.pubsub as pubsub_mod

    pubsub_fixes.install()
    wired = (pubsub_mod.read_varint_prefixed_bytes_limited, pubsub_mod.maybe_consume_signed_record,
             pubsub_mod.env_to_send_in_RPC, gossipsub_mod.env_to_send_in_RPC)
    pubsub_fixes.install()  # idempotent: nothing wrapped twice
    assert wired == (pubsub_mod.read_varint_prefixed_bytes_limited, pubsub_mod.maybe_consume_signed_record,
                     pubsub_mod.env_to_send_in_RPC, gossipsub_mod.env_to_send_in_RPC)
    assert wired[0] is pubsub_fixes.read_varint_prefixed
    assert all(w.func in (pubsub_fixes.consume_sender_record, pubsub_fixes.local_record) for w in wired[1:])


def test_a_peers_signed_peer_record_is_verified_once_per_change(monkeypatch):
    checked = []

    def consume(msg, host, peer):
        checked.append(msg.senderRecord)
        return msg.senderRecord != b"bad"

    class Msg:
        def __init__(self, record):
            self.senderRecord = record

        def HasField(self, name):
            return self.senderRecord is not None

    class Host:
        pass

    class Peer(bytes):
        def to_bytes(self):
            return bytes(self)

    host, a, b = Host(), Peer(b"a"), Peer(b"b")

    def once(record, peer):
        return pubsub_fixes.consume_sender_record(consume, Msg(record), host, peer)

    assert once(b"r1", a) and once(b"r1", a) and checked == [b"r1"]  # the same bytes again: not re-verified
    assert once(b"r1", b) and checked == [b"r1", b"r1"]  # per peer
    assert once(b"r2", a) and checked[-1] == b"r2"  # a new record is verified
    assert not once(b"bad", a) and not once(b"bad", a) and checked.count(b"bad") == 2  # a refused one every time
    assert once(None, a) and len(checked) == 5  # no record: nothing to check
    monkeypatch.setattr(pubsub_fixes, "SENDER_RECORD_RECHECK_S", 0.0)
    assert once(b"r1", b) and len(checked) == 6  # and every so often again
