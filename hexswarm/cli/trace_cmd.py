"""`hexswarm trace`: where a request ran, and where its time went."""

from __future__ import annotations

import json
from typing import Optional

import typer


def trace(
    request_id: str = typer.Argument(..., help="the request id (`submit --json` prints it)"),
    peer: str = typer.Option(..., "--peer", help="the node the request entered through"),
    as_json: bool = typer.Option(False, "--json"),
    key: Optional[str] = typer.Option(None, "--key", help="the key the request was submitted with (with --cert)"),
    cert: Optional[str] = typer.Option(None, "--cert", help="client certificate from `hexswarm admit --client`"),
) -> None:
    """Show each stage a request crossed: peer, steps, queue, compute and inbound network time."""
    import trio

    from hexswarm.cli.submit_cmd import client_credentials
    from hexswarm.net.client import ask
    from hexswarm.net.protocols import TRACE

    identity, certificate = client_credentials(key, cert)
    msg = {"rid": request_id} if certificate is None else {"rid": request_id, "cert": certificate}
    reply = trio.run(ask, peer, TRACE, msg, 10.0, identity)
    if as_json:
        print(json.dumps(reply))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"request {request_id}: {len(reply['attempts'])} attempt(s)")
    for col in ("epoch", "replica", "stage", "peer", "steps", "queue s", "compute s", "network-in s"):
        table.add_column(col)
    for s in sorted(reply["spans"], key=lambda s: (s.get("epoch", 0), s.get("replica", 0), s.get("stage", 0))):
        if "error" in s:
            table.add_row("-", "-", "-", s["peer"], "-", "-", "-", f"unreachable: {s['error'][:40]}")
            continue
        table.add_row(str(s["epoch"]), str(s["replica"]), str(s["stage"]), s["peer"][:20] + "...", str(s["steps"]),
                      f"{s['queue_s']:.4f}", f"{s['compute_s']:.4f}", f"{s['net_in_s']:.4f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
