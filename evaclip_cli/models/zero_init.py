"""Re-apply weight init to a CLIP built under ``deepspeed.zero.Init``.

Under zero.Init every module is partitioned as soon as its own ``__init__`` returns, so init that a parent applies
to its children afterwards (timm ``Eva.init_weights``, open_clip ``TextTransformer.init_parameters``) writes into
empty partitions and is lost: children keep PyTorch's defaults (e.g. token_embedding std 1.0 instead of 0.02).
Here the same distributions are applied module by module under ``GatheredParameters(modifier_rank=0)``, so at most
one block is ever gathered. The formulas follow timm's Eva and open_clip's text tower.
"""
from __future__ import annotations

import math


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if p is not None], modifier_rank=0)


def reinit_zero3(model, is_main: bool) -> None:
    import torch
    from torch import nn
    from torch.nn.init import trunc_normal_

    gen = torch.Generator().manual_seed(0)  # rank 0 writes; the draw only needs to be reproducible

    def tn(t, std):
        if is_main:
            with torch.no_grad():
                tmp = torch.empty(t.shape, dtype=torch.float32)
                trunc_normal_(tmp, std=std, generator=gen)
                t.copy_(tmp.to(t.dtype))

    def normal(t, std):
        if is_main:
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=gen).mul_(std).to(t.dtype))

    def zero(t):
        if is_main and t is not None:
            with torch.no_grad():
                t.zero_()

    # ---- vision: timm Eva (trunc_normal .02 for Linear weights and pos/cls, zero biases, depth rescale) ----------
    trunk = model.visual.trunk
    with _gathered([trunk.pos_embed, getattr(trunk, "cls_token", None)]):
        if trunk.pos_embed is not None:
            tn(trunk.pos_embed, 0.02)
        if getattr(trunk, "cls_token", None) is not None:
            tn(trunk.cls_token, 0.02)
    for layer_id, block in enumerate(trunk.blocks, start=1):
        with _gathered(list(block.parameters())):
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    tn(m.weight, 0.02)
                    zero(m.bias)
            rescale = 1.0 / math.sqrt(2.0 * layer_id)
            if is_main:
                with torch.no_grad():
                    block.attn.proj.weight.mul_(rescale)
                    block.mlp.fc2.weight.mul_(rescale)
    # (the projection head, open_clip's nn.Linear, keeps its own __init__'s init, which zero.Init preserves)

    # ---- text: open_clip TextTransformer.init_parameters ------------------------------------------------------
    text = model.text
    width, layers = text.transformer.width, text.transformer.layers
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    with _gathered([text.token_embedding.weight, text.positional_embedding]):
        normal(text.token_embedding.weight, 0.02)
        normal(text.positional_embedding, 0.01)
    for block in text.transformer.resblocks:
        with _gathered(list(block.parameters())):
            normal(block.attn.in_proj_weight, attn_std)
            normal(block.attn.out_proj.weight, proj_std)
            normal(block.mlp.c_fc.weight, fc_std)
            normal(block.mlp.c_proj.weight, proj_std)
    if isinstance(text.text_projection, nn.Parameter):
        with _gathered([text.text_projection]):
            normal(text.text_projection, width ** -0.5)
