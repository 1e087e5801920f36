"""Placeholder: commands are added by their owning issue."""

import typer


def register(app: typer.Typer) -> None:
    pass
