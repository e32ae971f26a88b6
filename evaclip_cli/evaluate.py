"""Zero-shot evaluation core (CLIP_benchmark's protocol), shared by ``train``'s periodic eval and ``evaclip eval``.

Class embedding = mean of the L2-normalised template embeddings, renormalised; logits = 100 · img · W.
Metrics: top-1, top-5 and mean per-class recall, under CLIP_benchmark's names (``acc1``, ``acc5``,
``mean_per_class_recall``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def zeroshot_classifier(encode_text: Callable, tokenizer: Callable, classnames: Sequence[str],
                        templates: Sequence[str], device, batch_size: int = 256):
    """[embed_dim, n_classes] matrix of class embeddings."""
    import torch
    import torch.nn.functional as F

    texts, owners = [], []
    for i, c in enumerate(classnames):
        for t in templates:
            texts.append(t.format(c=c) if "{c}" in t else t.format(c))
            owners.append(i)
    feats = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            tok = tokenizer(texts[s:s + batch_size]).to(device)
            feats.append(F.normalize(encode_text(tok).float(), dim=-1))
    feats = torch.cat(feats)
    owners_t = torch.tensor(owners, device=feats.device)
    W = torch.zeros(len(classnames), feats.shape[1], device=feats.device)
    W.index_add_(0, owners_t, feats)
    W = F.normalize(W / torch.bincount(owners_t, minlength=len(classnames)).unsqueeze(1), dim=-1)
    return W.t()


def accumulate(logits, labels, n_classes: int, state: Optional[dict] = None) -> dict:
    """Running counts for top-1/top-5 and per-class recall."""
    import torch

    if state is None:
        state = {"n": 0, "top1": 0, "top5": 0, "per_class_hit": torch.zeros(n_classes, dtype=torch.float64),
                 "per_class_n": torch.zeros(n_classes, dtype=torch.float64)}
    k = min(5, n_classes)
    topk = logits.topk(k, dim=1).indices.cpu()
    labels = labels.cpu()
    hit1 = topk[:, 0] == labels
    hitk = (topk == labels.unsqueeze(1)).any(dim=1)
    state["n"] += len(labels)
    state["top1"] += int(hit1.sum())
    state["top5"] += int(hitk.sum())
    state["per_class_hit"].index_add_(0, labels, hit1.double())
    state["per_class_n"].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    return state


def finalize(state: dict) -> dict:
    n = max(state["n"], 1)
    seen = state["per_class_n"] > 0
    recall = (state["per_class_hit"][seen] / state["per_class_n"][seen]).mean().item() if seen.any() else 0.0
    return {"acc1": state["top1"] / n, "acc5": state["top5"] / n, "mean_per_class_recall": recall,
            "samples": state["n"]}


def all_reduce_state(state: dict) -> dict:
    """Sum the counts over ranks (each rank evaluated a disjoint slice)."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return state
    dev = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([torch.tensor([state["n"], state["top1"], state["top5"]], dtype=torch.float64),
                      state["per_class_hit"], state["per_class_n"]]).to(dev)
    tdist.all_reduce(flat)
    flat = flat.cpu()
    c = len(state["per_class_hit"])
    return {"n": int(flat[0]), "top1": int(flat[1]), "top5": int(flat[2]), "per_class_hit": flat[3:3 + c],
            "per_class_n": flat[3 + c:]}


def eval_transform(image_size: int):
    """CLIP eval preprocessing: resize the short side (bicubic), center crop, CLIP mean/std."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def zeroshot_on_folder(model, root, spec, device, rank: int = 0, world_size: int = 1, batch_size: int = 256,
                       dtype=None, workers: int = 0) -> dict:
    """Zero-shot classification of an ImageFolder-style eval set (``classnames.txt``, ``templates.txt``).

    Each rank encodes a disjoint, equally long slice (padded with repeats that are not counted), so ZeRO-3 ranks run
    the same number of forwards; counts are summed over ranks."""
    import torch
    from open_clip import get_tokenizer  # noqa: F401  (tokenizer is open_clip's)
    from open_clip.tokenizer import tokenize

    from .data.eval_sets import load_zeroshot_folder

    dataset, classnames, templates = load_zeroshot_folder(root, transform=eval_transform(spec.vision.image_size))
    ctx_len = spec.text.context_length

    def tok(texts):
        return tokenize(texts, context_length=ctx_len)

    with torch.no_grad():
        W = zeroshot_classifier(model.encode_text, tok, classnames, templates, device).to(device)
        n = len(dataset)
        per_rank = -(-n // world_size)
        idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        steps = -(-per_rank // batch_size)
        state = None
        for s in range(steps):
            chunk = idx[s * batch_size:(s + 1) * batch_size]
            items = [dataset[i] for i in chunk] if chunk else [dataset[0]]
            images = torch.stack([im for im, _ in items]).to(device)
            if dtype is not None:
                images = images.to(dtype)
            labels = torch.tensor([lab for _, lab in items])
            feats = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
            logits = 100.0 * feats @ W
            if chunk:
                state = accumulate(logits, labels, len(classnames), state)
        if state is None:
            state = accumulate(torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.long), len(classnames))
        state = all_reduce_state(state)
    res = finalize(state)
    res["chance"] = 1.0 / len(classnames)
    res["classes"] = len(classnames)
    return res
