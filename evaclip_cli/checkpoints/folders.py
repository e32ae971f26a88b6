"""The folders and files evaclip writes: open_clip folders, timm vision-tower folders, the EVA reference layout.

Every writer goes through a temporary sibling renamed into place (``evaclip_cli.atomic``): an interrupted write
never leaves a half-written output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evaclip_cli.atomic import AtomicDir, atomic_file, cannot
from evaclip_cli.checkpoints.io import (
    cast,
    parse_size,
    save_safetensors_sharded,
    torch_dtype,
    write_safetensors,
    write_torch_file,
)
from evaclip_cli.errors import UserError
from evaclip_cli.models.keymaps import open_clip_to_eva
from evaclip_cli.models.openclip_compat import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from evaclip_cli.models.specs import ClipSpec, eva_config_from_spec, open_clip_model_cfg


def preprocess_cfg(spec: ClipSpec) -> dict:
    return {"size": spec.vision.image_size, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
            "fill_color": 0}


def write_open_clip_folder(state: dict, spec: ClipSpec, dst: Path, dtype: Optional[str] = None,
                           max_shard_size: str | int = "5GB", force: bool = False,
                           extra_config: Optional[dict] = None) -> list[str]:
    """An open_clip folder: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (or shards + index)."""
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    cfg = {"model_cfg": open_clip_model_cfg(spec), "preprocess_cfg": preprocess_cfg(spec)}
    if extra_config:
        cfg.update(extra_config)
    with AtomicDir(dst, force) as tmp:
        files = save_safetensors_sharded(state, tmp, WEIGHTS_NAME, INDEX_NAME, limit, torch_dtype(dtype))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return [CONFIG_NAME, *files]


def write_timm_folder(vision_state: dict, spec: ClipSpec, dst: Path, dtype=None, max_shard_size="5GB",
                      force=False, extras: Optional[dict] = None) -> list[str]:
    """A vision tower alone as a timm folder (``timm.create_model('local-dir:DST', pretrained=True)``), with the
    MIM-only tensors (``mask_token``, ``lm_head``) kept in ``mim_extras.safetensors`` for ``distill --resume``."""
    from safetensors.torch import save_file

    from evaclip_cli.models.specs import GENERIC_TIMM_NAME

    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    trunk = {k[len("visual.trunk."):]: v for k, v in vision_state.items() if k.startswith("visual.trunk.")}
    v = spec.vision
    cfg = {
        "architecture": GENERIC_TIMM_NAME,
        "model_args": v.timm_kwargs(),
        "num_classes": 0,
        "global_pool": "token",
        "pretrained_cfg": {"input_size": [3, v.image_size, v.image_size], "interpolation": "bicubic",
                           "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "crop_pct": 1.0, "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"},
        "evaclip": {"vision_spec": v.model_dump()},
    }
    with AtomicDir(dst, force) as tmp:
        files = save_safetensors_sharded(trunk, tmp, "model.safetensors", "model.safetensors.index.json", limit,
                                         torch_dtype(dtype))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if extras:
            save_file({k: cast(t, torch_dtype(dtype)) for k, t in extras.items()}, str(tmp / "mim_extras.safetensors"))
            files.append("mim_extras.safetensors")
    return ["config.json", *files]


def write_eva_file(state: dict, spec: ClipSpec, dst: Path, dtype=None, force=False, extras=None) -> list[str]:
    """The reference repo's layout: a plain state dict (.pt/.bin or .safetensors) + its model-config JSON. Streamed:
    one tensor (cast to ``dtype``) in memory at a time, whatever the format."""
    vision_only = not any(k.startswith("text.") for k in state)
    separate = not spec.vision.qkv_fused
    if vision_only:  # MIM layout: no 'visual.' prefix
        out = {k[len("visual."):]: v for k, v in open_clip_to_eva(state, separate).items()}
        out.update(extras or {})
    else:
        out = open_clip_to_eva(state, separate)
    td = torch_dtype(dtype)
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    cfg_path = dst.with_suffix(".json")
    try:
        with atomic_file(dst) as tmp, atomic_file(cfg_path) as cfg_tmp:
            if dst.suffix == ".safetensors":
                write_safetensors(tmp, out, td, metadata={"format": "pt"})
            else:
                write_torch_file(tmp, out, td)
            cfg_tmp.write_text(json.dumps(eva_config_from_spec(spec), indent=2))
    except OSError as e:
        raise UserError(f"cannot write {dst}: {cannot(e, dst)}") from None
    return [dst.name, cfg_path.name]
