"""``evaclip convert``: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) / open_clip folder <-> open_clip folder / EVA.

The output is written to a temporary sibling and renamed into place, so an interrupted conversion never leaves a
half-written folder. Source tensors are memory-mapped where the format allows and written shard by shard, so
converting 18B needs little more memory than one shard beyond the page cache.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from .errors import UserError
from .models.checkpoints import (
    check_against_model,
    detect_layout,
    eva_to_open_clip,
    load_state_dict,
    mim_to_open_clip_visual,
    open_clip_to_eva,
    read_json,
)
from .models.openclip_compat import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from .models.specs import (
    ClipSpec,
    eva_config_from_spec,
    open_clip_model_cfg,
    resolve_arch,
    spec_from_eva_config,
    spec_from_open_clip_cfg,
)

RECIPE_FILES = ("evaclip_recipe.toml", "recipe.toml")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------------ helpers
def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '0' -> 0 (no sharding)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.I)
    if not m:
        raise UserError(f"--max-shard-size '{text}' is not a size (e.g. 5GB, 500MB, 2GiB, 0 for one file)")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit else ""]
    return int(num * base**power)


def _torch_dtype(name: Optional[str]):
    import torch

    return None if name in (None, "auto") else getattr(torch, _DTYPES[name])


def _cast(t, dtype):
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


class AtomicDir:
    """Write into ``.NAME.tmp-PID`` beside DST; rename into place on success, remove on failure."""

    def __init__(self, dst: Path, force: bool):
        self.dst = Path(dst)
        self.force = force
        if self.dst.exists() and not force:
            raise UserError(f"{self.dst} exists; pass --force to replace it")
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot create {self.tmp} ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            self.dst.rename(old)
        self.tmp.rename(self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return False


def save_safetensors_sharded(state: dict, folder: Path, weights_name: str, index_name: str, max_shard_bytes: int,
                             dtype=None, metadata: Optional[dict] = None) -> list[str]:
    """Write ``state`` as one safetensors file, or as shards + an index (the Hub's convention) above the limit."""
    from safetensors.torch import save_file

    import torch

    sizes = {k: v.numel() * (v.element_size() if dtype is None or not v.is_floating_point()
                             else torch.empty((), dtype=dtype).element_size()) for k, v in state.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for k in state:
        if max_shard_bytes and groups[-1] and acc + sizes[k] > max_shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(k)
        acc += sizes[k]
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file({k: _cast(state[k], dtype) for k in groups[0]}, str(folder / weights_name), metadata=meta)
        return [weights_name]
    stem = weights_name[: -len(".safetensors")]
    names, weight_map = [], {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: _cast(state[k], dtype) for k in keys}, str(folder / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in keys})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return [*names, index_name]


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
        files = save_safetensors_sharded(state, tmp, WEIGHTS_NAME, INDEX_NAME, limit, _torch_dtype(dtype))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return [CONFIG_NAME, *files]


def write_timm_folder(vision_state: dict, spec: ClipSpec, dst: Path, dtype=None, max_shard_size="5GB",
                      force=False, extras: Optional[dict] = None) -> list[str]:
    """A vision tower alone as a timm folder (``timm.create_model('local-dir:DST', pretrained=True)``), with the
    MIM-only tensors (``mask_token``, ``lm_head``) kept in ``mim_extras.safetensors`` for ``distill --resume``."""
    from safetensors.torch import save_file

    from .models.specs import GENERIC_TIMM_NAME

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
                                         _torch_dtype(dtype))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if extras:
            save_file({k: _cast(t, _torch_dtype(dtype)) for k, t in extras.items()}, str(tmp / "mim_extras.safetensors"))
            files.append("mim_extras.safetensors")
    return ["config.json", *files]


# ------------------------------------------------------------------------------------------------ sources
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
                            f"{str(e).splitlines()[0][:200]})") from None
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


def _find_recipe_near(path: Path) -> Optional[Path]:
    for d in (path, path.parent, path.parent.parent):
        for name in RECIPE_FILES:
            if (d / name).is_file():
                return d / name
    return None


def resolve_spec(src: Path, fmt: str, eva_config: Optional[Path], model: Optional[str], recipe: Optional[str]) \
        -> ClipSpec:
    given = [x for x in (eva_config, model, recipe) if x]
    if len(given) > 1:
        raise UserError("give only one of --eva-config, --model, --recipe")
    if eva_config:
        return spec_from_eva_config(read_json(eva_config, "EVA model config"), where=str(eva_config))
    if model:
        return resolve_arch(model)
    if recipe:
        from .recipes import load_recipe

        return load_recipe(recipe).recipe.spec()
    if fmt == "open_clip":
        return spec_from_open_clip_cfg(read_json(src / CONFIG_NAME, "open_clip config"))
    if fmt == "timm":
        cfg = read_json(src / "config.json", "timm config")
        vision = cfg.get("evaclip", {}).get("vision_spec")
        if vision is None:
            raise UserError(f"{src}: a timm folder not written by evaclip; pass --eva-config or --model")
        from .models.specs import VisionSpec

        return ClipSpec(vision=VisionSpec(**vision))
    if fmt == "deepspeed":
        found = _find_recipe_near(src)
        if found is not None:
            from .recipes import load_recipe

            return load_recipe(str(found)).recipe.spec()
        raise UserError(f"{src}: no {RECIPE_FILES[0]} next to the checkpoint; pass --recipe NAME or --model NAME")
    raise UserError(f"{src}: the architecture is not stored in an EVA checkpoint; pass --eva-config CONFIG.json "
                    "(the reference repo's model config) or --model NAME (e.g. EVA-CLIP-18B)")


def _is_timm_folder(path: Path) -> bool:
    try:
        return "architecture" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def detect_format(src: Path, requested: str) -> str:
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    if requested == "open_clip" and src.is_dir() and not (src / CONFIG_NAME).is_file() and _is_timm_folder(src):
        return "timm"  # a vision tower folder evaclip wrote (MIM student)
    if requested != "auto":
        return requested
    if src.is_dir():
        if (src / CONFIG_NAME).is_file():
            return "open_clip"
        if (src / "config.json").is_file() and _is_timm_folder(src):
            return "timm"
        if is_deepspeed_dir(src):
            return "deepspeed"
        raise UserError(f"{src}: a folder that is neither an open_clip folder ({CONFIG_NAME}) nor a DeepSpeed "
                        "checkpoint ('latest', global_step*/); pass --from")
    return "eva"


def load_source(src: Path, fmt: str, spec: ClipSpec) -> tuple[dict, dict, str]:
    """(state in evaclip's open_clip layout, MIM extras, detected layout)."""
    separate = not spec.vision.qkv_fused
    if fmt == "open_clip":
        if src.is_dir():
            from .models.openclip_compat import load_sharded_safetensors

            if (src / WEIGHTS_NAME).is_file():
                state = load_state_dict(src / WEIGHTS_NAME)
            elif (src / INDEX_NAME).is_file():
                state = load_sharded_safetensors(src / INDEX_NAME)
            else:
                raise UserError(f"{src}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        else:
            state = load_state_dict(src)
    elif fmt == "timm":
        from .models.openclip_compat import load_sharded_safetensors

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


def _expected_state(spec: ClipSpec) -> dict:
    from .models.clip import build_clip

    return build_clip(spec, device="meta").state_dict()


def _fit_to_expected(state: dict, expected: dict, where: str, vision_only: bool) -> dict:
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


# ------------------------------------------------------------------------------------------------ command
def run_convert(src, dst, src_format="auto", dst_format="open_clip", eva_config=None, model=None, recipe=None,
                dtype="auto", max_shard_size="5GB", vision_only=False, force=False, quiet=False) -> list[str]:
    from rich.console import Console

    src, dst = Path(src), Path(dst)
    console = Console(stderr=True, quiet=quiet)
    fmt = detect_format(src, src_format)
    spec = resolve_spec(src, fmt, eva_config, model, recipe)
    parse_size(max_shard_size)  # validate before any work
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    with console.status(f"reading {src} ({fmt})"):
        state, extras, layout = load_source(src, fmt, spec)
    vision_only = vision_only or layout in ("mim", "open_clip_visual")
    state = _fit_to_expected(state, _expected_state(spec), str(src), vision_only)
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


def write_eva_file(state: dict, spec: ClipSpec, dst: Path, dtype=None, force=False, extras=None) -> list[str]:
    """The reference repo's layout: a plain state dict (.pt/.bin or .safetensors) + its model-config JSON."""
    import torch

    vision_only = not any(k.startswith("text.") for k in state)
    separate = not spec.vision.qkv_fused
    if vision_only:  # MIM layout: no 'visual.' prefix
        out = {k[len("visual."):]: v for k, v in open_clip_to_eva(state, separate).items()}
        out.update(extras or {})
    else:
        out = open_clip_to_eva(state, separate)
    td = _torch_dtype(dtype)
    out = {k: _cast(v, td) for k, v in out.items()}
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    cfg_path = dst.with_suffix(".json")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(out, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(out, str(tmp))
        cfg_tmp = cfg_path.with_name(f".{cfg_path.name}.tmp-{os.getpid()}")
        cfg_tmp.write_text(json.dumps(eva_config_from_spec(spec), indent=2))
        tmp.replace(dst)
        cfg_tmp.replace(cfg_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {dst} ({e.strerror})") from None
    return [dst.name, cfg_path.name]
