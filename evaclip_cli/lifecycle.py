"""``evaclip demo``: the whole EVA-CLIP lifecycle, in small, on the embedded demo data.

teacher CLIP (train) -> weak-to-strong MIM distillation -> the student's CLIP (train) -> video stage
(finetune-video) -> convert (DeepSpeed checkpoint -> open_clip folder) -> eval suite -> push --dry-run.

Each stage is the real command, run as its own process (its own progress view), in the order a user would run them;
a failing stage stops the chain with its exit code. The summary table gives each stage's time and headline figure,
then the teacher's and the student CLIP's zero-shot figures side by side and whether the student surpassed its
teacher. The student CLIP starts as EVA-CLIP-18B's did (the distilled vision tower, the teacher's text tower) and
trains for no more steps than its teacher.
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


def _last_step(run: Path) -> Optional[int]:
    return next((int(rec["step"]) for rec in reversed(list(_records(run))) if "step" in rec), None)


def student_samples() -> int:
    """The student CLIP's samples: tiny-student's, capped at the teacher's steps (EVA-CLIP-18B saw 6B samples, its
    teacher EVA02-CLIP-E/14+ 9B: the student is not given more training to beat its teacher)."""
    from evaclip_cli.recipes import load_recipe

    teacher, student = load_recipe("tiny").recipe, load_recipe("tiny-student").recipe
    return min(student.steps, teacher.steps) * student.data.global_batch


def teacher_vs_student(teacher: dict, student: dict, steps: tuple[Optional[int], Optional[int]] = (None, None)) \
        -> tuple[list[tuple[str, str, str, str]], str]:
    """Rows (set, teacher top-1, student top-1, difference in points) over the sets both logged, and the verdict in
    words on their mean; ``steps`` = (teacher's, student's) for the sentence."""
    sets = [k for k in teacher if k in student]
    if not sets:
        return [], "the teacher and the student logged no common eval set: nothing to compare"
    rows = [(k.split("/")[0], f"{100 * teacher[k]:.1f}%", f"{100 * student[k]:.1f}%",
             f"{100 * (student[k] - teacher[k]):+.1f}") for k in sets]
    t, s = (sum(d[k] for k in sets) / len(sets) for d in (teacher, student))
    diff = round(100 * (s - t), 1)
    how = "surpassed its teacher" if diff > 0 else "matched its teacher" if diff == 0 else \
        "did not surpass its teacher"
    ts, ss = steps
    trained = f", in {ss} steps to the teacher's {ts}" if ts and ss else ""
    return rows, (f"The student CLIP {how}: mean top-1 {100 * s:.1f}% vs {100 * t:.1f}% ({diff:+.1f} points)"
                  f"{trained}.")


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
        # the paper's init: the distilled vision tower and the teacher's text tower; no more steps than the teacher
        {"name": "train (student CLIP)", "argv": ["train", "--recipe", "tiny-student",
                                                  f"init.vision={o / 'student' / 'final'}",
                                                  f"init.text={o / 'teacher' / 'final'}",
                                                  f"data.samples={student_samples()}", "--out", o / "clip"],
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
    for name, _, took, figure in rows:
        table.add_row(name, took, figure)
    console.print(table)
    _print_teacher_vs_student(console, out)
    console.print(f"total {time.perf_counter() - t_all:.0f} s; model card: {out / 'push' / 'README.md'}; "
                  f"eval table: {out / 'eval' / 'results.md'}")
    return 0


def _print_teacher_vs_student(console, out: Path) -> None:
    from rich.table import Table

    rows, verdict = teacher_vs_student(_last_eval(out / "teacher"), _last_eval(out / "clip"),
                                       (_last_step(out / "teacher"), _last_step(out / "clip")))
    if rows:
        table = Table(title="weak-to-strong: zero-shot top-1 of the teacher and the student CLIP")
        for col in ("eval set", "teacher", "student CLIP", "student - teacher (points)"):
            table.add_column(col, justify="left" if col == "eval set" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(verdict, soft_wrap=True)
