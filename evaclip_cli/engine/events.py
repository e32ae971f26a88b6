"""``RUN/events.jsonl``: what happened to a run besides its numbers, one JSON object a line (rank 0), read by
``evaclip status``: ``{"time": unix seconds, "step": N, "kind": ..., "message": "..."}``.

Kinds: ``start``, ``resume``, ``checkpoint``, ``stop`` (a graceful stop), ``guard_skip`` (a spike not applied),
``rollback``, ``error`` (the one line the run ended with).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


class Events:
    def __init__(self, out_dir: Path, enabled: bool):
        self.path = Path(out_dir) / EVENTS_FILE
        self.enabled = enabled

    def add(self, kind: str, step: int, message: str) -> None:
        """Append one event; a folder that cannot take it does not stop the run (the checkpoint writes say so)."""
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), "step": step, "kind": kind, "message": message})
        try:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
        except OSError:
            pass


def read_events(out_dir: Path) -> list[dict]:
    """Every event of a run folder, oldest first (unreadable lines are passed over)."""
    path = Path(out_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out
