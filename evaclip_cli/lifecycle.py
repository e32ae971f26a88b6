"""``evaclip demo``: the whole EVA-CLIP lifecycle, in small, on the embedded demo data.

teacher CLIP (train) -> weak-to-strong MIM distillation -> the student's CLIP (train) -> video stage
(finetune-video) -> convert (DeepSpeed checkpoint -> open_clip folder) -> eval suite -> push --dry-run.

Each stage is the real command, run as its own process (its own progress view), in the order a user would run them;
a failing stage stops the chain with its exit code. The summary table gives each stage's time and headline figure.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError


def _records(run: Path):
    """The run's metrics.jsonl records (a torn line is skipped)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def _last_eval(run: Path) -> dict:
    """The last zero-shot figures a run logged (keys ``<set>/acc1``)."""
    evals = [{k: v for k, v in rec.items() if k.endswith("/acc1")} for rec in _records(run)]
    return next((e for e in reversed(evals) if e), {})


def _last_loss(run: Path) -> Optional[float]:
    return next((rec["loss"] for rec in reversed(list(_records(run))) if "loss" in rec), None)


def _fmt_eval(acc: dict) -> str:
    return ", ".join(f"{k.split('/')[0]} {100 * v:.1f}%" for k, v in acc.items()) or "no eval logged"


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 1e6:.1f} MB"


STUDENT = ["model.vision.width=128", "model.vision.depth=4", "model.vision.heads=4", "model.vision.mlp_dim=512"]


def stages(out: Path) -> list[dict]:
    o = out
    return [
        {"name": "train (teacher)", "argv": ["train", "--recipe", "tiny", "--out", o / "teacher"],
         "figure": lambda: "top-1 " + _fmt_eval(_last_eval(o / "teacher"))},
        {"name": "distill", "argv": ["distill", "--recipe", "distill-tiny", "--teacher", o / "teacher" / "final",
                                     "--out", o / "student"],
         "figure": lambda: f"MIM loss {_last_loss(o / 'student'):.3f} (negative cosine)"},
        {"name": "train (student CLIP)", "argv": ["train", "--recipe", "tiny-student",
                                                  f"init.vision={o / 'student' / 'final'}", "--out", o / "clip"],
         "figure": lambda: "top-1 " + _fmt_eval(_last_eval(o / "clip"))},
        # the video stage continues the chain's last CLIP: video-tiny with the student's tower sizes
        {"name": "finetune-video", "argv": ["finetune-video", "--recipe", "video-tiny", *STUDENT,
                                            f"init.clip={o / 'clip'}", "--out", o / "video"],
         "figure": lambda: "top-1 " + _fmt_eval(_last_eval(o / "video"))},
        {"name": "convert", "argv": ["convert", o / "video" / "checkpoints", o / "open_clip", "--force"],
         "figure": lambda: f"open_clip folder {_size(o / 'open_clip')}"},
        {"name": "eval suite", "argv": ["eval", "suite", "-m", o / "open_clip", "-s", "demo", "--root",
                                        "{demo}", "--out", o / "eval", "--frames", "4"],
         "figure": lambda: _fmt_suite(o / "eval" / "results.json")},
        {"name": "push --dry-run", "argv": ["push", o / "open_clip", "--repo", "evaclip/demo-video-tiny",
                                            "--results", o / "eval" / "results.json", "--dry-run",
                                            "--out", o / "push"],
         "figure": lambda: f"{sum(1 for f in (o / 'push').rglob('*') if f.is_file())} files, {_size(o / 'push')} "
                           f"in {o / 'push'}"},
    ]


def _fmt_suite(path: Path) -> str:
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "no results"
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in res.get("aggregates", {}).items())


def run_demo(out: Path, skip: int = 0) -> int:
    from rich.console import Console
    from rich.table import Table

    from evaclip_cli.data.demo import demo_dir

    console = Console()
    out = Path(out)
    demo = demo_dir()
    plan = stages(out)
    if not 0 <= skip < len(plan):
        raise UserError(f"--from-stage must be in 1..{len(plan)}")
    out.mkdir(parents=True, exist_ok=True)
    rows, t_all = [], time.perf_counter()
    env = {**os.environ, "EVACLIP_DEMO_DIR": str(demo)}
    for i, st in enumerate(plan):
        argv = [str(demo) if a == "{demo}" else str(a) for a in st["argv"]]
        if i < skip:
            rows.append((f"{i + 1}. {st['name']}", "evaclip " + shlex.join(argv), "skipped", ""))
            continue
        console.rule(f"[bold]{i + 1}/{len(plan)} {st['name']}[/bold]: evaclip {shlex.join(argv)}")
        if st["name"] == "eval suite" and not (demo / "demo.json").is_file():
            from evaclip_cli.data.demo import make_demo

            make_demo(demo)
        t = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "evaclip_cli.cli", *argv], env=env)
        secs = time.perf_counter() - t
        if code != 0:
            console.print(f"[red]stage {i + 1} ({st['name']}) failed with exit code {code}[/red]; rerun from it "
                          f"with `evaclip demo --from-stage {i + 1}`")
            return code
        try:
            figure = st["figure"]()
        except Exception as e:  # a summary glitch is not a failed stage
            figure = f"({type(e).__name__})"
        rows.append((f"{i + 1}. {st['name']}", "evaclip " + shlex.join(argv), f"{secs:.0f}", figure))
    table = Table(title="evaclip demo: the EVA-CLIP lifecycle on the demo data", show_lines=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("s", justify="right")
    table.add_column("result", overflow="fold")
    for name, _, secs, figure in rows:
        table.add_row(name, secs, figure)
    console.print(table)
    console.print(f"total {time.perf_counter() - t_all:.0f} s; model card: {out / 'push' / 'README.md'}; "
                  f"eval table: {out / 'eval' / 'results.md'}")
    return 0
