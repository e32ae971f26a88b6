"""Zero-shot classification throughput of `evaclip eval zeroshot` against `clip_benchmark eval`, in one run.

Same model folder (an EVA-CLIP open_clip folder; both load it with open_clip after `import evaclip_cli`), same data
(CLIP_benchmark's wds/ layout: ImageNet-sized JPEGs + .cls shards, classnames, templates), same batch size, same
DataLoader workers, same precision (fp32 on CPU; clip_benchmark with --no_amp), one process each, run one after the
other, `--repeats` times. A run is timed end to end as a user sees it: process start, imports, model load, text
classifier, decoding, forward passes, metrics. Images/s = images / wall seconds (median over repeats).

Two cases (the issue's): "large" = 100 classes x 80 templates (ImageNet's prompt count per class) on 2,000 images;
"small" = 10 classes x 18 templates (CIFAR-10's) on 1,000 images. Rows of each:
  clip_benchmark 1.6.2
  evaclip (cold)                `evaclip eval zeroshot --no-cache` (the console script; classifier computed, no cache
                                read or written)
  evaclip (cold, python -m)     the same through `python -m evaclip_cli.cli` (what torchrun starts on every rank;
                                like the console script, it imports torch and open_clip after the workers start)
  evaclip (classifier cached)   a re-run, or a second dataset sharing the classes (the cache was filled by an untimed
                                run first)
  evaclip --fast-decode         cached classifier; the JPEG decoder downscales by 2/4/8 while decoding (numbers may
                                move slightly, so it is opt-in)
Top-1 of every run is printed next to its speed (the model is random: top-1 only shows the runs agree), with the CPU
seconds of the run (the process and its data workers) and the floor they set on this machine (CPU s / CPUs): a
tool cannot finish faster than its floor, however well it overlaps its work.

    python bench/eval_throughput.py [--cases large,small] [--arch tiny] [--size 500x375] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = "import sys, evaclip_cli; from clip_benchmark.cli import main; sys.exit(main())"


def make_data(root: Path, n: int, size: tuple, classes: int, templates: int, shard: int = 500) -> None:
    """JPEGs of ImageNet's typical size with real structure (scikit-learn's digits, upscaled, on textured colour).
    At least 8 shards: clip_benchmark's webdataset pipeline refuses fewer shards than workers."""
    shard = max(1, min(shard, -(-n // 8)))
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    n_shards = (n + shard - 1) // shard
    for s in range(n_shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * shard, min(n, (s + 1) * shard)):
                k = i % len(d.target)
                digit = Image.fromarray((d.images[k] * 15).astype("uint8")).resize(size, Image.BILINEAR)
                noise = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
                arr = np.asarray(digit)[..., None].astype(np.uint16) + noise
                buf = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype("uint8")).save(buf, format="JPEG", quality=90)
                label = (int(d.target[k]) * 7 + i) % classes
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    (root / "classnames.txt").write_text("".join(f"class number {c}\n" for c in range(classes)))
    words = ["photo", "picture", "drawing", "sketch", "rendering", "painting", "snapshot", "image"]
    tpl = [f"a {random.Random(t).choice(words)} of a {{c}}, variant {t}." for t in range(templates)]
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(tpl) + "\n")


def make_model(folder: Path, arch: str) -> None:
    import torch

    import evaclip_cli  # noqa: F401
    from evaclip_cli.checkpoints.folders import write_open_clip_folder
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import resolve_arch

    torch.manual_seed(0)
    spec = resolve_arch(arch)
    write_open_clip_folder(build_clip(spec).state_dict(), spec, folder, force=True)


def timed(cmd: list, env: dict, cwd: Path, out: Path) -> tuple[float, float, float]:
    """(wall seconds, top-1, CPU seconds of the process and every process it waited for: its data workers)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, json.loads(out.read_text())["metrics"]["acc1"], cpu


CASES = {"large": (2000, 100, 80), "small": (1000, 10, 18)}  # images, classes, templates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="large,small", help="comma-separated: large (2000 images, 100 classes x 80 "
                    "templates), small (1000 images, 10 classes x 18 templates)")
    ap.add_argument("--arch", default="tiny", help="evaclip arch of the (randomly initialised) model: tiny, b16, ...")
    ap.add_argument("--size", default="500x375", help="JPEG size WxH (ImageNet's typical 500x375)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="evaclip-evalbench-"))
    model = tmp / "model"
    make_model(model, args.arch)
    cache = tmp / "cache"
    env = {**os.environ, "EVACLIP_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    console = Path(sys.executable).with_name("evaclip")
    if not console.is_file():
        sys.exit(f"{console}: the evaclip console script is not installed next to {sys.executable} (pip install -e .)")
    common = ["eval", "zeroshot", "-m", str(model), "--batch-size", str(args.batch), "--workers", str(args.workers)]
    print(f"model: {args.arch} (random init; speed only); JPEGs {w}x{h}; batch {args.batch}, {args.workers} workers, "
          f"fp32, {os.cpu_count()} CPUs")
    for case in args.cases.split(","):
        n, classes, templates = CASES[case]
        data = tmp / f"wds_{case}"
        make_data(data, n, (w, h), classes, templates)
        evaclip = [str(console), *common, "-d", str(data)]
        evaclip_m = [sys.executable, "-m", "evaclip_cli.cli", *common, "-d", str(data)]
        peer = [sys.executable, "-c", PEER, "eval", "--model", f"local-dir:{model}", "--pretrained", "", "--dataset",
                "wds/bench", "--dataset_root", str(data), "--task", "zeroshot_classification", "--no_amp",
                "--batch_size", str(args.batch), "--num_workers", str(args.workers)]
        out = tmp / "out.json"
        rows: dict = {"clip_benchmark 1.6.2": [], "evaclip (cold)": [], "evaclip (cold, python -m)": [],
                      "evaclip (classifier cached)": [], "evaclip --fast-decode (cached)": []}
        for f in cache.rglob("*.pt"):
            f.unlink()
        timed([*evaclip, "-o", str(out)], env, tmp, out)  # fills the cache (untimed)
        cached = len(list(cache.rglob("*.pt")))
        for rep in range(args.repeats):
            rows["clip_benchmark 1.6.2"].append(timed([*peer, "--output", str(out)], env, tmp, out))
            rows["evaclip (cold)"].append(timed([*evaclip, "--no-cache", "-o", str(out)], env, tmp, out))
            rows["evaclip (cold, python -m)"].append(timed([*evaclip_m, "--no-cache", "-o", str(out)], env, tmp, out))
            rows["evaclip (classifier cached)"].append(timed([*evaclip, "-o", str(out)], env, tmp, out))
            rows["evaclip --fast-decode (cached)"].append(timed([*evaclip, "--fast-decode", "-o", str(out)], env, tmp,
                                                                out))
        assert cached == 1 and len(list(cache.rglob("*.pt"))) == 1, "the cold runs must neither read nor write it"
        base = n / statistics.median(t for t, _, _ in rows["clip_benchmark 1.6.2"])
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        print(f"\n{case}: {n} images, {classes} classes x {templates} templates ({classes * templates:,} prompts)")
        print(f"{'':34s} {'images/s':>9s} {'ratio':>6s} {'top-1':>7s} {'CPU s':>6s} {'floor':>6s}   wall s per run")
        for name, runs in rows.items():
            ips = n / statistics.median(t for t, _, _ in runs)
            cpu = statistics.median(c for _, _, c in runs)
            # floor: the wall time the same CPU work needs at best on this machine's CPUs (all busy, no idle gaps)
            print(f"{name:34s} {ips:9.1f} {ips / base:5.2f}x {100 * runs[-1][1]:6.2f}% {cpu:6.1f} {cpu / cpus:6.1f}   "
                  + ", ".join(f"{t:.1f}" for t, _, _ in runs))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
