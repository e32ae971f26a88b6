"""Assemble an EVA-CLIP as open_clip's ``CustomTextCLIP`` (timm vision tower + open_clip text tower)."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

from evaclip_cli.models.specs import ClipSpec, open_clip_model_cfg


def _imports():
    # open_clip/timm/torchvision are imported before any zero.Init context (DeepSpeed trap: dynamo import inside it)
    import open_clip  # noqa: F401
    import timm  # noqa: F401
    import torch

    from evaclip_cli.models.openclip_compat import integrate

    integrate()  # the towers are timm models, open_clip honours timm_model_kwargs (the console script defers it)
    return torch


def _engine_clip_class():
    from open_clip.model import CustomTextCLIP
    from torch import nn

    class EngineCLIP(CustomTextCLIP):
        """open_clip's CustomTextCLIP with ``logit_scale`` of shape [1]: DeepSpeed cannot partition or flatten
        0-dim parameters. State-dict keys are unchanged; exports reshape it back to []."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scale = self.logit_scale  # type: ignore[has-type]  # open_clip's attribute (open_clip is not type-checked)
            self.logit_scale = nn.Parameter(scale.detach().reshape(1).clone())

    return EngineCLIP


def build_clip(spec: ClipSpec, device: str = "cpu", zero_init: Optional[dict] = None, grad_checkpointing=False,
               engine: bool = False):
    """Build the CLIP for ``spec``.

    ``device="meta"`` builds without allocating (parameter counts, estimates). ``zero_init`` (a DeepSpeed config
    dict) builds under ``deepspeed.zero.Init`` so each rank only ever holds its partition. ``engine=True`` gives
    the training variant (``logit_scale`` shaped [1]).
    """
    torch = _imports()
    from open_clip.model import CustomTextCLIP

    cls = _engine_clip_class() if engine or zero_init is not None else CustomTextCLIP

    cfg = open_clip_model_cfg(spec)
    cfg.pop("custom_text")
    if zero_init is not None:
        import deepspeed

        ctx = deepspeed.zero.Init(config_dict_or_path=zero_init)
    elif device == "meta":
        ctx = torch.device("meta")
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        model = cls(**cfg)
    if device not in ("meta", "cpu") and zero_init is None:
        model = model.to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def count_params(model) -> int:
    """Parameters, counting ZeRO-3 partitioned ones by their full size."""
    total = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", None) or p.numel()
    return total


def tower_params(model) -> dict:
    vision = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.visual.parameters())
    text = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.text.parameters())
    total = count_params(model)
    return {"vision": vision, "text": text, "other": total - vision - text, "total": total}


def torch_dtype(precision: str):
    """The torch dtype of a recipe's or command's precision ("bf16", "fp16", "fp32")."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resample_pos_embed(pos_embed, new_grid: int, num_prefix_tokens: int = 1):
    """A ViT position embedding [1, prefix + g*g, C] on a new grid (CLIPA fine-tuning, 336/448 variants): timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased when shrinking; prefix tokens kept), after checking that the
    embedding is a square grid."""
    from timm.layers import resample_abs_pos_embed

    n = pos_embed.shape[1] - num_prefix_tokens
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position embedding has {n} patch tokens, not a square grid")
    if old == new_grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], [old, old], num_prefix_tokens=num_prefix_tokens,
                                  interpolation="bicubic", antialias=old > new_grid)


def build_visual(spec: ClipSpec):
    """The vision tower alone (open_clip TimmModel: ``trunk`` + ``head.proj``), e.g. a frozen MIM teacher."""
    _imports()
    import open_clip.model as oc_model

    cfg = open_clip_model_cfg(spec)
    return oc_model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])


def lock_towers(model, lock) -> dict:
    """Freeze towers as open_clip_train's ``--lock-image*`` / ``--lock-text*`` do, through open_clip's own
    ``lock_image_tower`` / ``lock_text_tower`` (``lock`` is the recipe's ``model.lock``): frozen parameters have
    ``requires_grad`` False, so the engine gives them no gradients and no optimizer state. ``text_freeze_layer_norm``
    false leaves the LayerNorms of the frozen text layers trained (open_clip asserts it true). Works on ZeRO-3
    partitioned models (names and flags only). Returns {"frozen": n, "trained": n} parameters (full sizes)."""
    import warnings

    from torch import nn

    if lock.image:
        with warnings.catch_warnings():  # open_clip imports timm.models.helpers (deprecated) for a partial lock
            warnings.simplefilter("ignore", FutureWarning)
            model.lock_image_tower(unlocked_groups=lock.image_unlocked_groups,
                                   freeze_bn_stats=lock.image_freeze_bn_stats)
    if lock.text:
        model.lock_text_tower(unlocked_layers=lock.text_unlocked_layers, freeze_layer_norm=True)
        if not lock.text_freeze_layer_norm:
            for m in model.text.modules():
                if isinstance(m, nn.LayerNorm):
                    for p in m.parameters():
                        p.requires_grad = True
    frozen = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if not p.requires_grad)
    return {"frozen": frozen, "trained": count_params(model) - frozen}

