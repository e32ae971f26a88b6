"""``evaclip eval zeroshot | retrieval | suite | video``: zero-shot evaluation, data-parallel with --nproc."""
from __future__ import annotations

import contextlib
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.invocation import command_line
from evaclip_cli.cli.options import (
    Arch,
    BatchSize,
    EvaConfig,
    EvalNproc,
    FastDecode,
    Model,
    Output,
    Precision,
    PrecisionOpt,
    Pretrained,
    Split,
    Workers,
    complete_suite,
)


class VideoTask(str, Enum):
    auto = "auto"
    classification = "classification"
    retrieval = "retrieval"


@contextlib.contextmanager
def _data_parallel(ctx: typer.Context, nproc: int):
    """Relaunch this command on nproc processes (torchrun) unless this is one of them; afterwards leave the
    process group (if torchrun started one) cleanly."""
    from evaclip_cli.engine import launch

    plan = launch.plan_eval(nproc, command_line(ctx), environ=os.environ, free_port=launch.free_port)
    if not isinstance(plan, launch.RunHere):
        raise typer.Exit(launch.execute(plan))
    try:
        yield
    finally:
        if "LOCAL_RANK" in os.environ:
            from evaclip_cli.engine.dist import shutdown

            shutdown()


def zeroshot(
    ctx: typer.Context,
    model: Model,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="ImageFolder root, CLIP_benchmark wds/ folder, "
                                         ".tar shards with a class field, or a set on the Hub "
                                         "(hf-hub:clip-benchmark/wds_cifar10).")],
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Benchmark name (picks the shipped class names and templates, e.g. imagenet1k, cifar10); "
        "default: the folder name.")] = None,
    classnames: Annotated[Optional[Path], typer.Option(
        "--classnames", help="Class names, one per line, label order.")] = None,
    templates: Annotated[Optional[Path], typer.Option(
        "--templates", help="Prompt templates with {c}, one per line.")] = None,
    class_key: Annotated[str, typer.Option("--class-key", help="Label field of webdataset samples.")] = "cls",
    split: Split = "test", pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None,
    output: Output = None, batch_size: BatchSize = 256, workers: Workers = None,
    precision: PrecisionOpt = Precision.auto, fast_decode: FastDecode = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Recompute the text classifier (not read or written from ~/.cache/evaclip).")] = False,
    nproc: EvalNproc = 1,
):
    """Zero-shot image classification: top-1, top-5 and mean per-class recall, as CLIP_benchmark computes them."""
    with _data_parallel(ctx, nproc):
        from evaclip_cli.eval.runner import run_zeroshot

        run_zeroshot(model, dataset, name=name, pretrained=pretrained, eva_config=eva_config, arch=arch,
                     classnames=classnames, templates=templates, split=split, class_key=class_key,
                     batch_size=batch_size, workers=workers, precision=precision.value, cache=not no_cache,
                     fast_decode=fast_decode, output=output)


def retrieval(
    ctx: typer.Context,
    model: Model,
    dataset: Annotated[str, typer.Option(
        "--dataset", "-d", help="CLIP_benchmark wds/ retrieval folder, a caption JSON (Karpathy's "
        "dataset_flickr30k.json / dataset_coco.json, or [{image, caption}]), or a set on the Hub "
        "(hf-hub:clip-benchmark/wds_flickr30k).")],
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="Image root of a caption JSON (default: next to it).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Dataset name in the results (default: from the path).")] = None,
    split: Split = "test", pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None,
    output: Output = None, batch_size: BatchSize = 256, workers: Workers = None,
    precision: PrecisionOpt = Precision.auto, fast_decode: FastDecode = False,
    nproc: EvalNproc = 1,
):
    """Zero-shot image-text retrieval: image->text and text->image recall@1/5/10, several captions per image."""
    with _data_parallel(ctx, nproc):
        from evaclip_cli.eval.runner import run_retrieval

        run_retrieval(model, dataset, name=name, images=images, pretrained=pretrained, eva_config=eva_config,
                      arch=arch, split=split, batch_size=batch_size, workers=workers, precision=precision.value,
                      fast_decode=fast_decode, output=output)


def suite(
    ctx: typer.Context,
    *,  # keyword-only: the options keep their help order, --root after --suite
    model: Model,
    suite: Annotated[list[str], typer.Option(
        "--suite", "-s", help="Shipped suite (eva-clip-27, eva-clip-video, eva-clip-retrieval) or a suite .toml; "
        "repeat for several.", autocompletion=complete_suite)] = ["eva-clip-27"],  # noqa: B006 (Typer copies it)
    root: Annotated[Optional[str], typer.Option(
        "--root", help="Folder holding one folder per dataset (CLIP_benchmark wds_* exports, ImageFolders, video "
        "folders, caption JSON), or hf-hub:OWNER: the wds_<name> sets fetched from the Hub (test split only, into "
        "huggingface_hub's cache). Default: hf-hub:clip-benchmark.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Where results.json, results.md and results.png go (default: eval/<model name>).")] = None,
    frames: Annotated[Optional[int], typer.Option(
        "--frames", min=1, help="Video sets: frames per clip (default: the paper's single middle frame).")] = None,
    pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None, batch_size: BatchSize = 256,
    workers: Workers = None, precision: PrecisionOpt = Precision.auto, fast_decode: FastDecode = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the text classifiers.")] = False,
    nproc: EvalNproc = 1,
):
    """Every dataset of a benchmark suite found under --root or fetched from the Hub (default: CLIP_benchmark's
    exports): per-dataset numbers, the paper's aggregates (27-avg, video avg, retrieval mean recall), results.json +
    a Markdown table (for `push`) + a PNG chart."""
    with _data_parallel(ctx, nproc):
        from evaclip_cli.eval.runner import run_suite

        run_suite(model, suite, root, out, pretrained=pretrained, eva_config=eva_config, arch=arch,
                  batch_size=batch_size, workers=workers, precision=precision.value, cache=not no_cache,
                  fast_decode=fast_decode, frames=frames)


def video(
    ctx: typer.Context,
    model: Model,
    dataset: Annotated[Path, typer.Option(
        "--dataset", "-d", help="ROOT/<class>/*.mp4 folder (UCF-101 layout), a CSV with label + path (or Kinetics' "
        "youtube_id,time_start,time_end), or a path,caption manifest (retrieval).")],
    frames: Annotated[int, typer.Option(
        "--frames", "-t", min=1, help="1: the middle frame (the paper's protocol); T > 1: the mean of T uniformly "
        "spaced frames.")] = 1,
    task: Annotated[VideoTask, typer.Option(
        "--task", help="auto: retrieval for a path,caption manifest, classification otherwise.")] = VideoTask.auto,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Dataset name in the results (default: folder or file name).")] = None,
    classnames: Annotated[Optional[Path], typer.Option(
        "--classnames", help="Class names file, one per line (sorted class order).")] = None,
    templates: Annotated[Optional[Path], typer.Option("--templates", help="Prompt templates file ({c}).")] = None,
    pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Clips per forward (x frames images).")] = 32,
    workers: Workers = None, precision: PrecisionOpt = Precision.auto, output: Output = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress.")] = False,
    nproc: EvalNproc = 1,
):
    """Zero-shot video classification (top-1, top-5, mean per-class recall, mean of top-1/top-5 as Kinetics
    reports it) or video-text retrieval (R@1/5/10), frames decoded with decord. Unreadable clips are skipped
    and counted. --nproc N: data-parallel over N processes (torchrun), as the other eval commands."""
    with _data_parallel(ctx, nproc):
        from evaclip_cli.eval.runner import run_video

        run_video(model, str(dataset), name=name, task=task.value, frames=frames, pretrained=pretrained,
                  eva_config=eva_config, arch=arch, classnames=classnames, templates=templates, batch_size=batch_size,
                  workers=workers, precision=precision.value, output=output, quiet=quiet)
