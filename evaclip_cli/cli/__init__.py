"""The ``evaclip`` command line: the Typer app (``app.py``) and one wiring module per command group (``cmd_*.py``).

Wiring only: each command parses its options, calls one library function and prints. Heavy imports (torch,
deepspeed, open_clip) stay inside the command functions so ``--help`` and shell completion stay instant.
"""
from evaclip_cli.cli.app import app, entry, main

__all__ = ["app", "entry", "main"]
