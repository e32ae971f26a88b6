"""``evaclip convert``: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) / open_clip / timm folder -> open_clip folder,
timm folder or the EVA layout.

The output is written to a temporary sibling and renamed into place, so an interrupted conversion never leaves a
half-written folder. Source tensors are memory-mapped where the format allows and written shard by shard.
"""
from __future__ import annotations

from pathlib import Path

from evaclip_cli.atomic import output_lock
from evaclip_cli.checkpoints.deepspeed import load_deepspeed_state
from evaclip_cli.checkpoints.detect import detect_format, resolve_spec
from evaclip_cli.checkpoints.folders import write_eva_file, write_open_clip_folder, write_timm_folder
from evaclip_cli.checkpoints.io import load_sharded_safetensors, load_state_dict, parse_size
from evaclip_cli.errors import UserError
from evaclip_cli.models.keymaps import check_against_model, detect_layout, eva_to_open_clip, mim_to_open_clip_visual
from evaclip_cli.models.openclip_compat import INDEX_NAME, WEIGHTS_NAME
from evaclip_cli.models.specs import ClipSpec


def load_source(src: Path, fmt: str, spec: ClipSpec) -> tuple[dict, dict, str]:
    """(state in evaclip's open_clip layout, MIM extras, detected layout)."""
    separate = not spec.vision.qkv_fused
    if fmt == "open_clip":
        if src.is_dir():
            if (src / WEIGHTS_NAME).is_file():
                state = load_state_dict(src / WEIGHTS_NAME)
            elif (src / INDEX_NAME).is_file():
                state = load_sharded_safetensors(src / INDEX_NAME)
            else:
                raise UserError(f"{src}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        else:
            state = load_state_dict(src)
    elif fmt == "timm":
        if (src / "model.safetensors").is_file():
            trunk = load_state_dict(src / "model.safetensors")
        elif (src / "model.safetensors.index.json").is_file():
            trunk = load_sharded_safetensors(src / "model.safetensors.index.json")
        else:
            raise UserError(f"{src}: no model.safetensors in the timm folder")
        extras = load_state_dict(src / "mim_extras.safetensors") if (src / "mim_extras.safetensors").is_file() else {}
        return {"visual.trunk." + k: v for k, v in trunk.items()}, extras, "mim" if extras else "open_clip_visual"
    elif fmt == "deepspeed":
        if not src.is_dir():
            raise UserError(f"{src}: --from deepspeed needs a checkpoint folder")
        state = load_deepspeed_state(src)
    else:
        state = load_state_dict(src)
    layout = detect_layout(state)
    if layout == "open_clip":
        return state, {}, layout
    if layout == "eva":
        return eva_to_open_clip(state, separate), {}, layout
    if layout == "mim":
        vis, extras = mim_to_open_clip_visual(state, separate)
        return vis, extras, layout
    if layout == "open_clip_visual":
        return {"visual." + k: v for k, v in state.items()}, {}, layout
    raise UserError(f"{src}: unrecognised key layout (first keys: {', '.join(list(state)[:3])}); expected an EVA-CLIP, "
                    "MIM or open_clip state dict")


def expected_state(spec: ClipSpec) -> dict:
    from evaclip_cli.models.clip import build_clip

    return build_clip(spec, device="meta").state_dict()


def fit_to_expected(state: dict, expected: dict, where: str, vision_only: bool) -> dict:
    if vision_only:
        expected = {k: v for k, v in expected.items() if k.startswith("visual.trunk.")}
        state = {k: v for k, v in state.items() if k.startswith("visual.trunk.")}
    key = "visual.trunk.pos_embed"
    if key in state and key in expected and state[key].shape[-1] == expected[key].shape[-1] \
            and state[key].shape != expected[key].shape:
        raise UserError(f"{where}: position embedding {tuple(state[key].shape)} does not match the config's image "
                        f"size {tuple(expected[key].shape)}; fix vision_cfg.image_size (train resamples it)")
    check_against_model(state, expected, where)
    # model order and model shapes (logit_scale [1] after DeepSpeed -> [] as open_clip has it)
    return {k: (state[k].reshape(expected[k].shape) if tuple(state[k].shape) != tuple(expected[k].shape)
                else state[k]) for k in expected if k in state}


def run_convert(src, dst, src_format="auto", dst_format="open_clip", eva_config=None, model=None, recipe=None,
                dtype="auto", max_shard_size="5GB", vision_only=False, force=False, quiet=False) -> list[str]:
    from rich.console import Console

    src, dst = Path(src), Path(dst)
    console = Console(stderr=True, quiet=quiet)
    fmt = detect_format(src, src_format)
    spec = resolve_spec(src, fmt, eva_config, model, recipe)
    parse_size(max_shard_size)  # validate before any work
    with output_lock(dst):  # two converts into one DST: the second stops with one line
        return _convert(src, dst, fmt, spec, console, dst_format, dtype, max_shard_size, vision_only, force)


def _convert(src: Path, dst: Path, fmt: str, spec: ClipSpec, console, dst_format: str, dtype, max_shard_size,
             vision_only: bool, force: bool) -> list[str]:
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    with console.status(f"reading {src} ({fmt})"):
        state, extras, layout = load_source(src, fmt, spec)
    vision_only = vision_only or layout in ("mim", "open_clip_visual")
    state = fit_to_expected(state, expected_state(spec), str(src), vision_only)
    if dst_format == "open_clip":
        if vision_only:
            files = write_timm_folder(state, spec, dst, dtype, max_shard_size, force, extras or None)
            kind = "timm vision-tower folder"
        else:
            files = write_open_clip_folder(state, spec, dst, dtype, max_shard_size, force)
            kind = "open_clip folder"
    else:
        files = write_eva_file(state, spec, dst, dtype, force, extras)
        kind = "EVA reference layout"
    n = sum(t.numel() for t in state.values())
    console.print(f"[green]wrote[/green] {dst} ({kind}; {len(state)} tensors, {n:,} parameters, layout {layout}): "
                  f"{', '.join(files)}")
    return files
