"""`hexswarm node`, `hexswarm id`, `hexswarm peers`: run the daemon, show identity, ask a node for its table."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from hexswarm.errors import UserError, first_leaf

SHUTDOWN_GRACE_S = 5.0


def setup_logging(level: str) -> None:
    """Readable one-line logs on stderr; py-libp2p's own chatter only when debugging."""
    from hexswarm.logformat import log_to_stderr, quiet_libp2p

    quiet_libp2p(level == "debug")
    log_to_stderr(getattr(logging, level.upper()))


def _load(config: Path, bootstrap: list[str] | None = None, listen: list[str] | None = None, http: str | None = None):
    from hexswarm.swarm.config import load_config

    return load_config(config, {"bootstrap": bootstrap or None, "listen": listen or None, "http": http})


async def _stop_on_signals(node) -> None:
    import trio

    from hexswarm.runtime.shutdown import STOPPING

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger("hexswarm.node").info("%s: stopping", signal.Signals(signum).name)
            STOPPING.set()
            node.stop()
            break
        # A second signal, or a stop that hangs, ends the process at once.
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            async for _ in signals:
                break
        logging.getLogger("hexswarm.node").error("shutdown did not finish; exiting now")
        os._exit(1)


async def _run_node(node) -> None:
    import trio

    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, node)
        try:
            from hexswarm.daemon import run_daemon

            await run_daemon(node)
        except Exception as e:
            failure = first_leaf(e)
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def node_command(
    config: Path = typer.Option(..., "--config", "-c", help="Node YAML config."),
    bootstrap: Optional[list[str]] = typer.Option(
        None, "--bootstrap", "-b", help="Bootstrap multiaddr .../p2p/<PeerID> (repeatable; replaces the config's)."
    ),
    listen: Optional[list[str]] = typer.Option(None, "--listen", "-l", help="Listen multiaddr (repeatable; replaces the config's)."),
    http: Optional[str] = typer.Option(
        None, "--http", help="Serve the OpenAI-compatible HTTP API and /metrics on HOST:PORT "
        "(replaces the config's 'http')."
    ),
) -> None:
    """Run the node daemon in the foreground (stop with Ctrl-C or SIGTERM)."""
    import trio

    cfg = _load(config, bootstrap, listen, http)
    setup_logging(cfg.log_level)
    from hexswarm.runtime.loop_watch import loop_watch
    from hexswarm.swarm.node import Node

    node = Node(cfg)
    trio.run(_run_node, node, instruments=[loop_watch()])


def id_command(config: Path = typer.Option(..., "--config", "-c", help="Node YAML config.")) -> None:
    """Print this node's PeerID and its /ip4/.../tcp/.../p2p/<PeerID> multiaddrs (creates the key if needed)."""
    from libp2p.utils.address_validation import expand_wildcard_address

    from hexswarm.net.host import parse_multiaddr
    from hexswarm.net.identity import load_or_create

    cfg = _load(config)
    peer_id = load_or_create(cfg.key_file).peer_id
    print(peer_id)
    for text in cfg.listen:
        for addr in expand_wildcard_address(parse_multiaddr(text)):
            note = "  (port chosen at start)" if addr.value_for_protocol("tcp") == "0" else ""
            print(f"{addr}/p2p/{peer_id}{note}")


def _format_devices(devices: list[dict]) -> str:
    if not devices:
        return "-"
    groups: dict[str, int] = {}
    for d in devices:
        label = f"{d.get('name', d.get('kind', '?'))} {d.get('memory_gib', 0):g}G"
        groups[label] = groups.get(label, 0) + 1
    return ", ".join(f"{n}x {label}" for label, n in groups.items())


def _format_calibration(cal: dict | None) -> str:
    """The engine's measured speed a peer announces: ms per decode step by batch, prefill tokens/s (one
    prompt; a full step), and what the runtime adds per stage of a pipeline and its local link's speed."""
    if not isinstance(cal, dict) or not cal.get("decode"):
        return "-"
    try:
        steps = " ".join(f"B{int(b)}:{float(t) * 1e3:.2f}" for b, t in cal["decode"])
        lines = [f"{steps} ms/step", f"prefill {float(cal['prefill_tokens_per_s']):,.0f} tok/s"]
        if cal.get("prefill_batch"):
            n, secs = cal["prefill_batch"]
            lines[-1] += f", {float(n) / float(secs):,.0f} tok/s at {int(n)} tokens"
        if cal.get("mixed"):
            rows, tokens, secs = cal["mixed"]
            lines.append(f"B{int(rows)} + {int(tokens)} prompt tokens: {float(secs) * 1e3:.2f} ms/step")
        if cal.get("stage_overhead"):
            lines.append("stage overhead " + " ".join(f"B{int(r)}:{float(t) * 1e3:.2f}" for r, t in cal["stage_overhead"])
                         + " ms/step")
        if cal.get("stage_host"):
            lines.append("stage host " + " ".join(f"B{int(r)}:{float(t) * 1e3:.2f}" for r, t in cal["stage_host"])
                         + " ms/step")
        if cal.get("link_Bps"):
            lines.append(f"local link {float(cal['link_Bps']) / 1e9:.2f} GB/s")
        return "\n".join(lines)
    except (TypeError, ValueError, KeyError):
        return "?"


def _print_table(reply: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"swarm {reply.get('swarm')!r} as seen by {reply.get('self')}")
    for column in ("PeerID", "addresses", "GPUs", "engine (measured)", "state", "last seen", "latency"):
        table.add_column(column, overflow="fold")
    for p in reply["peers"]:
        state = p["state"] + (" (self)" if p.get("self") else "")
        color = "green" if p["state"] == "up" else "red"
        latency = "-" if p.get("latency_ms") is None else f"{p['latency_ms']:.1f} ms"
        table.add_row(
            p["peer_id"],
            "\n".join(p["addrs"]),
            _format_devices(p["devices"]),
            _format_calibration(p.get("calibration")),
            f"[{color}]{state}[/{color}]",
            f"{p['last_seen_s']:.1f} s ago",
            latency,
        )
    Console().print(table)


def peers_command(
    peer: str = typer.Option(..., "--peer", "-p", help="A running node: /ip4/.../tcp/.../p2p/<PeerID>."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of peer objects."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for the node."),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Also draw the peers, their GPUs and measured links to this PNG."
    ),
    key: Optional[str] = typer.Option(None, "--key", help="client key file (with --cert; a swarm with an owner)"),
    cert: Optional[str] = typer.Option(None, "--cert", help="client certificate from `hexswarm admit --client`"),
) -> None:
    """Show a running node's peer table (PeerID, addresses, GPUs, measured engine speed, state, last seen, latency)."""
    setup_logging("error")
    from hexswarm.cli.submit_cmd import client_credentials
    from hexswarm.api.peers_client import peers_of

    reply = peers_of(peer, timeout, *client_credentials(key, cert))
    if not isinstance(reply.get("peers"), list):
        raise UserError(f"{peer} sent a malformed peers reply")
    if as_json:
        print(json.dumps(reply["peers"], indent=1, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
    else:
        _print_table(reply)
    if png is not None:
        from hexswarm.api.peers_render import render_peers_png

        try:
            render_peers_png(reply, png)
        except OSError as e:
            raise UserError(f"cannot write {png}: {e.strerror}") from None
        print(f"wrote {png}: {len(reply['peers'])} peers; numbers in the picture:", file=sys.stderr)
        for k, p in enumerate(reply["peers"]):
            print(f"  {k + 1}  {p['peer_id']}  {p['state']}  {_format_devices(p['devices'])}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("node")(node_command)
    app.command("id")(id_command)
    app.command("peers")(peers_command)
