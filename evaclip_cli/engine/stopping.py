"""A graceful stop: the run finishes the step it is on, writes a checkpoint of it on every rank, and exits with
``errors.StopRequested`` (exit code 75), the code the sbatch script requeues on.

Two ways to ask, both checked at every step boundary by every rank and agreed on with one collective (so all
ranks stop after the same step):

- a signal named in ``compute.stop_signals`` (SIGTERM, SIGUSR1 by default) delivered to any rank;
- the file ``RUN/STOP`` (what the sbatch script's trap creates on slurm's warning before the time limit: it
  reaches every node through the shared run folder, where a signal reaches only the batch shell).
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

STOP_FILE = "STOP"


class GracefulStop:
    """Handlers for ``signal_names`` while installed (``with GracefulStop(...)``); ``requested()`` is the agreed
    answer of all ranks."""

    def __init__(self, out_dir: Path, signal_names: list[str], is_main: bool):
        self.stop_file = Path(out_dir) / STOP_FILE
        self.signals = [getattr(signal, name) for name in signal_names]
        self.is_main = is_main
        self.reason: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if self.is_main:
            self.stop_file.unlink(missing_ok=True)  # a request of an earlier job does not stop this one
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (an embedding caller): the STOP file still works
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> Optional[str]:
        """Why the run should stop now (the same on every rank), or None. One all-reduce per call."""
        from evaclip_cli.engine import dist

        if self.reason is None and self.is_main and self.stop_file.exists():
            self.reason = f"{self.stop_file}"
        if not dist.any_true(self.reason is not None):
            return None
        return self.reason or "another rank's request"

    def done(self) -> None:
        """The stop was carried out: the request file has served its purpose."""
        if self.is_main:
            self.stop_file.unlink(missing_ok=True)
