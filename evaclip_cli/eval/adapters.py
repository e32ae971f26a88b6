"""Image sets and video sets as the evaluation loops read them.

An adapter says how to list a set (``len``), read item ``i`` (``dataset()[i]`` -> ``(i, tensor)``, or
``(i, None)`` for an item that cannot be decoded: skipped and counted), batch items (``collate``), make a filler
input of one item (run through the model, never counted, when a rank has no readable item in a step), embed a batch
(images: ``encode_image``; clips: every frame through ``encode_image``, then ``pool_frames``), and what the targets
are: ``label(i)`` for classification, ``captions(order)`` for retrieval. ``name``, ``classnames``, ``templates``
and ``targets`` (integer labels) are what ``prompts.resolve_prompts`` reads. An adapter may also offer
``decoded(order, batch_size, workers)`` (``ImageSet``: decode-ahead workers, ``prefetch.py``), which the loops prefer
to a DataLoader over ``dataset()``.
"""
from __future__ import annotations

from typing import Any, Optional


def collate(batch):
    """``[(i, tensor | None)]`` -> ``(readable indices, stacked tensors | None, unreadable indices)``."""
    from evaclip_cli.data.benchmarks import collate as _collate

    return _collate(batch)


class ImageSet:
    """An indexed image set (``data.benchmarks.EvalSet``) decoded with ``transform`` (open_clip's eval
    preprocessing of the model: ``LoadedClip.transform()``).

    Decode-ahead (``eval/prefetch.py``): ``start_decoding`` may start worker processes on this rank's images before
    the model — and so its transform — is known (the runner predicts the image size from the model's config);
    ``set_transform`` then keeps their results only if the model's transform is open_clip's eval transform at that
    size and the PIL-only path reproduces it bit for bit (``data.benchmarks.check_crop``). ``decoded`` gives the
    loops that pool's batches (starting one if none runs), or None: the loops use a DataLoader over ``dataset()``."""

    kind = "image"
    prefetch = 4
    unreadable = "no readable image"

    def __init__(self, evalset, transform, image_size: int, draft: Optional[int] = None):
        self.evalset, self.transform, self.image_size, self.draft = evalset, transform, image_size, draft
        self.name = evalset.name
        self.classnames, self.templates = evalset.classnames, evalset.templates
        self.folder_names = getattr(evalset, "folder_names", None)
        self.missing = evalset.missing
        self.pool: Any = None  # eval.prefetch.CropPool
        self._fast: Optional[tuple] = None  # (Crop, mean, std) once the transform is recognised and checked
        self._fast_for = None  # the transform _fast was computed for

    # ------------------------------------------------------------------------------------------ decode-ahead
    def start_decoding(self, order: list, batch_size: int, workers: int, size: int) -> None:
        """Decode and crop ``items[i]`` for ``i`` in ``order`` to ``size`` on ``workers`` processes, now."""
        from evaclip_cli.data.benchmarks import Crop
        from evaclip_cli.eval.prefetch import CropPool, available

        self.close()
        if order and size > 0 and available(workers):
            self.pool = CropPool(self.evalset.items, order, batch_size, workers, Crop(size), self.draft)

    def set_transform(self, transform, image_size: int, draft: Optional[int] = None) -> None:
        """The model's preprocessing (and ``--fast-decode``'s draft size); a running pool that does not match it is
        stopped."""
        self.transform, self.image_size, self.draft = transform, image_size, draft
        if self.pool is not None:
            fast = self._recognised()
            if fast is None or fast[0] != self.pool.crop or self.pool.draft != draft:
                self.close()

    def _recognised(self) -> Optional[tuple]:
        from evaclip_cli.data.benchmarks import check_crop, crop_of

        if self._fast_for is not self.transform:
            fast = crop_of(self.transform)
            self._fast = fast if fast is not None and check_crop(self.transform, *fast) else None
            self._fast_for = self.transform
        return self._fast

    def decoded(self, order: list, batch_size: int, workers: int):
        """``(indices, inputs | None, unreadable)`` batches of ``order`` from decode-ahead workers (the running pool
        if it decodes exactly these batches, else a new one), or None when the transform is not open_clip's."""
        from evaclip_cli.eval.prefetch import available

        fast = self._recognised() if self.transform is not None else None
        if fast is None:
            self.close()
            return None
        pool = self.pool
        if pool is None or pool.order != list(order) or pool.batch_size != batch_size or pool.crop != fast[0] \
                or pool.draft != self.draft:
            if not available(workers):
                self.close()
                return None
            self.start_decoding(order, batch_size, workers, fast[0].size)
            pool = self.pool
        return self._from_pool(pool, fast)

    def _from_pool(self, pool, fast):
        from evaclip_cli.data.benchmarks import decode_image, read_bytes, to_float

        _, mean, std = fast
        for j in range(pool.n):
            good, u8, bad, redo = pool.get(j)
            x = to_float(u8, mean, std) if u8 is not None else None
            if redo:  # the model's own transform, merged back in the batch's order
                import torch

                done = dict(zip(good, x)) if x is not None else {}
                for i in redo:
                    try:
                        done[i] = self.transform(decode_image(read_bytes(self.evalset.items[i]), self.draft))
                    except Exception:
                        bad.append(i)
                chunk, unreadable = pool.order[j * pool.batch_size:(j + 1) * pool.batch_size], set(bad)
                good = [i for i in chunk if i in done]
                bad = [i for i in chunk if i in unreadable]
                x = torch.stack([done[i] for i in good]) if good else None
            yield good, x, bad

    def close(self) -> None:
        """Stop decode-ahead workers (idempotent)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

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


# ------------------------------------------------------------------------------------------------ the one builder
#: the tasks ``build_adapter`` knows
TASKS = ("zeroshot", "retrieval", "video_classification", "video_retrieval")


def is_retrieval_manifest(path: Any) -> bool:
    """A ``path,caption`` CSV (no ``label`` column): video-text retrieval rather than classification."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = [h.strip().lower() for h in fh.readline().split(",")]
    return "caption" in header and "label" not in header


def video_task(path: Any) -> str:
    """The task of a video set: ``video_retrieval`` for a ``path,caption`` manifest, else ``video_classification``."""
    return "video_retrieval" if is_retrieval_manifest(path) else "video_classification"


def build_adapter(task: str, path: Any, name: str, *, loaded=None, frames: int = 1, images: Any = None):
    """The adapter over one set for ``task`` (``TASKS``): an image classification set (``zeroshot``, any layout
    ``evaclip eval zeroshot`` reads, its test split), an image-text retrieval set (``retrieval``; ``images``: a
    caption JSON's images folder), or a video set read with ``frames`` frames per clip. Items are read with
    ``loaded``'s preprocessing; a video set may be built before the model loads (``loaded`` None: the clips' size is
    set later with ``set_image_size``)."""
    from pathlib import Path

    if task == "zeroshot":
        from evaclip_cli.data.benchmarks import classification_set

        return ImageSet(classification_set(str(path), split="test", class_key="cls"), loaded.transform(),
                        loaded.image_size, None)
    if task == "retrieval":
        from evaclip_cli.data.benchmarks import retrieval_set

        return ImageSet(retrieval_set(str(path), images=str(images) if images else None), loaded.transform(),
                        loaded.image_size)
    size = loaded.image_size if loaded is not None else 0
    if task == "video_retrieval":
        from evaclip_cli.data.video import load_video_retrieval

        ds, captions, owner = load_video_retrieval(Path(path), frames, size)
        return ClipSet(ds, name, frames, size, captions=captions, owner=owner)
    if task == "video_classification":
        from evaclip_cli.data.video import load_video_classification

        ds, classnames, templates = load_video_classification(Path(path), frames, size)
        return ClipSet(ds, name, frames, size, classnames, templates)
    raise ValueError(f"unknown eval task {task!r} (one of {', '.join(TASKS)})")
