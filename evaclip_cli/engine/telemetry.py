"""What a log window says about speed and health, beside the loss: step time, the share of it spent waiting for
data, achieved TFLOP/s per device and MFU, the gradient norm before clipping, device memory.

Model FLOPs per sample come from the estimator (``evaclip_cli.estimate.model_flops_per_sample``, passed in by the
stage: the engine sits below the estimator), so ``evaclip estimate``, ``bench/gpu_check.py`` and the run's log use
one formula. MFU needs the device's peak (``compute.peak_tflops`` or the estimator's GPU table); on a CPU there is
none and MFU is left out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class FlopsModel:
    """Model FLOPs of one training sample (forward + backward), the peak FLOP/s of one device (None: unknown) and
    the tokens each tower sees per sample after CLIPA's reduction (0: not known)."""

    per_sample: float = 0.0
    peak_per_device: Optional[float] = None
    image_tokens: int = 0
    text_tokens: int = 0

    def tokens(self) -> dict:
        return {"image_tokens_kept": self.image_tokens, "text_tokens_kept": self.text_tokens} \
            if self.image_tokens else {}


class WindowClock:
    """Wall time of a log window and the part of it spent blocked on the data loader."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.samples = 0

    def next_batch(self, data_iter):
        t = time.perf_counter()
        batch = next(data_iter)
        self.data_wait += time.perf_counter() - t
        return batch

    def stepped(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def throughput(clock: WindowClock, flops: FlopsModel, world: int, data_wait_max: float) -> dict:
    """The window's speed figures (rank 0's clock; ``data_wait_max``: the longest data wait of any rank)."""
    return speed_figures(clock.samples, clock.steps, clock.elapsed(), data_wait_max, flops, world)


def speed_figures(samples: int, steps: int, seconds: float, data_wait: float, flops: FlopsModel, world: int) -> dict:
    """samples/s, step time, data-wait fraction, achieved TFLOP/s per device and (with a peak) MFU of ``samples``
    trained in ``steps`` steps taking ``seconds`` on ``world`` devices (``bench/gpu_check.py`` uses it too)."""
    elapsed = max(seconds, 1e-9)
    sps = samples / elapsed
    out = {"samples_per_s": sps, "step_time_s": elapsed / max(steps, 1),
           "data_wait_frac": min(1.0, data_wait / elapsed)}
    if flops.per_sample:
        achieved = flops.per_sample * sps / max(world, 1)
        out["tflops_per_device"] = achieved / 1e12
        if flops.peak_per_device:
            out["mfu"] = achieved / flops.peak_per_device
    return out


def device_memory(device: str) -> dict:
    """GiB allocated now and at peak: the CUDA caching allocator's figures on a GPU, the process's resident set
    (and its high-water mark) on a CPU."""
    if device.startswith("cuda"):
        import torch

        return {"mem_alloc_gib": torch.cuda.memory_allocated() / 2**30,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    import os
    import resource

    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mem_alloc_gib": rss / 2**30, "mem_peak_gib": max(peak, rss) / 2**30}


def grad_norm_before_step(engine) -> Optional[float]:
    """The global gradient norm before clipping, where only the caller can see it: ZeRO-0 in fp32 clips with
    ``clip_grad_norm_`` and keeps no norm, so it is taken from the (already all-reduced) gradients here, before
    ``engine.step()``. None elsewhere: DeepSpeed's optimizers record it (``grad_norm_after_step``)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    import torch

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def grad_norm_after_step(engine) -> Optional[float]:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
