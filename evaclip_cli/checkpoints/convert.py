"""``evaclip convert``: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) / open_clip / timm folder / BAAI's HF
remote-code folder -> open_clip folder, timm folder, the EVA layout or BAAI's HF layout. The source may be on the Hub
(``hf-hub:OWNER/NAME[/FILE][@REV]`` or a released name such as ``EVA-CLIP-18B``, see ``checkpoints.hub_source``).

The output is written to a temporary sibling and renamed into place, so an interrupted conversion never leaves a
half-written folder. Source tensors are memory-mapped where the format allows and written tensor by tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from evaclip_cli.atomic import cannot, check_apart, check_output, output_lock
from evaclip_cli.checkpoints.deepspeed import load_deepspeed_state
from evaclip_cli.checkpoints.detect import detect_format, resolve_spec
from evaclip_cli.checkpoints.folders import write_eva_file, write_open_clip_folder, write_timm_folder
from evaclip_cli.checkpoints.io import load_sharded_safetensors, load_state_dict, parse_size
from evaclip_cli.errors import UserError
from evaclip_cli.models.keymaps import (
    check_against_model,
    detect_layout,
    eva_to_open_clip,
    mim_to_open_clip_visual,
    timm_head_to_proj,
)
from evaclip_cli.models.openclip_compat import INDEX_NAME, WEIGHTS_NAME
from evaclip_cli.models.specs import ClipSpec


def load_source(src: Path, fmt: str, spec: ClipSpec, notes: Optional[list] = None) -> tuple[dict, dict, str]:
    """(state in evaclip's open_clip layout, MIM extras, detected layout); what the user should be told about the
    mapping (BAAI's missing logit_scale, a dropped k bias) is appended to ``notes``."""
    separate = not spec.vision.qkv_fused
    if fmt == "hf":
        from evaclip_cli.checkpoints.hf_layout import read_hf

        if not src.is_dir():
            state = load_state_dict(src)
        else:
            return read_hf(src, separate, notes), {}, "hf"
    elif fmt == "open_clip":
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
        return timm_head_to_proj(state), {}, layout
    if layout == "hf":
        from evaclip_cli.models.keymaps import hf_to_open_clip

        state, said = hf_to_open_clip(state, separate)
        if notes is not None:
            notes.extend(said)
        return state, {}, layout
    if layout == "eva":
        return eva_to_open_clip(state, separate), {}, layout
    if layout == "mim":
        vis, extras = mim_to_open_clip_visual(state, separate)
        return vis, extras, layout
    if layout == "open_clip_visual":
        return {"visual." + k: v for k, v in state.items()}, {}, layout
    raise UserError(f"{src}: unrecognised key layout (first keys: {', '.join(list(state)[:3])}); expected an EVA-CLIP, "
                    "MIM, BAAI HF or open_clip state dict")


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

    dst = Path(dst)
    console = Console(stderr=True, quiet=quiet)
    parse_size(max_shard_size)  # validate before any work
    if Path(str(src)).exists():
        check_apart(src, dst, "convert")  # before the '--force' hint: --force would destroy the source
    check_output(dst, "any" if dst_format != "eva" else "file")
    if dst.exists() and not force:  # before a download of tens of GB, not after
        raise UserError(f"{dst} exists; pass --force to replace it")
    src, model = _resolve_hub(src, eva_config, model, recipe, console)
    check_apart(src, dst, "convert")  # a Hub source lives in the Hugging Face cache
    fmt = detect_format(src, src_format)
    spec = resolve_spec(src, fmt, eva_config, model, recipe)
    if dst_format == "hf":  # a tower the layout cannot describe: say so before reading anything
        from evaclip_cli.models.specs import hf_config_from_spec

        hf_config_from_spec(spec)
    with output_lock(dst):  # two converts into one DST: the second stops with one line
        return _convert(src, dst, fmt, spec, console, dst_format, dtype, max_shard_size, vision_only, force)


def _resolve_hub(src, eva_config, model, recipe, console) -> tuple[Path, Optional[str]]:
    """A Hub source (``hf-hub:...`` or a released name) -> the local file/folder in huggingface_hub's cache; the
    released name also says the architecture (unless the user named one)."""
    from evaclip_cli.checkpoints.hub_source import is_hub_source, resolve_source

    text = str(src)
    if Path(text).exists() or not is_hub_source(text):
        return Path(text), model
    got = resolve_source(text, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    if got.arch and not (eva_config or model or recipe):
        model = got.arch
    return got.path, model


def _convert(src: Path, dst: Path, fmt: str, spec: ClipSpec, console, dst_format: str, dtype, max_shard_size,
             vision_only: bool, force: bool) -> list[str]:
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    notes: list[str] = []
    with console.status(f"reading {src} ({fmt})"):
        state, extras, layout = load_source(src, fmt, spec, notes)
    vision_only = vision_only or layout in ("mim", "open_clip_visual")
    state = fit_to_expected(state, expected_state(spec), str(src), vision_only)
    try:
        files, kind = _write(state, extras, spec, src, dst, dst_format, layout, dtype, max_shard_size, vision_only,
                             force, notes)
    except OSError as e:  # a full disk, a read-only folder: the temporary output is gone, DST untouched
        raise UserError(f"cannot write {dst}: {cannot(e, dst)}") from None
    for line in notes:
        console.print(f"note: {line}", highlight=False, soft_wrap=True)
    n = sum(t.numel() for t in state.values())
    console.print(f"[green]wrote[/green] {dst} ({kind}; {len(state)} tensors, {n:,} parameters, layout {layout}): "
                  f"{', '.join(files)}", soft_wrap=True)
    return files


def _write(state: dict, extras: dict, spec: ClipSpec, src: Path, dst: Path, dst_format: str, layout: str, dtype,
           max_shard_size, vision_only: bool, force: bool, notes: list) -> tuple[list[str], str]:
    if dst_format == "open_clip":
        if vision_only:
            files = write_timm_folder(state, spec, dst, dtype, max_shard_size, force, extras or None)
            kind = "timm vision-tower folder"
        else:
            files = write_open_clip_folder(state, spec, dst, dtype, max_shard_size, force)
            kind = "open_clip folder"
    elif dst_format == "hf":
        from evaclip_cli.checkpoints.hf_layout import write_hf_folder

        if vision_only:
            raise UserError(f"{src}: --to hf writes a whole CLIP (BAAI's EvaCLIPModel); this is a vision tower only "
                            f"({layout})")
        files = write_hf_folder(state, spec, dst, dtype, max_shard_size, force, notes)
        kind = "BAAI HF remote-code layout"
    else:
        files = write_eva_file(state, spec, dst, dtype, force, extras)
        kind = "EVA reference layout"
    return files, kind
