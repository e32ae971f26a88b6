"""Warmup + cosine (or linear / constant) learning-rate factor, applied per group as base_lr * lr_scale * factor."""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Factor for optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule kind {kind!r}")


def apply(param_groups, step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    f = lr_factor(step, total, warmup, kind, min_ratio)
    for g in param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * g.get("lr_scale", 1.0) * f
    return f
