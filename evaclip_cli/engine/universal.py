"""Resuming on another number of processes, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint (stage 1-3; bf16's optimizer too) holds one optimizer partition per process, and DeepSpeed loads it
only into as many processes as wrote it. When ``--resume`` (``auto`` or a path) finds a checkpoint written by another
world size, ``prepare`` (every rank, before the model is built) has rank 0 convert it, once, with DeepSpeed's
``ds_to_universal`` (in a subprocess; ``--inject_missing_state``, which stage 1/2 checkpoints need) into
``checkpoints/universal/global_stepN``: written under a temporary name and renamed, with its own manifest, reused by
every later resume from that checkpoint, removed when the checkpoint itself is pruned. The engine then loads it with
``"checkpoint": {"load_universal": true}``, and ``after_load`` repairs what DeepSpeed's universal loading changes:
ZeRO-3 copies param group 0's hyperparameters (weight_decay, lr_scale, base_lr, ...) into every group and hands every
sub-group the same ``step`` tensor (AdamW would then advance that one counter once per sub-group). A stage 0
checkpoint keeps the whole optimizer state in one file and loads at any world size as it is.

What carries over exactly: the fp32 weights, the optimizer moments and step counts (LAMB's and AdamW's), the param
groups, the global step and the counters. What cannot be exact is per rank: ``rank_states`` says what the data
streams and RNG states become.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from evaclip_cli import atomic
from evaclip_cli.engine import resume as ckpt
from evaclip_cli.errors import UserError

OPTIM_FILES = "*zero_pp_rank_*_optim_states.pt"  # one per data-parallel rank (bf16_... for BF16_Optimizer)
WAIT_HOURS = 24  # how long the other ranks wait for rank 0's conversion (an 18B one reads every partition)


@dataclass
class Source:
    """Where to load from: ``root``/``tag``; ``universal`` when it is a universal checkpoint; ``saved_world`` the
    world size that wrote the original (None: not recorded, a stage 0 checkpoint)."""

    root: Path
    tag: str
    universal: bool
    saved_world: Optional[int]


def is_universal(tag_dir: Path) -> bool:
    return (Path(tag_dir) / "zero" / "optimizer_state.pt").is_file()


def saved_world_size(tag_dir: Path) -> Optional[int]:
    """The number of processes that wrote a checkpoint: from its manifest, else from its optimizer partitions (None
    for a stage 0 checkpoint of an older evaclip: it has none, and loads at any world size)."""
    n = ckpt.read_manifest(Path(tag_dir)).get("world_size")
    if isinstance(n, int) and n > 0:
        return n
    return len(list(Path(tag_dir).glob(OPTIM_FILES))) or None


def prepare(resume_from: tuple[Path, str], world_size: int, is_main: bool,
            log: Callable[[str], None]) -> Source:
    """What this run loads for ``resume_from`` (root, tag): the checkpoint itself, or (world size changed and the
    optimizer state is partitioned) its universal conversion, made by rank 0 while the other ranks wait."""
    root, tag = Path(resume_from[0]), resume_from[1]
    tag_dir = root / tag
    if is_universal(tag_dir):  # --resume pointed at a conversion
        return Source(root, tag, True, ckpt.read_manifest(tag_dir).get("world_size"))
    saved = saved_world_size(tag_dir)
    if saved is None or saved == world_size or not any(tag_dir.glob(OPTIM_FILES)):
        return Source(root, tag, False, saved)
    dst = root / ckpt.UNIVERSAL_DIR / tag
    problem = None
    if is_main:
        try:
            if dst.is_dir() and ckpt.damage(dst) is None and is_universal(dst):
                log(f"{tag_dir} was written by {saved} processes, this run has {world_size}: loading its universal "
                    f"checkpoint {dst}")
            else:
                log(f"{tag_dir} was written by {saved} processes, this run has {world_size}: converting it to "
                    f"DeepSpeed's universal checkpoint {dst} (once)")
                convert(tag_dir, dst, saved)
        except UserError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - one line for the user, whatever DeepSpeed raised
            problem = f"cannot convert {tag_dir} to a universal checkpoint ({type(e).__name__}: {e})"
    problem = _from_rank0(problem)
    if problem:
        raise UserError(f"{problem}; or resume with --nproc {saved}")
    return Source(dst.parent, tag, True, saved)


def loading_config(ds_config: dict) -> dict:
    """The DeepSpeed config that loads a universal checkpoint."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert(src: Path, dst: Path, saved_world: Optional[int] = None) -> Path:
    """``ds_to_universal`` of checkpoint folder ``src`` into ``dst`` (temporary sibling, renamed into place)."""
    import subprocess
    import sys

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with atomic.AtomicDir(dst, force=True) as tmp:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp), "--num_extract_workers", str(max(1, min(4, cpus))),
               "--num_merge_workers", str(max(1, min(2, cpus))), "--inject_missing_state"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal writes it beside its output
        if r.returncode != 0:
            raise UserError(f"cannot convert {src} to a universal checkpoint (ds_to_universal: "
                            f"{_last_line(r.stderr or r.stdout)})")
        _slim_optimizer_state(tmp / "zero" / "optimizer_state.pt")
        ckpt.write_manifest(tmp, {"world_size": saved_world, "source": src.name})
    return dst


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "%|" not in ln]
    return lines[-1][:300] if lines else "no output"


def _slim_optimizer_state(path: Path) -> None:
    """ZeRO-3's ``zero/optimizer_state.pt`` is rank 0's whole optimizer file (its fp32 partition and moments), and
    every rank loads it whole only to read the step and the param groups: keep those. Refuses step counts that
    differ between sub-groups (DeepSpeed would give every sub-group the first one)."""
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=False)
    inner = sd.get("optimizer_state_dict")
    if not isinstance(inner, dict) or "state" not in inner:
        return  # stage 1/2: already only the global state and the param groups
    steps = {float(s["step"]) for s in inner["state"].values() if "step" in s}
    if len(steps) > 1:
        raise UserError(f"the optimizer sub-groups of {path.parent.parent} are at different steps {sorted(steps)}: "
                        "DeepSpeed's universal loading keeps only one")
    inner["state"] = {k: {"step": s["step"]} for k, s in inner["state"].items() if "step" in s}
    sd.pop("fp32_flat_groups", None)
    with atomic.atomic_file(path) as tmp:
        torch.save(sd, tmp)


def _from_rank0(problem: Optional[str]) -> Optional[str]:
    """Rank 0's outcome on every rank, waiting up to WAIT_HOURS (not the process group's timeout: a conversion of
    an 18B checkpoint reads every partition)."""
    import datetime

    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return problem
    group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))
    try:
        box = [problem]
        tdist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    finally:
        tdist.destroy_process_group(group)


def after_load(optimizer, source: Source) -> None:
    """Undo what DeepSpeed's universal loading changes: every param group gets its own saved hyperparameters back
    (ZeRO-3 gives all of them group 0's) and every optimizer state its own ``step`` (ZeRO-3 shares one tensor)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    sd = torch.load(source.root / source.tag / "zero" / "optimizer_state.pt", map_location="cpu",
                    weights_only=False)
    saved = sd.get("param_groups") or (sd.get("optimizer_state_dict") or {}).get("param_groups") or []
    if len(saved) != len(inner.param_groups):
        raise UserError(f"{source.root / source.tag} has {len(saved)} optimizer param groups, this run has "
                        f"{len(inner.param_groups)}: resume with the recipe that wrote it")
    for group, old in zip(inner.param_groups, saved):
        for k, v in old.items():
            if k != "params":
                group[k] = v
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            ref = state.get("exp_avg")
            step = step.detach().clone()
            if on_device and torch.is_tensor(ref):  # fused/capturable AdamW keeps its step beside the moments
                step = step.to(device=ref.device, dtype=torch.float32)
            state["step"] = step


def rank_states(client: dict, rank: int) -> tuple[Optional[dict], Optional[dict]]:
    """(data position, RNG state) of ``rank`` from a checkpoint's client state.

    Same world size: the rank's own, exactly. Another world size: rank r < the old world size continues old rank r's
    data streams (stream ids r·workers + w are the same ids; resampled streams continue exactly) and RNG state;
    ranks beyond it start their own streams at the beginning (streams never read before) with an RNG seeded by
    (seed, rank, step); the streams of ranks that no longer exist end there. In epoch mode (data.resampled = false)
    the shard order of an epoch depends on the number of streams, so the epoch in progress is not completed
    exactly. (None, None) for a rank the checkpoint has no state of: the caller seeds it with ``fresh_seed``.
    """
    data_states, rng_states = client.get("data_states") or [], client.get("rng_states") or []
    if rank < len(data_states):
        return data_states[rank], rng_states[rank] if rank < len(rng_states) else None
    return None, None


def fresh_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of a rank that has no saved RNG state (a resume on more processes)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(("rank-rng", seed, rank, step)).encode(), digest_size=4).digest(),
                          "little")
