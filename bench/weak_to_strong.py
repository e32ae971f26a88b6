"""Weak-to-strong, shown by the tool itself on the demo data, with the student inits of the paper's ablation.

1. train a tiny CLIP (the weak teacher), N steps                 evaclip train   --recipe tiny
2. distill its patch features into a wider, deeper student       evaclip distill --recipe distill-tiny
3. train the student's CLIP from three inits, same data:
     distilled + teacher text   the vision tower from the student, the text tower from the teacher (EVA-CLIP-18B's)
     distilled                  the vision tower from the student, the text tower random
     random                     both towers random
   at N steps (equal to the teacher) and at 2/3 N steps (the student is not given more training than its teacher)
4. print every zero-shot accuracy against the teacher's (demo colours and shapes, held-out images), as a Markdown
   table for the README

    python bench/weak_to_strong.py [--teacher-steps 800] [--distill-steps 400] [--work DIR]
    python bench/weak_to_strong.py --dry-run      # the commands, each checked by `evaclip ... --dry-run`; no training
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ["model.vision.width=128", "model.vision.depth=4", "model.vision.heads=4", "model.vision.mlp_dim=512"]
BATCH = 64
# the student CLIP's inits (overrides of `evaclip train`, given the work folder)
VARIANTS: dict[str, Callable[[Path], list[str]]] = {
    "distilled + teacher text": lambda w: [f"init.vision={w / 'student' / 'final'}",
                                           f"init.text={w / 'teacher' / 'final'}"],
    "distilled": lambda w: [f"init.vision={w / 'student' / 'final'}"],
    "random": lambda w: [],
}
FRACTIONS = {"equal": 1.0, "2/3": 2 / 3}  # of the teacher's steps


def _evaclip(args, env, dry_run: bool = False):
    args = [*map(str, args), *(["--dry-run"] if dry_run else [])]
    r = subprocess.run([sys.executable, "-m", "evaclip_cli.cli", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"evaclip {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r


def final_accuracy(run: Path) -> dict:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in rows if any(k.endswith("/acc1") for k in r)]
    accs = {k[:-len("/acc1")]: v for k, v in evals[-1].items() if k.endswith("/acc1")}
    accs["mean"] = sum(accs.values()) / len(accs)
    return accs


def plan(work: Path, teacher_steps: int, distill_steps: int, clip_steps: Optional[int] = None,
         variants: Optional[list[str]] = None) -> list[tuple[str, list]]:
    """(run folder name, evaclip argv) in order: teacher, distill, then every (steps, init) student CLIP.
    ``clip_steps``: one step count for every student; default: each of ``FRACTIONS`` of the teacher's steps."""
    runs: list[tuple[str, list]] = [
        ("teacher", ["train", "--recipe", "tiny", "--out", work / "teacher", f"data.samples={teacher_steps * BATCH}",
                     "eval.every_steps=0"]),
        ("student", ["distill", "--recipe", "distill-tiny", "--teacher", work / "teacher" / "final", "--out",
                     work / "student", f"data.samples={distill_steps * BATCH}"]),
    ]
    for steps in student_steps(teacher_steps, clip_steps).values():
        for name in variants or list(VARIANTS):
            folder = f"clip-{steps}-{name.replace(' + ', '+').replace(' ', '_')}"
            runs.append((folder, ["train", "--recipe", "tiny", *STUDENT, f"data.samples={steps * BATCH}",
                                  "eval.every_steps=0", *VARIANTS[name](work), "--out", work / folder]))
    return runs


def student_steps(teacher_steps: int, clip_steps: Optional[int] = None) -> dict[str, int]:
    if clip_steps is not None:
        return {f"{clip_steps}": clip_steps}
    return {label: max(1, round(f * teacher_steps)) for label, f in FRACTIONS.items()}


def weak_to_strong(work: Path, teacher_steps: int, distill_steps: int, clip_steps: Optional[int] = None, env=None,
                   variants: Optional[list[str]] = None, dry_run: bool = False) -> dict:
    """Run the plan; returns {"teacher": acc, "students": {steps label: {init: acc}}, "steps": {...}} and, for the
    first steps label, "distilled" / "scratch" (the earlier two-way comparison)."""
    env = dict(env or os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    work.mkdir(parents=True, exist_ok=True)
    runs = plan(work, teacher_steps, distill_steps, clip_steps, variants)
    for folder, argv in runs:
        if not dry_run:
            shutil.rmtree(work / folder, ignore_errors=True)
        _evaclip(argv, env, dry_run)
    if dry_run:
        return {"planned": [[str(a) for a in argv] for _, argv in runs]}
    steps = student_steps(teacher_steps, clip_steps)
    students = {label: {name: final_accuracy(work / folder) for folder, name in _folders(runs, n)}
                for label, n in steps.items()}
    first = students[next(iter(students))]
    return {"teacher": final_accuracy(work / "teacher"), "students": students, "steps": steps,
            "teacher_steps": teacher_steps, "distilled": first.get("distilled"), "scratch": first.get("random")}


def _folders(runs, steps: int):
    names = {f"clip-{steps}-{n.replace(' + ', '+').replace(' ', '_')}": n for n in VARIANTS}
    return [(folder, names[folder]) for folder, _ in runs if folder in names]


def table(res: dict) -> str:
    """The README's Markdown table: mean top-1 of every run and its difference from the teacher."""
    t = res["teacher"]["mean"]
    lines = ["| CLIP | init | steps | mean top-1 | vs teacher |", "|---|---|---|---|---|",
             f"| teacher (tiny) | random | {res['teacher_steps']} | {100 * t:.1f}% | |"]
    for label, by_init in res["students"].items():
        for name, acc in by_init.items():
            lines.append(f"| student ({label}) | {name} | {res['steps'][label]} | {100 * acc['mean']:.1f}% | "
                         f"{100 * (acc['mean'] - t):+.1f} points |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--clip-steps", type=int, default=None,
                    help="one step count for every student (default: equal to and 2/3 of the teacher's)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the commands, each checked by `evaclip ... --dry-run`; nothing is trained")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="evaclip-w2s-"))
    res = weak_to_strong(work, args.teacher_steps, args.distill_steps, args.clip_steps, dry_run=args.dry_run)
    if args.dry_run:
        for argv in res["planned"]:
            print("evaclip " + " ".join(argv))
        return
    print(table(res))


if __name__ == "__main__":
    main()
