"""THE classification loop and THE retrieval loop: image and video sets, ``evaclip eval`` and training's periodic
eval all run through these two.

Sharding: rank r takes items ``[r·P, (r+1)·P)`` with ``P = ceil(n / world)`` and every rank runs the same number of
steps, ``ceil(P / batch)``: a rank whose slice is shorter, or whose batch holds no readable item, runs its step on a
filler input whose output is thrown away. A ZeRO-3 model gathers its parameters collectively in every forward, so a
rank that ran fewer forwards would leave the others waiting forever. Filler items are never counted; unreadable
items are skipped and counted. Counts are summed over ranks (classification), embeddings gathered (retrieval).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from evaclip_cli.errors import UserError


@dataclass
class Runtime:
    """Where and how the model runs: ``loaded`` (a ``LoadedClip``), device, this rank and the world size, images per
    forward, DataLoader workers, the input dtype (training: the engine's bf16/fp16 weights take inputs of their
    dtype) and the autocast context (``evaclip eval --precision bf16|fp16``)."""
    loaded: Any
    device: str = "cpu"
    rank: int = 0
    world: int = 1
    batch_size: int = 256
    workers: int = 0
    dtype: Any = None
    autocast: Callable = contextlib.nullcontext


def rank_slice(n: int, rank: int, world: int, batch_size: int) -> tuple[list, int]:
    """(this rank's item indices, steps every rank runs)."""
    per = -(-n // world)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    return idx, -(-per // batch_size)


def open_batches(adapter, rt: Runtime):
    """Start reading this rank's batches now — DataLoader workers, or the adapter's decode-ahead workers
    (``adapter.decoded``: ``ImageSet`` with open_clip's transform), begin decoding at this call — and return the
    iterator of ``(indices, inputs | None, unreadable indices)`` for exactly ``steps`` steps on every rank (empty past
    the end of this rank's slice). The runner opens it before building the text classifier, so images are decoded
    while prompts are encoded."""
    import torch

    idx, steps = rank_slice(len(adapter), rt.rank, rt.world, rt.batch_size)
    loader = None
    if idx and rt.workers and hasattr(adapter, "decoded"):
        loader = adapter.decoded(idx, rt.batch_size, rt.workers)
    if loader is None and not idx:
        loader = iter(())
    elif loader is None:
        from evaclip_cli.eval.adapters import collate

        sub = torch.utils.data.Subset(adapter.dataset(), idx)
        loader = iter(torch.utils.data.DataLoader(
            sub, batch_size=rt.batch_size, shuffle=False, num_workers=rt.workers, collate_fn=collate,
            persistent_workers=False, prefetch_factor=adapter.prefetch if rt.workers else None,
            pin_memory=torch.cuda.is_available() and adapter.kind == "image"))
    return _steps(loader, steps)


def _steps(loader, steps: int):
    for _ in range(steps):
        yield next(loader, ([], None, []))


def batches(adapter, rt: Runtime):
    """``open_batches``, opened when iteration starts."""
    yield from open_batches(adapter, rt)


def _embed(adapter, rt: Runtime, x):
    """Embeddings of a batch; for a step without a readable item, a forward on a filler (output dropped) when other
    ranks run theirs, and None."""
    if x is None:
        if rt.world > 1:
            with rt.autocast():
                adapter.embed(rt.loaded.model, adapter.filler().to(rt.device), rt.dtype)
        return None
    with rt.autocast():
        return adapter.embed(rt.loaded.model, x.to(rt.device, non_blocking=True), rt.dtype).float()


def classify(adapter, W, rt: Runtime, progress: Optional[Callable] = None, source=None) -> dict:
    """Zero-shot classification of ``adapter``'s items with the classifier ``W`` ([D, classes]): ``acc1``,
    ``acc5``, ``mean_per_class_recall``, ``samples`` (items counted, over all ranks), ``skipped`` (unreadable,
    plus those listed without data). ``source``: the batches, if already opened (``open_batches``)."""
    import torch

    from evaclip_cli.eval.metrics import accumulate, all_reduce_state, empty_state, finalize, sum_across

    n_classes = W.shape[1]
    state, skipped = empty_state(n_classes), 0
    with torch.no_grad():
        for idx, x, bad in (batches(adapter, rt) if source is None else source):
            skipped += len(bad)
            emb = _embed(adapter, rt, x)
            if emb is not None:
                logits = 100.0 * emb @ W
                state = accumulate(logits, torch.tensor([adapter.label(i) for i in idx]), n_classes, state)
            if progress:
                progress(len(idx) + len(bad))
    state = all_reduce_state(state)
    res = finalize(state)
    res["skipped"] = sum_across(skipped) + adapter.missing
    listed = {adapter.label(i) for i in range(len(adapter))}
    res["classes_unread"] = sorted(c for c in listed if c < n_classes and state["per_class_n"][c] == 0)
    return res


def require_readable(res: dict, adapter, classnames, what: str = "image") -> None:
    """``evaclip eval``'s rule: a set with nothing readable, or a class whose every item is unreadable, is bad
    input (one line), not an accuracy of 0 on 0 samples."""
    if res["samples"] == 0:
        raise UserError(f"{adapter.name}: none of the {len(adapter)} {what}s could be decoded; check the files "
                        "(`evaclip data inspect` counts them for shards)")
    if res.get("classes_unread"):
        c = res["classes_unread"]
        names = ", ".join(f"'{classnames[i]}'" for i in c[:3]) + (f" and {len(c) - 3} more" if len(c) > 3 else "")
        raise UserError(f"{adapter.name}: no readable {what} in class {names}: every one of its {what}s failed to "
                        "decode; fix or remove those files")


def retrieve(adapter, rt: Runtime, text_batch_size: int, progress: Optional[Callable] = None, source=None) -> dict:
    """Retrieval between ``adapter``'s items and their captions: R@1/5/10 both ways (CLIP_benchmark's names),
    ``samples``, ``captions``, ``skipped``. Item embeddings are gathered from every rank; every rank then encodes
    every caption (the same forwards everywhere). ``source``: the batches, if already opened (``open_batches``)."""
    import torch

    from evaclip_cli.engine.dist import all_gather_object
    from evaclip_cli.eval.metrics import retrieval_metrics
    from evaclip_cli.eval.prompts import encode_texts

    ids, embs, skipped = [], [], 0
    with torch.no_grad():
        for idx, x, bad in (batches(adapter, rt) if source is None else source):
            skipped += len(bad)
            emb = _embed(adapter, rt, x)
            if emb is not None:
                embs.append(emb.cpu())
                ids += idx
            if progress:
                progress(len(idx) + len(bad))
    parts = all_gather_object((ids, torch.cat(embs) if embs else None, skipped))
    order, item_emb = [], []
    for i, e, _ in parts:
        if e is not None:
            order += i
            item_emb.append(e)
    skipped = sum(p[2] for p in parts) + adapter.missing
    if not item_emb:
        raise UserError(f"{adapter.name}: {adapter.unreadable} (none of the {len(adapter)} could be decoded)")
    item_emb = torch.cat(item_emb)
    perm = sorted(range(len(order)), key=order.__getitem__)
    item_emb, order = item_emb[perm], [order[i] for i in perm]
    texts, owner = adapter.captions(order)
    text_emb = encode_texts(rt.loaded, texts, rt.device, text_batch_size, rt.autocast)
    return {"metrics": retrieval_metrics(item_emb, text_emb, owner), "samples": len(order), "captions": len(texts),
            "skipped": skipped}
