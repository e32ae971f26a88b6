"""Optimizers: LAMB (the 18B optimizer; ZeRO-aware, per-tensor trust ratios) and AdamW."""
from __future__ import annotations


def build_optimizer(param_groups: list[dict], cfg):
    """``cfg`` is a recipe's ``optimizer`` section. The groups carry lr / weight_decay / lr_scale / base_lr."""
    import torch

    betas = tuple(cfg.betas)
    if cfg.name == "lamb":
        from evaclip_cli.engine.lamb import Lamb

        return Lamb(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        # the fused kernel (CPU and CUDA in torch >= 2.4) instead of the per-tensor loop torch picks for CPU
        try:
            return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def attach(optimizer, engine) -> None:
    """Let the ZeRO-aware LAMB learn how DeepSpeed partitioned the parameters (no-op for other optimizers)."""
    from evaclip_cli.engine.lamb import Lamb, attach_to_engine

    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrappers keep the client one inside
    if isinstance(inner, Lamb):
        attach_to_engine(engine, inner)
