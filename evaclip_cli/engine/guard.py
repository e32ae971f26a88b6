"""The spike guard (the recipe's ``[guard]``): a step whose loss is more than ``sigma`` standard deviations above
the mean of the last ``window`` applied steps is not applied; ``rollback_after`` such steps within
``rollback_window`` steps roll the run back to its last checkpoint, and the batches read since are skipped
(PaLM's remedy for loss spikes, section 5.1).

"Not applied" means the optimizer does nothing: no parameter, moment or step count changes
(``SkippableStep`` wraps the client optimizer inside DeepSpeed's wrappers, so it holds for ZeRO 0-3, fp32 and
bf16); the gradients are dropped by DeepSpeed as after any step. The guard's history travels in every checkpoint,
so a resumed run judges exactly as the uninterrupted one would.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional


class SpikeGuard:
    def __init__(self, cfg: Any):
        self.enabled = bool(cfg.enabled)
        self.sigma = cfg.sigma
        self.window = cfg.window
        self.min_history = cfg.min_history
        self.rollback_after = cfg.rollback_after
        self.rollback_window = cfg.rollback_window
        self.history: deque[float] = deque(maxlen=self.window)
        self.recent_skips: list[int] = []  # steps of the skips that count towards a rollback
        self.skipped = 0
        self.rollbacks = 0

    def threshold(self) -> Optional[float]:
        """The loss above which the next step is a spike (None: not enough history yet, or the guard is off)."""
        if not self.enabled or len(self.history) < max(2, self.min_history):
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        return mean + self.sigma * std

    def judge(self, step: int, loss: float) -> bool:
        """True when step ``step``'s loss (the same on every rank) is a spike; applied losses join the history."""
        limit = self.threshold()
        if limit is not None and loss > limit:
            self.skipped += 1
            self.recent_skips = [s for s in self.recent_skips if s > step - self.rollback_window] + [step]
            return True
        self.history.append(loss)
        return False

    def wants_rollback(self) -> bool:
        return self.enabled and self.rollback_after > 0 and len(self.recent_skips) >= self.rollback_after

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.recent_skips = []

    def state_dict(self) -> dict:
        return {"history": list(self.history), "recent_skips": list(self.recent_skips), "skipped": self.skipped,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Optional[dict], keep_counts: bool = False) -> None:
        """Restore the history of a checkpoint; ``keep_counts``: a rollback keeps this run's skip/rollback counts."""
        state = state or {}
        self.history = deque(state.get("history", []), maxlen=self.window)
        self.recent_skips = list(state.get("recent_skips", []))
        if not keep_counts:
            self.skipped = int(state.get("skipped", 0))
            self.rollbacks = int(state.get("rollbacks", 0))


class SkippableStep:
    """Makes the client optimizer's next ``step()`` a no-op on request (``skip_next()``), whatever DeepSpeed wrapper
    calls it: the instance's ``step`` is replaced by one that checks the switch."""

    def __init__(self, optimizer: Any):
        inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO/bf16 wrappers keep the client inside
        self._inner = inner
        self._step = inner.step
        self._skip = False
        inner.step = self._guarded_step

    def skip_next(self) -> None:
        self._skip = True

    def _guarded_step(self, *args, **kwargs):
        if self._skip:
            self._skip = False
            return None
        return self._step(*args, **kwargs)
