"""What a training run shows while it runs: a Rich live bar on a terminal; one plain, flushed line per log window
and per checkpoint when stdout is a file or a pipe (a batch job's ``slurm-%j.out``), where a live view writes
nothing until the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional


def format_rate(x: float) -> str:
    """Samples per second: two significant digits below 10 (a slow 18B step is 0.11/s, not 0), whole numbers
    above."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}:{m:02d}:{s:02d}"


def window_line(record: dict, total: int, eta_s: Optional[float]) -> str:
    """One log window as a line: step/total, loss, lr, samples/s, the telemetry that is there, ETA."""
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3g}",
             f"{format_rate(record['samples_per_s'])} samples/s"]
    if "step_time_s" in record:
        parts.append(f"step {record['step_time_s']:.3g}s")
    if "data_wait_frac" in record:
        parts.append(f"data wait {100 * record['data_wait_frac']:.0f}%")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    elif "tflops_per_device" in record:
        parts.append(f"{record['tflops_per_device']:.3g} TFLOP/s")
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3g}")
    if eta_s is not None:
        parts.append(f"ETA {format_eta(eta_s)}")
    return "  ".join(parts)


class _Eta:
    """Seconds left from the steps done since this process started (a resumed run's earlier steps do not count)."""

    def __init__(self, start_step: int):
        self.t0, self.step0 = time.perf_counter(), start_step

    def left(self, step: int, total: int) -> Optional[float]:
        done = step - self.step0
        return None if done <= 0 else (time.perf_counter() - self.t0) / done * (total - step)


class PlainProgress:
    """Lines for a file or pipe: each log window and each checkpoint, flushed at once."""

    def __init__(self, console: Any, name: str, total: int, start: int):
        self.console, self.name, self.total = console, name, total
        self.eta = _Eta(start)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def window(self, record: dict) -> None:
        line = window_line(record, self.total, self.eta.left(record["step"], self.total))
        self.console.print(f"{self.name}: {line}", highlight=False, soft_wrap=True)
        self.console.file.flush()

    def advance(self, step: int) -> None:
        pass

    def note(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def set_total(self, total: int) -> None:
        self.total = total


class LiveProgress:
    """Rich's live bar (a terminal): loss, samples/s and MFU (where there is a peak) in the bar."""

    def __init__(self, console: Any, name: str, total: int, start: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]} samples/s"),
                            TextColumn("{task.fields[mfu]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=False, refresh_per_second=2)
        self.task = self.bar.add_task(name, total=total, completed=start, loss=float("nan"), sps="-", mfu="")

    def __enter__(self) -> LiveProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def window(self, record: dict) -> None:
        mfu = f"MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        self.bar.update(self.task, completed=record["step"], loss=record["loss"],
                        sps=format_rate(record["samples_per_s"]), mfu=mfu)

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def note(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


class NoProgress:
    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def window(self, record: dict) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def note(self, line: str) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass


def make_progress(console: Any, name: str, total: int, start: int, enabled: bool):
    """The live bar on a terminal, plain lines otherwise, nothing on ranks other than 0 or when quiet."""
    if not enabled:
        return NoProgress()
    interactive = console.is_terminal and sys.stdout.isatty()
    return (LiveProgress if interactive else PlainProgress)(console, name, total, start)
