"""Peak memory of `evaclip convert` against a plain load-rename-save script, on the same EVA checkpoint; and, with
--real-18b, on checkpoints of EVA-CLIP-18B's real tensor shapes in both released layouts.

Default mode: builds an EVA-CLIP checkpoint in the reference key layout (18B style, width and depth set below;
~1.2 GB fp32 by default), then measures, each in a fresh subprocess, the peak RSS of
  (a) evaclip convert SRC OUT --eva-config CFG --max-shard-size 500MB   (memory-mapped source, tensor-by-tensor write)
  (b) the peer: torch.load(SRC) -> rename keys -> safetensors.save_file  (what a one-off script does)
and prints both, the checkpoint size, and the ratios.

    python bench/convert_memory.py [--width 2048] [--depth 6] [--keep DIR]

--real-18b: synthetic checkpoints with EVA-CLIP-18B's real tensor shapes (vision width 5120, MLP 25600, 40 heads,
RMSNorm, post-norm; the real 1280-wide 32-layer text tower; embed 1536) and as many of the 48 vision blocks as make
each checkpoint at least --min-gb (8) on disk and fit the free disk, in
  (pt)    the reference layout as BAAI ships it: one fp16 .pt (EVA_CLIP_18B_psz14_s6B.fp16.pt is 36.7 GB)
  (hf)    BAAI's transformers remote-code layout: config.json + fp32 model-0000N-of-0000M.safetensors + index
  (zero3) what `evaclip train --recipe 18b` writes: a DeepSpeed ZeRO-3 checkpoint of --ranks (2) ranks, each rank's
          fp32 partition + LAMB's two moments (12 bytes per parameter), converted with --from deepspeed; --smoke
          checks that DeepSpeed's own zero_to_fp32 reads the synthetic files as evaclip does
then `evaclip convert` each to an open_clip folder (default 5GB shards, the source's dtype) in a fresh subprocess,
and reports peak anonymous memory against the checkpoint size and the largest output shard. Goal: peak < largest
output shard + 1 GB, whatever the checkpoint size. With --to eva the output is instead the reference layout's one
.pt file (what BAAI ships; distill's student_mim.pt is written the same way), and the goal is peak < largest tensor
+ 1 GB: torch.save would need the whole model. Tensors are zeros (values do not change what is mapped or
copied); each case's files are deleted after it unless --keep. Needs about 2.2x one checkpoint free on --dir's disk.

    python bench/convert_memory.py --real-18b [--dir /tmp] [--min-gb 8] [--blocks N|max] [--only pt|hf|zero3]
                                   [--ranks 2] [--to open_clip|eva] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
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


# ---------------------------------------------------------------------------------------------- --real-18b
def _real_spec(blocks: int, width: int = 5120, mlp: int = 25600, heads: int = 40, text=(1280, 20, 32)):
    from evaclip_cli.models.specs import ClipSpec, TextSpec, VisionSpec

    return ClipSpec(embed_dim=1536, vision=VisionSpec(patch_size=14, width=width, depth=blocks, heads=heads,
                                                      mlp_dim=mlp, norm="rms", qkv_bias=False, post_norm=True),
                    text=TextSpec(width=text[0], heads=text[1], layers=text[2]))


def _shapes(spec) -> dict:
    """Every tensor of the CLIP (open_clip layout) with its shape, from the model built on the meta device."""
    from evaclip_cli.models.clip import build_clip

    return {k: tuple(v.shape) for k, v in build_clip(spec, device="meta").state_dict().items()}


def _nbytes(shapes: dict, elem: int) -> int:
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        n += k * elem
    return n


def _write_pt(spec, path: Path) -> None:
    """The reference layout as one fp16 .pt, written without holding it in memory (zero pages are never touched:
    calloc'd tensors read as zeros map the kernel's zero page)."""
    import torch

    from evaclip_cli.models.keymaps import open_clip_to_eva

    meta = {k: torch.empty(s, device="meta") for k, s in _shapes(spec).items()}
    names = open_clip_to_eva(meta, separate_qkv=False)
    state = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in names.items()}
    torch.save(state, path)


def _write_hf(spec, folder: Path, shard_bytes: int) -> None:
    """BAAI's HF layout (fp32 shards + index + config.json), streamed tensor by tensor."""
    import json

    import torch

    from evaclip_cli.checkpoints.io import save_safetensors_sharded
    from evaclip_cli.models.keymaps import open_clip_to_hf
    from evaclip_cli.models.lazy import LazyCat
    from evaclip_cli.models.specs import hf_config_from_spec

    class Zeros(LazyCat):  # a tensor made when the writer asks for it
        def __init__(self, shape):
            self.parts, self.dim = [], 0
            self.shape, self.dtype = torch.Size(shape), torch.float32

        def element_size(self):
            return 4

        def is_floating_point(self):
            return True

        def materialize(self):
            return torch.zeros(self.shape, dtype=self.dtype)

    meta = {k: torch.empty(s, device="meta") for k, s in _shapes(spec).items() if k != "logit_scale"}
    hf, _ = open_clip_to_hf(meta)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_sharded({k: Zeros(v.shape) for k, v in hf.items()}, folder, "model.safetensors",
                             "model.safetensors.index.json", shard_bytes)
    (folder / "config.json").write_text(json.dumps(hf_config_from_spec(spec), indent=2))


def _write_zero3(recipe_toml: str, spec, root: Path, ranks: int) -> None:
    """A DeepSpeed ZeRO-3 checkpoint of ``spec`` as ``ranks`` processes write it (DeepSpeed's file layout and keys:
    deepspeed/runtime/zero/stage3.py; checked against DeepSpeed's own reader by ``--smoke``): per rank, the model
    states (parameter shapes, buffers, client state) and the optimizer states (this rank's fp32 partition of every
    parameter, flat, + LAMB's two moments of the same size), beside the run's ``evaclip_recipe.toml``. Zeros
    (calloc'd: never touched, so writing ~12 bytes x parameters takes no memory)."""
    import math
    from collections import OrderedDict

    import torch

    from evaclip_cli.models.clip import build_clip

    model_state = build_clip(spec, device="meta").state_dict(keep_vars=True)
    shapes = OrderedDict((k, v.shape) for k, v in model_state.items() if isinstance(v, torch.nn.Parameter))
    buffers = [k for k, v in model_state.items() if not isinstance(v, torch.nn.Parameter)]
    part = sum(math.ceil(s.numel() / ranks) for s in shapes.values())
    tag = root / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    (root.parent / "evaclip_recipe.toml").write_text(recipe_toml)
    for r in range(ranks):
        module = {k: torch.empty(0) for k in shapes}
        for k in buffers:  # the text tower's causal mask: the only buffer, small
            module[k] = torch.zeros(model_state[k].shape, dtype=model_state[k].dtype)
        torch.save({"module": module, "buffer_names": buffers, "param_shapes": [shapes], "shared_params": {},
                    "frozen_param_shapes": None, "frozen_param_fragments": None, "ds_version": "0.19.8",
                    "ds_config": {}, "step": 1, "world_size": ranks},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        moments = {"exp_avg": torch.zeros(part), "exp_avg_sq": torch.zeros(part), "step": torch.tensor(1.0)}
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": ranks, "loss_scaler": None,
                                             "fp32_flat_groups": [torch.zeros(part)],
                                             "optimizer_state_dict": {"state": {0: moments},
                                                                      "param_groups": [{"params": [0]}]}},
                    "ds_config": {}, "ds_version": "0.19.8"},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        del moments
    (root / "latest").write_text("global_step1")


_SMOKE_OVERRIDES = ["model.vision.width=256", "model.vision.mlp_dim=1280", "model.vision.heads=2",
                    "model.text.width=64", "model.text.heads=2", "model.text.layers=2"]


def _check_zero3_against_deepspeed(root: Path) -> None:
    """--smoke: DeepSpeed's own reader (zero_to_fp32) and evaclip's streamed one agree on the synthetic checkpoint,
    so the synthetic layout is DeepSpeed's."""
    import contextlib
    import io
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from evaclip_cli.checkpoints.deepspeed import load_deepspeed_state
    from evaclip_cli.models.lazy import materialize

    with contextlib.redirect_stdout(io.StringIO()):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(root))
    ours = load_deepspeed_state(root)
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    for k, v in theirs.items():
        assert torch.equal(materialize(ours[k]), v), k
    print(f"smoke: the synthetic ZeRO-3 checkpoint reads the same through DeepSpeed's zero_to_fp32 ({len(ours)} "
          "tensors)")


def _largest_tensor(spec, element_size: int) -> int:
    from evaclip_cli.checkpoints.convert import expected_state

    return max(t.numel() for t in expected_state(spec).values()) * element_size


def _largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def real_18b(args) -> None:
    import shutil

    import evaclip_cli  # noqa: F401
    from evaclip_cli.models.specs import eva_config_from_spec

    work = Path(args.keep or tempfile.mkdtemp(prefix="evaclip-bench-18b-", dir=args.dir))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:  # a few MB with the same code paths, to check the script itself
        mk = lambda n: _real_spec(n, width=256, mlp=1280, heads=2, text=(64, 2, 2))  # noqa: E731
    else:
        mk = _real_spec
    elem = {"pt": 2, "hf": 4, "zero3": 12}  # zero3: fp32 partition + two LAMB moments per parameter
    per_block = {c: _nbytes(_shapes(mk(2)), e) - _nbytes(_shapes(mk(1)), e) for c, e in elem.items()}
    base = {c: _nbytes(_shapes(mk(1)), e) - per_block[c] for c, e in elem.items()}
    min_bytes = 0 if args.smoke else args.min_gb * 1e9
    free = shutil.disk_usage(work).free
    print(f"disk: {free / 1e9:.1f} GB free in {work}")
    base_anon, _, _ = peak_memory_of([sys.executable, "-c", "import torch, open_clip, timm, evaclip_cli"])
    print(f"imports alone (torch, open_clip, timm): {base_anon:.2f} GB anonymous")
    rows = []
    for case in (["pt", "hf", "zero3"] if args.only is None else [args.only]):
        if args.blocks == "max":  # as many as the disk holds twice over (source + output), 10 GB kept free
            blocks = int(((free - 10e9) / 2.2 - base[case]) // per_block[case])
        else:
            blocks = int(args.blocks) if args.blocks else max(1, -(-int(min_bytes - base[case]) // per_block[case]))
        blocks = max(1, min(blocks, 48))
        size = base[case] + blocks * per_block[case]
        if 2.2 * size + 1e9 > free and not args.smoke:
            raise SystemExit(f"{case}: {blocks} blocks make a {size / 1e9:.1f} GB checkpoint; source + output need "
                             f"~{2.2 * size / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {work} (use --dir elsewhere)")
        spec = mk(blocks)
        src = work / {"pt": "EVA_CLIP_18B_synthetic.fp16.pt", "hf": "EVA-CLIP-18B-synthetic-hf",
                      "zero3": "run/checkpoints"}[case]
        out = work / (f"out-{case}.pt" if args.to == "eva" else f"out-{case}")
        t = time.perf_counter()
        if case == "pt":
            cfg = work / "EVA-CLIP-18B-synthetic.json"
            cfg.write_text(json.dumps(eva_config_from_spec(spec)))
            if not src.exists():
                _write_pt(spec, src)
            cmd_extra = ["--eva-config", str(cfg), "--dtype", args.dtype or "fp16"]
            on_disk = src.stat().st_size
        elif case == "hf":
            if not src.exists():
                _write_hf(spec, src, 10 * 10**9 if not args.smoke else 2 * 10**6)
            cmd_extra = ["--dtype", args.dtype or "fp32"]
            on_disk = sum(p.stat().st_size for p in src.iterdir())
        else:
            from evaclip_cli.recipes import load_recipe, recipe_to_toml

            recipe = load_recipe("18b", [f"model.vision.depth={blocks}", *(_SMOKE_OVERRIDES if args.smoke else [])])
            assert recipe.recipe.spec() == spec, "the 18b recipe's widths are the paper's"
            if not src.exists():
                _write_zero3(recipe_to_toml(recipe.recipe), spec, src, args.ranks)
            if args.smoke:
                _check_zero3_against_deepspeed(src)
            cmd_extra = ["--from", "deepspeed", "--dtype", args.dtype or "fp32"]
            on_disk = sum(p.stat().st_size for p in src.rglob("*.pt"))
        made = time.perf_counter() - t
        cmd = [sys.executable, "-m", "evaclip_cli.cli", "convert", str(src), str(out), "--force",
               *(["--to", "eva"] if args.to == "eva" else ["--max-shard-size", args.max_shard_size]), *cmd_extra]
        anon, rss, secs = peak_memory_of(cmd)
        if args.to == "eva":  # one file: the goal is the largest tensor (+ 1 GB), not the file
            shard = _largest_tensor(spec, {"fp16": 2, "bf16": 2}.get(cmd_extra[-1], 4))
            print(f"{case} -> {out.name}: {out.stat().st_size / 1e9:.2f} GB .pt, largest tensor "
                  f"{shard / 1e9:.2f} GB")
        else:
            shard = _largest_file(out)
        ok = anon * 1e9 < shard + 1e9
        rows.append((case, blocks, on_disk, shard, anon, rss, secs))
        print(f"{case}: {blocks} of 48 vision blocks, checkpoint {on_disk / 1e9:.2f} GB (written in {made:.0f} s); "
              f"convert peak {anon:.2f} GB anonymous (RSS {rss:.2f} GB incl. mapped pages), {secs:.0f} s; "
              f"{'largest tensor' if args.to == 'eva' else 'largest output shard'} {shard / 1e9:.2f} GB; goal: "
              f"peak < that + 1 GB = {(shard + 1e9) / 1e9:.2f} GB: "
              f"{'met' if ok else 'NOT met'}")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            shutil.rmtree(src, ignore_errors=True) if src.is_dir() else src.unlink(missing_ok=True)
            if case == "zero3":
                shutil.rmtree(src.parent, ignore_errors=True)
    bound = "largest tensor (output: one .pt)" if args.to == "eva" else "largest output shard"
    print(f"| layout | vision blocks | checkpoint | peak anonymous | x checkpoint | {bound} | goal |")
    print("|---|---|---|---|---|---|---|")
    for case, blocks, on_disk, shard, anon, _, _ in rows:
        label = {"pt": ".pt fp16", "hf": "HF fp32 shards", "zero3": f"ZeRO-3, {args.ranks} ranks"}[case]
        print(f"| {label} | {blocks}/48 | {on_disk / 1e9:.2f} GB | "
              f"{anon:.2f} GB | {anon * 1e9 / on_disk:.2f} | {shard / 1e9:.2f} GB | "
              f"{'met' if anon * 1e9 < shard + 1e9 else 'NOT met'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--real-18b", action="store_true", help="EVA-CLIP-18B's real tensor shapes, .pt and HF layout")
    ap.add_argument("--dir", type=Path, default=None, help="--real-18b: where the checkpoints go (default: TMPDIR)")
    ap.add_argument("--min-gb", type=float, default=8.0, help="--real-18b: smallest checkpoint on disk")
    ap.add_argument("--blocks", default=None,
                    help="--real-18b: vision blocks, or 'max' (as many as the disk holds; default: from --min-gb)")
    ap.add_argument("--only", choices=("pt", "hf", "zero3"), default=None)
    ap.add_argument("--ranks", type=int, default=2, help="--real-18b zero3: data-parallel ranks of the checkpoint")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="--real-18b: dtype written (default: the source's, fp16 for .pt, fp32 for HF)")
    ap.add_argument("--max-shard-size", default="5GB", help="--real-18b: output shards (evaclip's default 5GB)")
    ap.add_argument("--to", choices=("open_clip", "eva"), default="open_clip",
                    help="--real-18b: the output layout (eva: the reference .pt, one file)")
    ap.add_argument("--smoke", action="store_true", help="--real-18b at toy width: checks the script, not memory")
    args = ap.parse_args()
    if args.real_18b:
        return real_18b(args)


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
