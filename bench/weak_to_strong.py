"""Weak-to-strong, shown by the tool itself on the demo data.

1. train a tiny CLIP (the weak teacher)                          evaclip train   --recipe tiny
2. distill its patch features into a wider, deeper student       evaclip distill --recipe distill-tiny
3. train the student's CLIP from the distilled init and from random init, same steps, same data
4. print both zero-shot accuracies (demo colours and shapes, held-out images)

    python bench/weak_to_strong.py [--teacher-steps 800] [--distill-steps 400] [--clip-steps 100]
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

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ["model.vision.width=128", "model.vision.depth=4", "model.vision.heads=4", "model.vision.mlp_dim=512"]
BATCH = 64


def _evaclip(args, env):
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


def weak_to_strong(work: Path, teacher_steps: int, distill_steps: int, clip_steps: int, env=None) -> dict:
    env = dict(env or os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    work.mkdir(parents=True, exist_ok=True)
    for d in ("teacher", "student", "from_distilled", "from_scratch"):
        shutil.rmtree(work / d, ignore_errors=True)
    _evaclip(["train", "--recipe", "tiny", "--out", str(work / "teacher"), f"data.samples={teacher_steps * BATCH}",
              "eval.every_steps=0"], env)
    _evaclip(["distill", "--recipe", "distill-tiny", "--teacher", str(work / "teacher" / "final"), "--out",
              str(work / "student"), f"data.samples={distill_steps * BATCH}"], env)
    common = ["--recipe", "tiny", *STUDENT, f"data.samples={clip_steps * BATCH}", "eval.every_steps=0"]
    _evaclip(["train", "--out", str(work / "from_distilled"), *common,
              f"init.vision={work / 'student' / 'final'}"], env)
    _evaclip(["train", "--out", str(work / "from_scratch"), *common], env)
    return {"distilled": final_accuracy(work / "from_distilled"), "scratch": final_accuracy(work / "from_scratch"),
            "teacher": final_accuracy(work / "teacher")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--clip-steps", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="evaclip-w2s-"))
    res = weak_to_strong(work, args.teacher_steps, args.distill_steps, args.clip_steps)

    def fmt(a):
        return ", ".join(f"{k} {v * 100:.1f}%" for k, v in a.items())

    print(f"teacher (tiny, {args.teacher_steps} steps): {fmt(res['teacher'])}")
    print(f"student CLIP, {args.clip_steps} steps, init from the distilled student: {fmt(res['distilled'])}")
    print(f"student CLIP, {args.clip_steps} steps, random init:                     {fmt(res['scratch'])}")
    print(f"distilled - random (mean top-1): {(res['distilled']['mean'] - res['scratch']['mean']) * 100:+.1f} points")


if __name__ == "__main__":
    main()
