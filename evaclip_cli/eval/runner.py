"""The one runner: ``evaclip eval zeroshot|retrieval|video|suite`` and training's periodic eval.

``run_zeroshot``, ``run_retrieval``, ``run_video``, ``run_suite`` (the commands) and ``evaluate_live`` (the training
stages) all build the same things — a ``LoadedClip``, an adapter over the set, the prompts and classifier of
``prompts.py`` — and run them through the loops of ``loops.py``. The commands add what a command needs: the
data-parallel setup under torchrun, precision (autocast), DataLoader workers, a progress bar, the metrics JSON
(CLIP_benchmark's layout, written atomically) and a results table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from evaclip_cli.errors import UserError
from evaclip_cli.eval.suite import suite_names

__all__ = ["run_zeroshot", "run_retrieval", "run_video", "run_suite", "suite_names", "evaluate_live", "LiveSet"]


# ---------------------------------------------------------------------------------------------------- run setup
def setup_dist():
    """Data-parallel eval under torchrun (the same launcher as `train`); a bare process stays single."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            tdist.init_process_group(backend)
    device = "cpu"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def env_rank_world() -> tuple[int, int]:
    """This process's rank and the world size as torchrun sets them (``setup_dist`` reads the same), known before
    torch is imported."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _open_clip_config(model, pretrained=None) -> Optional[dict]:
    """The config of an open_clip folder (or of a run folder's ``final/``), read without loading anything; None for
    any other source."""
    import json

    if pretrained is not None:
        return None
    p = Path(model)
    for d in (p / "final", p):
        cfg = d / "open_clip_config.json"
        if cfg.is_file():
            try:
                got = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return got if isinstance(got, dict) and isinstance(got.get("model_cfg"), dict) else None
    return None


def predicted_image_size(model, pretrained=None) -> Optional[int]:
    """The input size an open_clip folder (or a run folder's ``final/``) declares: decode-ahead starts with it;
    ``ImageSet.set_transform`` discards that work if the loaded model says otherwise. None when it cannot be known
    before loading."""
    cfg = _open_clip_config(model, pretrained)
    vision = cfg["model_cfg"].get("vision_cfg", {}) if cfg else None
    if not isinstance(vision, dict):
        return None
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and size > 0 else None


#: Packages that open_clip and timm import only if installed, inside ``try/except ImportError``, and that evaluation
#: never uses: ``wandb`` (timm.utils.summary's optional logging; 0.6-0.75 s of import when installed, as with
#: ``evaclip[wandb]``). ``transformers`` is added when the model has no Hugging Face text tower.
EVAL_UNUSED = ("wandb",)


def import_open_clip_lean(model, pretrained=None) -> bool:
    """Import open_clip for evaluation with less work (measured on 2 cores: 5.8 s -> 4.5 s, median of 6):

    * without the optional packages evaluation never uses (``EVAL_UNUSED``), and without ``transformers`` (about a
      sixth of open_clip's import) when the model is known to be an open_clip folder whose text tower and tokenizer
      are not Hugging Face ones (no ``hf_*`` key in ``text_cfg``; every EVA-CLIP): open_clip and timm import them
      inside ``try/except ImportError``, and ``sys.modules[name] = None`` makes that import fail at once. The
      entries are removed afterwards, so a later ``import wandb`` works as usual;
    * with the cyclic garbage collector paused: torch, torchvision and timm create a few hundred thousand objects
      and no garbage, and each collection on the way rescans them all. After the import they are frozen
      (``gc.freeze``), so the collections during the eval loop skip them too.

    Nothing happens when open_clip is imported already (a program that imported ``evaclip_cli`` as a library, or
    training's periodic eval). True if done."""
    import gc
    import sys

    from evaclip_cli.models.openclip_compat import gc_paused

    if "open_clip" in sys.modules:
        return False
    cfg = _open_clip_config(model, pretrained)
    text = cfg["model_cfg"].get("text_cfg", {}) if cfg else None
    unused = list(EVAL_UNUSED)
    if isinstance(text, dict) and not any(str(k).startswith("hf_") for k in text):
        unused.append("transformers")
    blocked = [m for m in unused if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # `import m` raises ImportError
    try:
        with gc_paused():
            import open_clip  # noqa: F401
    except ImportError:  # another open_clip that needs it: forget the half-import, let the loader import it normally
        for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
            del sys.modules[k]
        return False
    finally:
        for m in blocked:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    gc.freeze()  # this process is an eval command: what it imported lives as long as it does
    return True


def _start_decoding(adapter, model, pretrained, batch_size, workers, fast_decode) -> None:
    """Decode-ahead of this rank's images at the size the model's config declares, before the model is loaded."""
    from evaclip_cli.eval.loops import rank_slice

    size = predicted_image_size(model, pretrained)
    if size is None:
        return
    rank, world = env_rank_world()
    adapter.draft = size if fast_decode else None
    adapter.start_decoding(rank_slice(len(adapter), rank, world, batch_size)[0], batch_size,
                           default_workers() if workers is None else workers, size)


def _model_and_dist(model, pretrained, eva_config, arch, loaded=None):
    rank, world, device = setup_dist()
    if loaded is None:
        from evaclip_cli.checkpoints.load import load_clip

        loaded = load_clip(model, device=device, eva_config=eva_config, pretrained=pretrained, arch=arch)
    return loaded, rank, world, device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def autocast(device: str, precision: str):
    import contextlib
    import functools

    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=dtype)


def default_workers() -> int:
    import os

    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _runtime(loaded, device, rank, world, batch_size, workers, precision):
    from evaclip_cli.eval.loops import Runtime

    return Runtime(loaded, device, rank, world, batch_size, default_workers() if workers is None else workers,
                   None, autocast(device, precision))


class Progress:
    """A transient Rich progress bar (rank 0, not quiet); calling it advances by n items."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.p = RichProgress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), transient=True)
            self.t = self.p.add_task(label, total=total)

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __call__(self, n):
        if self.enabled:
            self.p.advance(self.t, n)

    def __exit__(self, *a):
        if self.enabled:
            self.p.__exit__(*a)


# ------------------------------------------------------------------------------------------------------ results
def print_results(rows: list, title: str) -> None:
    """A Rich table of metric dicts (fractions shown as percentages)."""
    from rich.console import Console
    from rich.table import Table

    cols: list = []
    for r in rows:
        for k in r["metrics"]:
            if k not in cols:
                cols.append(k)
    table = Table(title=title)
    table.add_column("dataset")
    for c in cols:
        table.add_column(c.replace("image_retrieval_recall", "t→i R").replace("text_retrieval_recall", "i→t R")
                         .replace("mean_per_class_recall", "mean/class").replace("mean_top1_top5", "mean(1,5)"),
                         justify="right")
    table.add_column("samples", justify="right")
    table.add_column("skipped", justify="right")
    for r in rows:
        table.add_row(r["dataset"], *[f"{100 * r['metrics'][c]:.2f}" if c in r["metrics"] else "" for c in cols],
                      f"{r['samples']:,}", str(r.get("skipped", 0)))
    Console().print(table)


def _finish(out: dict, output, quiet: bool, rank: int, title: str) -> None:
    """Rank 0: the results printed, then written to ``output``: a write that fails after all (the disk filled
    since the start) is one line after the results, which are never lost."""
    if rank != 0:
        return
    if not quiet:
        print_results([out], f"{title}: {out['model']}")
        if out["skipped"]:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]{out['skipped']} unreadable or incomplete sample(s) skipped[/yellow]")
    if output:
        from evaclip_cli import atomic

        try:
            atomic.write_json(output, out)
        except OSError as e:
            raise UserError(f"cannot write {output}: {atomic.cannot(e, output)}") from None


def _check_output(output) -> None:
    """An ``--output`` that cannot be written stops before the model is loaded, not after the evaluation."""
    if output:
        from evaclip_cli import atomic

        atomic.check_output(output, "file")


# ------------------------------------------------------------------------------------------------------ sets
def image_classification(dataset: str, loaded, split: str = "test", class_key: str = "cls", draft=None):
    from evaclip_cli.data.benchmarks import classification_set
    from evaclip_cli.eval.adapters import ImageSet

    return ImageSet(classification_set(dataset, split=split, class_key=class_key), loaded.transform(),
                    loaded.image_size, draft)


def video_classification(path, loaded, frames: int, name: Optional[str] = None):
    """A video classification set (``loaded``: its clips are read at the model's size; None: set it later with
    ``set_image_size``)."""
    from evaclip_cli.data.video import load_video_classification
    from evaclip_cli.eval.adapters import ClipSet

    path = Path(path)
    size = loaded.image_size if loaded is not None else 0
    ds, classnames, templates = load_video_classification(path, frames, size)
    return ClipSet(ds, name or (path.stem if path.is_file() else path.name), frames, size, classnames, templates)


def is_retrieval_manifest(path: Path) -> bool:
    """A ``path,caption`` CSV (no ``label`` column): video-text retrieval rather than classification."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = [h.strip().lower() for h in fh.readline().split(",")]
    return "caption" in header and "label" not in header


def hub_dataset(dataset: str, name: Optional[str], split: str) -> tuple[str, Optional[str]]:
    """(local path, name) of a set: ``hf-hub:OWNER/NAME`` fetched into huggingface_hub's cache (its split only),
    named after the repo (``wds_cifar10`` -> ``cifar10``); anything else as it is."""
    from evaclip_cli.checkpoints.hub_datasets import fetch_dataset, is_hub_dataset, parse_dataset, set_name

    if not is_hub_dataset(dataset) or Path(dataset).exists():
        return dataset, name
    return str(fetch_dataset(dataset, split)), name or set_name(parse_dataset(dataset))


# ------------------------------------------------------------------------------------------------------ commands
def run_zeroshot(model: str, dataset: str, *, name=None, key=None, pretrained=None, eva_config=None, arch=None,
                 classnames=None, templates=None, split="test", class_key="cls", batch_size=256, workers=None,
                 precision="auto", cache=True, fast_decode=False, output=None, quiet=False, loaded=None) -> dict:
    """``evaclip eval zeroshot``: zero-shot classification of an image set; returns the metrics JSON."""
    from evaclip_cli.data.benchmarks import classification_set
    from evaclip_cli.eval.adapters import ImageSet
    from evaclip_cli.eval.loops import classify, require_readable
    from evaclip_cli.eval.prompts import classifier, fingerprint, resolve_prompts

    _check_output(output)
    dataset, name = hub_dataset(dataset, name, split)
    evalset = classification_set(dataset, split=split, class_key=class_key)
    names, tpls = resolve_prompts(evalset, key or name, classnames, templates)
    adapter = ImageSet(evalset, None, 0)
    try:
        loaded, rt, source = _open_image_eval(adapter, model, pretrained, eva_config, arch, loaded, batch_size,
                                              workers, precision, fast_decode)
        rank, device, precision = rt.rank, rt.device, resolve_precision(precision, rt.device)
        # a Hub source: its cache snapshot (the path names the commit), so a new revision never reuses a classifier
        model_id = fingerprint(loaded.extra.get("resolved", model), f"{pretrained}|{eva_config}|{arch}|{precision}")
        W, _ = classifier(loaded, names, tpls, device, batch_size, rt.autocast, model_id if cache else None)
        with Progress(len(adapter), f"{name or evalset.name}", not quiet and rank == 0) as prog:
            r = classify(adapter, W, rt, prog, source)
    finally:
        adapter.close()
    require_readable(r, adapter, names)
    out = {"dataset": name or evalset.name, "model": str(model), "task": "zeroshot_classification",
           "metrics": {k: r[k] for k in ("acc1", "acc5", "mean_per_class_recall")}, "samples": r["samples"],
           "skipped": r["skipped"], "language": "en", "classes": len(names), "templates": len(tpls),
           "layout": evalset.layout}
    if pretrained:
        out["pretrained"] = str(pretrained)
    _finish(out, output, quiet, rank, "zero-shot classification")
    return out


def _open_image_eval(adapter, model, pretrained, eva_config, arch, loaded, batch_size, workers, precision,
                     fast_decode):
    """Everything before an image set's loop: decoding starts (when the model is not loaded yet, so it overlaps
    torch, the model and the text classifier), the model and the process group, the runtime, the batches.
    Returns (loaded, runtime, batches)."""
    from evaclip_cli.eval.loops import open_batches

    if loaded is None:
        _start_decoding(adapter, model, pretrained, batch_size, workers, fast_decode)
        import_open_clip_lean(model, pretrained)
    loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch, loaded)
    rt = _runtime(loaded, device, rank, world, batch_size, workers, resolve_precision(precision, device))
    adapter.set_transform(loaded.transform(), loaded.image_size, loaded.image_size if fast_decode else None)
    return loaded, rt, open_batches(adapter, rt)


def run_retrieval(model: str, dataset: str, *, name=None, images=None, pretrained=None, eva_config=None, arch=None,
                  split="test", batch_size=256, workers=None, precision="auto", fast_decode=False, output=None,
                  quiet=False, loaded=None) -> dict:
    """``evaclip eval retrieval``: image-text retrieval (R@1/5/10 both ways); returns the metrics JSON."""
    from evaclip_cli.data.benchmarks import retrieval_set
    from evaclip_cli.eval.adapters import ImageSet
    from evaclip_cli.eval.loops import retrieve

    _check_output(output)
    dataset, name = hub_dataset(dataset, name, split)
    evalset = retrieval_set(dataset, images=images, split=split)
    adapter = ImageSet(evalset, None, 0)
    try:
        loaded, rt, source = _open_image_eval(adapter, model, pretrained, eva_config, arch, loaded, batch_size,
                                              workers, precision, fast_decode)
        rank = rt.rank
        with Progress(len(adapter), f"{name or evalset.name}", not quiet and rank == 0) as prog:
            r = retrieve(adapter, rt, batch_size, prog, source)
    finally:
        adapter.close()
    out = {"dataset": name or evalset.name, "model": str(model), "task": "zeroshot_retrieval",
           "metrics": r["metrics"], "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"],
           "language": "en", "layout": evalset.layout}
    _finish(out, output, quiet, rank, "zero-shot retrieval")
    return out


def run_video(model: str, dataset: str, *, name: Optional[str] = None, task: str = "auto", frames: int = 1,
              pretrained=None, eva_config=None, arch=None, classnames=None, templates=None,
              batch_size: int = 32, workers: Optional[int] = None, precision: str = "auto", output=None,
              quiet: bool = False, loaded=None) -> dict:
    """``evaclip eval video``: zero-shot classification of a folder/CSV set (``acc1``, ``acc5``,
    ``mean_per_class_recall``, ``mean_top1_top5``) or video-text retrieval on a ``path,caption`` manifest, with the
    middle frame (``frames=1``, the paper's protocol) or the mean of ``frames`` segment centres."""
    from evaclip_cli.eval.adapters import ClipSet
    from evaclip_cli.eval.loops import classify, require_readable, retrieve
    from evaclip_cli.eval.prompts import classifier, resolve_prompts

    _check_output(output)
    path = Path(dataset)
    if not path.exists():
        raise UserError(f"{dataset}: no such folder or CSV (a folder of <class>/*.mp4, a label CSV, or a "
                        "path,caption manifest for retrieval)")
    if frames < 1:
        raise UserError(f"--frames must be >= 1 (1: the middle frame, the paper's protocol), got {frames}")
    if task == "auto":
        task = "retrieval" if is_retrieval_manifest(path) else "classification"
    label = name or (path.stem if path.is_file() else path.name)
    protocol = "middle frame" if frames == 1 else f"mean of {frames} frames"
    # the set is listed and its prompts checked before the model loads (minutes for an 18B); the clips' size is
    # the model's
    if task == "retrieval":
        from evaclip_cli.data.video import load_video_retrieval

        ds, captions, owner = load_video_retrieval(path, frames, 0)
        adapter = ClipSet(ds, label, frames, 0, captions=captions, owner=owner)
    else:
        adapter = video_classification(path, None, frames, label)
        names, tpls = resolve_prompts(adapter, label, classnames, templates)
    loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch, loaded)
    adapter.set_image_size(loaded.image_size)
    rt = _runtime(loaded, device, rank, world, batch_size, workers, resolve_precision(precision, device))
    if task == "retrieval":
        with Progress(len(adapter), path.name, not quiet and rank == 0) as prog:
            r = retrieve(adapter, rt, 256, prog)
        out = {"dataset": label, "model": str(model), "task": "video_retrieval", "metrics": r["metrics"],
               "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"], "language": "en",
               "frames": frames}
        _finish(out, output, quiet, rank, f"zero-shot video retrieval ({protocol})")
        return out
    W, _ = classifier(loaded, names, tpls, device, 256, rt.autocast)
    with Progress(len(adapter), path.name, not quiet and rank == 0) as prog:
        r = classify(adapter, W, rt, prog)
    require_readable(r, adapter, names, "clip")
    m = {"acc1": r["acc1"], "acc5": r["acc5"], "mean_per_class_recall": r["mean_per_class_recall"],
         "mean_top1_top5": (r["acc1"] + r["acc5"]) / 2}
    out = {"dataset": label, "model": str(model), "task": "video_classification", "metrics": m,
           "samples": r["samples"], "skipped": r["skipped"], "language": "en", "frames": frames,
           "classes": len(names), "templates": len(tpls)}
    _finish(out, output, quiet, rank, f"zero-shot video classification ({protocol})")
    return out


def run_suite(model: str, suites: list, root, out_dir=None, *, pretrained=None, eva_config=None, arch=None,
              batch_size=256, workers=None, precision="auto", cache=True, fast_decode=False, frames=None,
              quiet=False) -> dict:
    """``evaclip eval suite``: every dataset of the suites found under ``root`` (a folder, or ``hf-hub:OWNER``: the
    sets fetched from the Hub, CLIP_benchmark's by default), one model load; writes ``results.json``/``.md``/``.png``
    to ``out_dir`` (default ``eval/<model name>``)."""
    from rich.console import Console

    from evaclip_cli.checkpoints.hub_datasets import DEFAULT_ROOT, is_hub_dataset, plan_suite
    from evaclip_cli.eval.suite import aggregates, headline, load_suite, write_outputs

    root = str(root or DEFAULT_ROOT)
    hub = is_hub_dataset(root) and not Path(root).exists()
    if not hub and not Path(root).is_dir():
        raise UserError(f"{root}: dataset root not found (--root DIR holding one folder per dataset, or "
                        f"hf-hub:OWNER for the sets on the Hub, e.g. {DEFAULT_ROOT})")
    specs = [load_suite(s) for s in suites]
    # from the Hub: every set listed and its size checked against the free space before anything is fetched
    plans, left = plan_suite([d for s in specs for d in s["datasets"]], root) if hub else ({}, {})
    out_dir = Path(out_dir) if out_dir else Path("eval") / Path(str(model)).name
    from evaclip_cli import atomic

    atomic.check_output(out_dir, "folder")  # before the model loads, not after every set is evaluated
    loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch)
    console = Console(quiet=quiet or rank != 0)
    results, missing, failed, per_suite = [], [], [], []
    for suite in specs:
        rows = []
        for d in suite["datasets"]:
            try:
                path = _suite_set(d, plans, left, console) if hub else \
                    next((Path(root) / c for c in d["dirs"] if (Path(root) / c).exists()), None)
            except UserError as e:
                failed.append(d["name"])
                console.print(f"[red]{d['name']}[/red]: {e}", soft_wrap=True, highlight=False)
                continue
            if path is None:
                missing.append(d["name"])
                continue
            try:
                if d["task"] == "zeroshot":
                    r = run_zeroshot(model, str(path), name=d["name"], key=d.get("key"), loaded=loaded,
                                     batch_size=batch_size, workers=workers, precision=precision, cache=cache,
                                     fast_decode=fast_decode, quiet=True, pretrained=pretrained)
                elif d["task"] == "retrieval":
                    r = run_retrieval(model, str(path), name=d["name"], loaded=loaded, batch_size=batch_size,
                                      workers=workers, precision=precision, fast_decode=fast_decode, quiet=True)
                else:
                    r = run_video(model, str(path), name=d["name"], frames=frames or d.get("frames", 1),
                                  loaded=loaded, workers=workers, precision=precision, quiet=True)
            except UserError as e:
                failed.append(d["name"])
                console.print(f"[red]{d['name']}[/red]: {e}")
                continue
            r["headline"] = {"metric": d["metric"], "value": headline(r, d["metric"])}
            console.print(f"{d['name']}: {d['metric']} {100 * (r['headline']['value'] or 0):.2f} "
                          f"({r['samples']:,} samples{', ' + str(r['skipped']) + ' skipped' if r['skipped'] else ''})")
            rows.append(r)
        per_suite.append((suite, rows))
        results += rows
    aggs, paper = aggregates(per_suite)
    out = {"model": str(model), "suite": "+".join(s["name"] for s in specs), "results": results, "missing": missing,
           "failed": failed, "aggregates": aggs, "paper": paper}
    if rank == 0:
        for task in dict.fromkeys(r["task"] for r in results):
            print_results([r for r in results if r["task"] == task], f"{task.replace('_', ' ')}: {out['model']}")
        for k, v in aggs.items():
            ref = f" (paper, EVA-CLIP-18B: {100 * paper[k]:.1f})" if k in paper else ""
            console.print(f"[bold]{k}[/bold]: {100 * v:.2f}{ref}")
        if missing:
            where = f"not on {root}" if hub else f"not found under {root}"
            console.print(f"[yellow]{where}[/yellow]: {', '.join(missing)}")
        try:  # after the results are printed: a disk that filled since the start loses nothing on the screen
            written = write_outputs(out, out_dir)
        except OSError as e:
            raise UserError(f"cannot write {out_dir}: {atomic.cannot(e, out_dir)}") from None
        console.print(f"wrote {', '.join(str(p) for p in written)}")
    return out


def _suite_set(d: dict, plans: dict, left: dict, console) -> Optional[Path]:
    """A suite's set from the Hub: fetched now (its turn), or None with the line that says why it is left out."""
    from evaclip_cli.checkpoints.hub_datasets import fetch

    if d["name"] in plans:
        return fetch(plans[d["name"]])
    console.print(f"[yellow]{left[d['name']]}[/yellow]", soft_wrap=True, highlight=False)
    return None


# ------------------------------------------------------------------------------------------------ training eval
@dataclass
class LiveSet:
    """A set training evaluates periodically (a recipe's ``[[eval.datasets]]``): ``task="zeroshot"``, an image
    classification set (any layout ``evaclip eval zeroshot`` reads); ``"retrieval"``, an image-text retrieval set
    (``evaclip eval retrieval``'s layouts: CLIP_benchmark wds/, a caption JSON beside its images); ``"video"``, a
    video classification set or a ``path,caption`` retrieval manifest, read with ``frames`` frames per clip."""
    name: str
    path: Path
    task: str = "zeroshot"
    frames: int = 1
    images: Optional[Path] = None  # retrieval: a caption JSON's images folder (default: beside the JSON)


def evaluate_live(model, spec, sets: list, *, device, rank: int = 0, world: int = 1, batch_size: int = 256,
                  dtype=None) -> dict:
    """Zero-shot accuracy of the model being trained (any ZeRO stage; every rank calls this) on each set:
    ``{name}/acc1``, ``{name}/acc5``, ``{name}/chance`` for a classification set, CLIP_benchmark's six
    ``{name}/image_retrieval_recall@K`` / ``{name}/text_retrieval_recall@K`` (K = 1, 5, 10) for a retrieval set, and
    ``{name}/skipped`` when items were unreadable.

    The same adapters, prompts, classifier and loops as ``evaclip eval``, with the model's open_clip preprocessing
    (``LoadedClip.live``): an eval of the final step gives ``evaclip eval zeroshot|retrieval|video -d PATH``'s numbers
    for the exported model (class names and templates: the set's own files, else the shipped ones for its folder
    name). The classifier is never cached (the weights change); ``dtype`` is the engine's weight dtype (inputs are
    cast to it); a video set takes ``batch_size // frames`` clips per forward."""
    from evaclip_cli.eval.loops import Runtime, classify, retrieve
    from evaclip_cli.eval.prompts import classifier, resolve_prompts
    from evaclip_cli.models.loaded import LoadedClip

    loaded = LoadedClip.live(model, spec)
    out = {}
    for s in sets:
        if not Path(s.path).exists():
            raise UserError(f"{s.path}: eval set '{s.name}' not found")
        adapter: Any
        bs, retrieval = batch_size, s.task == "retrieval"
        if s.task == "video":
            bs = max(1, batch_size // s.frames)
            retrieval = is_retrieval_manifest(Path(s.path))
            if retrieval:
                from evaclip_cli.data.video import load_video_retrieval
                from evaclip_cli.eval.adapters import ClipSet

                ds, captions, owner = load_video_retrieval(Path(s.path), s.frames, loaded.image_size)
                adapter = ClipSet(ds, s.name, s.frames, loaded.image_size, captions=captions, owner=owner)
            else:
                adapter = video_classification(s.path, loaded, s.frames, s.name)
        elif retrieval:
            from evaclip_cli.data.benchmarks import retrieval_set
            from evaclip_cli.eval.adapters import ImageSet

            evalset = retrieval_set(str(s.path), images=str(s.images) if s.images else None)
            adapter = ImageSet(evalset, loaded.transform(), loaded.image_size)
        else:
            adapter = image_classification(str(s.path), loaded)
        rt = Runtime(loaded, device, rank, world, bs, 0, dtype)
        if retrieval:
            got = retrieve(adapter, rt, batch_size)
            out.update({f"{s.name}/{k}": v for k, v in got["metrics"].items()})
            if got["skipped"]:
                out[f"{s.name}/skipped"] = got["skipped"]
            continue
        names, tpls = resolve_prompts(adapter, None)  # as `evaclip eval -d PATH`: the set's own name picks them
        W, _ = classifier(loaded, names, tpls, device, batch_size)
        res = classify(adapter, W, rt)
        out[f"{s.name}/acc1"] = res["acc1"]
        out[f"{s.name}/acc5"] = res["acc5"]
        out[f"{s.name}/chance"] = 1.0 / len(names)
        if res["skipped"]:
            out[f"{s.name}/skipped"] = res["skipped"]
    return out
