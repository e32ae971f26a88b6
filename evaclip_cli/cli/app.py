"""The ``evaclip`` command line: wiring only. Heavy imports (torch, deepspeed, open_clip) stay inside commands so
``--help`` and shell completion stay instant."""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from evaclip_cli import __version__
from evaclip_cli.errors import TrainingStopped, UserError

app = typer.Typer(
    name="evaclip",
    help="The EVA-CLIP-18B lifecycle in one tool: weak-to-strong MIM distillation, DeepSpeed CLIP training, the video "
    "stage, checkpoint conversion, zero-shot evaluation and publishing to the Hub. `evaclip demo` runs it all on "
    "the embedded demo data.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
from evaclip_cli.cli.cmd_data import data_app  # noqa: E402  (light: its commands import lazily)

app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Zero-shot evaluation with CLIP_benchmark's protocol and metric names: image "
                       "classification, retrieval, video, and whole benchmark suites.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

OVERRIDES_HELP = "Recipe overrides, section.key=value (e.g. optimizer.lr=1e-4 data.micro_batch=16)."


def _complete_recipe(incomplete: str):
    from evaclip_cli.recipes import builtin_names

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

    from evaclip_cli.recipes import RECIPE_DIR, builtin_names, load_recipe

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
    from evaclip_cli.recipes import load_recipe, recipe_to_toml

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
    from evaclip_cli.recipes import copy_recipe

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
    from evaclip_cli.estimate import run_estimate

    run_estimate(recipe, overrides or [], gpu=gpu.value if gpu else None, gpus=gpus, hours=hours, mfu=mfu,
                 as_json=json_out)


# --------------------------------------------------------------------------------------------------------- train
class Launcher(str, Enum):
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    slurm = "slurm"


def launch_or_run(stage: str, recipe: str, overrides: list, nproc: int, nodes: int, node_rank: int,
                  master_addr: Optional[str], master_port: Optional[int], hostfile: Optional[Path],
                  launcher: Optional[Launcher], dry_run: bool, out: Optional[Path], resume: Optional[str]):
    """Shared by every training stage: resolve the recipe, then run here, relaunch on N processes, or write the
    command / sbatch script."""
    from rich.console import Console

    from evaclip_cli.engine import launch
    from evaclip_cli.recipes import load_recipe, recipe_to_toml

    loaded = load_recipe(recipe, overrides or [])
    r = loaded.recipe
    if stage != r.stage:
        raise UserError(f"recipe '{recipe}' is a '{r.stage}' recipe; run it with `evaclip "
                        f"{ {'train': 'train', 'distill': 'distill', 'video': 'finetune-video'}[r.stage]} ...`")
    out_dir = Path(out) if out else r.out_dir()
    argv = list(_ARGV) if _ARGV else _stage_argv(stage, recipe, overrides, out, resume)
    console = Console()
    world = nproc * nodes
    from evaclip_cli.engine.config import accumulation_steps

    accum = accumulation_steps(r.data.global_batch, r.data.micro_batch, world)
    if launcher == Launcher.slurm:
        script = launch.slurm_script(r.name, nodes, nproc, out_dir, argv)
        if dry_run:
            typer.echo(script)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "launch.sbatch"
        path.write_text(script)
        console.print(f"wrote {path}: submit it with [bold]sbatch {path}[/bold]")
        return
    if dry_run:
        console.rule(f"evaclip {stage} --recipe {recipe} (dry run)")
        typer.echo(recipe_to_toml(r), nl=False)
        console.rule()
        if launcher == Launcher.deepspeed or hostfile:
            cmd = launch.deepspeed_args(Path(hostfile) if hostfile else Path("hostfile"), nproc, master_addr, argv)
        elif world > 1:
            cmd = ["torchrun", *launch.torchrun_args(nproc, nodes, node_rank, master_addr, master_port, argv)]
        else:
            cmd = ["evaclip", *launch.strip_launch_args(argv)]
        typer.echo(" ".join(shlex.quote(c) for c in cmd))
        console.print(f"{world} process(es) × micro batch {r.data.micro_batch} × accumulation {accum} = global batch "
                      f"{r.data.global_batch}; {r.steps:,} steps; output {out_dir}")
        return
    if not launch.under_launcher():
        if launcher == Launcher.deepspeed or hostfile:
            import subprocess

            cmd = launch.deepspeed_args(Path(hostfile) if hostfile else Path("hostfile"), nproc, master_addr, argv)
            raise typer.Exit(subprocess.call(cmd))
        if world > 1:
            raise typer.Exit(launch.run_torchrun(launch.torchrun_args(nproc, nodes, node_rank, master_addr,
                                                                      master_port, argv)))
    return r, out_dir


def _stage_argv(stage, recipe, overrides, out, resume):
    argv = [{"video": "finetune-video"}.get(stage, stage), "--recipe", recipe, *(overrides or [])]
    if out:
        argv += ["--out", str(out)]
    if resume:
        argv += ["--resume", resume]
    return argv


NPROC = typer.Option(1, "--nproc", min=1, help="Processes on this machine (one per GPU; CPU: gloo).")
NODES = typer.Option(1, "--nodes", min=1, help="Machines (torchrun per node with --node-rank/--master-addr).")
NODE_RANK = typer.Option(0, "--node-rank", min=0, help="This machine's rank when --nodes > 1.")
MASTER_ADDR = typer.Option(None, "--master-addr", help="Address of node 0 (multi-node).")
MASTER_PORT = typer.Option(None, "--master-port", help="Rendezvous port (default: a free one / 29500).")
HOSTFILE = typer.Option(None, "--hostfile", help="DeepSpeed hostfile ('host slots=N' lines): launch on all hosts.")
LAUNCHER = typer.Option(None, "--launcher", help="torchrun (default), deepspeed, or slurm (writes an sbatch script).")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the resolved recipe and the launch command; run nothing.")
OUT = typer.Option(None, "--out", "-o", help="Run folder (default: logging.out_dir, runs/<recipe>).")
RESUME = typer.Option(None, "--resume", help="'auto' (newest checkpoint of this run, if any) or a checkpoint path.")


@app.command()
def train(
    recipe: str = typer.Option("tiny", "--recipe", "-r", help="Recipe name or path.", autocompletion=_complete_recipe),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    nproc: int = NPROC, nodes: int = NODES, node_rank: int = NODE_RANK, master_addr: Optional[str] = MASTER_ADDR,
    master_port: Optional[int] = MASTER_PORT, hostfile: Optional[Path] = HOSTFILE,
    launcher: Optional[Launcher] = LAUNCHER, dry_run: bool = DRY_RUN, out: Optional[Path] = OUT,
    resume: Optional[str] = RESUME,
):
    """Contrastive CLIP training on DeepSpeed (ZeRO 0-3, LAMB/AdamW, CLIPA token reduction). With the default
    'tiny' recipe it trains on the embedded demo data and prints the zero-shot accuracy."""
    res = launch_or_run("train", recipe, overrides, nproc, nodes, node_rank, master_addr, master_port, hostfile,
                        launcher, dry_run, out, resume)
    if res is None:
        return
    r, out_dir = res
    from evaclip_cli.stages.clip import run_train, summary_line

    result = run_train(r, out_dir=out_dir, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        from rich.console import Console

        Console().print(f"[bold green]done[/bold green] {result['step']} steps -> {out_dir}: {summary_line(result)}",
                        soft_wrap=True)


@app.command()
def distill(
    recipe: str = typer.Option("distill-tiny", "--recipe", "-r", help="Recipe name or path.",
                               autocompletion=_complete_recipe),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher CLIP (open_clip folder, EVA .pt, run); "
                                          "same as distill.teacher=..."),
    nproc: int = NPROC, nodes: int = NODES, node_rank: int = NODE_RANK, master_addr: Optional[str] = MASTER_ADDR,
    master_port: Optional[int] = MASTER_PORT, hostfile: Optional[Path] = HOSTFILE,
    launcher: Optional[Launcher] = LAUNCHER, dry_run: bool = DRY_RUN, out: Optional[Path] = OUT,
    resume: Optional[str] = RESUME,
):
    """Weak-to-strong MIM distillation: a frozen EVA-CLIP teacher's patch features -> a bigger EVA student
    (block-wise masking, negative cosine loss). The student initialises `evaclip train` (init.vision)."""
    overrides = list(overrides or []) + ([f"distill.teacher={teacher}"] if teacher else [])
    res = launch_or_run("distill", recipe, overrides, nproc, nodes, node_rank, master_addr, master_port, hostfile,
                        launcher, dry_run, out, resume)
    if res is None:
        return
    r, out_dir = res
    from evaclip_cli.stages.distill import run_distill

    result = run_distill(r, out_dir=out_dir, resume=resume)
    if _is_rank0():
        from rich.console import Console

        Console().print(f"[bold green]done[/bold green] {result['step']} steps -> {out_dir}: final loss "
                        f"{result.get('loss', float('nan')):.4f} (negative cosine, -1 is perfect)", soft_wrap=True)


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
    from evaclip_cli.models.specs import ALIASES, ARCHS

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
    from evaclip_cli.checkpoints.convert import run_convert

    run_convert(src, dst, src_format=src_format.value, dst_format=dst_format.value, eva_config=eva_config,
                model=model, recipe=recipe, dtype=dtype.value, max_shard_size=max_shard_size,
                vision_only=vision_only, force=force)


# ---------------------------------------------------------------------------------------------------------- eval
class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


EVAL_MODEL = typer.Option(..., "--model", "-m", help="open_clip folder, evaclip run folder, DeepSpeed checkpoint, "
                          "EVA .pt (with --eva-config/--arch), or an open_clip model name with --pretrained FILE.")
EVAL_PRETRAINED = typer.Option(None, "--pretrained", help="Local weights file for an open_clip model name or a "
                               "released EVA name given as --model (never downloaded).")
EVAL_EVA_CONFIG = typer.Option(None, "--eva-config", help="Reference model config JSON for an EVA .pt.")
EVAL_ARCH = typer.Option(None, "--arch", help="Released name / evaclip arch of an EVA .pt or DeepSpeed checkpoint "
                         "without a recipe.", autocompletion=_complete_model)
EVAL_OUTPUT = typer.Option(None, "--output", "-o", help="Write the metrics as JSON (CLIP_benchmark's names).")
EVAL_BATCH = typer.Option(256, "--batch-size", min=1, help="Images per forward.")
EVAL_WORKERS = typer.Option(None, "--workers", min=0, help="DataLoader workers decoding images (default: CPUs, ≤8).")
EVAL_PRECISION = typer.Option(Precision.auto, "--precision", help="auto: bf16 autocast on GPU, fp32 on CPU.")
EVAL_FAST = typer.Option(False, "--fast-decode", help="Let the JPEG decoder downscale (2/4/8x) while decoding large "
                         "images: faster, numbers may differ slightly from CLIP_benchmark's.")
EVAL_SPLIT = typer.Option("test", "--split", help="Split folder of a CLIP_benchmark wds/ dataset / caption JSON.")
EVAL_NPROC = typer.Option(1, "--nproc", min=1, help="Data-parallel processes (one per GPU; torchrun, as `train`).")


@contextlib.contextmanager
def _eval_group():
    """Leave the process group (if torchrun started one) cleanly after an eval command."""
    try:
        yield
    finally:
        if "LOCAL_RANK" in os.environ:
            from evaclip_cli.engine.dist import shutdown

            shutdown()


def current_argv() -> list:
    """This command line, for a relaunch; also when the parsing module is ``__main__`` (``python -m evaclip_cli.cli.app``)
    and the caller imported ``evaclip_cli.cli.app`` as a second module."""
    return list(getattr(sys.modules.get("__main__"), "_ARGV", None) or _ARGV or sys.argv[1:])


def _eval_launch(nproc: int) -> bool:
    """Relaunch this command on nproc processes (torchrun); True when this process should just return."""
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from evaclip_cli.engine import launch

        raise typer.Exit(launch.run_torchrun(launch.torchrun_args(nproc, 1, 0, None, None, current_argv())))
    return False


@eval_app.command("zeroshot")
def eval_zeroshot(
    model: str = EVAL_MODEL,
    dataset: str = typer.Option(..., "--dataset", "-d", help="ImageFolder root, CLIP_benchmark wds/ folder, or .tar "
                                "shards with a class field."),
    name: Optional[str] = typer.Option(None, "--name", help="Benchmark name (picks the shipped class names and "
                                       "templates, e.g. imagenet1k, cifar10); default: the folder name."),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="Class names, one per line, label order."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates with {c}, one per line."),
    class_key: str = typer.Option("cls", "--class-key", help="Label field of webdataset samples."),
    split: str = EVAL_SPLIT, pretrained: Optional[str] = EVAL_PRETRAINED, eva_config: Optional[str] = EVAL_EVA_CONFIG,
    arch: Optional[str] = EVAL_ARCH, output: Optional[Path] = EVAL_OUTPUT, batch_size: int = EVAL_BATCH,
    workers: Optional[int] = EVAL_WORKERS, precision: Precision = EVAL_PRECISION, fast_decode: bool = EVAL_FAST,
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the text classifier (not read or written "
                                  "from ~/.cache/evaclip)."),
    nproc: int = EVAL_NPROC,
):
    """Zero-shot image classification: top-1, top-5 and mean per-class recall, as CLIP_benchmark computes them."""
    _eval_launch(nproc)
    from evaclip_cli.eval.core import run_zeroshot

    with _eval_group():
        run_zeroshot(model, dataset, name=name, pretrained=pretrained, eva_config=eva_config, arch=arch,
                     classnames=classnames, templates=templates, split=split, class_key=class_key, batch_size=batch_size,
                     workers=workers, precision=precision.value, cache=not no_cache, fast_decode=fast_decode,
                     output=output)


@eval_app.command("retrieval")
def eval_retrieval(
    model: str = EVAL_MODEL,
    dataset: str = typer.Option(..., "--dataset", "-d", help="CLIP_benchmark wds/ retrieval folder, or a caption JSON "
                                "(Karpathy's dataset_flickr30k.json / dataset_coco.json, or [{image, caption}])."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root of a caption JSON (default: next to it)."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name in the results (default: from the path)."),
    split: str = EVAL_SPLIT, pretrained: Optional[str] = EVAL_PRETRAINED, eva_config: Optional[str] = EVAL_EVA_CONFIG,
    arch: Optional[str] = EVAL_ARCH, output: Optional[Path] = EVAL_OUTPUT, batch_size: int = EVAL_BATCH,
    workers: Optional[int] = EVAL_WORKERS, precision: Precision = EVAL_PRECISION, fast_decode: bool = EVAL_FAST,
    nproc: int = EVAL_NPROC,
):
    """Zero-shot image-text retrieval: image->text and text->image recall@1/5/10, several captions per image."""
    _eval_launch(nproc)
    from evaclip_cli.eval.core import run_retrieval

    with _eval_group():
        run_retrieval(model, dataset, name=name, images=images, pretrained=pretrained, eva_config=eva_config, arch=arch,
                      split=split, batch_size=batch_size, workers=workers, precision=precision.value,
                      fast_decode=fast_decode, output=output)


def _complete_suite(incomplete: str):
    from evaclip_cli.eval.core import suite_names

    return [n for n in suite_names() if n.startswith(incomplete)]


@eval_app.command("suite")
def eval_suite(
    model: str = EVAL_MODEL,
    suite: List[str] = typer.Option(["eva-clip-27"], "--suite", "-s", help="Shipped suite (eva-clip-27, "
                                    "eva-clip-video, eva-clip-retrieval) or a suite .toml; repeat for several.",
                                    autocompletion=_complete_suite),
    root: Path = typer.Option(..., "--root", help="Folder holding one folder per dataset (CLIP_benchmark wds_* "
                              "exports, ImageFolders, video folders, caption JSON)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where results.json, results.md and results.png go "
                                       "(default: eval/<model name>)."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Video sets: frames per clip (default: the "
                                         "paper's single middle frame)."),
    pretrained: Optional[str] = EVAL_PRETRAINED, eva_config: Optional[str] = EVAL_EVA_CONFIG,
    arch: Optional[str] = EVAL_ARCH, batch_size: int = EVAL_BATCH, workers: Optional[int] = EVAL_WORKERS,
    precision: Precision = EVAL_PRECISION, fast_decode: bool = EVAL_FAST,
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the text classifiers."),
    nproc: int = EVAL_NPROC,
):
    """Every dataset of a benchmark suite found under --root: per-dataset numbers, the paper's aggregates
    (27-avg, video avg, retrieval mean recall), results.json + a Markdown table (for `push`) + a PNG chart."""
    _eval_launch(nproc)
    from evaclip_cli.eval.core import run_suite

    with _eval_group():
        run_suite(model, suite, root, out, pretrained=pretrained, eva_config=eva_config, arch=arch,
                  batch_size=batch_size, workers=workers, precision=precision.value, cache=not no_cache,
                  fast_decode=fast_decode, frames=frames)


# ---------------------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder of the demo's runs and outputs."),
    from_stage: int = typer.Option(1, "--from-stage", min=1, help="Start at this stage (1-7); earlier outputs are "
                                   "reused."),
):
    """The whole lifecycle on the embedded demo data: train a teacher -> distill -> train the student's CLIP ->
    finetune-video -> convert -> eval suite -> push --dry-run, with a summary table (about 5 min on 2 CPU cores)."""
    from evaclip_cli.lifecycle import run_demo

    code = run_demo(out, skip=from_stage - 1)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------------------- commands wired from their modules
from evaclip_cli.cli.cmd_video import register as _register_video  # noqa: E402  (finetune-video, eval video)
from evaclip_cli.cli.cmd_push import register as _register_push  # noqa: E402  (push)

_register_video(app, eval_app)
_register_push(app, eval_app)

_ARGV: list = []


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[list] = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    global _ARGV
    _ARGV = list(map(str, argv)) if argv is not None else sys.argv[1:]
    try:
        app(args=_ARGV, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        if _is_rank0():
            print(f"evaclip: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("evaclip: interrupted", file=sys.stderr)
        return 130
    except TrainingStopped as e:  # a run that cannot go on: one line, exit code 3
        if _is_rank0():
            print(f"evaclip: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if os.environ.get("EVACLIP_DEBUG"):  # an evaclip bug, not bad input: one line, traceback on request
            raise
        print(f"evaclip: internal error: {type(e).__name__}: {e} (set EVACLIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
