"""A resume knows what it resumes. Every checkpoint records the resolved recipe it was written under; a resume
compares the recipe it is given with that one, key by key:

- model and shape keys (``model.*``, ``stage``, ZeRO stage, precision, offload): refused, each key named. The
  weights, partitions and optimizer states of the checkpoint cannot take another shape;
- keys that change the schedule or the data order (``data.*``, ``optimizer.*``, ``schedule.*``, ``tokens.*``,
  ``seed``, ``distill.*``, ``video.*``): refused unless ``--accept-changes``; then applied from the resumed step:
  the run goes on until the new ``data.samples`` have been seen (samples are counted as seen, whatever batch size
  saw them), the schedule continues from the resumed step over the new total, a new global batch applies from the
  first step after the resume. Each such resume starts a new *segment*: its recipe is kept in
  ``RUN/recipe_history/`` and ``metrics.jsonl`` rows carry ``segment``;
- everything else (logging, checkpoint cadence, eval sets, tracking, compute, the guard, init): accepted silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: prefixes of keys a checkpoint cannot take another value of
SHAPE_KEYS = ("stage", "model.", "deepspeed.zero_stage", "deepspeed.precision", "deepspeed.offload_",
              "deepspeed.zero_init")
#: prefixes of keys that change what is trained on or how fast: applied only with --accept-changes
SCHEDULE_KEYS = ("data.", "optimizer.", "schedule.", "tokens.", "seed", "distill.", "video.", "deepspeed.grad_clip",
                 "deepspeed.extra")
#: keys with no bearing on the schedule: the stream is position-exact whatever the workers; the micro batch is how
#: the global batch is split (a resume on another number of processes needs another one), the global batch and
#: (data.contrastive_batch = "global") the loss stay as they were
SILENT_KEYS = ("data.workers", "data.val", "data.micro_batch")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) or key.startswith(p + ".")
               for p in prefixes)


@dataclass(frozen=True)
class RecipeChange:
    shape: list[str]
    schedule: list[str]
    silent: list[str]


def classify(keys: list[str]) -> RecipeChange:
    shape = [k for k in keys if _matches(k, SHAPE_KEYS)]
    schedule = [k for k in keys if k not in shape and not _matches(k, SILENT_KEYS) and _matches(k, SCHEDULE_KEYS)]
    silent = [k for k in keys if k not in shape and k not in schedule]
    return RecipeChange(shape, schedule, silent)


def _show(keys: list[str], old: dict, new: dict) -> str:
    a, b = flatten(old), flatten(new)
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


def check_change(old: dict, new: dict, accept: bool, where: str) -> RecipeChange:
    """Raise UserError for a change the resume cannot or may not make; the classified change otherwise."""
    from evaclip_cli.errors import UserError

    change = classify(changed_keys(old, new))
    if change.shape:
        raise UserError(f"cannot resume {where} with another model or shape: {_show(change.shape, old, new)}; "
                        "resume with the recipe it was written under, or start a new run (--out)")
    if change.schedule and not accept:
        raise UserError(f"resuming {where} with changed training keys: {_show(change.schedule, old, new)}; pass "
                        "--accept-changes to apply them from this step (see `evaclip train --help`), or resume "
                        "with the recipe it was written under")
    return change


def total_steps(start_step: int, samples_seen: int, samples: int, global_batch: int) -> int:
    """The run's last step: the resumed step plus the steps of ``global_batch`` that the samples still to see
    take."""
    from evaclip_cli.errors import UserError

    if samples < samples_seen:
        raise UserError(f"data.samples = {samples:,} is below the {samples_seen:,} samples this run has already "
                        "seen; raise it, or convert the last checkpoint as it is (evaclip convert)")
    return start_step + math.ceil((samples - samples_seen) / global_batch)
