"""Parameter groups as in the EVA-CLIP trainer: per-tower lr and weight decay, layer-wise lr decay, no-decay set.

Layer ids: 0 for the embeddings (patch/pos/cls, token/positional), i+1 for block i, L+1 for everything after the
blocks (final norm, head/projection). A group's ``lr_scale`` = decay ** (L + 1 - id); the schedule multiplies the
tower's base lr by it. No weight decay for 1-D tensors, biases, pos_embed, cls_token, mask_token, logit_scale and the
text positional embedding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "logit_scale", "positional_embedding", "reg_token")


@dataclass
class TowerCfg:
    lr: float
    weight_decay: float
    layer_decay: float
    num_layers: int


def clip_layer_id(name: str, vision_depth: int, text_layers: int) -> tuple[str, int]:
    """(tower, layer id) for a parameter of evaclip's open_clip CLIP (or a bare tower: ``trunk.*``)."""
    n = name.removeprefix("module.")
    if n.startswith(("visual.", "trunk.", "blocks.", "patch_embed", "cls_token", "pos_embed", "mask_token",
                     "lm_head", "norm.", "head")):
        n = n.removeprefix("visual.").removeprefix("trunk.")
        if n.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "reg_token")):
            return "vision", 0
        m = re.match(r"(?:trunk\.)?blocks\.(\d+)\.", n)
        if m:
            return "vision", int(m.group(1)) + 1
        return "vision", vision_depth + 1
    if n.startswith("text."):
        t = n.removeprefix("text.")
        if t.startswith(("token_embedding", "positional_embedding")):
            return "text", 0
        m = re.match(r"transformer\.resblocks\.(\d+)\.", t)
        if m:
            return "text", int(m.group(1)) + 1
        return "text", text_layers + 1
    return "vision", vision_depth + 1  # logit_scale and anything shared: top of the vision tower


def no_weight_decay(name: str, param) -> bool:
    """1-D tensors (norms, biases), embeddings by name: no weight decay. The rank is the parameter's full shape: under
    ZeRO-3's zero.Init every parameter is already a 1-D partition (``ds_shape`` holds the real one)."""
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)


def build_param_groups(named_params, towers: dict[str, TowerCfg], layer_id: Callable[[str], tuple[str, int]],
                       frozen: Optional[Callable[[str], bool]] = None) -> list[dict]:
    """Group parameters by (tower, layer, decay/no-decay). Each group carries ``lr``, ``weight_decay``,
    ``lr_scale``, ``base_lr`` and a readable ``name``; frozen parameters (requires_grad False) are left out."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        if not p.requires_grad or (frozen is not None and frozen(name)):
            continue
        tower, lid = layer_id(name)
        cfg = towers[tower]
        nd = no_weight_decay(name, p)
        key = (tower, lid, nd)
        if key not in groups:
            scale = cfg.layer_decay ** (cfg.num_layers + 1 - lid)
            groups[key] = {
                "params": [],
                "name": f"{tower}.layer{lid}.{'no_decay' if nd else 'decay'}",
                "weight_decay": 0.0 if nd else cfg.weight_decay,
                "lr_scale": scale,
                "base_lr": cfg.lr,
                "lr": cfg.lr * scale,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]
