"""``evaclip train | distill | finetune-video``: the training stages, one launch path.

Each command resolves its recipe and asks ``engine.launch.plan`` what to do with this command line (run here,
relaunch on N processes with torchrun, DeepSpeed's launcher, an sbatch script, or a dry run); only a ``RunHere``
plan trains in this process.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.invocation import command_line, is_rank0
from evaclip_cli.cli.options import (
    AcceptChanges,
    DryRunFlag,
    Hostfile,
    LauncherOpt,
    MasterAddr,
    MasterPort,
    NodeRank,
    Nodes,
    Nproc,
    Out,
    Overrides,
    Recipe,
    Resume,
    SkipMemoryCheck,
    complete_recipe,
)


def _plan_or_launch(ctx: typer.Context, stage: str, recipe: str, overrides: list, nproc: int, nodes: int,
                    node_rank: int, master_addr: Optional[str], master_port: Optional[int], hostfile: Optional[Path],
                    launcher, dry_run: bool, out: Optional[Path], skip_memory_check: bool = False):
    """(resolved recipe, run folder) when this process trains; otherwise carry the plan out and exit. A run folder
    that cannot be written, or a run that cannot fit in memory, stops here, before anything is launched or built."""
    from evaclip_cli.engine import launch
    from evaclip_cli.recipes import load_recipe

    r = load_recipe(recipe, overrides).recipe
    opts = launch.LaunchOptions(nproc=nproc, nodes=nodes, node_rank=node_rank, master_addr=master_addr,
                                master_port=master_port, hostfile=hostfile,
                                launcher=launcher.value if launcher else None, dry_run=dry_run)
    plan = launch.plan(stage, r, opts, command_line(ctx), recipe_ref=recipe, out=out,
                       under_launcher=launch.under_launcher(os.environ), free_port=launch.free_port)
    if not isinstance(plan, (launch.DryRun, launch.Sbatch)):
        from evaclip_cli.atomic import check_output

        check_output(Path(out) if out else r.out_dir(), "folder")
        if not skip_memory_check:
            _check_memory(r, plan, opts)
    if not isinstance(plan, launch.RunHere):
        if isinstance(plan, (launch.Torchrun, launch.DeepSpeedLauncher)):
            from evaclip_cli.engine.tracking import check_available

            check_available(r)  # once here, not once per rank
        code = launch.execute(plan)
        if isinstance(plan, launch.DryRun) and not isinstance(plan.target, launch.Sbatch):
            from rich.console import Console

            from evaclip_cli.estimate import per_rank_states

            # the processes asked for (--nproc/--nodes/--hostfile), else the recipe's compute.gpus
            Console().print(per_rank_states(r, plan.world if plan.world > 1 else None), soft_wrap=True)
        raise typer.Exit(code)
    return r, plan.out_dir


def _check_memory(r, plan, opts) -> None:
    """Refuse, in one line, a run whose estimate (``estimate.memory_fit``) clearly exceeds the memory available: in
    a rank (its GPU's free memory; on CPU the machine's available RAM shared by its local ranks), or, on CPU, in
    the process about to start a single-node torchrun (one line instead of one failure per rank)."""
    from evaclip_cli.engine import launch

    env = os.environ
    if isinstance(plan, launch.RunHere):
        world = int(env.get("WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", "1")))
        local = int(env.get("LOCAL_WORLD_SIZE", env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))
    elif isinstance(plan, launch.Torchrun) and opts.nodes == 1:
        world, local = opts.world, opts.nproc
    else:
        return
    import torch

    from evaclip_cli.engine.memory import available_bytes
    from evaclip_cli.estimate import GiB, memory_fit

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        if not isinstance(plan, launch.RunHere):
            return  # each rank checks its own GPU
        device = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
        avail, where = float(available_bytes(device)), f"free on {device}"
    else:
        machine = available_bytes("cpu")
        avail = machine / max(local, 1)
        where = f"of available RAM per rank ({machine / GiB:.1f} GiB on this machine / {local} rank(s))"
    problem = memory_fit(r, world, avail, on_gpu, where)
    if problem:
        from evaclip_cli.errors import UserError

        raise UserError(problem)


def _done(out_dir: Path, result: dict, summary: str) -> None:
    if is_rank0(os.environ):
        from rich.console import Console

        Console().print(f"[bold green]done[/bold green] {result['step']} steps -> {out_dir}: {summary}", soft_wrap=True)


def train(
    ctx: typer.Context,
    recipe: Recipe = "tiny",
    overrides: Overrides = None,
    nproc: Nproc = 1, nodes: Nodes = 1, node_rank: NodeRank = 0, master_addr: MasterAddr = None,
    master_port: MasterPort = None, hostfile: Hostfile = None, launcher: LauncherOpt = None,
    dry_run: DryRunFlag = False, out: Out = None, resume: Resume = None, accept_changes: AcceptChanges = False,
    skip_memory_check: SkipMemoryCheck = False,
):
    """Contrastive CLIP training on DeepSpeed (ZeRO 0-3, LAMB/AdamW, CLIPA token reduction). With the default
    'tiny' recipe it trains on the embedded demo data and prints the zero-shot accuracy."""
    r, out_dir = _plan_or_launch(ctx, "train", recipe, list(overrides or []), nproc, nodes, node_rank, master_addr,
                                 master_port, hostfile, launcher, dry_run, out,
                                 skip_memory_check)
    from evaclip_cli.stages.clip import run_train, summary_line

    result = run_train(r, out_dir=out_dir, resume=resume, accept_changes=accept_changes)
    _done(out_dir, result, summary_line(result))


def distill(
    ctx: typer.Context,
    recipe: Recipe = "distill-tiny",
    overrides: Overrides = None,
    teacher: Annotated[Optional[str], typer.Option(
        "--teacher", help="Teacher CLIP (open_clip folder, EVA .pt, run, a released name such as EVA02-CLIP-E-14-plus, "
        "hf-hub:..., an open_clip tag such as open_clip:EVA02-E-14-plus/laion2b_s9b_b144k); same as "
        "distill.teacher=...")] = None,
    nproc: Nproc = 1, nodes: Nodes = 1, node_rank: NodeRank = 0, master_addr: MasterAddr = None,
    master_port: MasterPort = None, hostfile: Hostfile = None, launcher: LauncherOpt = None,
    dry_run: DryRunFlag = False, out: Out = None, resume: Resume = None, accept_changes: AcceptChanges = False,
    skip_memory_check: SkipMemoryCheck = False,
):
    """Weak-to-strong MIM distillation: a frozen EVA-CLIP teacher's patch features -> a bigger EVA student
    (block-wise masking, negative cosine loss). The student initialises `evaclip train` (init.vision)."""
    overrides = list(overrides or []) + ([f"distill.teacher={teacher}"] if teacher else [])
    r, out_dir = _plan_or_launch(ctx, "distill", recipe, overrides, nproc, nodes, node_rank, master_addr,
                                 master_port, hostfile, launcher, dry_run, out,
                                 skip_memory_check)
    from evaclip_cli.stages.distill import run_distill

    result = run_distill(r, out_dir=out_dir, resume=resume, accept_changes=accept_changes)
    _done(out_dir, result, f"final loss {result.get('loss', float('nan')):.4f} (negative cosine, -1 is perfect)")


def finetune_video(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name or path (stage 'video').",
                                        autocompletion=complete_recipe)] = "video-tiny",
    overrides: Overrides = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="The CLIP to start from (a `train` run folder, open_clip folder or DeepSpeed checkpoint); "
        "same as init.clip=...")] = None,
    nproc: Nproc = 1, nodes: Nodes = 1, node_rank: NodeRank = 0, master_addr: MasterAddr = None,
    master_port: MasterPort = None, hostfile: Hostfile = None, launcher: LauncherOpt = None,
    dry_run: DryRunFlag = False, out: Out = None, resume: Resume = None, accept_changes: AcceptChanges = False,
    skip_memory_check: SkipMemoryCheck = False,
):
    """The video stage: a `train` CLIP continues on video-text pairs (T frames per clip through the vision
    tower, mean of the frame embeddings, contrastive loss), image shards mixed in by weight; same engine,
    launchers and outputs as `train`. Prints the zero-shot video accuracy at the end."""
    overrides = list(overrides or []) + ([f"init.clip={init}"] if init else [])
    r, out_dir = _plan_or_launch(ctx, "video", recipe, overrides, nproc, nodes, node_rank, master_addr,
                                 master_port, hostfile, launcher, dry_run, out,
                                 skip_memory_check)
    from evaclip_cli.stages.video import run_finetune_video, summary_line

    result = run_finetune_video(r, out_dir=out_dir, resume=resume, accept_changes=accept_changes)
    _done(out_dir, result, summary_line(result))
