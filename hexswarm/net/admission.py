"""Swarm admission: certificates signed by the swarm owner's key.

A certificate is a sealed message (see signed.py), signed by the owner key, of
``{"swarm", "peer", "role": "node"|"client", "issued", "expires"}``.  A node of a
swarm that names an owner (`swarm_owner`, the owner key's PeerID) presents its
certificate in every inventory record; peers verify it before the record enters
their table, and until then refuse that peer on every hexswarm protocol and
drop its gossip.  The role counts: a "client" certificate (`hexswarm admit --client`)
lets a peer submit, read status and its own traces, never use node-to-node protocols.
"""

from __future__ import annotations

import time
from typing import Any

from hexswarm.errors import ProtocolError
from hexswarm.net.identity import Identity
from hexswarm.net.signed import open_sealed, seal

CERT_DOMAIN = b"hexswarm/admission/1\x00"
ROLES = ("node", "client")


def issue_certificate(owner: Identity, swarm: str, peer: str, role: str = "node", valid_days: float = 365.0) -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    now = time.time()
    body = {"swarm": swarm, "peer": peer, "role": role, "issued": now, "expires": now + valid_days * 86400.0}
    return seal(body, owner, CERT_DOMAIN)


def verify_certificate(cert: Any, owner: str, swarm: str, peer: str, roles: tuple[str, ...] = ROLES) -> dict:
    """The certificate's body if `owner` issued it to `peer` for `swarm` and it is current; else ProtocolError."""
    body, signer = open_sealed(cert, CERT_DOMAIN, max_bytes=4096)
    if signer != owner:
        raise ProtocolError("certificate not issued by this swarm's owner")
    if not isinstance(body, dict):
        raise ProtocolError("certificate body is not a map")
    if body.get("swarm") != swarm:
        raise ProtocolError(f"certificate is for swarm {body.get('swarm')!r}")
    if body.get("peer") != peer:
        raise ProtocolError("certificate belongs to another peer")
    if body.get("role") not in roles:
        raise ProtocolError(f"certificate role {body.get('role')!r} not accepted here")
    expires = body.get("expires")
    if not isinstance(expires, (int, float)) or expires < time.time():
        raise ProtocolError("certificate expired")
    return body


class Admission:
    """Which peers have shown a valid certificate, and in which role (self always has, as a node).

    A node certificate grants everything; a client certificate only what a client needs (submit,
    status).  The role is kept per peer, so a client certificate never opens node protocols.
    """

    def __init__(self, owner: str, swarm: str, me: str):
        self.owner = owner
        self.swarm = swarm
        # peer -> role -> expiry: a peer may hold both (a node that also submits with a client cert)
        self._grants: dict[str, dict[str, float]] = {me: {"node": float("inf")}}

    def admit(self, peer: str, cert: Any, roles: tuple[str, ...] = ("node",)) -> str:
        """Record `peer` as admitted in its certificate's role (returned); ProtocolError when invalid."""
        body = verify_certificate(cert, self.owner, self.swarm, peer, roles)
        self._grants.setdefault(peer, {})[body["role"]] = float(body["expires"])
        return body["role"]

    def is_admitted(self, peer: str, role: str = "node") -> bool:
        """Does `peer` hold a current certificate good for `role`? (a node's is good for "client" too)"""
        grants = self._grants.get(str(peer), {})
        accepted = ("node", "client") if role == "client" else (role,)
        now = time.time()
        return any(grants.get(r, 0.0) > now for r in accepted)
