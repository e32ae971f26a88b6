"""The contract between the engine and a training stage.

A stage says what is trained (model, parameter groups), on what (a resumable loader) and how (the loss); the engine
(``engine.loop.run``) owns DeepSpeed, the optimizer and schedule, accumulation, non-finite handling, checkpoints and
exact resume, logging and progress. ``evaclip_cli.stages`` holds the CLIP, distill and video stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, runtime_checkable

from evaclip_cli.engine import dist
from evaclip_cli.engine.params import TowerCfg

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe


@dataclass
class Context:
    """What the engine hands a stage: the recipe, the run folder, this process's place in the job and, once built,
    the DeepSpeed engine."""

    recipe: Recipe
    out_dir: Path
    info: dist.DistInfo
    ds_config: dict
    total_steps: int
    accum: int
    zero_init: bool = False
    engine: Any = None
    model: Any = None
    data_state: Optional[dict] = None
    console: Any = None
    extras: dict = field(default_factory=dict)

    @property
    def device(self):
        return self.engine.device if self.engine is not None else self.info.device

    def print(self, *a, **k):
        """A line for the user (rank 0). Lines are not wrapped at the terminal width: paths stay copyable."""
        if self.info.is_main and self.console is not None:
            k.setdefault("soft_wrap", True)
            self.console.print(*a, **k)


@runtime_checkable
class Stage(Protocol):
    """A training stage. ``evaluate`` and ``finish`` may return nothing; every method runs on every rank."""

    name: str

    def build_model(self, ctx: Context) -> Any:
        """The nn.Module, built under ``deepspeed.zero.Init`` when ``ctx.zero_init`` (ZeRO-3)."""

    def towers(self, ctx: Context) -> dict[str, TowerCfg]:
        """Learning rate, weight decay and layer decay per tower name."""

    def layer_id(self, name: str) -> tuple[str, int]:
        """(tower, layer id) of a parameter name, for layer-wise decay."""

    def build_loader(self, ctx: Context, state: Optional[dict]) -> Iterable[dict]:
        """Batches as dicts, resuming exactly from ``state`` (what ``data_state`` returned at the checkpoint)."""

    def consumed(self, batch: dict) -> None:
        """``batch`` was trained on: advance the resumable data position."""

    def data_state(self) -> dict:
        """This rank's data position, saved in every checkpoint."""

    def log_extras(self, ctx: Context) -> dict:
        """Extra scalars for the log (e.g. skipped-sample counters)."""

    def loss(self, ctx: Context, batch: dict, step: int) -> tuple[Any, dict]:
        """(loss tensor, {metric: float}) of one micro batch, through ``ctx.engine``'s forward."""

    def evaluate(self, ctx: Context, step: int) -> dict:
        """Periodic evaluation, {metric: float} ({} when there is nothing to evaluate)."""

    def finish(self, ctx: Context) -> None:
        """Exports after the final checkpoint. The loop has dropped the engine, optimizer and loader by then (their
        memory is freed for the export); the stage drops what it still holds of the model, and reads the weights
        from the checkpoint (``checkpoints.deepspeed``, streamed), never from ``ctx.engine``."""


@runtime_checkable
class ContrastiveStage(Stage, Protocol):
    """A stage whose loss has negatives (CLIP, video): the engine can make its contrastive batch the global batch
    under gradient accumulation (``data.contrastive_batch``). MIM distillation has none."""

    def features(self, ctx: Context, batch: dict, step: int, micro: int) -> tuple[Any, Any, Any, dict]:
        """(paired image embeddings, text embeddings, logit scale, metrics) of one micro batch; ``micro`` seeds any
        randomness of the forward, so two forwards of one batch agree."""

    def contrastive_loss(self, ctx: Context, img: Any, txt: Any, scale: Any) -> Any:
        """The loss of these rows against the same tensors of every rank."""


class LoaderStage:
    """What every stage shares: data bookkeeping (its ``build_loader`` sets ``self._data``, a resumable loader) and
    no periodic eval or export unless the stage defines them."""

    _data: Any = None  # the stage's resumable loader (data.wds.TrainLoader or the video one), set by build_loader

    def consumed(self, batch):
        self._data.consumed(batch)

    def data_state(self):
        return self._data.state_dict()

    def log_extras(self, ctx):
        c: dict = self._data.counters() if self._data is not None else {}
        return {f"data_{k}": v for k, v in c.items()}

    def evaluate(self, ctx, step) -> dict:
        return {}

    def finish(self, ctx) -> None:
        return None
