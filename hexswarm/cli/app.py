"""The `hexswarm` command: one typer app, one module per command group.

Command modules import torch / libp2p lazily inside their commands so that
`hexswarm --help` and `hexswarm plan` stay fast.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from hexswarm.errors import UserError

app = typer.Typer(
    name="hexswarm",
    help="Serve Llama-family models over a peer-to-peer swarm of heterogeneous GPU hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    from hexswarm.cli import generate_cmd, node_cmd, plan_cmd, submit_cmd

    for module in (generate_cmd, plan_cmd, node_cmd, submit_cmd):
        module.register(app)


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as e:
        raise SystemExit(e.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.ClickException as e:  # usage errors: one line, exit 2
        fail(e.format_message(), 2)
    except UserError as e:
        fail(str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as e:  # a bug: still one line unless debugging
        if os.environ.get("HEXSWARM_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e}", 1)
