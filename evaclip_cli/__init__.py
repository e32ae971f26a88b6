"""evaclip: the EVA-CLIP-18B lifecycle (distill, train, video, convert, eval, push) in one tool.

Importing ``evaclip_cli`` applies ``evaclip_cli.models.openclip_compat.integrate()``: the EVA-CLIP towers become timm
models and open_clip 3.3.0 learns to load evaclip folders (``timm_model_kwargs``, sharded safetensors), so
``import evaclip_cli, open_clip`` works in either order. That imports torch, timm and open_clip. The exceptions are
the command line's two entries: the ``evaclip`` console script (``evaclip_entry.py``), which marks the process before
importing the command line so ``--help`` and TAB completion stay instant, and ``python -m evaclip_cli.cli`` (what the
launchers start on every rank; recognised from ``sys.orig_argv`` while Python imports the package to run it), so an
eval rank starts decoding images before torch is imported. There, the code that builds or loads a model calls
``integrate()`` itself.
"""
from __future__ import annotations

import sys

__version__ = "0.1.0"


def _console_script() -> bool:
    """True inside the command line, which defers the integration: the ``evaclip`` console script
    (``evaclip_entry.main``), or ``python [options] -m evaclip_cli.cli`` while Python imports this package to run it
    (``sys.argv[0]`` is ``"-m"`` until the module starts)."""
    if getattr(sys.modules.get("evaclip_entry"), "COMMAND_LINE", False):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return sys.argv[:1] == ["-m"] and any(a == "-mevaclip_cli.cli" or (a == "-m" and b == "evaclip_cli.cli")
                                           for a, b in zip(argv, [*argv[1:], ""]))


if not _console_script():
    from evaclip_cli.errors import UserError as _UserError
    from evaclip_cli.models.openclip_compat import integrate as _integrate

    try:
        _integrate()
    except _UserError as _e:  # another open_clip version: one line
        raise ImportError(str(_e)) from None
