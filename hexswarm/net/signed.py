"""Sealed messages: a codec body signed by the sender's Ed25519 node key.

Wire form: ``{"body": bytes, "key": bytes (raw public key), "sig": bytes}``;
the signature covers ``domain + body``, and the signer's PeerID is derived
from the key, so a sealed message proves who made it and cannot be altered.
"""

from __future__ import annotations

from typing import Any

from hexswarm.errors import ProtocolError
from hexswarm.net import codec
from hexswarm.net.identity import Identity, peer_id_from_public_bytes, verify


def seal(obj: Any, identity: Identity, domain: bytes) -> dict:
    body = codec.encode(obj)
    return {"body": body, "key": identity.public_bytes, "sig": identity.sign(domain + body)}


def open_sealed(msg: Any, domain: bytes, max_bytes: int = 1 << 20) -> tuple[Any, str]:
    """(the object, the signer's PeerID text); ProtocolError when anything is off."""
    if not isinstance(msg, dict) or not all(isinstance(msg.get(k), bytes) for k in ("body", "key", "sig")):
        raise ProtocolError("sealed message must be {body, key, sig} bytes")
    if len(msg["body"]) > max_bytes:
        raise ProtocolError(f"sealed body of {len(msg['body'])} bytes exceeds {max_bytes}")
    if len(msg["key"]) != 32 or not verify(msg["key"], msg["sig"], domain + msg["body"]):
        raise ProtocolError("signature does not verify")
    try:
        signer = peer_id_from_public_bytes(msg["key"]).to_base58()
    except Exception:
        raise ProtocolError("not a valid Ed25519 key") from None
    return codec.decode(msg["body"], max_bytes), signer
