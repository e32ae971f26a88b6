"""``evaclip convert``: checkpoints between layouts."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.options import DType, complete_model, complete_recipe


class SrcFormat(str, Enum):
    auto = "auto"
    eva = "eva"
    deepspeed = "deepspeed"
    open_clip = "open_clip"
    timm = "timm"
    hf = "hf"


class DstFormat(str, Enum):
    open_clip = "open_clip"
    eva = "eva"
    hf = "hf"


def complete_source(incomplete: str) -> list[str]:
    """Released names once something is typed (an empty word keeps the shell's file completion)."""
    if not incomplete:
        return []
    from evaclip_cli.models.specs import RELEASED

    return [n for n in RELEASED if n.startswith(incomplete)]


def convert(
    src: Annotated[str, typer.Argument(
        autocompletion=complete_source,
        help="EVA .pt/.bin/.safetensors (CLIP or MIM), DeepSpeed checkpoint folder, open_clip folder, timm tower "
        "folder evaclip wrote, BAAI's HF folder (config.json + shards), hf-hub:OWNER/NAME\\[/FILE]\\[@REV], or a "
        "released name (EVA-CLIP-18B, EVA-CLIP-8B, EVA-CLIP-8B-448, EVA-18B, ...; downloaded into the Hugging Face "
        "cache).")],
    dst: Annotated[Path, typer.Argument(help="Output: an open_clip folder (--to open_clip), a .pt/.safetensors "
                                        "file (--to eva) or BAAI's HF folder (--to hf).")],
    src_format: Annotated[SrcFormat, typer.Option(
        "--from", help="Source layout (auto: detected; hf: BAAI's transformers remote-code folder).")] = SrcFormat.auto,
    dst_format: Annotated[DstFormat, typer.Option(
        "--to", help="Target layout: open_clip folder, EVA reference file, or BAAI's HF layout (config.json with an "
        "auto_map to BAAI's code, sharded safetensors + index).")] = DstFormat.open_clip,
    eva_config: Annotated[Optional[Path], typer.Option(
        "--eva-config", help="Model config JSON in the reference repo's schema (EVA-CLIP-18B.json).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Released name (EVA-CLIP-18B, EVA-CLIP-8B, EVA02-CLIP-bigE-14-plus, EVA02-CLIP-B-16) or "
        "evaclip arch.", autocompletion=complete_model)] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", help="Take the model from a recipe (DeepSpeed sources).", autocompletion=complete_recipe)] = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Weights dtype written.")] = DType.fp32,
    max_shard_size: Annotated[str, typer.Option(
        "--max-shard-size", help="Shard safetensors above this size (e.g. 5GB, 500MB); 0: never.")] = "5GB",
    vision_only: Annotated[bool, typer.Option(
        "--vision-only", help="Write only the vision tower (MIM checkpoints always are).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
):
    """Convert checkpoints: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) / BAAI's HF layout -> open_clip folder, and
    back. Hub sources are downloaded through huggingface_hub's cache (HF_TOKEN, HF_HUB_OFFLINE honoured)."""
    from evaclip_cli.checkpoints.convert import run_convert

    run_convert(src, dst, src_format=src_format.value, dst_format=dst_format.value, eva_config=eva_config,
                model=model, recipe=recipe, dtype=dtype.value, max_shard_size=max_shard_size,
                vision_only=vision_only, force=force)
