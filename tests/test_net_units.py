"""Identity, framing and signed records without a network."""

from __future__ import annotations

import dataclasses
import stat
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hexswarm.errors import ProtocolError, UserError
from hexswarm.net import codec, identity
from hexswarm.net.framing import FrameTimeout, StreamClosed, read_frame, write_frame
from hexswarm.net.protocols import RemoteError, protocol_id, unwrap_reply
from hexswarm.swarm.records import NodeRecord, open_record, sign_record


# --- identity -------------------------------------------------------------


def test_key_file_created_0600_and_stable(tmp_path):
    path = tmp_path / "keys" / "node.key"
    first = identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity.load_or_create(path).peer_id == first.peer_id
    assert first.peer_id.to_base58().startswith("12D3KooW")  # Ed25519 identity multihash
    assert first.libp2p_key_pair().public_key.to_bytes() == first.public_bytes


def test_bad_key_file_is_a_user_error(tmp_path):
    path = tmp_path / "node.key"
    path.write_text("not a key")
    with pytest.raises(UserError, match="node.key"):
        identity.load_or_create(path)


# --- framing over an in-memory stream ---------------------------------------


class MemoryStream:
    """Enough of a libp2p stream: read(n) returns at most n buffered bytes, b'' at EOF."""

    def __init__(self, data: bytes = b"", eof: bool = True, chunk: int = 3):
        self.buffer, self.eof, self.chunk, self.written = bytearray(data), eof, chunk, bytearray()

    async def read(self, n: int) -> bytes:
        if not self.buffer:
            if self.eof:
                return b""
            await trio.sleep_forever()
        out = bytes(self.buffer[: min(n, self.chunk)])
        del self.buffer[: len(out)]
        return out

    async def write(self, data: bytes) -> None:
        self.written += data


def test_frame_roundtrip_in_small_chunks():
    async def main():
        out = MemoryStream()
        await write_frame(out, {"a": [1, b"x"]})
        return await read_frame(MemoryStream(bytes(out.written)))

    assert trio.run(main) == {"a": [1, b"x"]}


def test_tensors_decode_only_where_a_protocol_carries_them():
    """A tensor in a submit frame reached `bool(...)` in the parser and raised past it (chaos run with the
    hostile sender, 2026-11-26): every decode refuses tensors unless its protocol carries them."""
    import torch

    body = codec.encode({"prompt": "hi", "stream": torch.zeros(2)})
    assert torch.equal(codec.decode(body, tensors=True)["stream"], torch.zeros(2))
    with pytest.raises(ProtocolError, match="no tensor belongs"):
        codec.decode(body)

    async def main():
        out = MemoryStream()
        await write_frame(out, {"prompt": "hi", "top_k": torch.ones(3)})
        return await read_frame(MemoryStream(bytes(out.written)))

    with pytest.raises(ProtocolError, match="no tensor belongs"):
        trio.run(main)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x00\x00", StreamClosed),  # truncated header
        (struct.pack(">I", 10) + b"abc", StreamClosed),  # truncated body
        (struct.pack(">I", 2**31), ProtocolError),  # oversized length
        (struct.pack(">I", 1) + b"\xc1", ProtocolError),  # never-used msgpack byte
    ],
)
def test_bad_frames(data, error):
    with pytest.raises(error):
        trio.run(read_frame, MemoryStream(data))


def test_read_timeout():
    with pytest.raises(FrameTimeout):
        trio.run(read_frame, MemoryStream(struct.pack(">I", 5), eof=False), 0.05)


def test_reply_envelopes():
    assert unwrap_reply({"ok": 3}) == 3
    with pytest.raises(RemoteError, match="bad_request"):
        unwrap_reply({"error": {"code": "bad_request", "message": "no"}})
    assert protocol_id("submit", 1) == "/hexswarm/submit/1"


# --- records ------------------------------------------------------------------


def _record(ident: identity.Identity, **changes) -> NodeRecord:
    base = NodeRecord(
        peer_id=ident.peer_id.to_base58(),
        public_key=ident.public_bytes,
        swarm="s",
        addrs=["/ip4/127.0.0.1/tcp/1/p2p/x"],
        devices=[{"kind": "cpu"}],
        roles=["worker"],
        links={"peer": {"rtt_ms": 1.0, "mbps": None}},
        incarnation=1,
        seq=1,
        timestamp=0.0,
    )
    return dataclasses.replace(base, **changes)


def test_record_roundtrip():
    me = identity.generate()
    wire = codec.decode(codec.encode(sign_record(_record(me), me)))
    assert open_record(wire) == _record(me)


def test_tampered_body_is_rejected():
    me = identity.generate()
    signed = sign_record(_record(me), me)
    forged = sign_record(_record(me, swarm="t"), me)
    with pytest.raises(ProtocolError, match="signature"):
        open_record({"body": forged["body"], "sig": signed["sig"]})


def test_signature_binds_to_peer_id():
    me, mallory = identity.generate(), identity.generate()
    # Mallory signs a record claiming my PeerID with her own key.
    claim = _record(mallory, peer_id=me.peer_id.to_base58())
    with pytest.raises(ProtocolError, match="does not match its PeerID"):
        open_record(sign_record(claim, mallory))
    # ... or with my public key but her signature.
    claim = _record(me)
    with pytest.raises(ProtocolError, match="signature"):
        open_record(sign_record(claim, mallory))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.dictionaries(st.sampled_from(["body", "sig", "x"]), st.binary(max_size=100))))
def test_open_record_only_raises_protocol_error(data):
    with pytest.raises(ProtocolError):
        open_record(data)


_ME = identity.generate()
_SIGNED = sign_record(_record(_ME), _ME)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["body", "sig"]), index=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_flipped_byte_is_rejected(field, index, flip):
    data = bytearray(_SIGNED[field])
    data[index % len(data)] ^= flip
    with pytest.raises(ProtocolError):
        open_record({**_SIGNED, field: bytes(data)})
