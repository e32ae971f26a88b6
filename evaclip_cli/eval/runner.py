"""The eval commands: ``evaclip eval zeroshot|retrieval|video|suite``, and training's periodic eval.

``run_zeroshot``, ``run_retrieval``, ``run_video``, ``run_suite`` (the commands) and ``evaluate_live`` (the training
stages) all build the same things — a ``LoadedClip``, an adapter over the set (``adapters.build_adapter``), the
prompts and classifier of ``prompts.py`` — and run them through the loops of ``loops.py``. The commands add what a
command needs: the setup of ``runtime.py`` (data-parallel under torchrun, precision, DataLoader workers), and the
output of ``report.py`` (a progress bar, a results table, the metrics JSON in CLIP_benchmark's layout, written
atomically).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError
from evaclip_cli.eval.report import Progress, check_output, finish, print_results
from evaclip_cli.eval.runtime import make_runtime, model_and_dist, open_image_eval, resolve_precision
from evaclip_cli.eval.suite import suite_names

__all__ = ["run_zeroshot", "run_retrieval", "run_video", "run_suite", "suite_names", "evaluate_live", "LiveSet"]


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

    check_output(output)
    dataset, name = hub_dataset(dataset, name, split)
    evalset = classification_set(dataset, split=split, class_key=class_key)
    names, tpls = resolve_prompts(evalset, key or name, classnames, templates)
    adapter = ImageSet(evalset, None, 0)
    try:
        loaded, rt, source = open_image_eval(adapter, model, pretrained, eva_config, arch, loaded, batch_size,
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
    finish(out, output, quiet, rank, "zero-shot classification")
    return out


def run_retrieval(model: str, dataset: str, *, name=None, images=None, pretrained=None, eva_config=None, arch=None,
                  split="test", batch_size=256, workers=None, precision="auto", fast_decode=False, output=None,
                  quiet=False, loaded=None) -> dict:
    """``evaclip eval retrieval``: image-text retrieval (R@1/5/10 both ways); returns the metrics JSON."""
    from evaclip_cli.data.benchmarks import retrieval_set
    from evaclip_cli.eval.adapters import ImageSet
    from evaclip_cli.eval.loops import retrieve

    check_output(output)
    dataset, name = hub_dataset(dataset, name, split)
    evalset = retrieval_set(dataset, images=images, split=split)
    adapter = ImageSet(evalset, None, 0)
    try:
        loaded, rt, source = open_image_eval(adapter, model, pretrained, eva_config, arch, loaded, batch_size,
                                             workers, precision, fast_decode)
        rank = rt.rank
        with Progress(len(adapter), f"{name or evalset.name}", not quiet and rank == 0) as prog:
            r = retrieve(adapter, rt, batch_size, prog, source)
    finally:
        adapter.close()
    out = {"dataset": name or evalset.name, "model": str(model), "task": "zeroshot_retrieval",
           "metrics": r["metrics"], "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"],
           "language": "en", "layout": evalset.layout}
    finish(out, output, quiet, rank, "zero-shot retrieval")
    return out


def run_video(model: str, dataset: str, *, name: Optional[str] = None, task: str = "auto", frames: int = 1,
              pretrained=None, eva_config=None, arch=None, classnames=None, templates=None,
              batch_size: int = 32, workers: Optional[int] = None, precision: str = "auto", output=None,
              quiet: bool = False, loaded=None) -> dict:
    """``evaclip eval video``: zero-shot classification of a folder/CSV set (``acc1``, ``acc5``,
    ``mean_per_class_recall``, ``mean_top1_top5``) or video-text retrieval on a ``path,caption`` manifest, with the
    middle frame (``frames=1``, the paper's protocol) or the mean of ``frames`` segment centres."""
    from evaclip_cli.eval.adapters import build_adapter, video_task
    from evaclip_cli.eval.loops import classify, require_readable, retrieve
    from evaclip_cli.eval.prompts import classifier, resolve_prompts

    check_output(output)
    path = Path(dataset)
    if not path.exists():
        raise UserError(f"{dataset}: no such folder or CSV (a folder of <class>/*.mp4, a label CSV, or a "
                        "path,caption manifest for retrieval)")
    if frames < 1:
        raise UserError(f"--frames must be >= 1 (1: the middle frame, the paper's protocol), got {frames}")
    if task == "auto":
        task = video_task(path)[len("video_"):]
    label = name or (path.stem if path.is_file() else path.name)
    protocol = "middle frame" if frames == 1 else f"mean of {frames} frames"
    # the set is listed and its prompts checked before the model loads (minutes for an 18B); the clips' size is
    # the model's
    adapter = build_adapter("video_retrieval" if task == "retrieval" else "video_classification", path, label,
                            frames=frames)
    if task != "retrieval":
        names, tpls = resolve_prompts(adapter, label, classnames, templates)
    loaded, rank, world, device = model_and_dist(model, pretrained, eva_config, arch, loaded)
    adapter.set_image_size(loaded.image_size)
    rt = make_runtime(loaded, device, rank, world, batch_size, workers, resolve_precision(precision, device))
    if task == "retrieval":
        with Progress(len(adapter), path.name, not quiet and rank == 0) as prog:
            r = retrieve(adapter, rt, 256, prog)
        out = {"dataset": label, "model": str(model), "task": "video_retrieval", "metrics": r["metrics"],
               "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"], "language": "en",
               "frames": frames}
        finish(out, output, quiet, rank, f"zero-shot video retrieval ({protocol})")
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
    finish(out, output, quiet, rank, f"zero-shot video classification ({protocol})")
    return out


def run_suite(model: str, suites: list, root, out_dir=None, *, pretrained=None, eva_config=None, arch=None,
              batch_size=256, workers=None, precision="auto", cache=True, fast_decode=False, frames=None,
              quiet=False) -> dict:
    """``evaclip eval suite``: every dataset of the suites found under ``root`` (a folder, or ``hf-hub:OWNER``: the
    sets fetched from the Hub, CLIP_benchmark's by default), one model load; writes ``results.json``/``.md``/``.png``
    to ``out_dir`` (default ``eval/<model name>``)."""
    from rich.console import Console

    from evaclip_cli.checkpoints.hub_datasets import DEFAULT_ROOT, is_hub_dataset, plan_suite
    from evaclip_cli.eval.suite import aggregates, headline, load_suite

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
    loaded, rank, world, device = model_and_dist(model, pretrained, eva_config, arch)
    console = Console(quiet=quiet or rank != 0)
    opts = {"pretrained": pretrained, "batch_size": batch_size, "workers": workers, "precision": precision,
            "cache": cache, "fast_decode": fast_decode, "frames": frames}
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
                r = _run_suite_set(d, path, model, loaded, opts)
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
        _report_suite(out, out_dir, f"not on {root}" if hub else f"not found under {root}", console)
    return out


def _run_suite_set(d: dict, path: Path, model: str, loaded, opts: dict) -> dict:
    """One set of a suite through its command (quiet: the suite prints one line per set), on the loaded model."""
    common = {"name": d["name"], "loaded": loaded, "workers": opts["workers"], "precision": opts["precision"],
              "quiet": True}
    if d["task"] == "zeroshot":
        return run_zeroshot(model, str(path), key=d.get("key"), batch_size=opts["batch_size"], cache=opts["cache"],
                            fast_decode=opts["fast_decode"], pretrained=opts["pretrained"], **common)
    if d["task"] == "retrieval":
        return run_retrieval(model, str(path), batch_size=opts["batch_size"], fast_decode=opts["fast_decode"],
                             **common)
    return run_video(model, str(path), frames=opts["frames"] or d.get("frames", 1), **common)


def _report_suite(out: dict, out_dir: Path, where_missing: str, console) -> None:
    """Rank 0: a results table per task, the aggregates, the missing sets, then the outputs written (after the
    results are printed: a disk that filled since the start loses nothing on the screen)."""
    from evaclip_cli import atomic
    from evaclip_cli.eval.suite import write_outputs

    results, paper = out["results"], out["paper"]
    for task in dict.fromkeys(r["task"] for r in results):
        print_results([r for r in results if r["task"] == task], f"{task.replace('_', ' ')}: {out['model']}")
    for k, v in out["aggregates"].items():
        ref = f" (paper, EVA-CLIP-18B: {100 * paper[k]:.1f})" if k in paper else ""
        console.print(f"[bold]{k}[/bold]: {100 * v:.2f}{ref}")
    if out["missing"]:
        console.print(f"[yellow]{where_missing}[/yellow]: {', '.join(out['missing'])}")
    try:
        written = write_outputs(out, out_dir)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {atomic.cannot(e, out_dir)}") from None
    console.print(f"wrote {', '.join(str(p) for p in written)}")


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
    from evaclip_cli.eval.adapters import build_adapter, video_task
    from evaclip_cli.eval.loops import Runtime, classify, retrieve
    from evaclip_cli.eval.prompts import classifier, resolve_prompts
    from evaclip_cli.models.loaded import LoadedClip

    loaded = LoadedClip.live(model, spec)
    out = {}
    for s in sets:
        if not Path(s.path).exists():
            raise UserError(f"{s.path}: eval set '{s.name}' not found")
        task = video_task(Path(s.path)) if s.task == "video" else \
            "retrieval" if s.task == "retrieval" else "zeroshot"
        adapter = build_adapter(task, s.path, s.name, loaded=loaded, frames=s.frames, images=s.images)
        rt = Runtime(loaded, device, rank, world, max(1, batch_size // s.frames) if s.task == "video" else batch_size,
                     0, dtype)
        if task.endswith("retrieval"):
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
