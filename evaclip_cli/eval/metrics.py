"""CLIP_benchmark's metric definitions and how they are summed over data-parallel ranks.

Classification: running counts for top-1, top-5 and per-class recall (``accumulate``), summed over ranks
(``all_reduce_state``), turned into ``acc1``, ``acc5``, ``mean_per_class_recall`` (``finalize``).
Retrieval: R@k in both directions from the gathered embeddings (``retrieval_metrics``).
"""
from __future__ import annotations

from typing import Optional


def empty_state(n_classes: int) -> dict:
    import torch

    return {"n": 0, "top1": 0, "top5": 0, "per_class_hit": torch.zeros(n_classes, dtype=torch.float64),
            "per_class_n": torch.zeros(n_classes, dtype=torch.float64)}


def accumulate(logits, labels, n_classes: int, state: Optional[dict] = None) -> dict:
    """Running counts for top-1/top-5 and per-class recall."""
    import torch

    if state is None:
        state = empty_state(n_classes)
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


def sum_across(value: int) -> int:
    """An integer summed over ranks (a bare process: itself)."""
    from evaclip_cli.engine.dist import all_reduce_sum

    return int(round(all_reduce_sum([float(value)])[0]))


def retrieval_metrics(image_emb, text_emb, text_owner, ks=(1, 5, 10)) -> dict:
    """CLIP_benchmark's definitions: image_retrieval_recall@k = share of captions whose image is in their top-k
    images; text_retrieval_recall@k = share of images with at least one of their captions in their top-k texts."""
    import torch

    scores = text_emb @ image_emb.t()  # [texts, images]
    owner = torch.as_tensor(text_owner)
    out = {}
    n_img = image_emb.shape[0]
    for k in ks:
        kk = min(k, n_img)
        top_img = scores.topk(kk, dim=1).indices  # per caption
        out[f"image_retrieval_recall@{k}"] = (top_img == owner.unsqueeze(1)).any(1).float().mean().item()
        kt = min(k, scores.shape[0])
        top_txt = scores.t().topk(kt, dim=1).indices  # per image: caption ids
        hit = (owner[top_txt] == torch.arange(n_img).unsqueeze(1)).any(1)
        out[f"text_retrieval_recall@{k}"] = hit.float().mean().item()
    return out
