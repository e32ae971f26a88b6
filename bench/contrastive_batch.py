"""The cost of the global contrastive batch (``data.contrastive_batch = "global"``) against the per-micro-batch
negatives ("micro"), at the same micro batch under gradient accumulation, in one run: `evaclip train` of the
``tiny`` recipe, one process, one after the other, interleaved over ``--repeats``.

    python bench/contrastive_batch.py [--steps 60] [--micro 32] [--accum 4] [--repeats 2]

Throughput is the steady state of metrics.jsonl (samples/s per logging window, the first 20% dropped); memory is
the rank's peak from memory.json. Expected: "global" runs a second, no-grad forward of every sample (about 4/3 of
the model FLOPs of "micro") and holds a feature cache of accum x micro rows; its loss sees accum x more negatives.
Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(mode: str, out: Path, a) -> dict:
    batch = a.micro * a.accum
    args = [sys.executable, "-m", "evaclip_cli.cli", "train", "--recipe", "tiny", "--out", str(out),
            f"data.samples={a.steps * batch}", f"data.global_batch={batch}", f"data.micro_batch={a.micro}",
            f"data.contrastive_batch={mode}", "eval.every_steps=0", "logging.log_every=5",
            "logging.checkpoint_every=0", "logging.tensorboard=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-2000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    steady = rows[max(1, len(rows) // 5):]
    peak = json.loads((out / "memory.json").read_text())["ranks"][0]["peak_bytes"]
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in steady), "peak_gb": peak / 1e9,
            "first_loss": rows[0]["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    res: dict = {"global": [], "micro": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for mode in ("micro", "global"):
                res[mode].append(run(mode, Path(tmp) / f"{mode}{i}", a))
    print(f"tiny recipe, micro batch {a.micro} x {a.accum} accumulation = global batch {a.micro * a.accum}, "
          f"{a.steps} steps, 1 process")
    print("| mode | negatives | samples/s (median of windows, each run) | peak memory | first loss |")
    print("|---|---|---|---|---|")
    for mode, neg in (("micro", a.micro), ("global", a.micro * a.accum)):
        rs = res[mode]
        rates = ", ".join(f"{r['samples_per_s']:.0f}" for r in rs)
        print(f"| {mode} | {neg} | {rates} | "
              f"{max(r['peak_gb'] for r in rs):.2f} GB | {rs[0]['first_loss']:.3f} |")
    g = statistics.median(r["samples_per_s"] for r in res["global"])
    m = statistics.median(r["samples_per_s"] for r in res["micro"])
    print(f"global / micro throughput: {g / m:.2f}x (model FLOPs ratio of the estimate: about 0.75x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
