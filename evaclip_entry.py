"""The ``evaclip`` console script (``[project.scripts]``).

``import evaclip_cli`` integrates evaclip with timm and open_clip (``evaclip_cli.models.openclip_compat.integrate``),
which imports torch, timm and open_clip: seconds. The command line must not pay that for ``--help`` or a TAB
completion, so this entry marks the process as the console script before importing ``evaclip_cli.cli``; the
commands that build or load a model integrate when they do. ``python -m evaclip_cli.cli`` (what the launchers start
on every rank) defers it the same way (``evaclip_cli/__init__.py`` recognises it from ``sys.orig_argv``).

It also makes OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless set) before torch is loaded, here and
in every rank the command launches: spinning threads of two processes sharing CPUs slow both several-fold (measured
on 2 cores, two concurrent `evaclip train --recipe tiny`: 154 samples/s each spinning, 528 each passive; one run alone
758 vs 706 samples/s).
"""
from __future__ import annotations

COMMAND_LINE = False  # read by evaclip_cli/__init__.py


def main() -> None:
    import os

    global COMMAND_LINE
    COMMAND_LINE = True
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from evaclip_cli.cli import entry

    entry()
