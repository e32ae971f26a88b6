"""Decode-ahead: worker processes decode and crop a rank's images while the main process is still busy elsewhere.

``evaclip eval`` starts them as soon as the set is listed: before torch, open_clip and the model are loaded (in the
``evaclip`` console script and under ``python -m evaclip_cli.cli`` nothing heavy is imported yet) and before the text
classifier is built, so decoding — the largest share of an eval on a small model — overlaps imports, model load and
prompt encoding instead of following them. A worker imports nothing but PIL and numpy
(``data.benchmarks.crop_image``: open_clip's resize + centre crop) and sends uint8 crops; the main process turns each
batch into the model's input with ``data.benchmarks.to_float`` (torchvision's ToTensor + Normalize, elementwise, on
the batch). ``ImageSet`` only uses the results after checking
that this path gives the model's transform bit for bit (``data.benchmarks.check_crop``); otherwise it falls back
to the DataLoader.

Work is cut like the loops cut it: this rank's slice (``loops.rank_slice``) in batches; batch ``j`` goes to worker
``j % workers``, whose queue returns its batches in order. Memory is bounded (``budget`` bytes of crops in flight,
at least 4 batches a worker, as the DataLoader's ``prefetch_factor``). An unreadable image is reported, not raised
(skipped and counted by the loop). Workers run at a lower priority (``NICE``): while the main process imports, loads
and encodes prompts — the critical path — a worker on the same core yields to it and takes the spare cores; once
the main process waits for images, they have the machine. Workers are daemons, stop when the main process is gone,
and ignore Ctrl-C (the main process handles it and closes the pool).
"""
from __future__ import annotations

import os
import queue
from typing import Optional

BUDGET = 1 << 30  # bytes of uint8 crops in flight per rank
NICE = 10  # workers yield a shared core to the main process (imports, model load, prompts: the critical path)


def available(workers: int) -> bool:
    import multiprocessing

    return workers > 0 and "fork" in multiprocessing.get_all_start_methods()


def _put(q, obj, parent: int) -> None:
    while True:
        try:
            q.put(obj, timeout=1.0)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(0)


def _watch(parent: int) -> None:
    """A worker outlives no parent: its queue's pipe is held open by its siblings, so a write to it would wait
    forever."""
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _work(jobs: list, items: list, crop, draft: Optional[int], q, parent: int) -> None:
    """One worker: for each (batch number, indices) decode and crop every image; put (number, readable indices,
    stacked crops | None, unreadable indices, indices needing the model's own transform)."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    try:
        os.nice(NICE)
    except OSError:
        pass
    import numpy as np

    from evaclip_cli.data.benchmarks import NeedsTransform, decode_crop, read_bytes

    for j, idx in jobs:
        good, arrays, bad, redo = [], [], [], []
        for i in idx:
            try:
                arrays.append(decode_crop(read_bytes(items[i]), crop, draft))
                good.append(i)
            except NeedsTransform:
                redo.append(i)
            except Exception:  # corrupt / truncated / unsupported image: skipped and counted
                bad.append(i)
        _put(q, (j, good, np.stack(arrays) if arrays else None, bad, redo), parent)


class CropPool:
    """Decode-ahead of ``items[i]`` for ``i`` in ``order``, in batches of ``batch_size``, on ``workers`` forked
    processes. ``get(j)``: batch ``j`` as ``(readable indices, uint8 [n, S, S, 3] | None, unreadable, needing the
    transform)``, in order ``j = 0, 1, ...``."""

    def __init__(self, items: list, order: list, batch_size: int, workers: int, crop, draft: Optional[int] = None,
                 budget: int = BUDGET):
        import multiprocessing

        import numpy  # noqa: F401  (imported once here, not by every worker)
        from PIL import Image

        Image.preinit()  # the common decoders, registered before the fork
        ctx = multiprocessing.get_context("fork")
        self.order, self.batch_size, self.crop, self.draft = list(order), batch_size, crop, draft
        chunks = [self.order[s:s + batch_size] for s in range(0, len(self.order), batch_size)]
        self.n = len(chunks)
        workers = max(1, min(workers, self.n))
        per_batch = batch_size * crop.size * crop.size * 3
        depth = max(4, budget // max(1, workers * per_batch))
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(workers)]
        parent = os.getpid()
        self.procs = [ctx.Process(target=_work, args=(list(enumerate(chunks))[w::workers], items, crop, draft,
                                                      self.queues[w], parent), daemon=True)
                      for w in range(workers)]
        try:
            for p in self.procs:
                p.start()
        except BaseException:
            self.close()
            raise
        self.next = 0

    def get(self, j: int):
        if j != self.next or j >= self.n:
            raise RuntimeError(f"decode-ahead: batch {j} asked, batch {self.next} of {self.n} is next")
        w = j % len(self.procs)
        while True:
            try:
                got = self.queues[w].get(timeout=5.0)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    code = self.procs[w].exitcode
                    self.close()
                    raise RuntimeError(f"an image decoding worker exited unexpectedly (exit code {code}); out of "
                                       "memory? try fewer --workers or a smaller --batch-size") from None
        self.next += 1
        if self.next == self.n:
            self.close()
        return got[1:]

    def close(self) -> None:
        for p in getattr(self, "procs", []):
            if p.is_alive():
                p.terminate()
        for p in getattr(self, "procs", []):
            p.join(5)
        for q in getattr(self, "queues", []):
            q.cancel_join_thread()
            q.close()
        self.procs, self.queues = [], []
