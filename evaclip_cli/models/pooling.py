"""Clip embeddings from frame embeddings: what the video stage's loss and video evaluation share.

A clip's embedding is the mean of its L2-normalised frame embeddings, renormalised; an image is a one-frame clip
(its embedding is its normalised image embedding)."""
from __future__ import annotations


def pool_frames(frame_emb, nframes):
    """[sum(nframes), D] frame embeddings -> [len(nframes), D]: the mean of each clip's L2-normalised frame
    embeddings, renormalised."""
    import torch
    import torch.nn.functional as F

    e = F.normalize(frame_emb, dim=-1)
    if all(n == 1 for n in nframes):
        return e
    owner = torch.repeat_interleave(torch.arange(len(nframes), device=e.device),
                                    torch.as_tensor(nframes, device=e.device))
    out = torch.zeros(len(nframes), e.shape[1], device=e.device, dtype=e.dtype).index_add(0, owner, e)
    return F.normalize(out, dim=-1)


def encode_clips(model, clips, dtype=None):
    """[B, T, 3, S, S] -> [B, D] normalised clip embeddings (one forward over B·T frames)."""
    b, t = clips.shape[:2]
    x = clips.reshape(b * t, *clips.shape[2:])
    if dtype is not None:
        x = x.to(dtype)
    return pool_frames(model.encode_image(x).float(), [t] * b)
