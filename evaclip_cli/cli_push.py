"""Typer wiring of the push commands (imports stay light: heavy modules load inside the commands)."""
from __future__ import annotations


def register(app, eval_app) -> None:
    """Add this module's commands to the `evaclip` app (and its `eval` group)."""
