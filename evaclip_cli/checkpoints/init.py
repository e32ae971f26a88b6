"""Initialise a tower from a checkpoint: a distilled MIM student, an evaclip/open_clip folder, an EVA .pt, a timm
tower folder, BAAI's HF folder or a DeepSpeed run, local or on the Hub (``hf-hub:OWNER/NAME[/FILE][@REV]``, a
released name such as ``EVA-18B``). Works on ZeRO-3 partitioned models (rank 0 reads, GatheredParameters writes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from evaclip_cli.checkpoints.io import load_state_dict
from evaclip_cli.errors import UserError
from evaclip_cli.models.keymaps import (
    detect_layout,
    eva_to_open_clip,
    mim_to_open_clip_visual,
    plain_clip_text,
    timm_head_to_proj,
)


def read_any(path: str | Path, separate_qkv: bool = False, lazy: bool = False) -> dict:
    """Any supported source -> a state dict in evaclip's open_clip layout (``visual.trunk.*``, ``text.*``).

    A Hub source (``hf-hub:...``, a released name) is fetched into huggingface_hub's cache first. BAAI's HF layout
    gets its q/k/v fused; with ``lazy`` those stay ``models.lazy.LazyCat`` (computed when copied into the model,
    one at a time: what ``load_into`` does), else every value is a tensor."""
    from evaclip_cli.checkpoints.hub_source import open_clip_tag_cfg, resolve_path
    from evaclip_cli.models.lazy import materialize_state

    if not Path(str(path)).exists() and open_clip_tag_cfg(str(path)).get("quick_gelu"):
        raise UserError(f"{path}: open_clip trained these weights with QuickGELU and evaclip's towers use GELU, so "
                        "they would compute something else here; evaluate them with `evaclip eval -m` instead")
    state = _read_any(resolve_path(str(path))[0], separate_qkv)
    return state if lazy else materialize_state(state)


def _read_any(p: Path, separate_qkv: bool) -> dict:
    from evaclip_cli.checkpoints.deepspeed import is_deepspeed_dir, load_deepspeed_state
    from evaclip_cli.checkpoints.hf_layout import is_hf_dir, read_hf
    from evaclip_cli.models.keymaps import hf_to_open_clip
    from evaclip_cli.models.openclip_compat import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, load_sharded_safetensors

    if not p.exists():
        raise UserError(f"{p}: no such file or directory (init checkpoint)")
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            state = load_state_dict(p / WEIGHTS_NAME) if (p / WEIGHTS_NAME).is_file() \
                else load_sharded_safetensors(p / INDEX_NAME)
        elif (p / "config.json").is_file() and "architecture" in json.loads((p / "config.json").read_text()):
            f = p / "model.safetensors"
            trunk = load_state_dict(f) if f.is_file() else load_sharded_safetensors(p / "model.safetensors.index.json")
            return {"visual.trunk." + k: v for k, v in trunk.items()}
        elif is_hf_dir(p):
            return read_hf(p, separate_qkv)
        elif is_deepspeed_dir(p):
            state = load_deepspeed_state(p)
        elif (p / "final").is_dir():  # an evaclip run folder
            return _read_any(p / "final", separate_qkv)
        else:
            raise UserError(f"{p}: not an open_clip, timm, BAAI HF or DeepSpeed checkpoint folder")
    else:
        state = load_state_dict(p)
    layout = detect_layout(state)
    if layout == "hf":
        return hf_to_open_clip(state, separate_qkv)[0]
    if layout == "eva":
        return eva_to_open_clip(state, separate_qkv)
    if layout == "mim":
        return mim_to_open_clip_visual(state, separate_qkv)[0]
    if layout == "open_clip_visual":
        return {"visual." + k: v for k, v in state.items()}
    if layout == "open_clip":
        return timm_head_to_proj(state)
    text = plain_clip_text(state)
    if text is not None:
        return text
    raise UserError(f"{p}: unrecognised checkpoint layout (first keys: {', '.join(list(state)[:3])})")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    segs = name.split(".")
    return any(s == pat or s.startswith(pat + "_") for pat in skip for s in segs)


def load_into(model, state: dict, prefix: str, skip: Iterable[str], where: str, is_main: bool,
              zero3: bool) -> dict:
    """Copy ``state[k]`` for every model parameter named ``prefix*`` (not skipped) into the model; resamples the
    position embedding across resolutions. Returns counts for the log."""
    import torch

    from evaclip_cli.models.clip import resample_pos_embed

    loaded, skipped, missing = 0, [], []
    for name, param in model.named_parameters():
        if not name.startswith(prefix):
            continue
        if _skipped(name, skip):
            skipped.append(name)
            continue
        if name not in state:
            missing.append(name)
            continue
        src = state[name]
        full_shape = tuple(getattr(param, "ds_shape", param.shape))
        if name.endswith("pos_embed") and tuple(src.shape) != full_shape and src.shape[-1] == full_shape[-1]:
            grid = int(round((full_shape[1] - 1) ** 0.5))
            src = resample_pos_embed(src, grid) if not isinstance(src, _Shape) else _Shape(full_shape)
        if tuple(src.shape) != full_shape and src.numel() != int(torch.Size(full_shape).numel()):
            raise UserError(f"{where}: '{name}' has shape {tuple(src.shape)}, the model has {full_shape}; "
                            "is this checkpoint for the recipe's model?")
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if is_main:
                    with torch.no_grad():
                        param.data.copy_(src.reshape(param.shape).to(param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(src.reshape(param.shape).to(param.dtype))
        loaded += 1
    if loaded == 0:
        raise UserError(f"{where}: no tensor matched the model's {prefix.rstrip('.')} tower "
                        f"(first keys: {', '.join(list(state)[:3])})")
    return {"loaded": loaded, "skipped": len(skipped), "missing": missing}


def init_from_recipe(model, init_cfg, separate_qkv: bool, is_main: bool, zero3: bool, log=print) -> None:
    """Vision tower from ``init.vision``, text tower from ``init.text``, with ``init.skip`` left at their init."""
    for tower, src in (("visual.", init_cfg.vision), ("text.", init_cfg.text)):
        if not src:
            continue
        state = read_any(src, separate_qkv, lazy=True) if is_main or not zero3 else {}
        if zero3:  # only rank 0 reads the file; the others need the key set and shapes to walk the same params
            from evaclip_cli.engine.dist import all_gather_object

            meta = all_gather_object({k: tuple(v.shape) for k, v in state.items()} if is_main else None)[0]
            if not is_main:
                state = {k: _Shape(s) for k, s in meta.items()}
        res = load_into(model, state, tower, init_cfg.skip, str(src), is_main, zero3)
        missing = f", {len(res['missing'])} not in the checkpoint (kept at init, first: {res['missing'][0]})" \
            if res["missing"] else ""
        log(f"init {tower.rstrip('.')} from {src}: {res['loaded']} tensors loaded, {res['skipped']} skipped "
            f"by init.skip{missing}")


class _Shape:
    """Stands in for a tensor on ranks that do not read the file (ZeRO-3): only its shape is used."""

    def __init__(self, shape):
        import torch

        self.shape = torch.Size(shape)

    def numel(self):
        return self.shape.numel()

    def reshape(self, *a):
        return self

    def to(self, *a, **k):
        return self


def clip_source_spec(src: str):
    """The architecture of a whole-CLIP source (``init.clip``): a released name from its table row (nothing fetched),
    else the source resolved (a Hub source fetched into huggingface_hub's cache) and its own config read (open_clip
    folder, BAAI's HF folder, a run folder or DeepSpeed checkpoint through its recipe)."""
    from evaclip_cli.checkpoints.detect import detect_format, resolve_spec
    from evaclip_cli.checkpoints.hub_source import resolve_path
    from evaclip_cli.checkpoints.load import _run_source
    from evaclip_cli.models.specs import RELEASED

    if src in RELEASED and RELEASED[src].layout != "mim":
        return RELEASED[src].spec()
    path, arch = resolve_path(src)
    if not path.exists():
        raise UserError(f"init.clip: {src}: no such file or folder (give a `train` run folder, an open_clip folder, "
                        "a DeepSpeed checkpoint, a released name such as EVA-CLIP-8B, or hf-hub:OWNER/NAME)")
    if path.is_dir():
        path = _run_source(path)
    return resolve_spec(path, detect_format(path, "auto"), None, arch, None)
