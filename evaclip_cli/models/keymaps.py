"""Checkpoint layouts and key maps, beside the models they load into.

Layouts evaclip reads:

* ``eva``       the reference repo (baaivision/EVA): ``visual.blocks.{i}.attn.qkv.weight``, ``visual.head.weight``,
                ``text.transformer.resblocks...``; B/16 adds ``q_proj/k_proj/v_proj``, ``inner_attn_ln``, SwiGLU
                ``w1/w2/ffn_ln/w3`` and rope buffers (dropped: they are recomputed).
* ``mim``       EVA MIM students/teachers: the vision keys without ``visual.``, plus ``mask_token``, ``lm_head.*``.
* ``open_clip`` evaclip's own: open_clip ``CustomTextCLIP`` with a timm tower (``visual.trunk.*``,
                ``visual.head.proj.*``, ``text.*``, ``logit_scale``).

All are accepted as a plain state dict or wrapped under ``module`` / ``state_dict`` / ``model``, fp16/bf16/fp32,
in ``.pt``/``.pth``/``.bin``/``.safetensors`` (or a sharded ``.safetensors.index.json``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from evaclip_cli.errors import UserError

# vision-tower renames between the reference (left) and timm's Eva (right), per block
_BLOCK_RENAMES = [
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.ffn_ln.", "mlp.norm."),
    ("mlp.w3.", "mlp.fc2."),
]
# buffers the reference saves that evaclip recomputes (rope tables, attention masks, zero k bias)
_DROP = re.compile(r"(^|\.)rope\.|(^|\.)freqs_(cos|sin)$|(^|\.)attn_mask$|\.attn\.k_bias$|relative_position_index$")


# the reference's ``CLIP`` (custom_text false) stores the text tower at the top level
_TOPLEVEL_TEXT = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")





def detect_layout(state: dict) -> str:
    keys = list(state)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if any(k.startswith("visual.blocks.") for k in keys) or any(k.startswith("text.transformer.") for k in keys):
        return "eva"
    if any(k.startswith("blocks.") for k in keys):
        return "mim"
    if any(k.startswith("trunk.blocks.") for k in keys):
        return "open_clip_visual"
    return "unknown"


# ----------------------------------------------------------------------------------------------- key maps
def _vision_eva_to_timm(key: str, separate_qkv: bool) -> str:
    for a, b in _BLOCK_RENAMES:
        key = key.replace(a, b)
    if separate_qkv:  # B/16 style: the biases live in the projections in timm
        key = key.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias")
    return key


def _vision_timm_to_eva(key: str, separate_qkv: bool, swiglu: bool) -> str:
    for a, b in _BLOCK_RENAMES:
        if b == "mlp.fc2." and not swiglu:  # a plain MLP's fc2 keeps its name; only SwiGLU's is 'w3'
            continue
        key = key.replace(b, a)
    if separate_qkv:
        key = key.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias")
    return key


def eva_to_open_clip(state: dict, separate_qkv: bool) -> dict:
    """Reference EVA-CLIP (or MIM, vision only) keys -> evaclip open_clip keys. Unknown keys are an error."""
    out, unknown = {}, []
    for k, v in state.items():
        if _DROP.search(k):
            continue
        if k.startswith("visual."):
            sub = k[len("visual."):]
            if sub.startswith("head."):
                out["visual.head.proj." + sub[len("head."):]] = v
            else:
                out["visual.trunk." + _vision_eva_to_timm(sub, separate_qkv)] = v
        elif k.startswith("text.") or k == "logit_scale":
            out[k] = v
        elif k.startswith(_TOPLEVEL_TEXT):  # the reference's plain CLIP class keeps the text tower at top level
            out["text." + k] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"unexpected keys in an EVA-CLIP checkpoint: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}")
    return out


def mim_to_open_clip_visual(state: dict, separate_qkv: bool) -> tuple[dict, dict]:
    """MIM student/teacher -> (``visual.trunk.*`` keys, MIM-only extras such as ``mask_token``/``lm_head``)."""
    out, extra = {}, {}
    for k, v in state.items():
        if _DROP.search(k):
            continue
        if k.startswith(("mask_token", "lm_head.", "decoder")):
            extra[k] = v
        elif k.startswith("head."):
            extra[k] = v
        else:
            out["visual.trunk." + _vision_eva_to_timm(k, separate_qkv)] = v
    return out, extra


def open_clip_to_eva(state: dict, separate_qkv: bool) -> dict:
    out = {}
    swiglu = any(".mlp.fc1_g." in k for k in state)
    for k, v in state.items():
        if k.startswith("visual.trunk."):
            out["visual." + _vision_timm_to_eva(k[len("visual.trunk."):], separate_qkv, swiglu)] = v
        elif k.startswith("visual.head.proj."):
            out["visual.head." + k[len("visual.head.proj."):]] = v
        elif k.startswith("text.") or k == "logit_scale":
            out[k] = v
        else:
            raise UserError(f"unexpected key '{k}' in an open_clip EVA-CLIP state dict")
    return out


# ------------------------------------------------------------------------------------------ sanity checks
def check_against_model(state: dict, expected: dict, where: str, ignore: Iterable[str] = ()) -> None:
    """Compare a converted state dict with the target model's (meta) state dict: names and shapes."""
    ignore = set(ignore)
    missing = [k for k in expected if k not in state and k not in ignore]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (first: {missing[0]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (first: {extra[0]})")
        raise UserError(f"{where}: checkpoint does not match the model config: {'; '.join(parts)}; "
                        "check --eva-config/--model")
    for k, t in expected.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape) and t.numel() != state[k].numel():
            raise UserError(f"{where}: '{k}' has shape {tuple(state[k].shape)}, the model config expects "
                            f"{tuple(t.shape)}; check --eva-config/--model")


