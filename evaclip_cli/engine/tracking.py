"""Where a run's numbers go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when the recipe asks; rank 0
only.

Every sink is a ``Sink``: ``begin(start_step, history)`` once the resume point is known (``history``: the
metrics.jsonl records up to it), ``log(kind, step, record)`` for each ``"train"`` and ``"eval"`` record, and
``end(curves_png, ok)`` after the run (``ok`` False when it stopped on an error). ``Tracking`` fans the engine's
calls out to the sinks; ``open_tracking`` builds the ones the recipe asks for, ``check_available`` stops a recipe
that asks for wandb without it installed before anything is built.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol

from evaclip_cli import atomic
from evaclip_cli.errors import UserError

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe

WANDB_INSTALL = "pip install 'evaclip[wandb]'"
WANDB_RUN_ID = "wandb_run_id"  # RUN/wandb_run_id: the wandb run a resumed run continues


class Sink(Protocol):
    def begin(self, start_step: int, history: list[dict]) -> None: ...

    def log(self, kind: str, step: int, record: dict) -> None: ...

    def end(self, curves_png: Optional[Path], ok: bool) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record that TensorBoard and wandb plot (the step is the x axis, not a curve)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


# ---------------------------------------------------------------------------------------------------- metrics.jsonl
class JsonlSink:
    """``metrics.jsonl``: one JSON object per logged step; on resume, entries after the resumed step are dropped so
    the file reads like an uninterrupted run."""

    def __init__(self, path: Path):
        self.path = path
        self.kept: list[dict] = []
        self._fh: Any = None

    def begin(self, start_step: int, history: list[dict]) -> None:
        path = self.path
        if start_step > 0 and path.exists():
            self.kept = [r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
                         if r.get("step", 0) <= start_step]
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.kept))
        elif start_step == 0 and path.exists():
            path.unlink()
        self._fh = open(path, "a")

    def log(self, kind: str, step: int, record: dict) -> None:
        self._fh.write(json.dumps(record if "step" in record else {"step": step, **record}) + "\n")
        self._fh.flush()

    def end(self, curves_png: Optional[Path], ok: bool) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------------------------------ TensorBoard
class TensorBoardSink:
    """``RUN/tensorboard/``: ``train/<key>`` and ``eval/<key>`` scalars against the step. On resume, events after the
    resumed step are purged (TensorBoard's ``purge_step``). Without tensorboard installed it is silently off:
    metrics.jsonl still has everything."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer: Any = None

    def begin(self, start_step: int, history: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else None)
        _quiet_writer_threads()

    def log(self, kind: str, step: int, record: dict) -> None:
        if self.writer is not None:
            for k, v in scalars(record).items():
                self.writer.add_scalar(f"{kind}/{k}", v, step)

    def end(self, curves_png: Optional[Path], ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _quiet_writer_threads() -> None:
    """TensorBoard writes its event file from a thread of its own: a failed write there (a full disk) would print
    a traceback; the sink's next call raises the same OSError, which ``Tracking`` turns into the one line."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "evaclip_quiet", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            return
        previous(args)

    hook.evaclip_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


# --------------------------------------------------------------------------------------------------- Weights & Biases
def check_available(recipe: Recipe) -> None:
    """Stop a recipe that asks for wandb when it cannot be imported (called before any model is built)."""
    if not recipe.logging.wandb.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"logging.wandb.enabled = true needs the wandb package: {WANDB_INSTALL} (or set "
                        "logging.wandb.enabled=false)") from None
    except Exception as e:  # installed but broken (e.g. a protobuf it cannot use)
        raise UserError(f"wandb is installed but cannot be imported ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); reinstall it with {WANDB_INSTALL}") from None


class WandbSink:
    """A wandb run in ``RUN/wandb/``: the resolved recipe as its config, the TensorBoard scalars against the
    ``step`` metric (so a resumed run that logs a step again adds a point instead of being refused), ``eval/table``
    (every eval so far: step, metric, value) after each eval, and ``curves`` (curves.png) at the end. Its id is kept
    in ``RUN/wandb_run_id``; a run resumed from a checkpoint continues that wandb run (``resume="allow"``)."""

    TABLE_COLUMNS: list = ["step", "metric", "value"]

    def __init__(self, recipe: Recipe, out_dir: Path, resuming: bool):
        import wandb

        self._wandb = wandb
        cfg = recipe.logging.wandb
        id_file = out_dir / WANDB_RUN_ID
        run_id = None
        if resuming and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        self.continued = run_id is not None
        self._rows: list[list] = []
        self.run: Any = None
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name, group=cfg.group,
                tags=list(cfg.tags) or None, notes=cfg.notes, mode=cfg.mode, job_type=recipe.stage,
                dir=str(out_dir), id=run_id or _new_run_id(wandb), resume="allow",
                config=recipe.model_dump(mode="json"), allow_val_change=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"logging.wandb: wandb could not start a run ({first}); run `wandb login`, or set "
                            "logging.wandb.mode=offline (sync later with `wandb sync`)") from None
        atomic.write_text(id_file, f"{self.run.id}\n")
        self.run.define_metric("step")
        for prefix in ("train", "eval"):
            self.run.define_metric(f"{prefix}/*", step_metric="step")

    def begin(self, start_step: int, history: list[dict]) -> None:
        # the eval table is re-logged whole after each eval: a resumed run starts it from the kept evals
        for r in history:
            if "loss" not in r and r.get("step", 0) <= start_step:
                self._rows += self._table_rows(int(r.get("step", 0)), r)

    def _table_rows(self, step: int, record: dict) -> list[list]:
        return [[step, k, float(v)] for k, v in scalars(record).items()]

    def log(self, kind: str, step: int, record: dict) -> None:
        data: dict[str, Any] = {"step": step, **{f"{kind}/{k}": v for k, v in scalars(record).items()}}
        if kind == "eval":
            self._rows += self._table_rows(step, record)
            data["eval/table"] = self._wandb.Table(columns=self.TABLE_COLUMNS, data=[list(r) for r in self._rows])
        self.run.log(data)

    def end(self, curves_png: Optional[Path], ok: bool) -> None:
        if self.run is None:
            return
        try:
            if curves_png is not None and Path(curves_png).is_file():
                self.run.log({"curves": self._wandb.Image(str(curves_png))})
        finally:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def _new_run_id(wandb) -> str:
    try:
        return wandb.util.generate_id()
    except Exception:  # the helper moved: wandb's ids are 8 characters of [a-z0-9]
        import secrets
        import string

        return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# ------------------------------------------------------------------------------------------------------- together
class Tracking:
    """The engine's one handle on its sinks. ``jsonl`` is the metrics.jsonl sink (its kept records are the history
    the other sinks see on resume); on ranks other than 0 there are no sinks and every call does nothing."""

    def __init__(self, sinks: list, jsonl: Optional[JsonlSink] = None, out_dir: Optional[Path] = None):
        self.sinks, self.jsonl, self.out_dir = sinks, jsonl, out_dir
        self._ended = False

    def begin(self, start_step: int) -> None:
        history: list[dict] = []
        for s in self.sinks:
            with self._writes(s):
                s.begin(start_step, history)
            if s is self.jsonl:
                history = self.jsonl.kept
        self._ended = False

    def log(self, kind: str, step: int, record: dict) -> None:
        for s in self.sinks:
            with self._writes(s):
                s.log(kind, step, record)

    @contextlib.contextmanager
    def _writes(self, sink) -> Iterator[None]:
        """A sink's failed write (a full disk, a quota, a read-only folder: metrics.jsonl, TensorBoard's event file)
        is one line that names the file and the run's last complete checkpoint."""
        try:
            yield
        except OSError as e:
            raise self.write_error(e, sink) from None

    def write_error(self, e: OSError, sink) -> UserError:
        from evaclip_cli.engine.resume import intact_note

        where = Path(e.filename) if e.filename else getattr(sink, "path", None) or getattr(sink, "log_dir", None)
        note = intact_note(self.out_dir / "checkpoints") if self.out_dir is not None else ""
        return UserError(f"cannot write {where}: {atomic.cannot(e, where or self.out_dir or '.')}{note}")

    def end(self, curves_png: Optional[Path] = None, ok: bool = True) -> None:
        if self._ended:
            return
        self._ended = True
        errors = []
        for s in self.sinks:
            try:
                s.end(curves_png, ok)
            except Exception as e:  # one sink's failure must not keep the others open
                errors.append(self.write_error(e, s) if isinstance(e, OSError) else e)
        if errors and ok:
            raise errors[0]


def open_tracking(recipe: Recipe, out_dir: Path, resuming: bool, is_main: bool) -> Tracking:
    """The sinks ``recipe.logging`` asks for (rank 0; an empty ``Tracking`` elsewhere). The wandb run starts here,
    so a wandb that cannot log in stops the run before the model is built."""
    if not is_main:
        return Tracking([])
    jsonl = JsonlSink(out_dir / "metrics.jsonl")
    sinks: list = [jsonl]
    if recipe.logging.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if recipe.logging.wandb.enabled:
        sinks.append(WandbSink(recipe, out_dir, resuming))
    return Tracking(sinks, jsonl, out_dir)
