"""The training loop every stage shares: ``run(recipe, stage)``.

A stage (``evaclip_cli.engine.stage.Stage``; the CLIP, distill and video stages live in ``evaclip_cli.stages``)
supplies the model, the data and the loss. The engine owns the rest: DeepSpeed config and initialisation, param
groups, LAMB/AdamW, warmup + cosine, gradient accumulation, non-finite loss handling, checkpoints and exact resume,
the logging sinks (metrics.jsonl, TensorBoard, wandb: ``engine.tracking``), Rich progress and the loss/accuracy PNG.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from evaclip_cli import atomic
from evaclip_cli.engine import dist, schedule, tracking
from evaclip_cli.engine import resume as ckpt
from evaclip_cli.engine.config import deepspeed_config
from evaclip_cli.engine.memory import MemoryLog, free_training_tensors, summary_line, trim_heap
from evaclip_cli.engine.params import build_param_groups
from evaclip_cli.engine.stage import Context, Stage
from evaclip_cli.errors import PeerLost, TrainingStopped, UserError, first_line


def write_recipe(recipe, out_dir: Path) -> Path:
    from evaclip_cli.recipes import recipe_to_toml

    path = out_dir / "evaclip_recipe.toml"
    atomic.write_text(path, "# resolved recipe of this run (evaclip); `evaclip convert --from deepspeed` reads it\n"
                      + recipe_to_toml(recipe))
    return path


#: the eval keys plotted and summed up: top-1 of a classification set, R@1 both ways of a retrieval set
EVAL_HEADLINES = ("/acc1", "/image_retrieval_recall@1", "/text_retrieval_recall@1")


def plot_curves(metrics_path: Path, out_png: Path) -> Optional[Path]:
    """Loss (and the zero-shot figures, when evaluated: top-1 of classification sets, R@1 both ways of retrieval
    sets) against step, as a PNG."""
    if not metrics_path.exists():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.endswith(EVAL_HEADLINES) for k in r)]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5.5, 3.8), squeeze=False)
    ax[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax[0][0].set(xlabel="step", ylabel="loss", title="training loss")
    ax[0][0].grid(alpha=0.3)
    if evals:
        keys = sorted({k for r in evals for k in r if k.endswith(EVAL_HEADLINES)})
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax[0][1].plot(*zip(*pts), marker="o", label=k)
        ax[0][1].set(xlabel="step", ylabel="top-1 / R@1", title="zero-shot eval")
        ax[0][1].legend(fontsize=8)
        ax[0][1].grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def run(recipe, stage: Stage, out_dir: Optional[Path] = None, resume: Optional[str] = None,
        quiet: bool = False) -> dict:
    """Train ``stage`` under ``recipe``; returns the final metrics (on every rank)."""
    import warnings

    from rich.console import Console

    # open_clip's ClipLoss gathers features with torch.distributed.nn.all_gather, which torch deprecates with a
    # FutureWarning on every call: nothing a user of a 360-GPU job can act on
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                            category=FutureWarning)
    tracking.check_available(recipe)  # e.g. wandb asked for and not installed: one line before anything is built
    info = dist.setup()
    dist.set_threads(recipe.compute.threads)
    out_dir = Path(out_dir or recipe.out_dir())
    console = Console(stderr=False, quiet=quiet or not info.is_main)
    total_steps = recipe.steps
    if total_steps <= 0:
        raise UserError("data.samples must be > 0 (the run length in samples)")
    on_gpu = info.device.startswith("cuda")
    if recipe.deepspeed.precision == "bf16" and not on_gpu:
        console.print("[yellow]note:[/yellow] bf16 on CPU is only fast with AMX; fp32 is the CPU default")
    ds_cfg = deepspeed_config(recipe, info.world_size, on_gpu)
    ctx = Context(recipe=recipe, out_dir=out_dir, info=info, ds_config=ds_cfg, total_steps=total_steps,
                  accum=ds_cfg["gradient_accumulation_steps"],
                  zero_init=recipe.deepspeed.zero_stage == 3 and recipe.deepspeed.zero_init, console=console)
    # the run folder: writable and ours alone (an OS lock that dies with this process), checked before any model is
    # built; rank 0 decides, every rank stops together
    lock, problem = None, None
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = atomic.run_lock(out_dir).acquire()
        except OSError as e:
            problem = f"cannot write {out_dir}: {atomic.cannot(e, out_dir)}"
        except UserError as e:
            problem = str(e)
    if dist.any_true(problem is not None):
        raise UserError(problem or "rank 0 cannot use the run folder")
    try:
        return _run(recipe, stage, ctx, resume, quiet)
    finally:
        if lock is not None:
            lock.release()


def _run(recipe, stage: Stage, ctx: Context, resume: Optional[str], quiet: bool) -> dict:
    info, out_dir = ctx.info, ctx.out_dir
    ckpt_dir = out_dir / "checkpoints"
    resume_from = ckpt.find_resume(resume, ckpt_dir, log=lambda line: ctx.print(line, soft_wrap=True))
    if resume is None and ckpt.list_complete(ckpt_dir):
        last = ckpt.list_complete(ckpt_dir)[-1][0]
        raise UserError(f"{out_dir} already holds checkpoints of a run (up to step {last}); pass --resume auto to "
                        "continue it, or choose another --out")
    # the logging sinks (rank 0): a wandb run that cannot start stops every rank here, before the model is built
    problem, track = None, tracking.Tracking([])
    try:
        track = tracking.open_tracking(recipe, out_dir, resuming=resume_from is not None, is_main=info.is_main)
    except UserError as e:
        problem = str(e)
    if dist.any_true(problem is not None):
        raise UserError(problem or "rank 0 could not start its logging (wandb)")
    try:
        return _train(recipe, stage, ctx, resume_from, track, quiet)
    except BaseException:
        track.end(None, ok=False)
        raise


def _train(recipe, stage: Stage, ctx: Context, resume_from, track: tracking.Tracking, quiet: bool) -> dict:
    import torch

    info, out_dir, console, total_steps = ctx.info, ctx.out_dir, ctx.console, ctx.total_steps
    ds_cfg = ctx.ds_config
    ckpt_dir = out_dir / "checkpoints"

    torch.manual_seed(recipe.seed + info.rank)
    import deepspeed

    from evaclip_cli.engine import universal

    # a checkpoint of another world size is loaded through its universal conversion (rank 0 makes it, before any
    # model is built): engine/universal.py
    source = universal.prepare(resume_from, info.world_size, info.is_main, ctx.print) if resume_from else None
    if source is not None and source.universal:
        ds_cfg = universal.loading_config(ds_cfg)
    # the data workers start before the model exists: forked later, each would keep a copy-on-write image of every
    # page of parameters and optimizer states the training then rewrites (a CPU run of 18B widths was OOM-killed by
    # two workers holding 3.5 GB each). Their start position comes from the checkpoint's client state, read first.
    data_state = None
    if resume_from is not None:
        data_state, _ = universal.rank_states(ckpt.read_client_state(resume_from[0] / resume_from[1]), info.rank)
    ctx.data_state = data_state
    loader = stage.build_loader(ctx, data_state)
    with torch.random.fork_rng(devices=[]):  # the workers' base seed is drawn here: model init stays as it was
        data_iter = iter(loader)
    mem = MemoryLog(info.device)  # per-phase memory of this rank -> memory.json (engine/memory.py)
    mem.mark("start")
    model = stage.build_model(ctx)
    mem.mark("model")
    groups = build_param_groups(model.named_parameters(), stage.towers(ctx), stage.layer_id)
    # parameter names per optimizer group: a ZeRO-0 bf16/fp16 checkpoint keeps its fp32 masters only as unnamed
    # per-group lists, and the export needs them (convert.load_deepspeed_state)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    from evaclip_cli.engine.optim import attach, build_optimizer

    optimizer = build_optimizer(groups, recipe.optimizer)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    attach(optimizer, engine)
    mem.mark("engine")
    if info.world_size == 1 and recipe.deepspeed.zero_stage == 0:
        engine.enable_backward_allreduce = False  # nothing to average over: skip DeepSpeed's bucketed all-reduce
    ctx.engine, ctx.model = engine, engine.module

    start_step, counters = 0, {"nonfinite": 0}
    if source is not None:
        root, tag = source.root, source.tag
        load_path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        if source.universal:
            universal.after_load(optimizer, source)
        start_step = int(client["step"])
        counters = dict(client.get("counters", counters))
        # another world size: rank r continues old rank r's data streams and RNG, new ranks start fresh streams
        _, rng = universal.rank_states(client, info.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            ckpt.seed_rng(universal.fresh_seed(recipe.seed, info.rank, start_step))
        saved_world = client.get("world_size")
        changed = f" (written by {saved_world} processes, now {info.world_size})" \
            if saved_world != info.world_size else ""
        ctx.print(f"resumed from {root / tag} at step {start_step}{changed}", soft_wrap=True)
    if info.is_main:
        write_recipe(recipe, out_dir)

    track.begin(start_step)
    log_every, ckpt_every = max(1, recipe.logging.log_every), recipe.logging.checkpoint_every
    eval_every = recipe.eval.every_steps
    max_bad = recipe.logging.max_bad_steps
    consecutive_bad = 0
    samples_per_step = recipe.data.global_batch
    last_metrics: dict = {}
    window: list[float] = []
    t_window, n_window = time.perf_counter(), 0

    def save(step):
        client = {
            "step": step,
            "world_size": info.world_size,
            "counters": counters,
            "data_states": dist.all_gather_object(stage.data_state()),
            "rng_states": dist.all_gather_object(ckpt.rng_state()),
            "recipe": recipe.name,
            "param_group_names": group_names,
        }
        try:
            return ckpt.save(ctx.engine, ckpt_dir, step, client, recipe.logging.keep_last, info.is_main)
        except OSError as e:
            done = ckpt.list_complete(ckpt_dir)
            kept = f"; the last complete checkpoint ({done[-1][1]}) is intact" if done else ""
            raise UserError(f"cannot write {ckpt_dir / ckpt.tag_for(step)}: {atomic.cannot(e, ckpt_dir)}{kept}") \
                from None

    progress = _progress(console, total_steps, start_step, enabled=info.is_main and not quiet)
    engine.train()
    step = start_step
    try:
        with progress:
            task = progress.add_task(stage.name, total=total_steps, completed=start_step, loss=float("nan"),
                                     sps="-")
            while step < total_steps:
                schedule.apply(optimizer.param_groups, step, total_steps, recipe.schedule.warmup_steps,
                               recipe.schedule.kind, recipe.schedule.min_lr_ratio)
                done, step_losses = 0, []
                extra: dict[str, float] = {}
                while done < ctx.accum:
                    batch = next(data_iter)
                    stage.consumed(batch)
                    loss, m = stage.loss(ctx, batch, step)
                    value = float(loss.detach().float().item())
                    bad = dist.any_true(not math.isfinite(value))
                    if bad:
                        counters["nonfinite"] += 1
                        consecutive_bad += 1
                        del loss
                        if consecutive_bad >= max_bad:
                            raise TrainingStopped(
                                f"stopped at step {step + 1}: {consecutive_bad} non-finite losses in a row "
                                f"(logging.max_bad_steps = {max_bad}); lower optimizer.lr, check the data, or "
                                f"resume from {ckpt_dir} with a changed recipe")
                        ctx.print(f"[yellow]step {step + 1}: non-finite loss skipped[/yellow] "
                                  f"({counters['nonfinite']} so far)")
                        continue
                    consecutive_bad = 0
                    engine.backward(loss)
                    engine.step()
                    if done + 1 == ctx.accum:  # the optimizer stepped: its moments exist now
                        mem.mark("step1")
                    step_losses.append(value)
                    for k, v in m.items():
                        extra[k] = extra.get(k, 0.0) + v / ctx.accum
                    done += 1
                step += 1
                loss_mean = sum(step_losses) / len(step_losses)
                loss_all = dist.all_reduce_sum([loss_mean])[0] / info.world_size
                window.append(loss_all)
                n_window += samples_per_step
                if step % log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    sps = n_window / max(now - t_window, 1e-9)
                    t_window, n_window = now, 0
                    lr = max(g["lr"] for g in optimizer.param_groups)
                    record = {"step": step, "loss": sum(window) / len(window), "lr": lr, "samples_per_s": sps,
                              "samples": step * samples_per_step, "nonfinite_skipped": counters["nonfinite"],
                              **extra, **stage.log_extras(ctx)}
                    window = []
                    track.log("train", step, record)
                    last_metrics.update(record)
                    progress.update(task, completed=step, loss=record["loss"], sps=format_rate(sps))
                else:
                    progress.update(task, completed=step)
                if eval_every and step % eval_every == 0 and step != total_steps:
                    _evaluate(ctx, stage, step, track, last_metrics)
                if ckpt_every and step % ckpt_every == 0 and step != total_steps:
                    save(step)
        save(step)
        if start_step < total_steps or not any(k.endswith(EVAL_HEADLINES) for k in last_metrics):
            _evaluate(ctx, stage, step, track, last_metrics)
        # the exports read the checkpoint just written: free the model, gradients, optimizer states and data workers
        # first (at 18B the training state is most of a node's memory; an export beside it was OOM-killed)
        free_training_tensors(engine)  # DeepSpeed's own references would keep them alive past the `del`
        ctx.engine = ctx.model = None
        del engine, optimizer, model, groups, loader, data_iter
        _free_memory()
        mem.mark("released")  # what the export has beside it
        _write_memory(ctx, mem)
        stage.finish(ctx)
    except Exception as e:
        if not dist.is_peer_failure(e):
            raise
        whole = ckpt.list_complete(ckpt_dir)
        where = f"resume from {whole[-1][1]} with --resume auto" if whole else "no checkpoint was written yet"
        raise PeerLost(f"rank {info.rank} lost another process of the job at step {step + 1} "
                       f"({type(e).__name__}: {first_line(e, 160)}); {where}") from None
    finally:
        if track.jsonl is not None:
            track.jsonl.end(None, ok=True)  # metrics.jsonl complete before the PNG is drawn from it
    if info.is_main:
        png = plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
        last_metrics["curves_png"] = str(png) if png else None
        track.end(png, ok=True)
    last_metrics["step"] = step
    last_metrics["nonfinite_skipped"] = counters["nonfinite"]
    return last_metrics


def _write_memory(ctx: Context, mem: MemoryLog) -> None:
    records = dist.all_gather_object(mem.record(ctx.info.rank))
    if ctx.info.is_main:
        atomic.write_json(ctx.out_dir / "memory.json", {"ranks": records})
        ctx.print(summary_line(records[0]), highlight=False, soft_wrap=True)


def _free_memory() -> None:
    """Collect what was just dropped (DeepSpeed's hooks make reference cycles) and hand freed heap pages back."""
    import gc

    gc.collect()
    trim_heap()


def _evaluate(ctx: Context, stage: Stage, step: int, track: tracking.Tracking, last_metrics):
    ctx.engine.eval()
    try:
        res = stage.evaluate(ctx, step) or {}
    finally:
        ctx.engine.train()
    if res:
        track.log("eval", step, {"step": step, **res})
        last_metrics.update(res)
        ctx.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))


def format_rate(x: float) -> str:
    """Samples per second for the progress bar: two significant digits below 10 (a slow 18B step is 0.11/s, not
    0), whole numbers above."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _progress(console, total, start, enabled):
    import contextlib

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not enabled:
        class _Null(contextlib.nullcontext):
            def add_task(self, *a, **k):
                return 0

            def update(self, *a, **k):
                pass

        return _Null()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]} samples/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=False, refresh_per_second=2)
