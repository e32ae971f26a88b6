"""Markdown reports: the eval-suite results table (``evaclip eval suite``, the model card of ``evaclip push``) and the
training summary of a run folder (``evaclip_recipe.toml`` + ``metrics.jsonl``); and what the eval commands print: a
progress bar, the results table, then the metrics JSON written.

Light on purpose: JSON/TOML in, Markdown or a Rich table out; no torch.
"""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Iterable, Optional

from evaclip_cli.errors import UserError

DASH = "–"

# the tables: (column header, metric key); metrics are fractions in [0, 1] (CLIP_benchmark) shown as percentages
_CLASSIFICATION = [("top-1", "acc1"), ("top-5", "acc5"), ("mean per-class recall", "mean_per_class_recall")]
_VIDEO_CLASSIFICATION = [("top-1", "acc1"), ("top-5", "acc5"), ("mean(top-1, top-5)", "mean_top1_top5")]
_RETRIEVAL = [(f"{side} R@{k}", f"{key}_retrieval_recall@{k}")
              for side, key in (("image", "image"), ("text", "text")) for k in (1, 5, 10)]
_SECTIONS = [
    ("zeroshot_classification", "Zero-shot image classification", _CLASSIFICATION),
    ("zeroshot_retrieval", "Zero-shot image-text retrieval", _RETRIEVAL),
    ("video_classification", "Zero-shot video classification", _VIDEO_CLASSIFICATION),
    ("video_retrieval", "Zero-shot video-text retrieval", _RETRIEVAL),
]


def _pct(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    return f"{100.0 * value:.2f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def results_markdown(results: dict) -> str:
    """The Markdown tables of a suite ``results.json`` (see the brief's contract): one table per task with the
    metric columns that apply (percentages), the sample counts (and skipped samples, frames, when any), the
    suite's aggregates (with the paper's figure when ``paper`` has one) and the datasets not evaluated
    (``missing``: no data; ``failed``: unreadable data)."""
    if not isinstance(results, dict) or not isinstance(results.get("results", []), list):
        raise ValueError("not a suite results dict: expected {'results': [...], ...}")
    entries = [r for r in results.get("results", []) if isinstance(r, dict)]
    lines: list[str] = []
    model, suite = results.get("model"), results.get("suite")
    if model or suite:
        what = f"`{model}`" if model else "the model"
        lines += [f"Zero-shot evaluation of {what}" + (f" on the `{suite}` suite" if suite else "")
                  + " (CLIP_benchmark protocol; percentages).", ""]
    known = {task for task, _, _ in _SECTIONS}
    sections = list(_SECTIONS) + [(t, f"{t}", None) for t in
                                  sorted({str(r.get("task")) for r in entries} - known)]
    for task, title, columns in sections:
        rows_in = [r for r in entries if str(r.get("task")) == task]
        if not rows_in:
            continue
        if columns is None:  # a task this table does not know: every metric it reports
            keys = sorted({k for r in rows_in for k in (r.get("metrics") or {})})
            columns = [(k, k) for k in keys]
        else:  # only the columns some row has
            columns = [(h, k) for h, k in columns if any(k in (r.get("metrics") or {}) for r in rows_in)]
        show_frames = any("frames" in r for r in rows_in)
        show_skipped = any(r.get("skipped") for r in rows_in)
        show_lang = any(r.get("language") not in (None, "en") for r in rows_in)
        header = ["dataset", *(h for h, _ in columns), "samples"]
        header += ["skipped"] if show_skipped else []
        header += ["frames"] if show_frames else []
        header += ["language"] if show_lang else []
        rows = []
        for r in rows_in:
            m = r.get("metrics") or {}
            row = [str(r.get("dataset", "?")), *(_pct(m.get(k)) for _, k in columns), str(r.get("samples", DASH))]
            row += [str(r.get("skipped", 0))] if show_skipped else []
            row += [str(r.get("frames", DASH))] if show_frames else []
            row += [str(r.get("language", DASH))] if show_lang else []
            rows.append(row)
        lines += [f"**{title}**", "", *_table(header, rows), ""]
    aggregates = results.get("aggregates") or {}
    paper = results.get("paper") or {}
    if aggregates:
        if any(k in paper for k in aggregates):  # the paper's EVA-CLIP-18B figure beside ours
            agg = _table(["aggregate", "value", "EVA-CLIP-18B (paper)"],
                         [[str(k), _pct(v), _pct(paper.get(k))] for k, v in aggregates.items()])
        else:
            agg = _table(["aggregate", "value"], [[str(k), _pct(v)] for k, v in aggregates.items()])
        lines += ["**Aggregates**", "", *agg, ""]
    missing = [str(m) for m in results.get("missing") or []]
    if missing:
        lines += [f"Not evaluated (data not found): {', '.join(missing)}.", ""]
    failed = [str(m) for m in results.get("failed") or []]
    if failed:
        lines += [f"Failed (unreadable data, see the eval log): {', '.join(failed)}.", ""]
    if not entries and not aggregates:
        lines += ["No results.", ""]
    return "\n".join(lines).rstrip() + "\n"


def load_results(path: Path) -> dict:
    """A suite ``results.json``, or one ``evaclip eval ... --output`` metrics JSON (wrapped as a one-row suite)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--results {path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--results {path}: not JSON ({e}); pass the results.json of `evaclip eval suite`") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and "dataset" in data:
        data = {"model": data.get("model"), "suite": None, "results": [data], "missing": [], "aggregates": {}}
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise UserError(f"--results {path}: not the results.json of `evaclip eval suite` (no 'results' list) nor "
                        "the --output JSON of an `evaclip eval` command")
    return data


# ------------------------------------------------------------------------------------------------ training runs
RECIPE_NAME = "evaclip_recipe.toml"
METRICS_NAME = "metrics.jsonl"

# well-known pretraining corpora, recognised in shard paths -> their Hub dataset ids (model-card metadata)
KNOWN_DATASETS = {
    "laion2b": "laion/laion2B-en",
    "laion400m": "laion/laion400m",
    "coyo": "kakaobrain/coyo-700m",
    "datacomp": "mlfoundations/datacomp_1b",
    "cc12m": "pixparse/cc12m-wds",
    "cc3m": "pixparse/cc3m-wds",
    "kinetics": "kinetics700",
}


def find_run_dir(path: Path) -> Optional[Path]:
    """The evaclip run folder ``path`` is, or sits in (run/, run/final, run/checkpoints[/global_stepN])."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    for d in (start, start.parent, start.parent.parent):
        if (d / RECIPE_NAME).is_file() and ((d / METRICS_NAME).is_file() or (d / "checkpoints").is_dir()):
            return d
    return None


def read_recipe(run_dir: Path) -> dict:
    try:
        return tomllib.loads((Path(run_dir) / RECIPE_NAME).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn last line (a run killed mid-write) is skipped."""
    out: list[dict] = []
    try:
        text = (Path(run_dir) / METRICS_NAME).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def recipe_datasets(recipe: dict) -> list[str]:
    """Hub dataset ids of the recipe's training data, where its shard paths name a well-known corpus."""
    found: list[str] = []
    for src in (recipe.get("data") or {}).get("train") or []:
        shards = str(src.get("shards", "")).lower().replace("-", "").replace("_", "")
        for key, ds in KNOWN_DATASETS.items():
            if key in shards and ds not in found:
                found.append(ds)
    return found


def _short_path(p: str) -> str:
    parts = [x for x in str(p).replace("\\", "/").split("/") if x]
    return "/".join(parts[-2:]) if parts else str(p)


def _num(x: Any) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def training_summary(run_dir: Path) -> str:
    """A short Markdown summary of an evaclip run: the recipe (model, data, optimisation, DeepSpeed) and what
    ``metrics.jsonl`` recorded (steps, samples seen, final loss, last zero-shot accuracies)."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    records = read_metrics(run_dir)
    rows: list[list[str]] = []

    def add(name, value):
        if value not in (None, "", [], {}):
            rows.append([name, value if isinstance(value, str) else _num(value)])

    add("recipe", recipe.get("name") or run_dir.name)
    add("description", recipe.get("description"))
    add("stage", recipe.get("stage"))
    model = recipe.get("model") or {}
    add("architecture", model.get("arch"))
    data = recipe.get("data") or {}
    if data.get("demo"):
        add("training data", "evaclip's embedded demo data")
    sources = [f"`{_short_path(s.get('shards', ''))}` (weight {_num(s.get('weight', 1.0))})"
               for s in data.get("train") or [] if isinstance(s, dict)]
    add("training data", ", ".join(sources))
    add("global batch", data.get("global_batch"))
    opt = recipe.get("optimizer") or {}
    if opt:
        lr = f"{_num(opt.get('lr'))}" + (f" (text {_num(opt['text_lr'])})" if opt.get("text_lr") else "")
        add("optimizer", f"{opt.get('name', '?')}, lr {lr}, weight decay {_num(opt.get('weight_decay', '?'))}"
            + (f", layer decay {_num(opt['layer_decay'])}" if opt.get("layer_decay", 1.0) != 1.0 else ""))
    sched = recipe.get("schedule") or {}
    if sched:
        add("schedule", f"{sched.get('kind', '?')}, {_num(sched.get('warmup_steps', 0))} warmup steps")
    ds = recipe.get("deepspeed") or {}
    if ds:
        add("DeepSpeed", f"ZeRO-{ds.get('zero_stage', 0)}, {ds.get('precision', 'fp32')}")
    tokens = recipe.get("tokens") or {}
    img_tok, txt_tok = tokens.get("image") or {}, tokens.get("text") or {}
    if img_tok.get("method", "none") != "none" or txt_tok.get("method", "none") != "none":
        add("token reduction (CLIPA)", f"image {img_tok.get('method', 'none')}, text {txt_tok.get('method', 'none')}")
    train_recs = [r for r in records if "loss" in r]
    if train_recs:
        last = train_recs[-1]
        add("steps", last.get("step"))
        add("samples seen", last.get("samples"))
        if isinstance(last.get("loss"), (int, float)):
            add("final loss", f"{last['loss']:.4f}")
        skipped = last.get("nonfinite_skipped")
        if skipped:
            add("non-finite steps skipped", skipped)
    accs: dict[str, tuple[int, float, Optional[float]]] = {}
    for r in records:
        for k, v in r.items():
            if k.endswith("/acc1") and isinstance(v, (int, float)):
                name = k[: -len("/acc1")]
                accs[name] = (r.get("step", 0), v, r.get(f"{name}/chance"))
    for name, (step, acc, chance) in accs.items():
        add(f"zero-shot top-1, {name}", f"{100 * acc:.1f}% at step {_num(step)}"
            + (f" (chance {100 * chance:.1f}%)" if isinstance(chance, (int, float)) else ""))
    recalls: dict[str, tuple[int, float, float]] = {}
    for r in records:
        for k, v in r.items():
            if k.endswith("/image_retrieval_recall@1") and isinstance(v, (int, float)):
                name = k[: -len("/image_retrieval_recall@1")]
                recalls[name] = (r.get("step", 0), v, r.get(f"{name}/text_retrieval_recall@1", float("nan")))
    for name, (step, t2i, i2t) in recalls.items():
        add(f"zero-shot retrieval R@1, {name}", f"text→image {100 * t2i:.1f}%, image→text {100 * i2t:.1f}% at step "
            f"{_num(step)}")
    if not rows:
        return ""
    return "\n".join(_table(["", "value"], rows, right_from=99)) + "\n"


def datasets_for(run_dir: Optional[Path], extra: Iterable[str] = ()) -> list[str]:
    out = list(dict.fromkeys(extra))
    if run_dir is not None:
        out += [d for d in recipe_datasets(read_recipe(run_dir)) if d not in out]
    return out


# --------------------------------------------------------------------------------- the eval commands' console output
class Progress:
    """A transient Rich progress bar of items (rank 0, not quiet); calling it advances by n items. The training
    loop's (``engine.progress``) counts optimizer steps and prints loss windows; this one counts items only."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.p = RichProgress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), transient=True)
            self.t = self.p.add_task(label, total=total)

    def __enter__(self) -> Progress:
        if self.enabled:
            self.p.__enter__()
        return self

    def __call__(self, n: int) -> None:
        if self.enabled:
            self.p.advance(self.t, n)

    def __exit__(self, *a) -> None:
        if self.enabled:
            self.p.__exit__(*a)


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


def finish(out: dict, output: Any, quiet: bool, rank: int, title: str) -> None:
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


def check_output(output: Any) -> None:
    """An ``--output`` that cannot be written stops before the model is loaded, not after the evaluation."""
    if output:
        from evaclip_cli import atomic

        atomic.check_output(output, "file")
