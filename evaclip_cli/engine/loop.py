"""The training loop every stage shares: ``run(recipe, stage)``.

A stage (``evaclip_cli.engine.stage.Stage``; the CLIP, distill and video stages live in ``evaclip_cli.stages``)
supplies the model, the data and the loss. The engine owns the rest, as the stations of ``Trainer``:

- ``build``: seed, data loader (started before the model: see ARCHITECTURE.md), model, param groups, DeepSpeed;
- ``restore``: a checkpoint's weights, optimizer, RNG, counters, guard history and segment (engine/resume.py,
  engine/universal.py for another world size, engine/segments.py for a changed recipe);
- ``optimizer_step``: one step of ``accum`` micro batches with the non-finite and spike rules (engine/guard.py);
- ``log_window``: loss, lr and telemetry (engine/telemetry.py) to the sinks (engine/tracking.py) and the progress
  (engine/progress.py);
- ``save`` / ``rollback``: checkpoints, and the guard's return to the last one;
- ``finish``: the final checkpoint and eval, the exports, ``curves.png``.

A graceful stop (engine/stopping.py) is checked between steps; ``RUN/events.jsonl`` (engine/events.py) records
what happened besides the numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from evaclip_cli import atomic
from evaclip_cli.engine import dist, schedule, tracking
from evaclip_cli.engine import resume as ckpt
from evaclip_cli.engine.config import deepspeed_config
from evaclip_cli.engine.events import Events
from evaclip_cli.engine.guard import SkippableStep, SpikeGuard
from evaclip_cli.engine.memory import MemoryLog, free_training_tensors, summary_line, trim_heap
from evaclip_cli.engine.params import build_param_groups
from evaclip_cli.engine.progress import make_progress
from evaclip_cli.engine.stage import Context, ContrastiveStage, Stage
from evaclip_cli.engine.stopping import GracefulStop
from evaclip_cli.engine.telemetry import (
    FlopsModel,
    WindowClock,
    device_memory,
    grad_norm_after_step,
    grad_norm_before_step,
    throughput,
)
from evaclip_cli.errors import Interrupted, PeerLost, StopRequested, TrainingStopped, UserError, first_line

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe

__all__ = ["run", "plot_curves", "write_recipe", "EVAL_HEADLINES"]

FlopsFor = Callable[[int, str], FlopsModel]  # (world size, device) -> FLOPs per sample and device peak
RECIPE_HISTORY = "recipe_history"  # RUN/recipe_history/segmentN.toml: the recipe of each segment of a run


def write_recipe(recipe: Recipe, out_dir: Path, segment: int = 1) -> Path:
    """``RUN/evaclip_recipe.toml`` (the current segment's recipe, read by ``evaclip convert --from deepspeed``) and
    its copy in ``RUN/recipe_history/``."""
    from evaclip_cli.recipes import recipe_to_toml

    text = "# resolved recipe of this run (evaclip); `evaclip convert --from deepspeed` reads it\n" + \
        recipe_to_toml(recipe)
    path = out_dir / "evaclip_recipe.toml"
    atomic.write_text(path, text)
    (out_dir / RECIPE_HISTORY).mkdir(exist_ok=True)
    atomic.write_text(out_dir / RECIPE_HISTORY / f"segment{segment}.toml", text)
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


def run(recipe: Recipe, stage: Stage, out_dir: Optional[Path] = None, resume: Optional[str] = None,
        quiet: bool = False, flops: Optional[FlopsFor] = None, accept_changes: bool = False) -> dict:
    """Train ``stage`` under ``recipe``; returns the final metrics (on every rank). ``flops`` gives the model FLOPs
    per sample and the device peak for the telemetry (the stage asks the estimator); ``accept_changes`` lets a
    resume apply changed schedule/data keys (engine/segments.py)."""
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
    if recipe.steps <= 0:
        raise UserError("data.samples must be > 0 (the run length in samples)")
    on_gpu = info.device.startswith("cuda")
    if recipe.deepspeed.precision == "bf16" and not on_gpu:
        console.print("[yellow]note:[/yellow] bf16 on CPU is only fast with AMX; fp32 is the CPU default")
    ds_cfg = deepspeed_config(recipe, info.world_size, on_gpu)
    ctx = Context(recipe=recipe, out_dir=out_dir, info=info, ds_config=ds_cfg, total_steps=recipe.steps,
                  accum=ds_cfg["gradient_accumulation_steps"],
                  zero_init=recipe.deepspeed.zero_stage == 3 and recipe.deepspeed.zero_init, console=console)
    lock = _lock_run_folder(out_dir, info)
    events = Events(out_dir, info.is_main)
    try:
        return _run(recipe, stage, ctx, resume, quiet, events, flops, accept_changes)
    except (StopRequested, Interrupted):
        raise
    except (UserError, TrainingStopped) as e:
        events.add("error", ctx.extras.get("step", 0), str(e))
        raise
    except Exception as e:
        events.add("error", ctx.extras.get("step", 0), f"internal error: {type(e).__name__}: {first_line(e)}")
        raise
    finally:
        if lock is not None:
            lock.release()


def _lock_run_folder(out_dir: Path, info: dist.DistInfo):
    """The run folder: writable and ours alone (an OS lock that dies with this process), checked before any model
    is built; rank 0 decides, every rank stops together."""
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
    return lock


def _run(recipe: Recipe, stage: Stage, ctx: Context, resume: Optional[str], quiet: bool, events: Events,
         flops: Optional[FlopsFor], accept_changes: bool) -> dict:
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
    trainer = Trainer(stage, ctx, track, events, flops, accept_changes, quiet)
    try:
        return trainer.train(resume_from)
    except BaseException:
        track.end(None, ok=False)
        raise


class Trainer:
    """One training run on this rank, as stations (see the module docstring). State that a checkpoint carries:
    ``step``, ``samples_seen``, ``segment``, ``counters``, the guard's history, the data positions and RNG."""

    def __init__(self, stage: Stage, ctx: Context, track: tracking.Tracking, events: Events,
                 flops: Optional[FlopsFor], accept_changes: bool, quiet: bool):
        self.stage, self.ctx, self.track, self.events = stage, ctx, track, events
        self.recipe, self.info = ctx.recipe, ctx.info
        self.ckpt_dir = ctx.out_dir / "checkpoints"
        self.flops_for, self.accept_changes, self.quiet = flops, accept_changes, quiet
        self.flops = FlopsModel()
        self.guard = SpikeGuard(self.recipe.guard)
        self.counters: dict[str, int] = {"nonfinite": 0}
        self.step = self.start_step = 0
        self.samples_seen, self.segment, self.saved_step = 0, 1, -1
        self.consecutive_bad = 0
        self.client: Optional[dict] = None  # the resumed checkpoint's client state
        self.last_metrics: dict = {}
        self.progress: Any = None
        self._window: dict[str, list[float]] = {"loss": [], "spike_loss": [], "grad_norm": []}
        self.clock = WindowClock()
        self._extra: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ build
    def build(self, resume_from: Optional[tuple[Path, str]]) -> None:
        """Seed, the resumed checkpoint's client state (checked against this recipe), data workers, model, param
        groups, optimizer, DeepSpeed."""
        import torch

        torch.manual_seed(self.recipe.seed + self.info.rank)
        import deepspeed

        from evaclip_cli.engine import universal
        from evaclip_cli.engine.optim import attach, build_optimizer

        ctx = self.ctx
        # a checkpoint of another world size is loaded through its universal conversion (rank 0 makes it, before
        # any model is built): engine/universal.py
        self.source = universal.prepare(resume_from, self.info.world_size, self.info.is_main, ctx.print) \
            if resume_from else None
        if self.source is not None and self.source.universal:
            ctx.ds_config = universal.loading_config(ctx.ds_config)
        data_state = None
        if resume_from is not None:
            self.client = ckpt.read_client_state(resume_from[0] / resume_from[1])
            self._check_recipe(self.client, resume_from[0] / resume_from[1])
            data_state, _ = universal.rank_states(self.client, self.info.rank)
        # the data workers start before the model exists: forked later, each would keep a copy-on-write image of
        # every page of parameters and optimizer states the training then rewrites
        ctx.data_state = data_state
        self.loader = self.stage.build_loader(ctx, data_state)
        with torch.random.fork_rng(devices=[]):  # the workers' base seed is drawn here: model init stays as it was
            self.data_iter = iter(self.loader)
        self.mem = MemoryLog(self.info.device)  # per-phase memory of this rank -> memory.json (engine/memory.py)
        self.mem.mark("start")
        model = self.stage.build_model(ctx)
        self.mem.mark("model")
        groups = build_param_groups(model.named_parameters(), self.stage.towers(ctx), self.stage.layer_id)
        # parameter names per optimizer group: a ZeRO-0 bf16/fp16 checkpoint keeps its fp32 masters only as
        # unnamed per-group lists, and the export needs them (convert.load_deepspeed_state)
        names = {id(p): n for n, p in model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        optimizer = build_optimizer(groups, self.recipe.optimizer)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ctx.ds_config)
        attach(optimizer, engine)
        self.skip = SkippableStep(optimizer)
        self.mem.mark("engine")
        if self.info.world_size == 1 and self.recipe.deepspeed.zero_stage == 0:
            engine.enable_backward_allreduce = False  # nothing to average over: skip DeepSpeed's bucketed all-reduce
        self.engine, self.optimizer = engine, optimizer
        ctx.engine, ctx.model = engine, engine.module
        if self.flops_for is not None:
            self.flops = self.flops_for(self.info.world_size, self.info.device)

    def _check_recipe(self, client: dict, where: Path) -> None:
        """A changed recipe: refused, or (``--accept-changes``) a new segment (engine/segments.py)."""
        from evaclip_cli.engine import segments

        old = client.get("resolved_recipe")
        if old is None:  # a checkpoint of an evaclip before 0.x recorded no recipe: nothing to compare
            return
        change = segments.check_change(old, self.recipe.model_dump(mode="json"), self.accept_changes, str(where))
        self.segment = int(client.get("segment", 1)) + (1 if change.schedule else 0)
        if change.schedule:
            self.ctx.print(f"[yellow]recipe changed at step {client['step']}[/yellow] "
                           f"({', '.join(change.schedule)}): segment {self.segment} starts here")

    # ---------------------------------------------------------------------------------------------- restore
    def restore(self, source: Any) -> None:
        """Weights, optimizer, counters, RNG, guard and position of the checkpoint ``source``
        (``universal.Source``) this run resumes."""
        from evaclip_cli.engine import segments, universal

        load_path, client = self.engine.load_checkpoint(str(source.root), tag=source.tag,
                                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"{source.root / source.tag}: DeepSpeed could not load this checkpoint")
        if source.universal:
            universal.after_load(self.optimizer, source)
        self.step = self.start_step = int(client["step"])
        self.counters = {"nonfinite": 0, **client.get("counters", {})}
        # another world size: rank r continues old rank r's data streams and RNG, new ranks start fresh streams
        _, rng = universal.rank_states(client, self.info.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            ckpt.seed_rng(universal.fresh_seed(self.recipe.seed, self.info.rank, self.step))
        self.guard.load_state_dict(client.get("guard"))
        old_batch = (client.get("resolved_recipe") or {}).get("data", {}).get("global_batch",
                                                                              self.recipe.data.global_batch)
        self.samples_seen = int(client.get("samples", self.step * old_batch))
        self.ctx.total_steps = segments.total_steps(self.step, self.samples_seen, self.recipe.data.samples,
                                                    self.recipe.data.global_batch)
        saved_world = client.get("world_size")
        changed = f" (written by {saved_world} processes, now {self.info.world_size})" \
            if saved_world != self.info.world_size else ""
        self.ctx.print(f"resumed from {source.root / source.tag} at step {self.step}{changed}", soft_wrap=True)
        self.events.add("resume", self.step, f"from {source.root / source.tag}{changed}")

    # ------------------------------------------------------------------------------------------------- train
    def train(self, resume_from: Optional[tuple[Path, str]]) -> dict:
        self.build(resume_from)
        if self.source is not None:
            self.restore(self.source)
        else:
            self.events.add("start", 0, f"{self.recipe.name}: {self.ctx.total_steps} steps")
        if self.info.is_main:
            write_recipe(self.recipe, self.ctx.out_dir, self.segment)
        self.track.begin(self.start_step)
        self.progress = make_progress(self.ctx.console, self.stage.name, self.ctx.total_steps, self.start_step,
                                      enabled=self.info.is_main and not self.quiet)
        self.engine.train()
        stopper = GracefulStop(self.ctx.out_dir, self.recipe.compute.stop_signals, self.info.is_main)
        try:
            with stopper, self.progress:
                self.clock.reset()  # the first window measures training, not the build
                self._steps(stopper)
            self.finish()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted at step {self.step}; {self._last_checkpoint_words()}") from None
        except Exception as e:
            if not dist.is_peer_failure(e):
                raise
            whole = ckpt.list_complete(self.ckpt_dir)
            where = f"resume from {whole[-1][1]} with --resume auto" if whole else "no checkpoint was written yet"
            raise PeerLost(f"rank {self.info.rank} lost another process of the job at step {self.step + 1} "
                           f"({type(e).__name__}: {first_line(e, 160)}); {where}") from None
        finally:
            if self.track.jsonl is not None:
                self.track.jsonl.end(None, ok=True)  # metrics.jsonl complete before the PNG is drawn from it
        return self._result()

    def _steps(self, stopper: GracefulStop) -> None:
        """Optimizer steps until the last one, with logging, rollbacks, evals, checkpoints and stop requests."""
        log = self.recipe.logging
        eval_every = self.recipe.eval.every_steps
        while self.step < self.ctx.total_steps:
            self.optimizer_step()
            self.ctx.extras["step"] = self.step
            if self.step % max(1, log.log_every) == 0 or self.step == self.ctx.total_steps:
                self.log_window()
            else:
                self.progress.advance(self.step)
            if self.guard.wants_rollback():
                self.rollback()
                continue
            last = self.step == self.ctx.total_steps
            if eval_every and self.step % eval_every == 0 and not last:
                _evaluate(self.ctx, self.stage, self.step, self.track, self.last_metrics)
            if log.checkpoint_every and self.step % log.checkpoint_every == 0 and not last:
                self.save()
            reason = stopper.requested()
            if reason is not None and not last:
                self.stop(reason, stopper)

    def optimizer_step(self) -> None:
        """One optimizer step: ``accum`` finite micro batches, then the guard's verdict on the step's loss, then
        DeepSpeed's step (a no-op for a spike)."""
        ctx, engine = self.ctx, self.engine
        r = self.recipe
        schedule.apply(self.optimizer.param_groups, self.step, ctx.total_steps, r.schedule.warmup_steps,
                       r.schedule.kind, r.schedule.min_lr_ratio)
        global_batch = r.data.contrastive_batch == "global" and ctx.accum > 1 and \
            isinstance(self.stage, ContrastiveStage)
        losses, extra = self._accumulate_global() if global_batch else self._accumulate()
        loss_all = dist.all_reduce_sum([sum(losses) / len(losses)])[0] / self.info.world_size
        spike = self.guard.judge(self.step + 1, loss_all)
        if spike:
            self.skip.skip_next()
            self._spike(loss_all)
        # the norm is read on logged steps only: reading it waits for the device (and ZeRO-0 fp32 computes it here)
        logged = (self.step + 1) % max(1, r.logging.log_every) == 0 or self.step + 1 == ctx.total_steps
        norm = grad_norm_before_step(engine) if logged else None
        engine.step()
        if logged and norm is None:
            norm = grad_norm_after_step(engine)
        self.mem.mark("step1")  # the optimizer stepped: its moments exist now (kept once)
        self.step += 1
        self.samples_seen += r.data.global_batch
        self.clock.stepped(r.data.global_batch)
        self._window["spike_loss" if spike else "loss"].append(loss_all)
        if norm is not None and not spike:
            self._window["grad_norm"].append(norm)
        self._extra = extra

    def _accumulate(self) -> tuple[list[float], dict[str, float]]:
        """Forward and backward of ``accum`` micro batches, each its own loss (a non-finite one is skipped and
        another read); every DeepSpeed step but the last, which ``optimizer_step`` takes."""
        ctx, engine = self.ctx, self.engine
        losses: list[float] = []
        extra: dict[str, float] = {}
        while len(losses) < ctx.accum:
            batch = self.clock.next_batch(self.data_iter)
            self.stage.consumed(batch)
            loss, m = self.stage.loss(ctx, batch, self.step)
            value = float(loss.detach().float().item())
            if dist.any_true(not math.isfinite(value)):
                del loss
                self._nonfinite()
                continue
            self.consecutive_bad = 0
            engine.backward(loss)
            losses.append(value)
            for k, v in m.items():
                extra[k] = extra.get(k, 0.0) + v / ctx.accum
            if len(losses) < ctx.accum:
                engine.step()  # not a boundary: DeepSpeed only counts the micro step
        return losses, extra

    def _accumulate_global(self) -> tuple[list[float], dict[str, float]]:
        """The contrastive batch is the global batch (``data.contrastive_batch = "global"``): the features of all
        ``accum`` micro batches first, without grad (a non-finite loss discards the set and reads another); then
        each micro batch's forward again with grad, its loss against the whole accumulated batch of every rank
        (its own rows replaced by the ones with grad). The gradients of the passes add up to the gradient of the
        global batch's loss: DeepSpeed's 1/accum scaling is off, and ``logit_scale`` takes 1/accum of its gradient
        in each pass (a parameter without a gradient in some micro steps is accumulated inexactly by ZeRO-3)."""
        import torch

        ctx, engine, stage = self.ctx, self.engine, cast(ContrastiveStage, self.stage)
        while True:
            batches = [self.clock.next_batch(self.data_iter) for _ in range(ctx.accum)]
            for batch in batches:
                stage.consumed(batch)
            base = engine.micro_steps  # seeds CLIPA's reducer: the same tokens in both passes
            with torch.no_grad():
                cached = [stage.features(ctx, batch, self.step, base + i) for i, batch in enumerate(batches)]
                imgs, txts = [c[0] for c in cached], [c[1] for c in cached]
                value = float(stage.contrastive_loss(ctx, torch.cat(imgs), torch.cat(txts), cached[-1][2]))
            if not dist.any_true(not math.isfinite(value)):
                break
            self._nonfinite()
        self.consecutive_bad = 0
        extra: dict[str, float] = {}
        for i, batch in enumerate(batches):
            img, txt, scale, m = stage.features(ctx, batch, self.step, base + i)
            last = i == ctx.accum - 1
            # every pass sees the whole loss's dependence on logit_scale: 1/accum of its gradient each
            shared = scale.detach() + (scale - scale.detach()) / ctx.accum
            loss = stage.contrastive_loss(ctx, torch.cat([*imgs[:i], img, *imgs[i + 1:]]),
                                          torch.cat([*txts[:i], txt, *txts[i + 1:]]), shared)
            engine.backward(loss, scale_wrt_gas=False)
            for k, v in {"logit_scale": float(scale.detach()), **m}.items():
                extra[k] = extra.get(k, 0.0) + v / ctx.accum
            if not last:
                engine.step()  # not a boundary: DeepSpeed only counts the micro step
        return [value], extra

    def _nonfinite(self) -> None:
        self.counters["nonfinite"] += 1
        self.consecutive_bad += 1
        max_bad = self.recipe.logging.max_bad_steps
        if self.consecutive_bad >= max_bad:
            raise TrainingStopped(
                f"stopped at step {self.step + 1}: {self.consecutive_bad} non-finite losses in a row "
                f"(logging.max_bad_steps = {max_bad}); lower optimizer.lr, check the data, or "
                f"resume from {self.ckpt_dir} with a changed recipe")
        self.ctx.print(f"[yellow]step {self.step + 1}: non-finite loss skipped[/yellow] "
                       f"({self.counters['nonfinite']} so far)")

    def _spike(self, loss: float) -> None:
        limit = self.guard.threshold()
        line = (f"step {self.step + 1}: loss {loss:.4f} is a spike (above {limit:.4f}, guard.sigma = "
                f"{self.recipe.guard.sigma}); step not applied ({self.guard.skipped} so far)")
        self.ctx.print(f"[yellow]{line}[/yellow]")
        self.events.add("guard_skip", self.step + 1, line)

    # --------------------------------------------------------------------------------------------------- log
    def log_window(self) -> None:
        """The window's record, reduced over ranks where that matters, to every sink and the progress."""
        w = self._window
        losses = w["loss"] or w["spike_loss"]
        mem = device_memory(self.info.device)
        wait, alloc, peak = dist.all_reduce_max([self.clock.data_wait, mem["mem_alloc_gib"], mem["mem_peak_gib"]])
        record = {"step": self.step, "loss": sum(losses) / len(losses),
                  "lr": max(g["lr"] for g in self.optimizer.param_groups),
                  **throughput(self.clock, self.flops, self.info.world_size, wait),
                  "grad_norm": sum(w["grad_norm"]) / len(w["grad_norm"]) if w["grad_norm"] else None,
                  "mem_alloc_gib": alloc, "mem_peak_gib": peak,
                  "samples": self.samples_seen, "total_steps": self.ctx.total_steps, "segment": self.segment,
                  "nonfinite_skipped": self.counters["nonfinite"], "guard_skipped": self.guard.skipped,
                  "guard_rollbacks": self.guard.rollbacks, **self.flops.tokens(), **self._extra,
                  **self.stage.log_extras(self.ctx)}
        if record["grad_norm"] is None:
            del record["grad_norm"]
        self._window = {"loss": [], "spike_loss": [], "grad_norm": []}
        self.clock.reset()
        self.track.log("train", self.step, record)
        self.last_metrics.update(record)
        self.progress.window(record)

    # -------------------------------------------------------------------------------------------------- save
    def save(self) -> Path:
        client = {
            "step": self.step,
            "world_size": self.info.world_size,
            "counters": self.counters,
            "data_states": dist.all_gather_object(self.stage.data_state()),
            "rng_states": dist.all_gather_object(ckpt.rng_state()),
            "recipe": self.recipe.name,
            "resolved_recipe": self.recipe.model_dump(mode="json"),
            "samples": self.samples_seen,
            "segment": self.segment,
            "guard": self.guard.state_dict(),
            "param_group_names": self.group_names,
        }
        try:
            path = ckpt.save(self.engine, self.ckpt_dir, self.step, client, self.recipe.logging.keep_last,
                             self.info.is_main)
        except OSError as e:
            done = ckpt.list_complete(self.ckpt_dir)
            kept = f"; the last complete checkpoint ({done[-1][1]}) is intact" if done else ""
            raise UserError(f"cannot write {self.ckpt_dir / ckpt.tag_for(self.step)}: "
                            f"{atomic.cannot(e, self.ckpt_dir)}{kept}") from None
        self.saved_step = self.step
        self.events.add("checkpoint", self.step, str(path))
        self.progress.note(f"checkpoint {path}")
        return path

    def rollback(self) -> None:
        """Back to the last checkpoint (weights, optimizer, RNG, guard history, samples seen); the data stream goes
        on from where it is, so the batches read since the checkpoint are skipped."""
        done = ckpt.list_complete(self.ckpt_dir)
        back = done[-1] if done else None
        written_by = ckpt.read_manifest(back[1]).get("world_size") if back else None
        if back is None or written_by not in (None, self.info.world_size):
            why = "no checkpoint yet" if back is None else f"{back[1]} was written by {written_by} processes"
            self.events.add("rollback", self.step, f"not possible ({why}): the spikes were skipped only")
            self.guard.rolled_back()
            return
        dist.barrier()
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=back[1].name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        ckpt.set_rng_state(client["rng_states"][self.info.rank])
        self.guard.load_state_dict(client.get("guard"), keep_counts=True)
        self.guard.rolled_back()
        skipped = self.step - back[0]
        self.counters["rollback_skipped_steps"] = self.counters.get("rollback_skipped_steps", 0) + skipped
        line = (f"step {self.step}: {self.recipe.guard.rollback_after} spikes within "
                f"{self.recipe.guard.rollback_window} steps; rolled back to {back[1]}, the {skipped * self.ctx.accum} "
                f"micro batches read since are skipped")
        self.ctx.print(f"[yellow]{line}[/yellow]")
        self.events.add("rollback", self.step, line)
        self.step = back[0]
        self.samples_seen = int(client.get("samples", self.samples_seen))
        self.progress.advance(self.step)

    def stop(self, reason: str, stopper: GracefulStop) -> None:
        path = self.save() if self.saved_step != self.step else self.ckpt_dir / ckpt.tag_for(self.step)
        line = (f"stopped by {reason} after step {self.step}/{self.ctx.total_steps}: checkpoint {path} written; "
                "continue with --resume auto")
        self.events.add("stop", self.step, line)
        stopper.done()
        raise StopRequested(line)

    def _last_checkpoint_words(self) -> str:
        whole = ckpt.list_complete(self.ckpt_dir)
        return (f"the last complete checkpoint is {whole[-1][1]} (--resume auto continues from it)" if whole
                else "no checkpoint was written yet")

    # ------------------------------------------------------------------------------------------------ finish
    def finish(self) -> None:
        """The final checkpoint and eval, then the exports with the training state freed."""
        self.save()
        if self.start_step < self.ctx.total_steps or not any(k.endswith(EVAL_HEADLINES) for k in self.last_metrics):
            _evaluate(self.ctx, self.stage, self.step, self.track, self.last_metrics)
        # the exports read the checkpoint just written: free the model, gradients, optimizer states and data
        # workers first (at 18B the training state is most of a node's memory)
        free_training_tensors(self.engine)  # DeepSpeed's own references would keep them alive past the `del`
        self.ctx.engine = self.ctx.model = None
        self.engine = self.optimizer = self.skip = self.loader = self.data_iter = None  # type: ignore[assignment]
        _free_memory()
        self.mem.mark("released")  # what the export has beside it
        _write_memory(self.ctx, self.mem)
        self.stage.finish(self.ctx)

    def _result(self) -> dict:
        out = self.last_metrics
        if self.info.is_main:
            png = plot_curves(self.ctx.out_dir / "metrics.jsonl", self.ctx.out_dir / "curves.png")
            out["curves_png"] = str(png) if png else None
            self.track.end(png, ok=True)
        out["step"] = self.step
        out["nonfinite_skipped"] = self.counters["nonfinite"]
        out["guard_skipped"], out["guard_rollbacks"] = self.guard.skipped, self.guard.rollbacks
        return out

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


