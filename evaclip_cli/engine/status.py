"""``evaclip status RUN``: where a run stands, read from its folder alone (a login node can read it while the job
runs elsewhere). Pure reading: nothing is written, locked or imported beyond the standard library.

What it reads: ``metrics.jsonl`` (the last train rows: step, total_steps, loss, samples/s, TFLOP/s, MFU and the
cumulative skip/rollback counters; eval rows), ``events.jsonl`` (the last error), ``checkpoints/global_stepN`` (the
last complete one and its age), ``.evaclip.lock`` (who holds the run: pid, host, since; alive or not when the host
is this one) and ``evaclip_recipe.toml`` (name, run length before the first logged step). Every key may be absent.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from evaclip_cli import atomic
from evaclip_cli.engine.events import read_events
from evaclip_cli.engine.resume import list_complete
from evaclip_cli.errors import UserError

RUN_MARKERS = ("evaclip_recipe.toml", "metrics.jsonl", "checkpoints", ".evaclip.lock", "events.jsonl")
TAIL_BYTES = 1 << 20  # the end of metrics.jsonl read (a long run's file holds every log window)
LAST_LOSSES = 5


def check_run_folder(run: Path) -> None:
    """A folder a training command wrote, or one line saying what it is not."""
    if not run.exists():
        raise UserError(f"{run}: no such folder; pass the --out (or logging.out_dir) of a training run")
    if not run.is_dir() or not any((run / m).exists() for m in RUN_MARKERS):
        raise UserError(f"{run} is not an evaclip run folder (no evaclip_recipe.toml, metrics.jsonl or checkpoints/); "
                        "pass the --out (or logging.out_dir) of a train, distill or finetune-video run")


def _tail_rows(path: Path, limit: int = TAIL_BYTES) -> list[dict]:
    """The JSON rows of the last ``limit`` bytes of a JSON-lines file (a torn first or last line is passed over)."""
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - limit))
        data = fh.read().decode("utf-8", errors="replace")
    rows = []
    for ln in data.splitlines():
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _recipe(run: Path) -> dict:
    """The run's resolved recipe (TOML) as a dict; {} when absent or unreadable."""
    import tomllib

    try:
        return tomllib.loads((run / "evaclip_recipe.toml").read_text())
    except (OSError, ValueError):
        return {}


def _recipe_steps(recipe: dict) -> Optional[int]:
    data = recipe.get("data", {})
    samples, batch = data.get("samples"), data.get("global_batch")
    if isinstance(samples, int) and isinstance(batch, int) and batch > 0:
        return math.ceil(samples / batch)
    return None


def lock_holder(run: Path) -> Optional[dict]:
    """Who holds the run folder's lock: {pid, host, since, alive, note}; None when nobody does (a holder removes the
    file when it is done; a killed one leaves it, and its pid is then found dead). ``alive`` is None for a holder on
    another host."""
    try:
        who = json.loads((run / ".evaclip.lock").read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(who, dict) or "pid" not in who:
        return None
    out = {"pid": who.get("pid"), "host": who.get("host"), "since": who.get("since")}
    if who.get("host") != atomic.host_label():
        out.update(alive=None, note=f"on {who.get('host')}, not checkable from here")
    elif isinstance(who.get("pid"), int) and atomic.process_alive(who["pid"]):
        out.update(alive=True, note="running")
    else:
        out.update(alive=False, note="not running (the process ended without releasing the lock file)")
    return out


def _checkpoint(run: Path, now: float) -> Optional[dict]:
    done = list_complete(run / "checkpoints")
    if not done:
        return None
    step, path = done[-1]
    manifest = path / "evaclip_manifest.json"
    try:
        written = (manifest if manifest.exists() else path).stat().st_mtime
    except OSError:
        return {"step": step, "path": str(path), "age_s": None}
    return {"step": step, "path": str(path), "age_s": max(0.0, now - written)}


def _mean(rows: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


EVAL_KEY = re.compile(r"/(acc1|image_retrieval_recall@1|text_retrieval_recall@1)$")


def read_status(run: Path, now: Optional[float] = None) -> dict[str, Any]:
    """Where the run in folder ``run`` stands (a JSON-able dict; a value that cannot be known is None)."""
    run = Path(run)
    check_run_folder(run)
    now = time.time() if now is None else now
    recipe = _recipe(run)
    rows = _tail_rows(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "step" in r]
    evals = [r for r in rows if any(EVAL_KEY.search(k) for k in r)]
    last = train[-1] if train else {}
    recent = train[-LAST_LOSSES:]
    step = last.get("step")
    total = last.get("total_steps") or _recipe_steps(recipe)
    ckpt = _checkpoint(run, now)
    if step is None and ckpt is not None:
        step = ckpt["step"]
    sps = _mean(recent, "samples_per_s")
    step_time = _mean(recent, "step_time_s")
    batch = recipe.get("data", {}).get("global_batch")
    eta = None
    if isinstance(step, int) and isinstance(total, int) and total >= step:
        if step_time:
            eta = (total - step) * step_time
        elif sps and isinstance(batch, int):
            eta = (total - step) * batch / sps
    events = read_events(run)
    error = next((e for e in reversed(events) if e.get("kind") == "error"), None)
    rollbacks = last.get("guard_rollbacks")
    if rollbacks is None and events:
        rollbacks = sum(1 for e in events if e.get("kind") == "rollback")
    lock = lock_holder(run)
    metrics_path = run / "metrics.jsonl"
    return {
        "run": str(run),
        "recipe": recipe.get("name"),
        "stage": recipe.get("stage"),
        "state": _state(run, step, total, lock, error),
        "step": step,
        "total_steps": total,
        "eta_s": eta,
        "last_losses": [{"step": r["step"], "loss": r["loss"]} for r in recent],
        "samples_per_s": sps,
        "step_time_s": step_time,
        "data_wait_frac": _mean(recent, "data_wait_frac"),
        "tflops_per_device": _mean(recent, "tflops_per_device"),
        "mfu": _mean(recent, "mfu"),
        "nonfinite_skipped": last.get("nonfinite_skipped"),
        "guard_skipped": last.get("guard_skipped"),
        "guard_rollbacks": rollbacks,
        "last_checkpoint": ckpt,
        "lock": lock,
        "last_error": None if error is None else {"step": error.get("step"), "time": error.get("time"),
                                                  "message": error.get("message")},
        "last_eval": {k: v for k, v in evals[-1].items() if EVAL_KEY.search(k)} if evals else {},
        "metrics_age_s": max(0.0, now - metrics_path.stat().st_mtime) if metrics_path.is_file() else None,
    }


def _state(run: Path, step, total, lock: Optional[dict], error: Optional[dict]) -> str:
    """A few words for the run: running | locked from another host | finished | stopped (a graceful stop; continue
    with --resume auto) | failed | not running."""
    if lock is not None and lock["alive"] is not False:
        return "running" if lock["alive"] else "locked from another host"
    if (run / "final").is_dir() or (isinstance(step, int) and isinstance(total, int) and step >= total):
        return "finished"
    last = _last_kind(run)
    if last == "stop":
        return "stopped"
    if error is not None and last == "error":
        return "failed"
    return "not running"


def _last_kind(run: Path) -> Optional[str]:
    events = read_events(run)
    return events[-1].get("kind") if events else None


def format_duration(seconds: Optional[float]) -> str:
    """``3d 4h``, ``2h 05m``, ``4m 10s``, ``12s``; '-' for unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s % 60:02d}s"
    return f"{s}s"
