"""What an eval command sets up before its loop: the data-parallel setup (``engine.dist.setup_inference``), the
model, precision (autocast), DataLoader workers, the loops' ``Runtime``, and decode-ahead of an image set started
before the model loads.
"""
from __future__ import annotations

from typing import Any, Optional


def setup_dist() -> tuple[int, int, str]:
    """(rank, world size, device) of a data-parallel eval under torchrun (the same launcher as `train`); a bare
    process stays single."""
    from evaclip_cli.engine.dist import setup_inference

    info = setup_inference()
    return info.rank, info.world_size, info.device


def env_rank_world() -> tuple[int, int]:
    """This process's rank and the world size as torchrun sets them (``setup_dist`` reads the same), known before
    torch is imported."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def predicted_image_size(model: Any, pretrained: Any = None) -> Optional[int]:
    """The input size an open_clip folder (or a run folder's ``final/``) declares: decode-ahead starts with it;
    ``ImageSet.set_transform`` discards that work if the loaded model says otherwise. None when it cannot be known
    before loading."""
    from evaclip_cli.models.openclip_compat import folder_config

    cfg = folder_config(model, pretrained)
    vision = cfg["model_cfg"].get("vision_cfg", {}) if cfg else None
    if not isinstance(vision, dict):
        return None
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and size > 0 else None


def start_decoding(adapter: Any, model: Any, pretrained: Any, batch_size: int, workers: Optional[int],
                   fast_decode: bool) -> None:
    """Decode-ahead of this rank's images at the size the model's config declares, before the model is loaded."""
    from evaclip_cli.eval.loops import rank_slice

    size = predicted_image_size(model, pretrained)
    if size is None:
        return
    rank, world = env_rank_world()
    adapter.draft = size if fast_decode else None
    adapter.start_decoding(rank_slice(len(adapter), rank, world, batch_size)[0], batch_size,
                           default_workers() if workers is None else workers, size)


def model_and_dist(model: Any, pretrained: Any, eva_config: Any, arch: Any, loaded: Any = None) -> tuple:
    """(loaded model, rank, world size, device): the process group first, then the model on this rank's device
    (unless ``loaded`` is given)."""
    rank, world, device = setup_dist()
    if loaded is None:
        from evaclip_cli.checkpoints.load import load_clip

        loaded = load_clip(model, device=device, eva_config=eva_config, pretrained=pretrained, arch=arch)
    return loaded, rank, world, device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def autocast(device: str, precision: str):
    """A factory of the autocast context for ``precision`` (a null context for fp32)."""
    import contextlib
    import functools

    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=dtype)


def default_workers() -> int:
    import os

    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def make_runtime(loaded: Any, device: str, rank: int, world: int, batch_size: int, workers: Optional[int],
                 precision: str):
    from evaclip_cli.eval.loops import Runtime

    return Runtime(loaded, device, rank, world, batch_size, default_workers() if workers is None else workers,
                   None, autocast(device, precision))


def open_image_eval(adapter: Any, model: Any, pretrained: Any, eva_config: Any, arch: Any, loaded: Any,
                    batch_size: int, workers: Optional[int], precision: str, fast_decode: bool) -> tuple:
    """Everything before an image set's loop: decoding starts (when the model is not loaded yet, so it overlaps
    torch, the model and the text classifier), the model and the process group, the runtime, the batches.
    Returns (loaded, runtime, batches)."""
    from evaclip_cli.eval.loops import open_batches
    from evaclip_cli.models.openclip_compat import import_open_clip_lean

    if loaded is None:
        start_decoding(adapter, model, pretrained, batch_size, workers, fast_decode)
        import_open_clip_lean(model, pretrained)
    loaded, rank, world, device = model_and_dist(model, pretrained, eva_config, arch, loaded)
    rt = make_runtime(loaded, device, rank, world, batch_size, workers, resolve_precision(precision, device))
    adapter.set_transform(loaded.transform(), loaded.image_size, loaded.image_size if fast_decode else None)
    return loaded, rt, open_batches(adapter, rt)
