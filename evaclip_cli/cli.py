"""The ``evaclip`` command line: wiring only. Heavy imports (torch, deepspeed, open_clip) stay inside commands so
``--help`` and shell completion stay instant."""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import UserError

app = typer.Typer(
    name="evaclip",
    help="The EVA-CLIP-18B lifecycle in one tool: recipes, estimate, convert (train, distill, video, eval and "
    "push build on these).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

OVERRIDES_HELP = "Recipe overrides, section.key=value (e.g. optimizer.lr=1e-4 data.micro_batch=16)."


def _complete_recipe(incomplete: str):
    from .recipes import builtin_names

    return [n for n in builtin_names() if n.startswith(incomplete)]


def _version(value: bool):
    if value:
        typer.echo(f"evaclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


# ------------------------------------------------------------------------------------------------------- recipes
@recipes_app.command("ls")
def recipes_ls():
    """List the shipped recipes with their stage, model and description."""
    from rich.console import Console
    from rich.table import Table

    from .recipes import RECIPE_DIR, builtin_names, load_recipe

    table = Table(title="evaclip recipes", show_lines=False)
    for col in ("name", "stage", "model", "extends", "description"):
        table.add_column(col, overflow="fold")
    for name in builtin_names():
        loaded = load_recipe(name)
        r = loaded.recipe
        parent = Path(loaded.chain[-2]).stem if len(loaded.chain) > 1 else ""
        table.add_row(name, r.stage, r.model.arch, parent, r.description)
    Console().print(table)
    Console().print(f"[dim]{RECIPE_DIR}[/dim]")


@recipes_app.command("show")
def recipes_show(
    recipe: str = typer.Argument(..., help="Shipped recipe name or path to a .toml.", autocompletion=_complete_recipe),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Print a recipe resolved: extends applied, overrides applied, defaults filled in."""
    from .recipes import load_recipe, recipe_to_toml

    loaded = load_recipe(recipe, overrides or [])
    typer.echo(f"# {' <- '.join(Path(c).name for c in reversed(loaded.chain))}")
    typer.echo(recipe_to_toml(loaded.recipe), nl=False)


@recipes_app.command("cp")
def recipes_cp(
    recipe: str = typer.Argument(..., help="Shipped recipe name or path.", autocompletion=_complete_recipe),
    dest: Path = typer.Argument(..., help="Destination .toml file or directory."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists."),
):
    """Copy a recipe (resolved, standalone) to DEST to start your own."""
    from .recipes import copy_recipe

    out = copy_recipe(recipe, dest, overrides or [], force=force)
    typer.echo(f"wrote {out}")


# ------------------------------------------------------------------------------------------------------ estimate
class Gpu(str, Enum):
    a100_40g = "a100-40g"
    a100_80g = "a100-80g"
    h100 = "h100"


@app.command()
def estimate(
    recipe: str = typer.Option("18b", "--recipe", "-r", help="Recipe name or path.", autocompletion=_complete_recipe),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    gpu: Optional[Gpu] = typer.Option(None, "--gpu", help="GPU type (default: the recipe's compute.gpu)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Number of GPUs (default: compute.gpus)."),
    hours: Optional[float] = typer.Option(None, "--hours", min=0.0,
                                          help="Wall-clock hours of a run: report the MFU it implies."),
    mfu: float = typer.Option(0.40, "--mfu", min=0.01, max=1.0, help="Model FLOPs utilisation assumed for GPU-hours."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Parameters, memory per GPU under ZeRO 0-3, FLOPs per sample and GPU-hours of a recipe, before you spend them."""
    from .estimate import run_estimate

    run_estimate(recipe, overrides or [], gpu=gpu.value if gpu else None, gpus=gpus, hours=hours, mfu=mfu,
                 as_json=json_out)


# ------------------------------------------------------------------------------------------------------- convert
class SrcFormat(str, Enum):
    auto = "auto"
    eva = "eva"
    deepspeed = "deepspeed"
    open_clip = "open_clip"
    timm = "timm"


class DstFormat(str, Enum):
    open_clip = "open_clip"
    eva = "eva"


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def _complete_model(incomplete: str):
    from .models.specs import ALIASES, ARCHS

    return [n for n in [*ALIASES, *ARCHS] if n.startswith(incomplete)]


@app.command()
def convert(
    src: Path = typer.Argument(..., help="EVA .pt/.bin/.safetensors (CLIP or MIM), DeepSpeed checkpoint folder, "
                               "open_clip folder, or a timm tower folder evaclip wrote."),
    dst: Path = typer.Argument(..., help="Output: an open_clip folder (--to open_clip) or a .pt/.safetensors file."),
    src_format: SrcFormat = typer.Option(SrcFormat.auto, "--from", help="Source layout (auto: detected)."),
    dst_format: DstFormat = typer.Option(DstFormat.open_clip, "--to", help="Target layout."),
    eva_config: Optional[Path] = typer.Option(None, "--eva-config",
                                              help="Model config JSON in the reference repo's schema (EVA-CLIP-18B.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Released name (EVA-CLIP-18B, EVA-CLIP-8B, "
                                        "EVA02-CLIP-bigE-14-plus, EVA02-CLIP-B-16) or evaclip arch.",
                                        autocompletion=_complete_model),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the model from a recipe (DeepSpeed sources).",
                                         autocompletion=_complete_recipe),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="Weights dtype written."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size",
                                       help="Shard safetensors above this size (e.g. 5GB, 500MB); 0: never."),
    vision_only: bool = typer.Option(False, "--vision-only",
                                     help="Write only the vision tower (MIM checkpoints always are)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
):
    """Convert checkpoints: EVA reference .pt / MIM / DeepSpeed (ZeRO 0-3) -> open_clip folder, and back."""
    from .convert import run_convert

    run_convert(src, dst, src_format=src_format.value, dst_format=dst_format.value, eva_config=eva_config,
                model=model, recipe=recipe, dtype=dtype.value, max_shard_size=max_shard_size,
                vision_only=vision_only, force=force)


def main(argv: Optional[list] = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        print(f"evaclip: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("evaclip: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an evaclip bug, not bad input: one line, traceback on request
        if os.environ.get("EVACLIP_DEBUG"):
            raise
        print(f"evaclip: internal error: {type(e).__name__}: {e} (set EVACLIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
