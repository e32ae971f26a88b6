"""Peak memory of `evaclip convert` against a plain load-rename-save script, on the same EVA checkpoint.

Builds an EVA-CLIP checkpoint in the reference key layout (18B style, width and depth set below; ~1.2 GB fp32 by
default), then measures, each in a fresh subprocess, the peak RSS of
  (a) evaclip convert SRC OUT --eva-config CFG --max-shard-size 500MB   (memory-mapped source, shard-by-shard write)
  (b) the peer: torch.load(SRC) -> rename keys -> safetensors.save_file  (what a one-off script does)
and prints both, the checkpoint size, and the ratios.

    python bench/convert_memory.py [--width 2048] [--depth 6] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = r"""
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
out = {}
for k, v in sd.items():
    if k.startswith("visual.head."):
        out["visual.head.proj." + k[len("visual.head."):]] = v.contiguous()
    elif k.startswith("visual."):
        out["visual.trunk." + k[len("visual."):]] = v.contiguous()
    else:
        out[k] = v.contiguous()
save_file(out, sys.argv[2])
"""


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def peak_memory_of(cmd: list[str]) -> tuple[float, float, float]:
    """(peak anonymous memory GB, peak RSS GB incl. file-backed pages, seconds), sampled every 20 ms.

    Anonymous memory is what a conversion really needs; memory-mapped checkpoint pages show up in RSS as
    file-backed pages the kernel can drop at any time."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        peak_rss = max(peak_rss, st.get("VmRSS", 0))
        time.sleep(0.02)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return peak_anon / 1e9, peak_rss / 1e9, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import evaclip_cli  # noqa: F401
    from evaclip_cli.models.specs import ClipSpec, TextSpec, VisionSpec, eva_config_from_spec

    spec = ClipSpec(embed_dim=1024, vision=VisionSpec(width=args.width, depth=args.depth, heads=args.width // 128,
                                                       mlp_dim=5 * args.width, norm="rms", qkv_bias=False,
                                                       post_norm=True),
                    text=TextSpec(width=1280, heads=20, layers=4))
    work = Path(args.keep or tempfile.mkdtemp(prefix="evaclip-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, cfg = work / "model.pt", work / "config.json"
    if not src.exists():
        from evaclip_cli.checkpoints.folders import write_eva_file
        from evaclip_cli.models.clip import build_clip

        model = build_clip(spec)
        write_eva_file(model.state_dict(), spec, src)
        del model
    cfg.write_text(json.dumps(eva_config_from_spec(spec)))
    size_gb = src.stat().st_size / 1e9
    evaclip = [sys.executable, "-m", "evaclip_cli.cli", "convert", str(src), str(work / "out"), "--eva-config",
               str(cfg), "--max-shard-size", "500MB", "--force"]
    peer = [sys.executable, "-c", PEER, str(src), str(work / "peer.safetensors")]
    base_anon, base_rss, _ = peak_memory_of([sys.executable, "-c", "import torch, open_clip, timm, evaclip_cli"])
    e_anon, e_rss, e_s = peak_memory_of(evaclip)
    p_anon, p_rss, p_s = peak_memory_of(peer)
    print(f"checkpoint: {size_gb:.2f} GB ({spec.vision.width}w x {spec.vision.depth}d vision, fp32) in {work}")
    print(f"imports alone (torch, open_clip, timm): {base_anon:.2f} GB anonymous, {base_rss:.2f} GB RSS")
    print(f"evaclip convert : {e_anon:.2f} GB anonymous = {e_anon / size_gb:.2f}x checkpoint "
          f"(RSS {e_rss:.2f} GB incl. mapped file pages), {e_s:.1f} s")
    print(f"peer (load+save): {p_anon:.2f} GB anonymous = {p_anon / size_gb:.2f}x checkpoint "
          f"(RSS {p_rss:.2f} GB), {p_s:.1f} s")
    print(f"ratio evaclip/peer, anonymous memory: {e_anon / p_anon:.2f}")


if __name__ == "__main__":
    main()
