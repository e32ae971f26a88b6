"""The EVA-CLIP vision towers as timm ``Eva`` models, registered with timm's public API as timm's own ``eva.py`` does.

Importing this module registers (``@register_model``, cfgs from ``generate_default_cfgs``):

* ``evaclip_18b_patch14_224``  EVA-CLIP-18B tower (RMSNorm, no qkv bias, post-norm)
* ``evaclip_8b_patch14_224``   EVA-CLIP-8B tower (RMSNorm, no qkv bias, pre-norm)
* ``evaclip_vit``              any EVA tower from JSON-serialisable kwargs (``norm="rms"|"layer"`` instead of a
                               callable), used for ``timm_model_kwargs`` in open_clip folders

The 5B (E/14+) and B/16 towers are timm's own ``eva02_enormous_patch14_clip_224`` and
``eva02_base_patch16_clip_224``. The constructors differ only in kwargs, read from ``specs.ARCHS`` (the one
description of each model). Nothing imports this module but ``openclip_compat.integrate()``: it imports timm.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import LayerNorm, RmsNorm
from timm.models import Eva, build_model_with_cfg, generate_default_cfgs, register_model

from evaclip_cli.models.specs import ARCHS


def _norm_layer(name: str, eps: float = 1e-6):
    if name == "rms":
        return partial(RmsNorm, eps=eps)
    if name == "layer":
        return partial(LayerNorm, eps=eps)
    raise ValueError(f"unknown norm '{name}' (rms or layer)")


def checkpoint_filter_fn(state_dict: dict, model: Eva) -> dict:
    """timm ``pretrained_filter_fn``: accept reference EVA / MIM / open_clip layouts for the tower."""
    from evaclip_cli.models.keymaps import detect_layout, eva_to_open_clip, mim_to_open_clip_visual

    separate = not getattr(model.blocks[0].attn, "fused_attn", True) or hasattr(model.blocks[0].attn, "q_proj")
    layout = detect_layout(state_dict)
    if layout == "mim":
        state_dict, _ = mim_to_open_clip_visual(state_dict, separate)
    elif layout == "eva":
        state_dict = eva_to_open_clip({k: v for k, v in state_dict.items() if k.startswith("visual.")}, separate)
    prefix = "visual.trunk."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _create_eva(variant: str, pretrained: bool = False, **kwargs: Any) -> Eva:
    """Build a timm ``Eva`` from evaclip kwargs (``norm`` may be a string) through timm's builder, so
    ``timm.create_model("local-dir:DIR", pretrained=True)`` works on the folders ``evaclip convert`` writes."""
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("global_pool", "token")
    norm = kwargs.pop("norm", None)
    eps = float(kwargs.pop("norm_eps", 1e-6))  # BAAI's HF configs carry their own layer_norm_eps
    if norm is not None:
        kwargs["norm_layer"] = _norm_layer(norm, eps) if isinstance(norm, str) else norm
    elif isinstance(kwargs.get("norm_layer"), str):
        kwargs["norm_layer"] = _norm_layer(kwargs["norm_layer"], eps)
    if kwargs.get("ref_feat_shape") is not None:
        kwargs["ref_feat_shape"] = tuple(kwargs["ref_feat_shape"])
    kwargs.pop("pretrained_model_args", None)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(Eva, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(img_size: int = 224, **kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 0, "input_size": (3, img_size, img_size), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "evaclip_18b_patch14_224.untrained": _cfg(ARCHS["18b"].vision.image_size),
    "evaclip_8b_patch14_224.untrained": _cfg(ARCHS["8b"].vision.image_size),
    "evaclip_vit.untrained": _cfg(224),
})


@register_model
def evaclip_18b_patch14_224(pretrained: bool = False, **kwargs: Any) -> Eva:
    """EVA-CLIP-18B vision tower: 5120 wide, 48 deep, 40 heads, MLP 25600, RMSNorm, no qkv bias, post-norm."""
    model_args = ARCHS["18b"].vision.timm_kwargs()
    return _create_eva("evaclip_18b_patch14_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evaclip_8b_patch14_224(pretrained: bool = False, **kwargs: Any) -> Eva:
    """EVA-CLIP-8B vision tower: 4096 wide, 32 deep, 32 heads, MLP 20480, RMSNorm, no qkv bias, pre-norm."""
    model_args = ARCHS["8b"].vision.timm_kwargs()
    return _create_eva("evaclip_8b_patch14_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evaclip_vit(pretrained: bool = False, **kwargs: Any) -> Eva:
    """Any EVA tower from JSON-serialisable kwargs (``norm='rms'|'layer'``): the ``timm_model_kwargs`` of a folder."""
    return _create_eva("evaclip_vit", pretrained=pretrained, **kwargs)
