"""``evaclip estimate``: what a recipe costs before it runs."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.options import Overrides, Recipe


class Gpu(str, Enum):
    a100_40g = "a100-40g"
    a100_80g = "a100-80g"
    h100 = "h100"


def estimate(
    recipe: Recipe = "18b",
    overrides: Overrides = None,
    gpu: Annotated[Optional[Gpu], typer.Option("--gpu", help="GPU type (default: the recipe's compute.gpu).")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1,
                                                help="Number of GPUs (default: compute.gpus).")] = None,
    hours: Annotated[Optional[float], typer.Option(
        "--hours", min=0.0, help="Wall-clock hours of a run: report the MFU it implies.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", min=0.01, max=1.0,
                                       help="Model FLOPs utilisation assumed for GPU-hours.")] = 0.40,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Parameters, memory per GPU under ZeRO 0-3, FLOPs per sample and GPU-hours of a recipe, before you spend them."""
    from evaclip_cli.estimate import run_estimate

    run_estimate(recipe, overrides or [], gpu=gpu.value if gpu else None, gpus=gpus, hours=hours, mfu=mfu,
                 as_json=json_out)
