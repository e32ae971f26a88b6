"""evaclip's integration with timm and open_clip: ``integrate()``, and the file names of an open_clip folder.

``integrate()`` is the one function that makes timm and open_clip know evaclip's models. It runs once per process
(later calls return at once): ``import evaclip_cli`` applies it, so ``import evaclip_cli, open_clip`` in either
order loads evaclip folders; the ``evaclip`` console script skips it at import (``--help`` and TAB completion stay
instant, see ``evaclip_entry.py``) and every evaclip code path that builds or loads a model calls it itself.

What it does, and why:

0. **Checks the open_clip version.** The additions below are written against open_clip 3.3.0's internals; any other
   version is refused with one line (a ``UserError``; ``import evaclip_cli`` turns it into an ``ImportError``).
1. **Registers the EVA-CLIP towers with timm** by importing ``evaclip_cli.models.eva`` (``@register_model``):
   ``evaclip_18b_patch14_224``, ``evaclip_8b_patch14_224``, ``evaclip_vit``.
2. **``vision_cfg.timm_model_kwargs``**: open_clip's main branch forwards this dict to ``timm.create_model`` so a timm
   tower of any size (the tiny demo model, a user's own width/depth) can be described in ``open_clip_config.json``;
   3.3.0's ``TimmModel`` forwards only drop rates and its ``CLIPVisionCfg`` rejects the key. The field is added to
   open_clip's own ``CLIPVisionCfg`` class in place (same class object, so ``open_clip.CLIPVisionCfg``,
   ``open_clip.model.CLIPVisionCfg`` and ``open_clip.coca_model.CLIPVisionCfg`` all have it), and
   ``_build_vision_tower`` forwards it to ``timm.create_model`` as main does (it sets a context variable that the
   ``timm`` reference of ``open_clip.timm_model``, a thin proxy, merges into ``create_model``'s kwargs). The
   folders use main's field name, so they stay valid for later open_clip releases.
3. **Sharded folders through ``local-dir:``**: ``open_clip_model.safetensors.index.json`` + shards (the Hub's
   convention for large models, what ``evaclip convert --max-shard-size`` writes) are found
   (``factory._find_checkpoint_in_dir``) and loaded as one state dict (``factory.load_state_dict``); stock 3.3.0
   would pick one shard and fail.
4. **The same shards through ``hf-hub:``** (what ``evaclip push`` uploads for large models): when the repo has no
   single weights file, ``pretrained.download_pretrained_from_hf`` downloads the index and its shards into one
   snapshot folder and returns the index; stock 3.3.0 would silently keep random weights.

No stale copies: each replaced function is swapped in every loaded ``open_clip``/``open_clip_train`` module that
holds the original (the defining module and those that imported it by name: ``coca_model._build_vision_tower``,
``factory.download_pretrained_from_hf``, ...); modules imported later look the name up in the patched module.
Replacements keep the original as ``__wrapped__`` and are marked ``__evaclip__``. Everything is additive: configs and
folders without these fields behave exactly as in stock open_clip.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

INDEX_NAME = "open_clip_model.safetensors.index.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
SUPPORTED_OPEN_CLIP = "3.3.0"

_PENDING_KWARGS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("evaclip_timm_kwargs",
                                                                                 default=None)
_LOCK = threading.Lock()
_INTEGRATED = False


def load_sharded_safetensors(index_path: str | Path, device: Any = "cpu") -> dict:
    """One state dict from a safetensors index (``*.safetensors.index.json``) and the shards beside it."""
    from safetensors.torch import load_file

    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    state: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(index_path.parent / shard), device=str(device)))
    missing = set(index["weight_map"]) - set(state)
    if missing:
        raise RuntimeError(f"{index_path}: {len(missing)} tensors listed in the index are in no shard "
                           f"(first: {sorted(missing)[0]})")
    return state


def integrate() -> None:
    """Register the EVA-CLIP towers with timm and add to open_clip 3.3.0 what evaclip folders need (module
    docstring: items 0-4). Idempotent and thread-safe; raises ``UserError`` (one line) on another open_clip."""
    global _INTEGRATED
    if _INTEGRATED:
        return
    with _LOCK, gc_paused():
        if _INTEGRATED:
            return
        import open_clip

        if open_clip.__version__ != SUPPORTED_OPEN_CLIP:
            from evaclip_cli.errors import UserError

            raise UserError(f"evaclip supports open_clip_torch {SUPPORTED_OPEN_CLIP}, found {open_clip.__version__}"
                            f" (pip install 'open_clip_torch=={SUPPORTED_OPEN_CLIP}')")
        import open_clip.factory as factory
        import open_clip.model as oc_model
        import open_clip.pretrained as pretrained
        import open_clip.timm_model as oc_timm

        import evaclip_cli.models.eva  # noqa: F401  (1. @register_model: the towers are timm models)

        # 2. timm_model_kwargs
        _add_field(oc_model.CLIPVisionCfg, "timm_model_kwargs", Optional[dict], None)
        if oc_timm.timm is not None and not isinstance(oc_timm.timm, _TimmProxy):
            oc_timm.timm = _TimmProxy(oc_timm.timm)
        _replace(oc_model._build_vision_tower, _forward_timm_model_kwargs)
        # 3. sharded local-dir: folders
        _replace(factory._find_checkpoint_in_dir, _find_index_in_dir)
        _replace(factory.load_state_dict, _load_index)
        # 4. sharded hf-hub: repos
        _replace(pretrained.download_pretrained_from_hf, _download_index_from_hf)
        _INTEGRATED = True


# ---------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off for a block of imports. torch, torchvision, timm and open_clip create a few
    hundred thousand long-lived objects and no garbage, and every collection on the way rescans them. The previous
    state is restored."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------------------------------- a lean import, for eval
#: Packages that open_clip and timm import only if installed, inside ``try/except ImportError``, and that evaluation
#: never uses: ``wandb`` (timm.utils.summary's optional logging). ``transformers`` is added when the model has no
#: Hugging Face text tower.
EVAL_UNUSED = ("wandb",)


def folder_config(model: Any, pretrained: Any = None) -> Optional[dict]:
    """The ``open_clip_config.json`` of an open_clip folder (or of a run folder's ``final/``), read without loading
    anything; None for any other source."""
    if pretrained is not None:
        return None
    p = Path(model)
    for d in (p / "final", p):
        cfg = d / CONFIG_NAME
        if cfg.is_file():
            try:
                got = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return got if isinstance(got, dict) and isinstance(got.get("model_cfg"), dict) else None
    return None


def import_open_clip_lean(model: Any, pretrained: Any = None) -> bool:
    """Import open_clip for an eval command with less work:

    * without the optional packages evaluation never uses (``EVAL_UNUSED``), and without ``transformers`` when the
      model is an open_clip folder whose text tower and tokenizer are not Hugging Face ones (no ``hf_*`` key in
      ``text_cfg``; every EVA-CLIP): open_clip and timm import them inside ``try/except ImportError``, and
      ``sys.modules[name] = None`` makes that import fail at once. The entries are removed afterwards, so a later
      ``import wandb`` works as usual;
    * with the cyclic garbage collector paused (``gc_paused``), and what was imported frozen afterwards
      (``gc.freeze``), so the collections during the eval loop skip it too.

    Nothing happens when open_clip is imported already (a program that imported ``evaclip_cli`` as a library, or
    training's periodic eval). True if done."""
    import gc

    if "open_clip" in sys.modules:
        return False
    blocked = [m for m in _unused_by_eval(folder_config(model, pretrained)) if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # `import m` raises ImportError
    try:
        with gc_paused():
            import open_clip  # noqa: F401
    except ImportError:  # another open_clip that needs it: forget the half-import, let the loader import it normally
        for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
            del sys.modules[k]
        return False
    finally:
        for m in blocked:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    gc.freeze()  # this process is an eval command: what it imported lives as long as it does
    return True


def _unused_by_eval(cfg: Optional[dict]) -> list[str]:
    text = cfg["model_cfg"].get("text_cfg", {}) if cfg else None
    unused = list(EVAL_UNUSED)
    if isinstance(text, dict) and not any(str(k).startswith("hf_") for k in text):
        unused.append("transformers")
    return unused


def _open_clip_modules() -> list:
    return [m for name, m in list(sys.modules.items())
            if m is not None and name.split(".")[0] in ("open_clip", "open_clip_train")]


def _replace(original: Callable, make: Callable[[Callable], Callable]) -> None:
    """Swap ``make(original)`` in for ``original`` in every loaded open_clip module that references it."""
    if getattr(original, "__evaclip__", False):  # already ours
        return
    new = functools.wraps(original)(make(original))
    new.__evaclip__ = True  # type: ignore[attr-defined]
    for module in _open_clip_modules():
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, new)


def _add_field(cls: type, name: str, annotation: Any, default: Any) -> None:
    """Add a field to an existing dataclass, in place: the class object stays the same, so every module's
    reference to it sees the field. The dataclass decorator runs again on the same class with its own parameters;
    the existing fields are handed back as ``Field`` objects so each keeps its default, factory and metadata."""
    fields = dataclasses.fields(cls)
    if any(f.name == name for f in fields):
        return
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    for f in fields:
        setattr(cls, f.name, f)
    cls.__dict__["__annotations__"][name] = annotation
    setattr(cls, name, dataclasses.field(default=default))
    for generated in ("__init__", "__repr__", "__eq__", "__match_args__"):  # the decorator keeps existing ones
        if generated in cls.__dict__:
            delattr(cls, generated)
    if (cls.__doc__ or "").startswith(cls.__name__ + "("):  # the generated signature docstring
        cls.__doc__ = None
    dataclasses.dataclass(cls, init=params.init, repr=params.repr, eq=params.eq, order=params.order,
                          unsafe_hash=params.unsafe_hash, frozen=params.frozen)


class _TimmProxy:
    """Stands in for the ``timm`` module inside ``open_clip.timm_model``: ``create_model`` also gets the
    ``timm_model_kwargs`` of the vision tower being built (set by ``_forward_timm_model_kwargs``)."""

    def __init__(self, timm_module):
        self._timm = timm_module

    def __getattr__(self, item):
        return getattr(self._timm, item)

    def create_model(self, model_name, *args, **kwargs):
        extra = _PENDING_KWARGS.get()
        if extra:
            kwargs = {**kwargs, **extra}
        return self._timm.create_model(model_name, *args, **kwargs)


def _forward_timm_model_kwargs(build_vision_tower):
    def _build_vision_tower(embed_dim, vision_cfg, *args, **kwargs):
        extra = (vision_cfg.get("timm_model_kwargs") if isinstance(vision_cfg, dict)
                 else getattr(vision_cfg, "timm_model_kwargs", None))
        token = _PENDING_KWARGS.set(dict(extra) if extra else None)
        try:
            return build_vision_tower(embed_dim, vision_cfg, *args, **kwargs)
        finally:
            _PENDING_KWARGS.reset(token)

    return _build_vision_tower


def _find_index_in_dir(find_checkpoint_in_dir):
    def _find_checkpoint_in_dir(dir_path):
        if (Path(dir_path) / INDEX_NAME).is_file() and not (Path(dir_path) / WEIGHTS_NAME).is_file():
            return str(Path(dir_path) / INDEX_NAME)
        return find_checkpoint_in_dir(dir_path)

    return _find_checkpoint_in_dir


def _load_index(load_state_dict):
    def _load_state_dict(checkpoint_path, device="cpu", weights_only=True):
        if str(checkpoint_path).endswith(".safetensors.index.json"):
            return load_sharded_safetensors(checkpoint_path, device=device)
        return load_state_dict(checkpoint_path, device=device, weights_only=weights_only)

    return _load_state_dict


def _download_index_from_hf(download_pretrained_from_hf):
    def _download_pretrained_from_hf(model_id, filename=None, revision=None, cache_dir=None):
        try:
            return download_pretrained_from_hf(model_id, filename=filename, revision=revision, cache_dir=cache_dir)
        except FileNotFoundError:
            if filename is not None:  # a named file (the config, a tag's file): nothing to fall back to
                raise
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(model_id, INDEX_NAME, revision=revision, cache_dir=cache_dir)
            for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
                hf_hub_download(model_id, shard, revision=revision, cache_dir=cache_dir)  # same snapshot folder
            return index

    return _download_pretrained_from_hf
