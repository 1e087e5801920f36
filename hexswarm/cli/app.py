"""The `hexswarm` command: one typer app, one module per command group.

Command modules import torch / libp2p lazily inside their commands so that
`hexswarm --help` and `hexswarm plan` stay fast.
"""

from __future__ import annotations

import os
import sys

import typer

from hexswarm.errors import UserError

app = typer.Typer(
    name="hexswarm",
    help="Serve Llama-family models over a peer-to-peer swarm of heterogeneous GPU hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Flags that take several values after one flag (HexGen style: --hetero-config 4 2 2).
# typer takes one value per flag, so they are expanded to repeated flags first.
MULTI_VALUE_FLAGS = {"--hetero-config", "--pp-partition", "--bootstrap", "--listen", "--peer"}


@app.callback()
def _root() -> None:
    """Serve Llama-family models over a peer-to-peer swarm of heterogeneous GPU hosts."""


def _register_commands() -> None:
    from hexswarm.cli import admit_cmd, doctor_cmd, generate_cmd, node_cmd, plan_cmd, submit_cmd, trace_cmd

    for module in (generate_cmd, plan_cmd, node_cmd, submit_cmd, admit_cmd, trace_cmd, doctor_cmd):
        module.register(app)


def expand_multi_value_flags(argv: list[str]) -> list[str]:
    """`--pp-partition 8 16 8` -> `--pp-partition 8 --pp-partition 16 --pp-partition 8`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg in MULTI_VALUE_FLAGS:
            first = True
            while i < len(argv) and not argv[i].startswith("--"):
                if not first:
                    out.append(arg)
                out.append(argv[i])
                first = False
                i += 1
    return out


def _click_error_types() -> tuple[type, ...]:
    """Usage-error classes of whichever click typer uses (typer >= 0.20 vendors its own)."""
    kinds = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            kinds.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(kinds)


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    args = expand_multi_value_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        rc = app(args=args, standalone_mode=False, prog_name="hexswarm")
        if isinstance(rc, int) and rc:
            raise SystemExit(rc)
    except typer.Exit as e:
        raise SystemExit(e.exit_code)
    except typer.Abort:
        fail("aborted", 130)
    except _click_error_types() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare command: show its help
            print(e.format_message(), file=sys.stderr)
            raise SystemExit(2)
        fail(" ".join(e.format_message().split()), 2)  # usage errors: one line, exit 2
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
