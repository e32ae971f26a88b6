"""Step checkpoints: written under a temporary tag, renamed into place, ``latest`` replaced atomically, the last K
kept. A checkpoint folder is a DeepSpeed checkpoint (``evaclip convert --from deepspeed`` reads it) whose client
state carries everything needed to continue exactly: step, per-rank data positions and RNG states, counters.

A checkpoint written by another number of processes is resumed through DeepSpeed's universal checkpoint
(``engine.universal``), converted once into ``checkpoints/universal/global_stepN`` and removed with its source."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from evaclip_cli import atomic
from evaclip_cli.engine import dist
from evaclip_cli.errors import UserError

TAG_RE = re.compile(r"^global_step(\d+)$")
MANIFEST = "evaclip_manifest.json"  # every file of a checkpoint and its size, written before the folder is renamed
UNIVERSAL_DIR = "universal"  # checkpoints/universal/global_stepN: a checkpoint converted for another world size


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = TAG_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = f".partial-{tag}"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tmp_tag
        if stale.exists():
            shutil.rmtree(stale)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    except Exception as e:
        raise _failed_write(e, ckpt_dir / tmp_tag, is_main) from None
    dist.barrier()
    final = ckpt_dir / tag
    if is_main:
        try:
            write_manifest(ckpt_dir / tmp_tag, {"world_size": client_state.get("world_size")})
        except OSError as e:
            raise _failed_write(e, ckpt_dir / tmp_tag, is_main) from None
        if final.exists():
            shutil.rmtree(final)
        (ckpt_dir / tmp_tag).rename(final)
        atomic.write_text(ckpt_dir / "latest", tag)
        complete = list_complete(ckpt_dir)
        for _, old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for p in ckpt_dir.glob(".partial-*"):
            shutil.rmtree(p, ignore_errors=True)
        prune_universal(ckpt_dir)
    dist.barrier()
    return final


def _failed_write(e: BaseException, partial: Path, is_main: bool) -> BaseException:
    """What a failed checkpoint write ends in: an OSError with its errno (torch's C++ writer reports a full disk as
    a RuntimeError: ``atomic.write_failure`` probes the folder, while it is still full), so the loop says "cannot
    write X: reason" in one line; the partial folder is removed (its space given back; ``latest`` never named it)."""
    err = atomic.write_failure(e, partial.parent)
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    return err if err is not None else e


def intact_note(ckpt_dir: Path) -> str:
    """'; the last complete checkpoint (X) is intact', for the one line of a failed write ('' when there is none)."""
    done = list_complete(Path(ckpt_dir))
    return f"; the last complete checkpoint ({done[-1][1]}) is intact" if done else ""


def write_manifest(tag_dir: Path, extra: Optional[dict] = None) -> None:
    """Record every file of a checkpoint folder with its size: a copy or disk that cut a file short shows. ``extra``
    (e.g. the world size that wrote it) is stored beside the file list."""
    import json

    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    atomic.write_text(tag_dir / MANIFEST, json.dumps({**(extra or {}), "files": files}, indent=1))


def read_manifest(tag_dir: Path) -> dict:
    """A checkpoint folder's manifest ({} when absent or unreadable)."""
    import json

    try:
        return json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def prune_universal(ckpt_dir: Path) -> None:
    """Remove the universal conversions whose source checkpoint is gone (pruned by ``keep_last``)."""
    root = Path(ckpt_dir) / UNIVERSAL_DIR
    if not root.is_dir():
        return
    kept = {p.name for _, p in list_complete(ckpt_dir)}
    for p in root.iterdir():
        if TAG_RE.match(p.name) and p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)
    atomic.remove_stale_temporaries(root)


def damage(tag_dir: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from (a file missing or cut short), or None when it is whole.
    Folders without a manifest (older evaclip) are checked by opening each torch file's zip directory."""
    import json
    import zipfile

    manifest = tag_dir / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return f"its {MANIFEST} is unreadable"
        for name, size in files.items():
            f = tag_dir / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size:,} of {size:,} bytes"
        return None
    pts = sorted(tag_dir.glob("*.pt"))
    if not pts:
        return "it holds no checkpoint file"
    for f in pts:
        try:
            with zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{f.name} is truncated or damaged"
    return None


def find_resume(spec: Optional[str], ckpt_dir: Path, log=None) -> Optional[tuple[Path, str]]:
    """(checkpoint root, tag) to resume from: ``auto`` = the newest whole checkpoint of the run, if any; a damaged
    newer one is reported through ``log`` and passed over. A path from elsewhere into a run folder (``ckpt_dir``'s
    parent) that holds another run is refused (``refuse_foreign_resume``)."""
    if not spec:
        return None
    if spec == "auto":
        complete = list_complete(ckpt_dir)
        if not complete:
            return None
        latest = ckpt_dir / "latest"
        named = latest.read_text().strip() if latest.is_file() else None
        candidates = [p for _, p in reversed(complete)]
        if named and (ckpt_dir / named).is_dir():  # 'latest' first (it may name a non-step tag)
            candidates = [ckpt_dir / named] + [p for p in candidates if p.name != named]
        for i, tag_dir in enumerate(candidates):
            why = damage(tag_dir)
            if why is None:
                return ckpt_dir, tag_dir.name
            if log is not None:
                nxt = next((c.name for c in candidates[i + 1:] if damage(c) is None), None)
                log(f"[yellow]{tag_dir} is incomplete ({why}); "
                    f"{'resuming from ' + nxt if nxt else 'no whole checkpoint is left'}[/yellow]")
        raise UserError(f"{ckpt_dir}: every checkpoint is incomplete or damaged; start again with another --out, "
                        "or remove the run's checkpoints/ folder")
    root, tag = _explicit_checkpoint(spec)
    refuse_foreign_resume(spec, root, ckpt_dir)
    return root, tag


def _explicit_checkpoint(spec: str) -> tuple[Path, str]:
    """``--resume PATH``: a ``global_stepN`` folder, a checkpoints folder (its newest) or a run folder (its newest)."""
    p = Path(spec)
    if not p.exists():
        raise UserError(f"--resume {spec}: no such checkpoint")
    if TAG_RE.match(p.name) and p.is_dir():
        return p.parent, p.name
    complete = list_complete(p)
    if complete:
        return p, complete[-1][1].name
    if (p / "checkpoints").is_dir() and list_complete(p / "checkpoints"):
        return p / "checkpoints", list_complete(p / "checkpoints")[-1][1].name
    raise UserError(f"--resume {spec}: no complete checkpoint (global_step*/) there")


def refuse_foreign_resume(spec: str, root: Path, ckpt_dir: Path) -> None:
    """A checkpoint from elsewhere resumes only into a new or empty run folder (``ckpt_dir``'s parent): one that
    holds another run's checkpoints or a finished ``final/`` would have them replaced and its metrics mixed. A
    checkpoint of the run folder's own (``root`` under ``ckpt_dir``) always resumes."""
    own, src = Path(ckpt_dir).resolve(), Path(root).resolve()
    if src == own or own in src.parents:
        return
    run = Path(ckpt_dir).parent
    held = list_complete(Path(ckpt_dir))
    if held:
        what = f"checkpoints of another run (up to step {held[-1][0]})"
    elif (run / "final").exists():
        what = "a finished run (final/)"
    else:
        return
    raise UserError(f"--resume {spec}: {run} already holds {what}, which resuming another checkpoint there would "
                    f"replace; choose a new or empty --out, or --resume auto to continue {run}'s own run")


def read_client_state(tag_dir: Path) -> dict:
    """The client state evaclip saved with a checkpoint (step, data positions, RNG states...), read before any model
    is built: DeepSpeed keeps it beside rank 0's model states (memory-mapped here: the file also holds the weights
    of a ZeRO 0-2 run)."""
    import torch

    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    rank0 = [f for f in files if f.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    if not rank0:
        raise UserError(f"{tag_dir}: no rank-0 model states file (mp_rank_00_model_states.pt); is the checkpoint "
                        "complete?")
    try:
        sd = torch.load(str(rank0[0]), map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(f"{rank0[0]}: cannot read ({type(e).__name__}); is the checkpoint complete?") from None
    return {k: v for k, v in sd.items() if k in ("step", "world_size", "counters", "data_states", "rng_states",
                                                  "recipe", "resolved_recipe", "samples", "segment", "guard")}


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    assert not isinstance(keys, str)
    version, py_state, gauss = random.getstate()
    return {"python": [version, list(py_state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def seed_rng(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (a rank that has no saved RNG state of its own)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
