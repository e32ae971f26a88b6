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


class DstFormat(str, Enum):
    open_clip = "open_clip"
    eva = "eva"


def convert(
    src: Annotated[Path, typer.Argument(help="EVA .pt/.bin/.safetensors (CLIP or MIM), DeepSpeed checkpoint folder, "
                                        "open_clip folder, or a timm tower folder evaclip wrote.")],
    dst: Annotated[Path, typer.Argument(help="Output: an open_clip folder (--to open_clip) or a .pt/.safetensors "
                                        "file.")],
    src_format: Annotated[SrcFormat, typer.Option("--from", help="Source layout (auto: detected).")] = SrcFormat.auto,
    dst_format: Annotated[DstFormat, typer.Option("--to", help="Target layout.")] = DstFormat.open_clip,
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
    """Convert checkpoints: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) -> open_clip folder, and back."""
    from evaclip_cli.checkpoints.convert import run_convert

    run_convert(src, dst, src_format=src_format.value, dst_format=dst_format.value, eva_config=eva_config,
                model=model, recipe=recipe, dtype=dtype.value, max_shard_size=max_shard_size,
                vision_only=vision_only, force=force)
