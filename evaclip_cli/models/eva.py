"""The EVA-CLIP vision towers as timm ``Eva`` models, registered under evaclip names.

Registered (once timm is imported, see ``evaclip_cli/__init__.py``):

* ``evaclip_18b_patch14_224``  EVA-CLIP-18B tower (RMSNorm, no qkv bias, post-norm)
* ``evaclip_8b_patch14_224``   EVA-CLIP-8B tower (RMSNorm, no qkv bias, pre-norm)
* ``evaclip_vit``              any EVA tower from JSON-serialisable kwargs (``norm="rms"|"layer"`` instead of a
                               callable), used for ``timm_model_kwargs`` in open_clip folders

The 5B (E/14+) and B/16 towers are timm's own ``eva02_enormous_patch14_clip_224`` and
``eva02_base_patch16_clip_224``.
"""
from __future__ import annotations

from functools import partial

from evaclip_cli.models.specs import ARCHS, GENERIC_TIMM_NAME, TIMM_NAMES

_REGISTERED = False


def _norm_layer(name: str):
    from timm.layers import LayerNorm, RmsNorm

    if name == "rms":
        return partial(RmsNorm, eps=1e-6)
    if name == "layer":
        return partial(LayerNorm, eps=1e-6)
    raise ValueError(f"unknown norm '{name}' (rms or layer)")


def _filter_fn(state_dict, model):
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


def create_eva(variant: str, pretrained: bool = False, **kwargs):
    """Build a timm ``Eva`` from evaclip kwargs (``norm`` may be a string), through timm's builder so
    ``timm.create_model("local-dir:DIR", pretrained=True)`` works on folders ``evaclip convert`` writes."""
    from timm.models._builder import build_model_with_cfg
    from timm.models.eva import Eva

    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("global_pool", "token")
    norm = kwargs.pop("norm", None)
    if norm is not None:
        kwargs["norm_layer"] = _norm_layer(norm) if isinstance(norm, str) else norm
    elif isinstance(kwargs.get("norm_layer"), str):
        kwargs["norm_layer"] = _norm_layer(kwargs["norm_layer"])
    if kwargs.get("ref_feat_shape") is not None:
        kwargs["ref_feat_shape"] = tuple(kwargs["ref_feat_shape"])
    kwargs.pop("pretrained_model_args", None)
    return build_model_with_cfg(Eva, variant, pretrained, pretrained_filter_fn=_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)


def _default_cfg(img: int) -> dict:
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return dict(url="", num_classes=0, input_size=(3, img, img), pool_size=None, crop_pct=1.0,
                interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, first_conv="patch_embed.proj",
                classifier="head", license="mit")


def _make_default_cfgs():
    from timm.models._registry import generate_default_cfgs

    cfgs = {f"{TIMM_NAMES[k]}.untrained": _default_cfg(ARCHS[k].vision.image_size) for k in ("18b", "8b")}
    cfgs[f"{GENERIC_TIMM_NAME}.untrained"] = _default_cfg(224)
    return generate_default_cfgs(cfgs)


def _make_constructor(key: str, name: str):
    base = ARCHS[key].vision.timm_kwargs()

    def fn(pretrained: bool = False, **kwargs):
        return create_eva(name, pretrained=pretrained, **{**base, **kwargs})

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = f"EVA-CLIP {key.upper()} vision tower ({ARCHS[key].vision.width}w/{ARCHS[key].vision.depth}d)."
    return fn


def _generic(pretrained: bool = False, **kwargs):
    return create_eva(GENERIC_TIMM_NAME, pretrained=pretrained, **kwargs)


_generic.__name__ = _generic.__qualname__ = GENERIC_TIMM_NAME
_generic.__doc__ = "Any EVA tower from evaclip kwargs (norm='rms'|'layer')."


def register() -> None:
    """Register the evaclip towers with timm (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from timm.models import is_model
    from timm.models._registry import register_model

    global default_cfgs
    default_cfgs = _make_default_cfgs()  # read by register_model from this module

    for key in ("18b", "8b"):
        name = TIMM_NAMES[key]
        if not is_model(name):
            register_model(_make_constructor(key, name))
    if not is_model(GENERIC_TIMM_NAME):
        register_model(_generic)
    _REGISTERED = True
