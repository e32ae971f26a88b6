"""evaclip: the EVA-CLIP-18B lifecycle (distill, train, video, convert, eval, push) in one tool.

Importing ``evaclip_cli`` registers the EVA-CLIP towers with timm and teaches open_clip to load evaclip folders
(``timm_model_kwargs``, sharded safetensors). To keep ``evaclip --help`` and shell completion instant, nothing
heavy is imported here: the registration runs as soon as timm / open_clip are imported (or right away if they
already are), so ``import evaclip_cli, open_clip`` and ``import open_clip, evaclip_cli`` both work.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_HOOKED = ("timm", "open_clip")


def _on_import(name: str) -> None:
    if name == "timm":
        from evaclip_cli.models.eva import register

        register()
    elif name == "open_clip":
        from evaclip_cli.models.eva import register
        from evaclip_cli.models.openclip_compat import patch_open_clip

        register()
        patch_open_clip()


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self._inner, self._name = inner, name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _on_import(self._name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def _install() -> None:
    pending = [n for n in _HOOKED if n not in sys.modules]
    for name in _HOOKED:
        if name in sys.modules:
            _on_import(name)
    if pending and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


_install()
