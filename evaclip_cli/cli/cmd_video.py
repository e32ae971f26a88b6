"""Typer wiring of the video commands (imports stay light: heavy modules load inside the commands)."""

import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer


class VideoTask(str, Enum):
    auto = "auto"
    classification = "classification"
    retrieval = "retrieval"


def register(app, eval_app) -> None:
    """Add this module's commands to the `evaclip` app (and its `eval` group)."""
    from evaclip_cli.cli.app import (DRY_RUN, EVAL_ARCH, EVAL_EVA_CONFIG, EVAL_MODEL, EVAL_NPROC, EVAL_OUTPUT, EVAL_PRECISION,
                      EVAL_PRETRAINED, EVAL_WORKERS, HOSTFILE, LAUNCHER, MASTER_ADDR, MASTER_PORT, NODE_RANK, NODES,
                      NPROC, OUT, OVERRIDES_HELP, RESUME, Launcher, Precision, _complete_recipe, _eval_group,
                      _eval_launch)

    @app.command("finetune-video")
    def finetune_video(
        recipe: str = typer.Option("video-tiny", "--recipe", "-r", help="Recipe name or path (stage 'video').",
                                   autocompletion=_complete_recipe),
        overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
        init: Optional[str] = typer.Option(None, "--init", help="The CLIP to start from (a `train` run folder, "
                                           "open_clip folder or DeepSpeed checkpoint); same as init.clip=..."),
        nproc: int = NPROC, nodes: int = NODES, node_rank: int = NODE_RANK, master_addr: Optional[str] = MASTER_ADDR,
        master_port: Optional[int] = MASTER_PORT, hostfile: Optional[Path] = HOSTFILE,
        launcher: Optional[Launcher] = LAUNCHER, dry_run: bool = DRY_RUN, out: Optional[Path] = OUT,
        resume: Optional[str] = RESUME,
    ):
        """The video stage: a `train` CLIP continues on video-text pairs (T frames per clip through the vision
        tower, mean of the frame embeddings, contrastive loss), image shards mixed in by weight; same engine,
        launchers and outputs as `train`. Prints the zero-shot video accuracy at the end."""
        from evaclip_cli.cli.app import launch_or_run

        overrides = list(overrides or []) + ([f"init.clip={init}"] if init else [])
        res = launch_or_run("video", recipe, overrides, nproc, nodes, node_rank, master_addr, master_port, hostfile,
                            launcher, dry_run, out, resume)
        if res is None:
            return
        r, out_dir = res
        from evaclip_cli.stages.video import run_finetune_video, summary_line

        result = run_finetune_video(r, out_dir=out_dir, resume=resume)
        if os.environ.get("RANK", "0") == "0":
            from rich.console import Console

            Console().print(f"[bold green]done[/bold green] {result['step']} steps -> {out_dir}: "
                            f"{summary_line(result)}", soft_wrap=True)

    @eval_app.command("video")
    def eval_video(
        model: str = EVAL_MODEL,
        dataset: Path = typer.Option(..., "--dataset", "-d", help="ROOT/<class>/*.mp4 folder (UCF-101 layout), a "
                                     "CSV with label + path (or Kinetics' youtube_id,time_start,time_end), or a "
                                     "path,caption manifest (retrieval)."),
        frames: int = typer.Option(1, "--frames", "-t", min=1, help="1: the middle frame (the paper's protocol); "
                                   "T > 1: the mean of T uniformly spaced frames."),
        task: VideoTask = typer.Option(VideoTask.auto, "--task", help="auto: retrieval for a path,caption "
                                       "manifest, classification otherwise."),
        name: Optional[str] = typer.Option(None, "--name", help="Dataset name in the results (default: folder "
                                           "or file name)."),
        classnames: Optional[Path] = typer.Option(None, "--classnames", help="Class names file, one per line "
                                                  "(sorted class order)."),
        templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates file ({c})."),
        pretrained: Optional[str] = EVAL_PRETRAINED,
        eva_config: Optional[str] = EVAL_EVA_CONFIG,
        arch: Optional[str] = EVAL_ARCH,
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Clips per forward (x frames images)."),
        workers: Optional[int] = EVAL_WORKERS,
        precision: Precision = EVAL_PRECISION,
        output: Optional[Path] = EVAL_OUTPUT,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No table, no progress."),
        nproc: int = EVAL_NPROC,
    ):
        """Zero-shot video classification (top-1, top-5, mean per-class recall, mean of top-1/top-5 as Kinetics
        reports it) or video-text retrieval (R@1/5/10), frames decoded with decord. Unreadable clips are skipped
        and counted. --nproc N: data-parallel over N processes (torchrun), as the other eval commands."""
        _eval_launch(nproc)
        from evaclip_cli.stages.video import run_eval_video

        with _eval_group():
            run_eval_video(model, str(dataset), name=name, task=task.value, frames=frames, pretrained=pretrained,
                           eva_config=eva_config, arch=arch, classnames=classnames, templates=templates,
                           batch_size=batch_size, workers=workers, precision=precision.value, output=output,
                           quiet=quiet)
