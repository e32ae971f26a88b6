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


def free_training_tensors(engine) -> int:
    """Shrink every tensor storage the engine's model and optimizer hold to nothing; returns the bytes freed.

    For the end of a run, after the final checkpoint (the exports read the weights from it). Dropping the engine is
    not enough: under ZeRO-3 every parameter keeps a reference to DeepSpeed's optimizer (and DeepSpeed keeps
    parameters in its own registries), so the fp32 partitions, moments and gradient buffers would stay alive beside
    the export. Storages that cannot be resized (memory-mapped, borrowed from NumPy) are left alone."""
    import torch

    seen: set[int] = set()
    freed = 0

    def free(t) -> None:
        nonlocal freed
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if not ptr or ptr in seen:
            return
        seen.add(ptr)
        n = st.nbytes()
        try:
            st.resize_(0)
        except RuntimeError:
            return
        freed += n

    def walk(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            free(obj)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)

    opt = getattr(engine, "optimizer", None)
    for o in (opt, getattr(opt, "optimizer", None)):
        if o is not None:
            walk(list(vars(o).values()), 0)
            walk(list(getattr(o, "state", {}).values()), 0)
    module = getattr(engine, "module", None)
    if module is not None:
        for p in module.parameters():
            p.grad = None
            free(getattr(p, "ds_tensor", None))
            free(p.data)
        for b in module.buffers():
            free(b)
    return freed


def available_bytes(device: str) -> int:
    """The memory a run starting now can use: a GPU's free memory (``cuda:N``), else this machine's available RAM
    (``MemAvailable``, capped by this container's cgroup limit)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:  # not Linux: the physical memory
        import os

        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # cgroup v2: the limit less what the group already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail
