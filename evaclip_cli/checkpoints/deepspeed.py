"""DeepSpeed checkpoint folders (ZeRO 0-3, any world size) -> one consolidated fp32 state dict.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from evaclip_cli.checkpoints.io import load_state_dict
from evaclip_cli.errors import UserError, first_line


def is_deepspeed_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or any(path.glob("global_step*")):
        return True
    return any(path.glob("*mp_rank_*_model_states.pt"))


def _deepspeed_tag_dir(path: Path) -> tuple[Path, Optional[str]]:
    """(checkpoint root, tag) for a DeepSpeed folder given as the root or as one tag folder."""
    if any(path.glob("*mp_rank_*_model_states.pt")):
        return path.parent, path.name
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    tags = sorted(path.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not tags:
        raise UserError(f"{path}: no DeepSpeed checkpoint (no 'latest' file, no global_step* folders)")
    return path, tags[-1].name


def load_deepspeed_state(path: Path) -> dict:
    """Consolidated fp32 state dict from a DeepSpeed checkpoint folder (ZeRO 0-3, any world size)."""
    root, tag = _deepspeed_tag_dir(path)
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise UserError(f"{root}: 'latest' names tag '{tag}', but {tag_dir} does not exist")
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import logging

        from deepspeed.utils import logger as ds_logger
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ds_logger.setLevel(logging.WARNING)
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except Exception as e:
            raise UserError(f"{tag_dir}: cannot consolidate the ZeRO checkpoint ({type(e).__name__}: "
                            f"{first_line(e)}); is the checkpoint complete?") from None
        return dict(state)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{tag_dir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    if len(files) > 1:
        raise UserError(f"{tag_dir}: {len(files)} model-parallel ranks; evaclip writes data-parallel checkpoints only")
    import torch

    state = load_state_dict(files[0], mmap=False)
    floats = [t for t in state.values() if t.is_floating_point()]
    if floats and all(t.dtype in (torch.bfloat16, torch.float16) for t in floats):
        state = _stage0_fp32_masters(files[0], state)
    return state


def _stage0_fp32_masters(path: Path, state: dict) -> dict:
    """Without ZeRO, a bf16/fp16 run's module weights are the rounded 16-bit copies; the fp32 masters sit in the
    optimizer state as unnamed per-group lists. evaclip's checkpoints name them (client state
    ``param_group_names``); use them so the export is the fp32 model, not a widened 16-bit one."""
    import sys

    import torch

    obj = torch.load(str(path), map_location="cpu", weights_only=False)  # DeepSpeed's own file: its loader does too
    groups = (obj.get("optimizer") or {}).get("fp32_groups")
    names = obj.get("param_group_names")
    if not groups or not names or len(groups) != len(names):
        print(f"evaclip: warning: {path} holds 16-bit weights without named fp32 masters; exporting the 16-bit "
              "weights", file=sys.stderr)
        return state
    out = dict(state)
    for group_names, tensors in zip(names, groups):
        for name, t in zip(group_names, tensors):
            if name in out:
                out[name] = t.detach().reshape(out[name].shape).float()
    return out
