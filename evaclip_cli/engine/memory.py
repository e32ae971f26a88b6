"""What a rank's memory holds at the phases of a run, measured: the figures to set beside ``evaclip estimate``.

The loop marks ``start`` (before the model is built), ``model`` (built, under zero.Init: this rank's partition),
``engine`` (DeepSpeed initialised: + the optimizer's fp32 partitions and gradient buffers) and ``step1`` (after the
first optimizer step: + the optimizer moments, which torch optimizers allocate lazily; activations are freed by
then) and ``released`` (the training state freed, before the export). ``step1 - start`` is the rank's model +
optimizer states; ``peak - step1`` what a step needs on top (activations, gathered ZeRO-3 layers). Rank 0 writes
every rank's record to the run's ``memory.json``.

On a GPU the figures are ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; on CPU the process's
anonymous resident memory (``RssAnon``: heap and tensors, not the mapped library and checkpoint files; glibc's
freed heap is trimmed first) and, as the peak, ``VmHWM`` (the high-water mark of all resident memory, so an upper
bound by the libraries' pages).
"""
from __future__ import annotations

from pathlib import Path


def _proc_status() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:  # not Linux
        pass
    return out


def trim_heap() -> None:
    """Hand glibc's freed heap pages back to the system."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MemoryLog:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.points: dict[str, int] = {}

    def current(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        return _proc_status().get("RssAnon", 0)

    def peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        return _proc_status().get("VmHWM", 0)

    def mark(self, name: str) -> None:
        if name not in self.points:
            if not self.cuda:
                trim_heap()  # freed heap handed back first: the figure is what is live, not what malloc kept
            self.points[name] = self.current()

    def record(self, rank: int) -> dict:
        return {"rank": rank, "kind": "cuda allocated" if self.cuda else "RssAnon (peak: VmHWM)",
                "points_bytes": dict(self.points), "peak_bytes": self.peak()}


def summary_line(rec: dict) -> str:
    """One line for the console: rank's states and peak, in GB."""
    p = rec["points_bytes"]
    parts = []
    if "step1" in p and "start" in p:
        parts.append(f"model + optimizer states {(p['step1'] - p['start']) / 1e9:.2f} GB")
    parts.append(f"peak {rec['peak_bytes'] / 1e9:.2f} GB")
    if "released" in p and "start" in p:
        parts.append(f"{(p['released'] - p['start']) / 1e9:.2f} GB still held when the export starts")
    return f"memory of rank {rec['rank']}: " + ", ".join(parts) + " (memory.json)"
