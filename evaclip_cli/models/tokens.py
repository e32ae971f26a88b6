"""CLIPA-v2 image token reduction inside the vision tower: keep a subset of patch tokens while training.

``TokenReducer`` takes the place of timm's ``patch_drop`` in an ``Eva`` tower (same contract: returns the kept
tokens and their indices, so rope follows), with three layouts:

* ``random``  a random subset per image (CLIPA's best masking; timm's patch dropout)
* ``grid``    a regular sub-grid with a random offset (one token per s×s cell first), topped up at random
* ``block``   one random contiguous rectangle of patches

It is a no-op in eval mode. Its randomness comes from a generator the trainer reseeds every micro step from
(seed, step, rank), so a resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TokenReducer(nn.Module):
    def __init__(self, method: str, keep_ratio: float, grid: int, num_prefix_tokens: int = 1):
        super().__init__()
        if method not in ("random", "grid", "block"):
            raise ValueError(f"unknown token reduction {method!r}")
        self.method, self.keep_ratio, self.grid = method, float(keep_ratio), int(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.generator = torch.Generator()
        self.generator.manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed) % (2**63 - 1))

    def num_keep(self, n: int) -> int:
        return max(1, int(n * self.keep_ratio))

    def _indices(self, batch: int, n: int) -> torch.Tensor:
        keep = self.num_keep(n)
        g = self.generator
        if self.method == "random":
            return torch.argsort(torch.rand(batch, n, generator=g), dim=1)[:, :keep]
        side = self.grid
        rows = torch.arange(n) // side
        cols = torch.arange(n) % side
        out = []
        for _ in range(batch):
            if self.method == "grid":
                s = max(1, round(1 / math.sqrt(self.keep_ratio)))
                oy, ox = torch.randint(0, s, (2,), generator=g).tolist()
                on_grid = ((rows + oy) % s == 0) & ((cols + ox) % s == 0)
                prio = (~on_grid).float() + torch.rand(n, generator=g) * 0.5
            else:  # block: a rectangle of about `keep` patches, then topped up from its neighbourhood
                h = max(1, min(side, round(math.sqrt(keep))))
                w = max(1, min(side, math.ceil(keep / h)))
                y0 = int(torch.randint(0, side - h + 1, (1,), generator=g))
                x0 = int(torch.randint(0, side - w + 1, (1,), generator=g))
                inside = (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w)
                cy, cx = y0 + (h - 1) / 2, x0 + (w - 1) / 2
                dist = (rows - cy).abs() + (cols - cx).abs()
                prio = (~inside).float() * 1e3 + dist + (rows * side + cols) * 1e-6
            out.append(torch.argsort(prio)[:keep])
        return torch.stack(out)

    def forward(self, x: torch.Tensor):
        if not self.training or self.keep_ratio >= 1.0:
            return x, None
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        idx = self._indices(x.shape[0], patches.shape[1]).sort(dim=1).values.to(x.device)
        kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1), idx


def install(tower, method: str, keep_ratio: float) -> TokenReducer:
    """Put a TokenReducer into a timm Eva trunk (``tower.patch_drop``)."""
    grid = tower.patch_embed.grid_size[0]
    reducer = TokenReducer(method, keep_ratio, grid, num_prefix_tokens=getattr(tower, "num_prefix_tokens", 1))
    tower.patch_drop = reducer
    return reducer
