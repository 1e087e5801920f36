"""Per-message costs of py-libp2p 0.8.1's pubsub, cut without changing what goes over the wire.

Measured with py-spy on membership-only nodes (16 and 32 per 2-core machine, tools/swarm_scale.py), where
gossip is nearly all of a node's work, each of these was a few to ~10 % of a node's CPU:

* the read loop reads each RPC's varint length a byte at a time, every byte a trip through the stream,
  muxer and their locks: read_varint_prefixed reads what the stream holds and keeps the rest;
* every RPC carries the sender's signed peer record, parsed and verified on each: the bytes last accepted
  from a peer are consumed again only when they change or every SENDER_RECORD_RECHECK_S;
* every RPC sent rebuilds that record's envelope from the host's addresses: it is reused for
  LOCAL_RECORD_REUSE_S.

install() applies them once per process; every node's pubsub then uses them.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import Any

READ_CHUNK = 64 * 1024  # read-ahead on a pubsub stream: whatever has arrived, up to this
SENDER_RECORD_RECHECK_S = 600.0  # well inside the 2-h TTL py-libp2p gives the addresses a record carries
LOCAL_RECORD_REUSE_S = 5.0
MAX_REMEMBERED_PEERS = 4096

# pubsub stream -> bytes read past the last RPC
_READ_AHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# host -> {peer id bytes: (its signed peer record as last accepted, when)}
_SENDER_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# host -> (when, env_to_send_in_RPC's answer)
_LOCAL_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def read_varint_prefixed(stream: Any, max_length: int) -> bytes:
    """py-libp2p's read_varint_prefixed_bytes_limited (same limits and errors), reading what the stream has."""
    from libp2p.exceptions import ParseError
    from libp2p.io.exceptions import MessageTooLarge
    from libp2p.utils.varint import decode_uvarint

    buf = _READ_AHEAD.get(stream)
    if buf is None:
        buf = _READ_AHEAD[stream] = bytearray()
    while True:
        end = next((i for i, b in enumerate(buf[:10]) if not b & 0x80), None)
        if end is not None:
            break
        if len(buf) >= 10:
            raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
        await _read_more(stream, buf, 1, "Stream ended while reading varint length prefix")
    length = decode_uvarint(bytes(buf[: end + 1]))
    if length > max_length:
        raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
    del buf[: end + 1]
    while len(buf) < length:
        await _read_more(stream, buf, length, f"Incomplete message: expected {length}, got {len(buf)}")
    message = bytes(buf[:length])
    del buf[:length]
    return message


async def _read_more(stream: Any, buf: bytearray, expected: int, what: str) -> None:
    from libp2p.io.exceptions import IncompleteReadError

    chunk = await stream.read(max(READ_CHUNK, expected - len(buf)))
    if not chunk:
        raise IncompleteReadError(what, expected_bytes=expected, received_bytes=len(buf))
    buf += chunk


def consume_sender_record(consume: Callable[[Any, Any, Any], bool], msg: Any, host: Any, peer_id: Any) -> bool:
    """py-libp2p's maybe_consume_signed_record (`consume`), skipped for the bytes last accepted from this peer."""
    if not msg.HasField("senderRecord"):
        return True
    seen = _SENDER_RECORDS.setdefault(host, {})
    key, now = peer_id.to_bytes(), time.monotonic()
    last = seen.get(key)
    if last is not None and last[0] == msg.senderRecord and now - last[1] < SENDER_RECORD_RECHECK_S:
        return True
    if not consume(msg, host, peer_id):
        return False
    if len(seen) >= MAX_REMEMBERED_PEERS:  # peers come and go: forget all now and then
        seen.clear()
    seen[key] = (msg.senderRecord, now)
    return True


def local_record(build: Callable[[Any], tuple[bytes, bool]], host: Any) -> tuple[bytes, bool]:
    """py-libp2p's env_to_send_in_RPC (`build`), reused for LOCAL_RECORD_REUSE_S."""
    now = time.monotonic()
    cached = _LOCAL_RECORDS.get(host)
    if cached is not None and now - cached[0] < LOCAL_RECORD_REUSE_S:
        return cached[1][0], False
    answer = build(host)
    _LOCAL_RECORDS[host] = (now, answer)
    return answer


def install() -> None:
    """Apply the three changes to py-libp2p's pubsub modules (once per process)."""
    import libp2p.pubsub.gossipsub as gossipsub_mod
    import libp2p.pubsub.pubsub as pubsub_mod

    if getattr(pubsub_mod, "_hexswarm_fixes", False):
        return
    pubsub_mod.read_varint_prefixed_bytes_limited = read_varint_prefixed
    pubsub_mod.maybe_consume_signed_record = functools.partial(consume_sender_record,
                                                               pubsub_mod.maybe_consume_signed_record)
    for module in (pubsub_mod, gossipsub_mod):
        module.env_to_send_in_RPC = functools.partial(local_record, module.env_to_send_in_RPC)
    pubsub_mod._hexswarm_fixes = True
