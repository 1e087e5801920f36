"""`hexswarm doctor --config FILE`: one line per check of this host and config (swarm/doctor.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def doctor_command(config: Path = typer.Option(..., "--config", "-c", help="Node YAML config.")) -> None:
    """Check the config, key, listen addresses, bootstrap peers, reachability, relays, clock, model files
    and GPU; print one line per check with what to do about a failure; exit 1 if any check failed."""
    from hexswarm.cli.node_cmd import setup_logging

    setup_logging("error")
    from hexswarm.swarm.doctor import FAIL, run_checks

    checks = run_checks(config)
    for c in checks:
        print(c.line(), flush=True)
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
