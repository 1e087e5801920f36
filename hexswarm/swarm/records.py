"""Signed node records: a node's inventory and heartbeat in one message.

Wire form (a codec message): ``{"body": <bytes>, "sig": <bytes>}``.
``body`` is the msgpack encoding of the record map; ``sig`` is the Ed25519
signature, by the node key, of ``SIGNING_DOMAIN + body``. The body carries the
raw public key, and a record is accepted only when the PeerID derived from
that key equals the record's ``peer_id``: the signature binds to the sender's
PeerID. Signing the exact bytes sent avoids any canonical-encoding question.

Optional fields (``_OPTIONAL_FIELD_TYPES``) may be absent: records of nodes
that predate them stay valid, and a record leaves an empty optional field out
of its body so that such nodes accept it too.

Size: a record is bounded whatever the swarm's size: ``links`` lists at most
``MAX_RECORD_LINKS`` peers (the lowest round-trip times; ``bounded_links``), so
it stays far below ``MAX_RECORD_BYTES`` at any N (all links up to 33 nodes).
A node whose heartbeat is slowed by the swarm's size says so in
``extra["hb_scale"]`` (absent: 1; see peer_table.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hexswarm.errors import ProtocolError
from hexswarm.net import codec
from hexswarm.net.identity import Identity, peer_id_from_public_bytes, verify
from hexswarm.plan.calibration import CalibrationError, parse_calibration

SIGNING_DOMAIN = b"hexswarm/node-record/1\x00"
MAX_RECORD_BYTES = 64 * 1024
RECORD_VERSION = 1
# Links a record carries at most: enough for every peer of a 33-node swarm; beyond, the nearest ones.
MAX_RECORD_LINKS = 32
# extra key: the sender's heartbeat multiplier (peer_table.membership_scale); absent when 1.
SCALE_KEY = "hb_scale"
# Announced multipliers are clamped to [1, MAX_SCALE]: a peer cannot make itself look alive for ever.
MAX_SCALE = 1024.0


@dataclass
class NodeRecord:
    peer_id: str
    public_key: bytes  # raw Ed25519, 32 bytes
    swarm: str
    addrs: list[str]
    devices: list[dict]
    roles: list[str]
    # peer id -> {"rtt_ms": float, "mbps": float | None}: this node's view of its links.
    links: dict[str, dict]
    incarnation: int  # wall-clock ms at process start: orders records across restarts
    seq: int  # counts up within one incarnation
    timestamp: float  # sender's wall clock, informational
    # Free-form keys later features publish (e.g. loaded stages); small values only.
    extra: dict = field(default_factory=dict)
    version: int = RECORD_VERSION
    # The engine's measured speed on this node's device and model (hexswarm.plan.calibration form); {}: none.
    calibration: dict = field(default_factory=dict)

    @property
    def order(self) -> tuple[int, int]:
        """Newer records compare greater."""
        return (self.incarnation, self.seq)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "peer_id": str,
    "public_key": bytes,
    "swarm": str,
    "addrs": list,
    "devices": list,
    "roles": list,
    "links": dict,
    "incarnation": int,
    "seq": int,
    "timestamp": (int, float),
    "extra": dict,
    "version": int,
}
_OPTIONAL_FIELD_TYPES: dict[str, type] = {"calibration": dict}


def bounded_links(links: dict[str, dict], limit: int = MAX_RECORD_LINKS) -> dict[str, dict]:
    """The `limit` links with the lowest round-trip time (ties by PeerID), for a record: all of them when
    there are no more than `limit`."""
    if len(links) <= limit:
        return dict(links)

    def key(item: tuple[str, dict]) -> tuple[float, str]:
        rtt = item[1].get("rtt_ms")
        return (rtt if isinstance(rtt, (int, float)) and not isinstance(rtt, bool) else math.inf, item[0])

    return dict(sorted(links.items(), key=key)[:limit])


def announced_scale(record: NodeRecord) -> float:
    """The heartbeat multiplier `record`'s sender announced (1 when absent or not a number), in [1, MAX_SCALE]."""
    extra = getattr(record, "extra", None)
    value = extra.get(SCALE_KEY, 1.0) if isinstance(extra, dict) else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 1.0
    return min(max(float(value), 1.0), MAX_SCALE)


def sign_record(record: NodeRecord, identity: Identity) -> dict:
    fields = asdict(record)
    for name in _OPTIONAL_FIELD_TYPES:
        if not fields[name]:
            del fields[name]
    body = codec.encode(fields)
    if len(body) > MAX_RECORD_BYTES:
        raise ProtocolError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    return {"body": body, "sig": identity.sign(SIGNING_DOMAIN + body)}


def _check_shape(data: dict) -> None:
    for name, kind in _FIELD_TYPES.items():
        if name not in data:
            raise ProtocolError(f"record lacks {name!r}")
        if not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise ProtocolError(f"record field {name!r} has type {type(data[name]).__name__}")
    if not all(isinstance(a, str) for a in data["addrs"]):
        raise ProtocolError("record addrs must be strings")
    if not all(isinstance(r, str) for r in data["roles"]):
        raise ProtocolError("record roles must be strings")
    if not all(isinstance(d, dict) for d in data["devices"]):
        raise ProtocolError("record devices must be maps")
    if not all(isinstance(k, str) and isinstance(v, dict) for k, v in data["links"].items()):
        raise ProtocolError("record links must map PeerIDs to maps")
    for name, kind in _OPTIONAL_FIELD_TYPES.items():
        if name in data and not isinstance(data[name], kind):
            raise ProtocolError(f"record field {name!r} has type {type(data[name]).__name__}")
    if data.get("calibration"):
        try:
            parse_calibration(data["calibration"])
        except CalibrationError as e:
            raise ProtocolError(f"record calibration: {e}") from None


def open_record(signed: Any) -> NodeRecord:
    """Verify a signed record and return it; ProtocolError when anything is off."""
    if not isinstance(signed, dict) or not isinstance(signed.get("body"), bytes) or not isinstance(signed.get("sig"), bytes):
        raise ProtocolError("signed record must be {body: bytes, sig: bytes}")
    body, sig = signed["body"], signed["sig"]
    if len(body) > MAX_RECORD_BYTES:
        raise ProtocolError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    data = codec.decode(body, MAX_RECORD_BYTES)
    if not isinstance(data, dict):
        raise ProtocolError("record body is not a map")
    if data.get("version") != RECORD_VERSION:
        raise ProtocolError(f"record version {data.get('version')!r} not supported")
    _check_shape(data)
    unknown = set(data) - set(_FIELD_TYPES) - set(_OPTIONAL_FIELD_TYPES)
    if unknown:
        raise ProtocolError(f"record has unknown field {sorted(unknown)[0]!r}")
    if len(data["public_key"]) != 32:
        raise ProtocolError("record public key is not a 32-byte Ed25519 key")
    try:
        derived = peer_id_from_public_bytes(data["public_key"]).to_base58()
    except Exception:
        raise ProtocolError("record public key is not a valid Ed25519 key") from None
    if derived != data["peer_id"]:
        raise ProtocolError("record public key does not match its PeerID")
    if not verify(data["public_key"], sig, SIGNING_DOMAIN + body):
        raise ProtocolError("record signature does not verify")
    return NodeRecord(**data)


def new_incarnation() -> int:
    return time.time_ns() // 1_000_000
