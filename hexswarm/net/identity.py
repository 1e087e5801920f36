"""A node's persistent Ed25519 identity: the key file and the PeerID it gives.

The key file is a PKCS#8 PEM written once, with mode 0600, on first use; the
same file always gives the same PeerID. Record signatures use the same key, so
a signature can be checked against the sender's PeerID (see records.py).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hexswarm.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    private_key: ed25519.Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self):  # -> libp2p.peer.id.ID
        return peer_id_from_public_bytes(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def libp2p_key_pair(self):  # -> libp2p.crypto.keys.KeyPair
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair

        raw = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = Ed25519PrivateKey.from_bytes(raw)
        return KeyPair(private, private.get_public_key())


def generate() -> Identity:
    return Identity(ed25519.Ed25519PrivateKey.generate())


def peer_id_from_public_bytes(raw: bytes):
    """The libp2p PeerID (identity multihash of the protobuf key) of a raw Ed25519 key."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(raw))


def verify(public_bytes: bytes, signature: bytes, data: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create(path: Path) -> Identity:
    """Load the key at `path`, creating it (mode 0600) when it does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        return _create(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by others (mode %o); use chmod 600", path, mode & 0o777)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"key file {path} is not a PEM private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"key file {path} does not hold an Ed25519 key")
    return Identity(key)


def _create(path: Path) -> Identity:
    identity = generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once must not both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create(path)
    except OSError as e:
        raise UserError(f"cannot create key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    log.info("created node key %s", path)
    return identity
