"""Checkpoint layouts and key maps, beside the models they load into.

Layouts evaclip reads:

* ``eva``       the reference repo (baaivision/EVA): ``visual.blocks.{i}.attn.qkv.weight``, ``visual.head.weight``,
                ``text.transformer.resblocks...``; B/16 adds ``q_proj/k_proj/v_proj``, ``inner_attn_ln``, SwiGLU
                ``w1/w2/ffn_ln/w3`` and rope buffers (dropped: they are recomputed).
* ``mim``       EVA MIM students/teachers: the vision keys without ``visual.``, plus ``mask_token``, ``lm_head.*``.
* ``open_clip`` evaclip's own: open_clip ``CustomTextCLIP`` with a timm tower (``visual.trunk.*``,
                ``visual.head.proj.*``, ``text.*``, ``logit_scale``).
* ``hf``        BAAI's transformers remote-code layout (BAAI/EVA-CLIP-8B, -8B-448, -18B): ``vision_model.*``,
                ``text_model.*``, separate ``q_proj/k_proj/v_proj``, ``visual_projection``/``text_projection`` Linear
                layers, no ``logit_scale`` (:func:`hf_to_open_clip`, :func:`open_clip_to_hf`).

All are accepted as a plain state dict or wrapped under ``module`` / ``state_dict`` / ``model``, fp16/bf16/fp32,
in ``.pt``/``.pth``/``.bin``/``.safetensors`` (or a sharded ``.safetensors.index.json``).
"""
from __future__ import annotations

import re
from typing import Iterable

from evaclip_cli.errors import UserError
from evaclip_cli.models.lazy import LazyCat, LazyChunk, LazyTensor

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
    if any(k.startswith(("vision_model.encoder.", "text_model.encoder.")) for k in keys):
        return "hf"
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


def plain_clip_text(state: dict):
    """The text tower of a plain open_clip ``CLIP`` (OpenAI's, LAION's ViT-*: ``transformer.*``, ``token_embedding``
    at the top level), as ``text.*`` keys of evaclip's tower (the same open_clip TextTransformer); None for any
    other state dict. Its vision tower is open_clip's own ViT, which no evaclip tower takes."""
    if "token_embedding.weight" not in state or not any(k.startswith("transformer.resblocks.") for k in state):
        return None
    return {"text." + k: v for k, v in state.items() if k.startswith(_TOPLEVEL_TEXT)}


def timm_head_to_proj(state: dict) -> dict:
    """open_clip's own EVA02 configs (``timm_proj: null``) keep the CLIP projection in timm's classifier,
    ``visual.trunk.head.*``; evaclip's towers name it ``visual.head.proj.*``. Same Linear, renamed."""
    if "visual.trunk.head.weight" not in state or "visual.head.proj.weight" in state:
        return state
    return {("visual.head.proj." + k[len("visual.trunk.head."):] if k.startswith("visual.trunk.head.") else k): v
            for k, v in state.items()}


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


# ------------------------------------------------------------------------------- BAAI's HF remote-code layout
LN_100 = 4.605170185988092  # ln(100): BAAI's EvaCLIPModel hard-codes logit_scale = 100

# Renames inside one transformer block, HF -> open_clip (the inverse is open_clip -> HF). A name ending in "." is a
# prefix (the rest of the key is kept), any other name is a whole key.
_HF_VISION_BLOCK = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.out_proj.": "attn.proj.",
                    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
_HF_TEXT_BLOCK = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                  "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
# tower -> (HF block prefix, open_clip block prefix, renames)
_HF_TOWERS = {"vision": ("vision_model.encoder.layers.", "visual.trunk.blocks.", _HF_VISION_BLOCK),
              "text": ("text_model.encoder.layers.", "text.transformer.resblocks.", _HF_TEXT_BLOCK)}
_HF_BLOCK_KEY = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_BLOCK_KEY = re.compile(r"^(visual\.trunk\.blocks|text\.transformer\.resblocks)\.(\d+)\.(.+)$")
_OC_TOWER = {"visual.trunk.blocks": "vision", "text.transformer.resblocks": "text"}
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
# open_clip block keys that have no twin in the renames: fused q/k/v, split into HF's three ("{}": q, k, v) ...
_OC_FUSED = {("vision", "attn.qkv.weight"): "self_attn.{}_proj.weight",
             ("text", "attn.in_proj_weight"): "self_attn.{}_proj.weight",
             ("text", "attn.in_proj_bias"): "self_attn.{}_proj.bias"}
# ... and the vision tower's q/v biases and B/16-style separate projections
_OC_VISION_EXTRA = {"attn.q_bias": "self_attn.q_proj.bias", "attn.v_bias": "self_attn.v_proj.bias",
                    "attn.q_proj.": "self_attn.q_proj.", "attn.k_proj.": "self_attn.k_proj.",
                    "attn.v_proj.": "self_attn.v_proj."}


def _t(v):
    return v.t()


# Keys outside the blocks: (HF, open_clip, HF -> open_clip, open_clip -> HF); None keeps the tensor as it is.
# HF's projections are Linear layers: ``text_projection.weight`` [P, H] is open_clip's ``text_projection`` [H, P],
# ``visual_projection.weight`` is already ``visual.head.proj.weight``.
_HF_NAMED = [
    ("visual_projection.weight", "visual.head.proj.weight", None, None),
    ("text_projection.weight", "text.text_projection", _t, _t),
    ("vision_model.embeddings.class_embedding", "visual.trunk.cls_token",
     lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
    ("vision_model.embeddings.patch_embedding.weight", "visual.trunk.patch_embed.proj.weight", None, None),
    ("vision_model.embeddings.patch_embedding.bias", "visual.trunk.patch_embed.proj.bias", None, None),
    ("vision_model.embeddings.position_embedding.weight", "visual.trunk.pos_embed",
     lambda t: t.reshape(1, *t.shape), lambda t: t.reshape(t.shape[-2], t.shape[-1])),
    ("vision_model.post_layernorm.", "visual.trunk.norm.", None, None),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight", None, None),
    ("text_model.embeddings.position_embedding.weight", "text.positional_embedding", None, None),
    ("text_model.final_layer_norm.", "text.ln_final.", None, None),
]


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """``key`` renamed by the first pair that matches it (module comment above: a prefix or a whole key)."""
    for a, b in pairs:
        if key == a or (a.endswith(".") and key.startswith(a)):
            return b + key[len(a):]
    return None


def _named(key: str, v, to_hf: bool) -> tuple[str, object] | None:
    """A key outside the blocks through ``_HF_NAMED``, either way: (new key, tensor) or None."""
    for hf, oc, to_oc_fn, to_hf_fn in _HF_NAMED:
        src, dst, fn = (oc, hf, to_hf_fn) if to_hf else (hf, oc, to_oc_fn)
        new = _rename(key, [(src, dst)])
        if new is not None:
            return new, (fn(v) if fn else v)
    return None


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"


def hf_to_open_clip(state: dict, separate_qkv: bool = False) -> tuple[dict, list[str]]:
    """BAAI's HF remote-code keys -> evaclip's open_clip keys; returns (state, notes for the user).

    * q/k/v: separate Linear layers -> timm's fused ``qkv`` (a :class:`LazyCat`) with ``q_bias``/``v_bias``; open_clip's
      text ``in_proj_weight``/``in_proj_bias``. A missing bias is zero (exact: that is what "no bias" computes).
    * The vision tower's k bias is dropped: it adds q·b_k to every logit of a query, which softmax ignores; timm's
      Eva (like the reference) has none. Non-zero values are reported in the notes.
    * ``class_embedding`` [D] -> ``cls_token`` [1, 1, D]; ``position_embedding.weight`` [N, D] -> ``pos_embed``
      [1, N, D]; ``text_projection.weight`` [P, H] (a Linear) -> open_clip's ``text_projection`` [H, P];
      ``visual_projection.weight`` is already open_clip's ``visual.head.proj.weight``.
    * No ``logit_scale`` in the layout (BAAI's model uses 100): the state gets ln(100), and a note says so.
    """
    out: dict = {}
    unknown: list[str] = []
    qkv: dict = {}  # (tower, block) -> {"q_w": t, "k_b": t, ...}, fused once every key is seen
    for k, v in state.items():
        if k.endswith("position_ids"):  # a buffer older transformers saved; recomputed
            continue
        if k == "logit_scale":
            out[k] = v.reshape(()) if v.numel() == 1 else v
            continue
        got = _hf_block_key(k, v, qkv) or _named(k, v, to_hf=False)
        if got is None:
            unknown.append(k)
        elif got[0]:  # "": a q/k/v projection, kept for the fusing below
            out[got[0]] = got[1]
    if unknown:
        raise UserError(f"unexpected keys in a BAAI HF EVA-CLIP checkpoint: {_listed(unknown)}")
    notes = _fuse_qkv(qkv, separate_qkv, out)
    if "logit_scale" not in out and any(k.startswith("text.") for k in out) and "visual.head.proj.weight" in out:
        import torch

        out["logit_scale"] = torch.tensor(LN_100)
        notes.append("BAAI's HF layout stores no logit_scale (its model hard-codes 100): the converted model gets "
                     f"logit_scale = ln(100) = {LN_100:.4f}")
    return out, notes


def _hf_block_key(k: str, v, qkv: dict) -> tuple[str, object] | None:
    """A key inside an HF block: (open_clip key, tensor); ("", None) for a q/k/v projection (collected in ``qkv``);
    None when it is no block key or has no open_clip name."""
    m = _HF_BLOCK_KEY.match(k)
    if m is None:
        return None
    tower, i, rest = m.group(1), int(m.group(2)), m.group(3)
    pm = _HF_QKV.match(rest)
    if pm:
        qkv.setdefault((tower[0], i), {})[f"{pm.group(1)}_{pm.group(2)[0]}"] = v
        return "", None
    _, oc_prefix, renames = _HF_TOWERS[tower]
    new = _rename(rest, renames.items())
    return None if new is None else (f"{oc_prefix}{i}.{new}", v)


def _fuse_qkv(qkv: dict, separate_qkv: bool, out: dict) -> list[str]:
    """Each block's q/k/v projections into ``out`` (module docstring of :func:`hf_to_open_clip`); returns the notes."""
    import torch

    dropped_k = 0.0
    for (tower, i), p in sorted(qkv.items()):
        if not all(f"{c}_w" in p for c in "qkv"):
            raise UserError(f"BAAI HF checkpoint: layer {i} of the {'vision' if tower == 'v' else 'text'} tower lacks "
                            f"one of q_proj/k_proj/v_proj.weight (has {', '.join(sorted(p))})")
        w = [p["q_w"], p["k_w"], p["v_w"]]
        bias = lambda c: p[f"{c}_b"] if f"{c}_b" in p else torch.zeros(w[0].shape[0], dtype=w[0].dtype)  # noqa: E731
        if tower == "t":
            pre = f"text.transformer.resblocks.{i}.attn."
            out[pre + "in_proj_weight"] = LazyCat(w)
            out[pre + "in_proj_bias"] = LazyCat([bias(c) for c in "qkv"])
            continue
        pre = f"visual.trunk.blocks.{i}.attn."
        if separate_qkv:
            for c in "qkv":
                out[pre + f"{c}_proj.weight"] = p[f"{c}_w"]
        else:
            out[pre + "qkv.weight"] = LazyCat(w)
        if "q_b" in p or "v_b" in p:
            qn, vn = ("q_proj.bias", "v_proj.bias") if separate_qkv else ("q_bias", "v_bias")
            out[pre + qn], out[pre + vn] = bias("q"), bias("v")
        if "k_b" in p:
            dropped_k = max(dropped_k, float(p["k_b"].float().abs().max()))
    if dropped_k > 0:
        return [f"dropped the vision tower's k_proj biases (max |b| {dropped_k:.3g}): a key bias adds the same "
                "q·b to every logit of a query, which softmax ignores, and timm's Eva has none"]
    return []


def _split3(v) -> list:
    """q, k, v of a fused weight or bias: views of it, or the parts of a :class:`LazyCat` (nothing copied)."""
    if isinstance(v, LazyCat) and v.dim == 0 and len(v.parts) == 3:
        return list(v.parts)
    if isinstance(v, LazyTensor):  # e.g. gathered from ZeRO partitions: each part copied out when written
        return [LazyChunk(v, 3, i) for i in range(3)]
    return list(v.chunk(3, 0))


def open_clip_to_hf(state: dict) -> tuple[dict, list[str]]:
    """evaclip's open_clip keys -> BAAI's HF remote-code keys (the inverse of :func:`hf_to_open_clip`, views where
    possible: q/k/v are slices of the fused weights). Returns (state, notes)."""
    notes: list[str] = []
    out: dict = {}
    unknown: list[str] = []
    for k, v in state.items():
        if k == "logit_scale":
            if abs(float(v.float().reshape(-1)[0]) - LN_100) > 1e-4:
                notes.append(f"BAAI's HF layout has no logit_scale (its model uses 100); this model's learned "
                             f"{float(v.float().reshape(-1)[0].exp()):.2f} is not written")
            continue
        if k == "visual.head.proj.bias":
            if float(v.float().abs().max()) > 0:
                raise UserError("the vision projection has a bias, which BAAI's HF layout (visual_projection, no "
                                "bias) cannot hold; this model cannot be written with --to hf")
            continue
        got = _oc_block_key(k, v)
        if got is None:
            named = _named(k, v, to_hf=True)
            got = None if named is None else [named]
        if got is None:
            unknown.append(k)
        else:
            out.update(got)
    if unknown:
        raise UserError(f"BAAI's HF layout has no place for: {_listed(unknown)}; this model cannot be written with "
                        "--to hf")
    # BAAI's own order: text tower, vision tower, projections
    order = {"text_model.": 0, "vision_model.": 1}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0].split(".")[0] + ".", 2))), notes


def _oc_block_key(k: str, v) -> list[tuple[str, object]] | None:
    """A key inside an open_clip block: its HF (key, tensor) pairs (three for a fused q/k/v); None when it is no
    block key or HF has no place for it."""
    m = _OC_BLOCK_KEY.match(k)
    if m is None:
        return None
    tower, i, rest = _OC_TOWER[m.group(1)], m.group(2), m.group(3)
    hf_prefix, _, renames = _HF_TOWERS[tower]
    pre = f"{hf_prefix}{i}."
    fused = _OC_FUSED.get((tower, rest))
    if fused is not None:
        return [(pre + fused.format(c), part) for c, part in zip("qkv", _split3(v))]
    pairs = [(b, a) for a, b in renames.items()] + (list(_OC_VISION_EXTRA.items()) if tower == "vision" else [])
    new = _rename(rest, pairs)
    return None if new is None else [(pre + new, v)]
