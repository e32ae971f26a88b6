"""Training throughput of `evaclip train` against open_clip's own trainer (`open_clip_train`), in one run.

Same model (the `tiny` recipe's EVA-CLIP, as an open_clip folder both load), same webdataset shards (the demo data),
same micro batch, same precision (fp32), same optimizer settings (AdamW, lr 2e-3, wd 0.05, warmup 20, gradient
clipping 5.0), same data workers, same machine, one process each, run one after the
other. Throughput is taken over the steady state (the first `--skip` steps are dropped) from each trainer's own log:
evaclip's metrics.jsonl (samples/s per logging window) and open_clip_train's "N/s" log lines.

    pip install pandas                # open_clip_train needs it
    python bench/train_throughput.py [--steps 200] [--batch 64] [--workers 1] [--repeats 3]

open_clip_train with webdataset 1.x needs one fix (its group_by_keys reads a 'fname' the 1.x end-of-shard marker
lacks: `KeyError: 'fname'`); the peer run applies the usual workaround (no end-of-shard marker).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = r"""
import functools, sys
import evaclip_cli  # the same EVA tower: open_clip then reads timm_model_kwargs
import webdataset.tariterators as ti
import open_clip_train.data as d
d.tar_file_expander = functools.partial(ti.tar_file_expander, eof_value=None)  # KeyError: 'fname' workaround
from open_clip_train.main import main
main(sys.argv[1:])
"""


def steady(values: list[float], skip_frac: float = 0.2) -> float:
    v = values[int(len(values) * skip_frac):] or values
    return sum(v) / len(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median ratio is reported")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import evaclip_cli  # noqa: F401
    from evaclip_cli.checkpoints.folders import preprocess_cfg
    from evaclip_cli.data.demo import make_demo
    from evaclip_cli.models.specs import ARCHS, open_clip_model_cfg

    work = args.work or Path(tempfile.mkdtemp(prefix="evaclip-train-bench-"))
    demo = work / "demo"
    make_demo(demo)
    shards = sorted((demo / "train").glob("*.tar"))
    pattern = str(demo / "train" / f"shard-{{00000..{len(shards) - 1:05d}}}.tar")
    samples = args.steps * args.batch
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "EVACLIP_DEMO_DIR": str(demo)}

    model_dir = work / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip_model_cfg(ARCHS["tiny"]), "preprocess_cfg": preprocess_cfg(ARCHS["tiny"])}))

    def run_evaclip():
        out = work / "evaclip"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evaclip_cli.cli", "train", "--recipe", "tiny", "--out", str(out),
                        f"data.samples={samples}", f"data.global_batch={args.batch}",
                        f"data.micro_batch={args.batch}", f"data.workers={args.workers}", "logging.log_every=10",
                        "logging.checkpoint_every=0", "logging.tensorboard=false", "eval.every_steps=0"],
                       env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        wall = time.perf_counter() - t0
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return steady([r["samples_per_s"] for r in rows if "samples_per_s" in r]), wall

    def run_open_clip():
        logs = work / "oc_logs"
        shutil.rmtree(logs, ignore_errors=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", PEER, "--train-data", pattern, "--dataset-type", "webdataset",
                            "--train-num-samples", str(samples), "--batch-size", str(args.batch), "--epochs", "1",
                            "--workers", str(args.workers), "--model", f"local-dir:{model_dir}", "--lr", "2e-3",
                            "--warmup", "20", "--wd", "0.05", "--grad-clip-norm", "5.0", "--precision", "fp32",
                            "--log-every-n-steps", "10", "--save-frequency", "0", "--logs", str(logs), "--name",
                            "peer", "--report-to", "", "--local-loss", "--gather-with-grad"],
                           env=env, capture_output=True, text=True, cwd=work)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"open_clip_train failed:\n{r.stderr[-3000:]}")
        log = (logs / "peer" / "out.log").read_text()
        return steady([float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]), wall

    ratios, e_all, o_all = [], [], []
    for i in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        e_sps, e_wall = run_evaclip()
        o_sps, o_wall = run_open_clip()
        e_all.append(e_sps)
        o_all.append(o_sps)
        ratios.append(e_sps / o_sps)
        print(f"  round {i + 1}: evaclip {e_sps:.1f}/s ({e_wall:.1f} s wall), open_clip_train {o_sps:.1f}/s "
              f"({o_wall:.1f} s wall), ratio {e_sps / o_sps:.2f}x")
    med = sorted(ratios)[len(ratios) // 2]
    e_sps, o_sps = sorted(e_all)[len(e_all) // 2], sorted(o_all)[len(o_all) // 2]

    print(f"tiny EVA-CLIP ({ARCHS['tiny'].vision.width}w vision, 64 px), {args.steps} steps x {args.batch}, fp32, "
          f"{args.workers} data worker(s), 1 process, CPU ({os.cpu_count()} cores)")
    print(f"evaclip train   : {e_sps:8.1f} samples/s steady state (median of {args.repeats})")
    print(f"open_clip_train : {o_sps:8.1f} samples/s steady state (median of {args.repeats})")
    print(f"ratio evaclip / open_clip_train: {med:.2f}x median, range {min(ratios):.2f}-{max(ratios):.2f}x "
          f"(goal >= 1.15x)")


if __name__ == "__main__":
    main()
