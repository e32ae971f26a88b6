"""What open_clip 3.3 needs to load evaclip folders; applied once open_clip is imported.

1. ``vision_cfg.timm_model_kwargs``: open_clip's main branch forwards this dict to ``timm.create_model`` so a timm
   tower of any size can be described in ``open_clip_config.json``. 3.3.0 rejects the field; here it is accepted
   and forwarded the same way, so evaclip folders stay loadable by later open_clip releases without evaclip.
2. Sharded safetensors (``open_clip_model.safetensors.index.json`` + shards, the Hub's convention): found in a
   ``local-dir:`` folder and loaded as one state dict.
3. The same shards in an ``hf-hub:`` repo (``evaclip push`` uploads large models so): the index and its shards are
   downloaded into one snapshot folder and loaded as in 2 (stock open_clip would silently keep random weights).

All three patches are additive: configs and folders without these fields behave exactly as in stock open_clip.
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
from pathlib import Path
from typing import Optional

INDEX_NAME = "open_clip_model.safetensors.index.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"

_PENDING_KWARGS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("evaclip_timm_kwargs", default=None)
_PATCHED = False


class _TimmProxy:
    """Stands in for the ``timm`` module inside ``open_clip.timm_model``: merges pending kwargs into create_model."""

    def __init__(self, timm_module):
        self._timm = timm_module

    def __getattr__(self, item):
        return getattr(self._timm, item)

    def create_model(self, model_name, *args, **kwargs):
        extra = _PENDING_KWARGS.get()
        if extra:
            kwargs = {**kwargs, **extra}
        return self._timm.create_model(model_name, *args, **kwargs)


def load_sharded_safetensors(index_path: str | Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    state: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(index_path.parent / shard), device=device))
    missing = set(index["weight_map"]) - set(state)
    if missing:
        raise RuntimeError(f"{index_path}: {len(missing)} tensors listed in the index are in no shard "
                           f"(first: {sorted(missing)[0]})")
    return state


def patch_open_clip() -> None:
    global _PATCHED
    if _PATCHED:
        return
    import open_clip.factory as factory
    import open_clip.model as oc_model
    import open_clip.timm_model as oc_timm

    # -- 1. timm_model_kwargs -----------------------------------------------------------------------------------
    base_cfg = oc_model.CLIPVisionCfg
    if "timm_model_kwargs" not in {f.name for f in dataclasses.fields(base_cfg)}:
        cfg_cls = dataclasses.make_dataclass(
            "CLIPVisionCfg",
            [("timm_model_kwargs", Optional[dict], dataclasses.field(default=None))],
            bases=(base_cfg,),
        )
        cfg_cls.__module__ = base_cfg.__module__
        oc_model.CLIPVisionCfg = cfg_cls
        orig_build = oc_model._build_vision_tower

        def _build_vision_tower(embed_dim, vision_cfg, *args, **kwargs):
            if isinstance(vision_cfg, dict):
                vision_cfg = cfg_cls(**vision_cfg)
            extra = getattr(vision_cfg, "timm_model_kwargs", None)
            token = _PENDING_KWARGS.set(dict(extra) if extra else None)
            try:
                return orig_build(embed_dim, vision_cfg, *args, **kwargs)
            finally:
                _PENDING_KWARGS.reset(token)

        oc_model._build_vision_tower = _build_vision_tower
        if oc_timm.timm is not None and not isinstance(oc_timm.timm, _TimmProxy):
            oc_timm.timm = _TimmProxy(oc_timm.timm)

    # -- 2. sharded safetensors in local-dir folders -----------------------------------------------------------
    orig_find = factory._find_checkpoint_in_dir
    orig_load_state_dict = factory.load_state_dict

    def _find_checkpoint_in_dir(dir_path: Path):
        index = Path(dir_path) / INDEX_NAME
        if index.is_file() and not (Path(dir_path) / WEIGHTS_NAME).is_file():
            return str(index)
        return orig_find(dir_path)

    def load_state_dict(checkpoint_path, device="cpu", weights_only=True):
        if str(checkpoint_path).endswith(".safetensors.index.json"):
            return load_sharded_safetensors(checkpoint_path, device=device)
        return orig_load_state_dict(checkpoint_path, device=device, weights_only=weights_only)

    factory._find_checkpoint_in_dir = _find_checkpoint_in_dir
    factory.load_state_dict = load_state_dict

    # -- 3. sharded safetensors in hf-hub: repos (what `evaclip push` uploads for large models) -----------------
    orig_download = factory.download_pretrained_from_hf

    def download_pretrained_from_hf(model_id, filename=None, revision=None, cache_dir=None):
        try:
            return orig_download(model_id, filename=filename, revision=revision, cache_dir=cache_dir)
        except FileNotFoundError:
            if filename is not None:  # a named file (the config): nothing to fall back to
                raise
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(model_id, INDEX_NAME, revision=revision, cache_dir=cache_dir)
            for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
                hf_hub_download(model_id, shard, revision=revision, cache_dir=cache_dir)  # same snapshot folder
            return index

    factory.download_pretrained_from_hf = download_pretrained_from_hf
    _PATCHED = True
