"""`hexswarm admit`: the swarm owner issues admission certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hexswarm.errors import UserError


def admit(
    peer: Optional[str] = typer.Argument(None, help="PeerID to admit (see `hexswarm id`)"),
    swarm_key: Path = typer.Option(..., "--swarm-key", help="the owner's key file (created if missing)"),
    swarm: str = typer.Option("default", "--swarm", help="swarm name the certificate is for"),
    client: bool = typer.Option(False, "--client", help="a submitter's certificate, not a node's"),
    days: float = typer.Option(365.0, "--days", help="validity in days"),
    out: Optional[Path] = typer.Option(None, "--out", help="certificate file (default: <PeerID>.cert)"),
    owner: bool = typer.Option(False, "--owner", help="print the owner PeerID (the configs' swarm_owner) and exit"),
) -> None:
    """Issue an admission certificate for PEER, signed by the swarm owner key."""
    from hexswarm.net import codec
    from hexswarm.net.admission import issue_certificate
    from hexswarm.net.host import parse_peer_id
    from hexswarm.net.identity import load_or_create

    identity = load_or_create(swarm_key)
    if owner:
        print(identity.peer_id.to_base58())
        return
    if not peer:
        raise UserError("give the PeerID to admit, or --owner to print the owner PeerID")
    parse_peer_id(peer)
    if days <= 0:
        raise UserError(f"--days must be positive, got {days}")
    cert = issue_certificate(identity, swarm, peer, "client" if client else "node", days)
    path = out or Path(f"{peer}.cert")
    path.write_bytes(codec.encode(cert))
    print(path)


def register(app: typer.Typer) -> None:
    app.command("admit")(admit)
