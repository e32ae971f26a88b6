"""Image sets and video sets as the evaluation loops read them.

An adapter says how to list a set (``len``), read item ``i`` (``dataset()[i]`` -> ``(i, tensor)``, or
``(i, None)`` for an item that cannot be decoded: skipped and counted), batch items (``collate``), make a filler
input of one item (run through the model, never counted, when a rank has no readable item in a step), embed a batch
(images: ``encode_image``; clips: every frame through ``encode_image``, then ``pool_frames``), and what the targets
are: ``label(i)`` for classification, ``captions(order)`` for retrieval. ``name``, ``classnames``, ``templates``
and ``targets`` (integer labels) are what ``prompts.resolve_prompts`` reads.
"""
from __future__ import annotations

from typing import Optional


def collate(batch):
    """``[(i, tensor | None)]`` -> ``(readable indices, stacked tensors | None, unreadable indices)``."""
    from evaclip_cli.data.benchmarks import collate as _collate

    return _collate(batch)


class ImageSet:
    """An indexed image set (``data.benchmarks.EvalSet``) decoded with ``transform`` (open_clip's eval
    preprocessing of the model: ``LoadedClip.transform()``)."""

    kind = "image"
    prefetch = 4
    unreadable = "no readable image"

    def __init__(self, evalset, transform, image_size: int, draft: Optional[int] = None):
        self.evalset, self.transform, self.image_size, self.draft = evalset, transform, image_size, draft
        self.name = evalset.name
        self.classnames, self.templates = evalset.classnames, evalset.templates
        self.missing = evalset.missing

    @property
    def targets(self):
        return self.evalset.targets

    def __len__(self):
        return len(self.evalset.items)

    def dataset(self):
        from evaclip_cli.data.benchmarks import ImageDataset

        return ImageDataset(self.evalset.items, self.transform, draft=self.draft)

    def label(self, i: int) -> int:
        return self.evalset.targets[i]

    def filler(self):
        import torch

        return torch.zeros(1, 3, self.image_size, self.image_size)

    @staticmethod
    def embed(model, x, dtype=None):
        """[B, 3, S, S] -> [B, D] L2-normalised float32 image embeddings."""
        import torch.nn.functional as F

        if dtype is not None:
            x = x.to(dtype)
        return F.normalize(model.encode_image(x).float(), dim=-1)

    def captions(self, order: list):
        """(captions, owner position) of the images in ``order``; an unreadable image's captions go with it."""
        texts, owner = [], []
        for pos, i in enumerate(order):
            for c in self.evalset.targets[i]:
                texts.append(c)
                owner.append(pos)
        return texts, owner


class _IndexedClips:
    """``ClipDataset`` as ``(i, clip)`` / ``(i, None)`` items (a module-level class: DataLoader workers pickle it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return i, (None if item is None else item[0])


class ClipSet:
    """A video set (``data.video.ClipDataset``: ``frames`` segment centres, or the middle frame, per clip), with
    captions for retrieval (``captions[k]`` belongs to clip ``owner[k]``)."""

    kind = "video"
    prefetch = 2
    unreadable = "no readable video"

    def __init__(self, ds, name: str, frames: int, image_size: int, classnames=None, templates=None,
                 captions: Optional[list] = None, owner: Optional[list] = None):
        self.ds, self.name, self.frames, self.image_size = ds, name, frames, image_size
        self.classnames, self.templates = classnames, templates
        self._captions, self._owner = captions or [], owner or []
        self.missing = getattr(ds, "missing", 0)

    @property
    def targets(self):
        return [lab for _, lab in self.ds.items]

    def set_image_size(self, size: int) -> None:
        """The model's input size (a set can be listed, and its prompts checked, before the model loads)."""
        self.image_size = self.ds.image_size = size

    def __len__(self):
        return len(self.ds)

    def dataset(self):
        return _IndexedClips(self.ds)

    def label(self, i: int) -> int:
        return self.ds.items[i][1]

    def filler(self):
        import torch

        return torch.zeros(1, self.frames, 3, self.image_size, self.image_size)

    @staticmethod
    def embed(model, x, dtype=None):
        """[B, T, 3, S, S] -> [B, D]: the mean of each clip's normalised frame embeddings, renormalised."""
        from evaclip_cli.models.pooling import encode_clips

        return encode_clips(model, x, dtype)

    def captions(self, order: list):
        pos = {v: p for p, v in enumerate(order)}
        kept = [(c, pos[o]) for c, o in zip(self._captions, self._owner) if o in pos]
        return [c for c, _ in kept], [p for _, p in kept]
