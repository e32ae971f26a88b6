"""The command line a command was invoked with, handed to it explicitly: the relaunchers (torchrun, DeepSpeed's
launcher, sbatch) re-run exactly it on every rank, minus the launcher options.

The root group records the arguments it parses as the context object (``ctx.obj``), however the app is invoked
(``main()``, ``python -m evaclip_cli.cli``, Typer's ``CliRunner``); a command reads them with ``command_line(ctx)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import typer
from typer.core import TyperGroup


@dataclass(frozen=True)
class Invocation:
    argv: tuple[str, ...]  # the arguments after the program name, command name first


class RootGroup(TyperGroup):
    """The ``evaclip`` group: records its arguments (``Invocation``) as the context object."""

    def make_context(self, info_name, args, parent=None, **extra):
        if parent is None:
            extra.setdefault("obj", Invocation(tuple(map(str, args))))
        return super().make_context(info_name, args, parent=parent, **extra)


def command_line(ctx: typer.Context) -> list[str]:
    """The arguments this command was invoked with (after the program name)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Invocation):
        raise RuntimeError("evaclip commands run through the evaclip app (evaclip_cli.cli.app), which records "
                           "the command line")
    return list(obj.argv)


def is_rank0(environ: Mapping[str, str]) -> bool:
    """Rank 0 (or a single process): the one that prints results and errors."""
    return environ.get("RANK", "0") == "0"
