"""Tensors computed only when a writer or a model asks for them.

A conversion of an 18B checkpoint must not hold the model twice. Where a value is derived from the source (BAAI's
separate q/k/v fused into timm's ``qkv``; a parameter gathered from the ZeRO partitions of every rank; one third of
a fused ``qkv``), the state dict holds a :class:`LazyTensor` instead, and the writers
(``checkpoints.io.write_safetensors``) and loaders (``checkpoints.load``) materialise one at a time, so the memory a
conversion needs is one tensor, not the model.

A lazy tensor quacks like the tensor methods the conversion path uses: ``shape``, ``dtype``, ``numel``,
``element_size``, ``is_floating_point``, ``reshape``, ``t``, ``to``, ``contiguous``, ``float``, ``detach``.
"""
from __future__ import annotations

from typing import Any


class LazyTensor:
    """Base: a subclass sets ``shape`` (a ``torch.Size``) and ``dtype`` and implements :meth:`materialize`."""

    shape: Any
    dtype: Any

    def materialize(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def numel(self) -> int:
        return int(self.shape.numel())

    def element_size(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    def is_floating_point(self) -> bool:
        return bool(self.dtype.is_floating_point)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape):
        import torch

        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if shape == tuple(self.shape):
            return self
        if torch.Size(shape).numel() == self.numel():  # e.g. logit_scale [1] -> []: stays lazy
            return LazyReshape(self, shape)
        return self.materialize().reshape(shape)  # let torch say what is wrong

    def t(self):
        return LazyTranspose(self)

    def to(self, *args, **kwargs):
        return self.materialize().to(*args, **kwargs)

    def contiguous(self):
        return self.materialize()

    def float(self):
        return self.materialize().float()

    def detach(self):
        return self.materialize()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


class LazyCat(LazyTensor):
    """``torch.cat(parts, dim)``: fusing BAAI's separate q/k/v projections into timm's ``qkv`` would otherwise copy
    every attention weight of the checkpoint at once (18B: 48 x 315 MB)."""

    def __init__(self, parts: list, dim: int = 0):
        import torch

        self.parts, self.dim = list(parts), dim
        shape = list(parts[0].shape)
        shape[dim] = sum(int(p.shape[dim]) for p in parts)
        self.shape = torch.Size(shape)
        self.dtype = parts[0].dtype

    def materialize(self):
        import torch

        return torch.cat([materialize(p).to(self.dtype) for p in self.parts], self.dim)


class LazyReshape(LazyTensor):
    """Another lazy tensor with the same elements in another shape."""

    def __init__(self, base: LazyTensor, shape):
        import torch

        self.base, self.shape, self.dtype = base, torch.Size(shape), base.dtype

    def materialize(self):
        return self.base.materialize().reshape(self.shape)


class LazyTranspose(LazyTensor):
    """``base.t()`` of a 2-D lazy tensor, made contiguous when materialised (a writer needs the bytes in order)."""

    def __init__(self, base: LazyTensor):
        import torch

        if len(base.shape) != 2:
            raise ValueError(f"t() expects a 2-D tensor, got shape {tuple(base.shape)}")
        self.base, self.shape, self.dtype = base, torch.Size([base.shape[1], base.shape[0]]), base.dtype

    def materialize(self):
        return self.base.materialize().t().contiguous()


class LazyChunk(LazyTensor):
    """``base.chunk(chunks, 0)[index]`` of a lazy tensor, copied out on its own: splitting a gathered ``qkv`` into
    q, k and v keeps one of them in memory at a time, not the fused tensor for as long as any part is unwritten."""

    def __init__(self, base: LazyTensor, chunks: int, index: int):
        import torch

        n = int(base.shape[0])
        if n % chunks:
            raise ValueError(f"cannot split {n} rows into {chunks} equal chunks")
        self.base, self.index, self.rows = base, index, n // chunks
        self.shape = torch.Size([self.rows, *base.shape[1:]])
        self.dtype = base.dtype

    def materialize(self):
        return self.base.materialize().narrow(0, self.index * self.rows, self.rows).clone()


def materialize(t):
    """A real tensor for ``t`` (a tensor or a :class:`LazyTensor`)."""
    return t.materialize() if isinstance(t, LazyTensor) else t


def materialize_state(state: dict) -> dict:
    return {k: materialize(v) for k, v in state.items()}
