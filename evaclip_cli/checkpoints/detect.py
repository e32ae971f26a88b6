"""What a checkpoint is: its format (open_clip folder, timm folder, BAAI's HF remote-code folder, DeepSpeed folder,
EVA file) and the architecture it holds (from its own config, a recipe beside it, or what the user names).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evaclip_cli.checkpoints.deepspeed import is_deepspeed_dir
from evaclip_cli.checkpoints.io import read_json
from evaclip_cli.errors import UserError
from evaclip_cli.models.openclip_compat import CONFIG_NAME
from evaclip_cli.models.specs import ClipSpec, resolve_arch, spec_from_eva_config, spec_from_open_clip_cfg

RECIPE_FILES = ("evaclip_recipe.toml", "recipe.toml")


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
        from evaclip_cli.recipes import load_recipe

        return load_recipe(recipe).recipe.spec()
    if fmt == "open_clip":
        return spec_from_open_clip_cfg(read_json(src / CONFIG_NAME, "open_clip config"))
    if fmt == "hf":
        from evaclip_cli.checkpoints.hf_layout import CONFIG, read_config, spec_of

        folder = src if src.is_dir() else src.parent
        if read_config(folder) is None:
            raise UserError(f"{folder / CONFIG}: not BAAI's EvaCLIP config.json (vision_config, text_config and an "
                            "auto_map to configuration_evaclip); pass --model NAME for a bare state dict")
        return spec_of(folder)
    if fmt == "timm":
        cfg = read_json(src / "config.json", "timm config")
        vision = cfg.get("evaclip", {}).get("vision_spec")
        if vision is None:
            raise UserError(f"{src}: a timm folder not written by evaclip; pass --eva-config or --model")
        from evaclip_cli.models.specs import VisionSpec

        return ClipSpec(vision=VisionSpec(**vision))
    if fmt == "deepspeed":
        found = _find_recipe_near(src)
        if found is not None:
            from evaclip_cli.recipes import load_recipe

            return load_recipe(str(found)).recipe.spec()
        raise UserError(f"{src}: no {RECIPE_FILES[0]} next to the checkpoint; pass --recipe NAME or --model NAME")
    if fmt == "eva":
        from evaclip_cli.checkpoints.hf_layout import hf_config_for_file, spec_of

        if hf_config_for_file(src) is not None:  # one weights file of a BAAI HF folder: its config.json is beside it
            return spec_of(src.parent)
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
        from evaclip_cli.checkpoints.hf_layout import is_hf_dir

        if (src / CONFIG_NAME).is_file():
            return "open_clip"
        if (src / "config.json").is_file() and _is_timm_folder(src):
            return "timm"
        if is_hf_dir(src):
            return "hf"
        if is_deepspeed_dir(src):
            return "deepspeed"
        if (src / "config.json").is_file():
            raise UserError(f"{src}: config.json is neither BAAI's EvaCLIP config (vision_config, text_config, "
                            "auto_map to configuration_evaclip) nor a timm config; pass --from")
        raise UserError(f"{src}: a folder that is neither an open_clip folder ({CONFIG_NAME}), BAAI's HF layout "
                        "(config.json) nor a DeepSpeed checkpoint ('latest', global_step*/); pass --from")
    return "eva"
