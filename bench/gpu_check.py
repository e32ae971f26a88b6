"""One GPU check for evaclip: the figures a first GPU session should bring back, in one JSON and one table.

    python bench/gpu_check.py --out gpu_check.json            # one GPU (H100/H200 class), under 8 minutes
    python bench/gpu_check.py --smoke --out /tmp/smoke.json   # every section on the CPU at toy sizes (the test)

Sections (each in its own subprocess, time-boxed, its failure recorded without stopping the others; the total is
held to ``--budget-s``, 420 s by default, shared out in proportion to ``SHARES``):

env            GPU name/memory/capability, driver, CUDA, cuDNN, torch/deepspeed/timm/open_clip versions, SDPA backends
train_step     bf16 forward+backward of the real EVA-CLIP-18B vision block stack (timm ``evaclip_18b_patch14_224``:
               width 5120, 40 heads, MLP 25600, RMSNorm eps 1e-6, no qkv bias, post-norm; 224 px = 257 tokens) with
               only ``depth`` cut, at the deepest depth that fits (probe depth 1 and 2, extrapolate the memory per
               block, try that depth and step down on OOM; bounded by the section's time), without and with
               activation checkpointing, micro batch = the ``18b`` recipe's ``data.micro_batch``. The weights are bf16
               (as DeepSpeed holds them), no autocast. Which SDPA kernel the default path takes is read from the
               profiler (aten op names), and a step with SDPA restricted to FLASH_ATTENTION must run. MFU = model
               FLOPs / step time / peak dense bf16 FLOP/s of the card (``estimate.DEVICE_PEAKS``; ``--peak-tflops`` for
               others); goal: >= 50% on H100/H200 without checkpointing (with it, MFU <= 75% of HFU by definition).
lamb           evaclip's ``Lamb`` (engine/lamb.py) stepping fp32 masters of the same stack's tensors, then the copy into
               the bf16 model weights (DeepSpeed's order): per tensor (no ZeRO) and on flat ZeRO-style partitions of
               <= 1e9 elements (ZeRO-3's default sub_group_size) with a ``FlatLayout``; seconds per billion params.
zero_init      ``models.clip.build_clip(spec, zero_init=ds_config)`` (the engine's ZeRO-3 build, world size 1, bf16) of
               the 18B CLIP with the vision depth cut to what fits the time (the full 48 when it does), then
               ``models.zero_init.reinit_zero3``; seconds per billion params of each.
loader         ``data.wds.build_train_loader`` over demo shards (``data.demo.make_demo``, 256 px JPEGs): 224 px, micro
               batch 64, 8 workers; images/s after every worker has delivered its first batch.
eval_zeroshot  ``eval.runner.run_zeroshot`` (the `evaclip eval zeroshot` core) with ``--precision bf16`` on the demo
               shapes set, a randomly initialised EVA02-CLIP-B/16 (speed only); images/s end to end and the steady
               rate from two set sizes ((n_big - n_small) / (t_big - t_small)).
nccl           bus bandwidth of a 1 GiB fp32 all-reduce over all GPUs (``torch.multiprocessing.spawn``), 2+ GPUs only;
               with --smoke the same code runs on 2 gloo CPU processes as a stand-in.

The demo data is made by a background process while the GPU sections run (``--work``, reused by later runs).

FLOPs (``evaclip_cli.estimate``'s convention, reused from ``estimate._Tower.forward_flops``): per image, forward =
2 * (matmul weights of the blocks) * s + 4 * L * s^2 * w (QK^T and AV) + 2 * (patch-embed weights) * patches; model
FLOPs per step = 3 * forward * micro batch (forward + backward); hardware FLOPs add one forward with checkpointing.
So the matmuls are 6 * params * tokens and attention 12 * L * s^2 * w per image and step.

JSON: {"tool", "mode": "gpu"|"smoke", "budget_s", "wall_s", "sections": {NAME: {"status": "ok"|"skipped"|"error"|
"timeout", "reason"?, "error"?, "seconds", ...figures}}, "goal": {...}}; per-section logs in ``--logs``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("env", "train_step", "lamb", "zero_init", "loader", "eval_zeroshot", "nccl")
SHARES = {"env": 0.06, "train_step": 0.36, "lamb": 0.10, "zero_init": 0.14, "loader": 0.10, "eval_zeroshot": 0.14,
          "nccl": 0.10}
MIN_SECTION_S = 8.0
FLOOR_S = {"env": 20.0}  # a section's time is at least this much (MIN_SECTION_S otherwise) while the budget lasts
GOAL_MFU = 0.50
# dense bf16 tensor-core FLOP/s by a substring of torch.cuda.get_device_name(), first match wins
PEAKS = None  # moved: evaclip_cli.estimate.DEVICE_PEAKS (one table for the estimate, telemetry and this bench)
GOAL_CARDS = ("H100", "H200")
DEFAULT_MICRO_BATCH = 150  # the 18b recipe's data.micro_batch (read from the recipe when it loads)
DEMO_GPU = dict(n_train=2000, n_val=16, image_size=256, per_class=300, n_videos=0)
DEMO_SMOKE = dict(n_train=64, n_val=8, image_size=64, per_class=4, n_videos=0)
GiB = 1024**3


# ------------------------------------------------------------------------------------------------ small helpers
def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class Recorder:
    """A section's result dict, written to disk on every change: a section killed at its time limit still leaves
    what it had measured."""

    def __init__(self, path: Path):
        self.path, self.data = Path(path), {}

    def __setitem__(self, key, value):
        self.data[key] = value
        write_json(self.path, self.data)

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def update(self, **kw):
        self.data.update(kw)
        write_json(self.path, self.data)


class Clock:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def peak_for(name: str):
    """Dense bf16 peak of a device by name: the estimator's table (``evaclip_cli.estimate.DEVICE_PEAKS``)."""
    from evaclip_cli.estimate import device_peak_flops

    return device_peak_flops(name, "bf16")


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def free_memory_safe() -> None:
    try:
        free_memory()
    except Exception:
        pass


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def device_or_skip(a, rec) -> str | None:
    """'cpu' with --smoke, 'cuda' on a GPU; None (and the section marked skipped) without a GPU."""
    import torch

    if a.smoke:
        return "cpu"
    if not torch.cuda.is_available():
        rec.update(status="skipped", reason="no CUDA device (run with --smoke on a CPU machine)")
        return None
    return "cuda"


def micro_batch(a) -> int:
    if a.micro_batch:
        return a.micro_batch
    if a.smoke:
        return 2
    try:
        from evaclip_cli.recipes import load_recipe

        return int(load_recipe("18b").recipe.data.micro_batch)
    except Exception:
        return DEFAULT_MICRO_BATCH


# --------------------------------------------------------------------------------------- the 18B-width block stack
def stack_model_args(a, depth: int) -> tuple[str, dict]:
    """timm name and kwargs of the block stack: the registered 18B tower with only ``depth`` cut (smoke: the same
    block kinds at toy width)."""
    if not a.smoke:
        return "evaclip_18b_patch14_224", dict(depth=depth)
    from evaclip_cli.models.specs import ARCHS

    v = ARCHS["18b"].vision.model_copy(update=dict(width=64, heads=4, mlp_dim=320, image_size=56, depth=depth))
    return "evaclip_vit", v.timm_kwargs()


def build_stack(a, depth: int, device: str, dtype):
    """Built on the meta device, cast, then materialised on ``device`` (no fp32 copy of 18B-width weights ever
    exists) and initialised there: N(0, 0.02) matrices and embeddings, unit norm weights, zero biases."""
    import timm
    import torch

    import evaclip_cli  # noqa: F401  (registers the EVA-CLIP towers with timm)

    name, kw = stack_model_args(a, depth)
    with torch.device("meta"):
        model = timm.create_model(name, **kw)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for _, b in model.named_buffers():
            b.zero_()
    return model


def describe_block(model) -> dict:
    blk = model.blocks[0]
    attn = blk.attn
    return {"block_class": type(blk).__name__, "norm": type(blk.norm1).__name__,
            "norm_eps": getattr(blk.norm1, "eps", None), "width": model.embed_dim, "heads": attn.num_heads,
            "mlp": blk.mlp.fc1.out_features if hasattr(blk.mlp, "fc1") else None,
            "qkv_bias": getattr(attn, "q_bias", None) is not None or getattr(getattr(attn, "qkv", None), "bias", None)
            is not None, "post_norm": "PostNorm" in type(blk).__name__,
            "timm_fused_attn": bool(getattr(attn, "fused_attn", False)),
            "tokens": model.patch_embed.num_patches + model.num_prefix_tokens,
            "image_size": list(model.patch_embed.img_size)}


def stack_flops(model, depth: int) -> dict:
    """Model FLOPs of one image through the stack, counted as evaclip_cli.estimate counts them."""
    named = list(model.named_parameters())
    block_mm = sum(p.numel() for n, p in named if n.startswith("blocks.") and p.ndim >= 2)
    patch_mm = sum(p.numel() for n, p in named if n.startswith("patch_embed.") and p.ndim >= 2)
    patches = model.patch_embed.num_patches
    s, w = patches + model.num_prefix_tokens, model.embed_dim
    from evaclip_cli.estimate import transformer_forward_flops

    fwd = transformer_forward_flops(depth, w, s, block_mm, ((patch_mm, patches),))
    source = "evaclip_cli.estimate.transformer_forward_flops"
    return {"forward_flops_per_image": fwd, "block_matmul_params": block_mm, "patch_matmul_params": patch_mm,
            "flops_source": source,
            "formula": "forward/image = 2*block_matmul_params*s + 4*L*s^2*w + 2*patch_matmul_params*patches; "
                       "model FLOPs/step = 3*forward*batch; hardware FLOPs/step = 4*forward*batch with checkpointing"}


def sdpa_backend(op_names) -> str:
    names = " ".join(op_names)
    if "_flash_attention_for_cpu" in names:
        return "flash (CPU kernel)"
    for key, label in (("_scaled_dot_product_flash_attention", "flash"), ("_flash_attention_forward", "flash"),
                       ("_scaled_dot_product_cudnn_attention", "cudnn"),
                       ("_scaled_dot_product_efficient_attention", "mem_efficient"),
                       ("_fused_attention_overrideable", "overrideable"),
                       ("_scaled_dot_product_attention_math", "math")):
        if key in names:
            return label
    return "none seen" if not names else "unknown"


def sec_train_step(rec, a, clock):
    import torch

    from evaclip_cli.engine.telemetry import FlopsModel, speed_figures

    dev = device_or_skip(a, rec)
    if dev is None:
        return
    from evaclip_cli.models.specs import ARCHS

    dtype = torch.bfloat16
    b = micro_batch(a)
    max_depth = a.max_depth or (3 if a.smoke else ARCHS["18b"].vision.depth)
    name, kw = stack_model_args(a, 1)
    rec.update(timm_model=name, timm_kwargs={k: v for k, v in kw.items() if k != "depth"}, micro_batch=b,
               dtype="bf16 weights (no autocast), as DeepSpeed bf16 holds them", max_depth=max_depth)
    if dev == "cuda":
        gpu = torch.cuda.get_device_name(0)
        peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_for(gpu)
        rec.update(gpu=gpu, peak_flops=peak, peak_source="--peak-tflops" if a.peak_tflops else
                   ("evaclip_cli.estimate.DEVICE_PEAKS" if peak else "peak unknown (pass --peak-tflops)"))
    else:
        peak = a.peak_tflops * 1e12 if a.peak_tflops else None
        rec.update(gpu=None, peak_flops=peak, peak_source="peak unknown (CPU)")

    def make_input(model):
        size = model.patch_embed.img_size
        return torch.randn(b, 3, size[0], size[1], device=dev, dtype=dtype)

    def step_fn(model, x):
        def step():
            out = model.forward_features(x)
            loss = out.float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        return step

    def timed(step, n) -> list:
        out = []
        for _ in range(n):
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            out.append(time.perf_counter() - t0)
        return out

    # ---- SDPA: which kernel the default path takes, and that flash alone runs (a depth-1 stack, real shapes) ----
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    sd: dict = {}
    rec["block"] = describe_block(build_stack(a, 1, "meta", dtype))
    try:
        model = build_stack(a, 1, dev, dtype)
        x = make_input(model)
        step = step_fn(model, x)
        step()
        sync(dev)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            sync(dev)
        ops = sorted({e.key for e in prof.key_averages() if "attention" in e.key or "scaled_dot" in e.key})
        sd.update(default_ops=ops, default_backend=sdpa_backend(ops))
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                step()
                sync(dev)
            sd["flash_only_step"] = "ran"
        except RuntimeError as e:
            sd["flash_only_step"] = f"failed: {' '.join(str(e).split())[:400]}"
    except Exception as e:  # recorded; the timed runs below still happen
        sd["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:600]
        sd.setdefault("default_backend", "unknown (probe failed)")
        sd.setdefault("flash_only_step", "not run (probe failed)")
    flash_ok = sd["flash_only_step"] == "ran" and rec["block"]["timm_fused_attn"]
    if dev == "cuda":
        sd["flash_confirmed"] = bool(flash_ok)
        sd["default_is_flash"] = sd["default_backend"] == "flash"
    else:
        sd["flash_confirmed"] = None
        sd["reason"] = "CUDA flash confirmation needs a GPU (on the CPU the flash-only step runs PyTorch's CPU kernel)"
    rec["sdpa"] = sd
    model = x = step = None
    free_memory()

    # ---- the two modes --------------------------------------------------------------------------------------
    goal_card = dev == "cuda" and any(k in rec.get("gpu", "") for k in GOAL_CARDS)
    modes = (("no_checkpointing", False), ("checkpointing", True))
    for i, (label, ckpt) in enumerate(modes):
        share = clock.left() / (len(modes) - i)
        mode_deadline = time.time() + share
        res: dict = {"grad_checkpointing": ckpt}
        rec[label] = res
        tried: list = []
        res["probe"] = tried

        def attempt(depth, warm=2):
            """Build at ``depth`` and run ``warm`` steps: (model, input, peak bytes, warm step times) or Nones."""
            model = x = None
            oom = None
            try:
                free_memory()
                model = build_stack(a, depth, dev, dtype)
                model.train()
                model.set_grad_checkpointing(ckpt)
                x = make_input(model)
                ts = timed(step_fn(model, x), warm)
                pk = torch.cuda.max_memory_allocated() if dev == "cuda" else None
                tried.append({"depth": depth, "fits": True, "peak_gib": pk / GiB if pk else None,
                              "warm_step_s": ts})
                rec[label] = res
                return model, x, pk, ts
            except Exception as e:
                if not is_oom(e):
                    raise
                oom = " ".join(str(e).split())[:200]
            model = x = None
            free_memory()
            tried.append({"depth": depth, "fits": False, "oom": oom})
            rec[label] = res
            return None, None, None, None

        def left():
            return mode_deadline - time.time()

        try:
            if dev == "cuda":
                p1, t1 = attempt(1)[2:]
                p2, t2 = attempt(2)[2:]
                if p1 is None or p2 is None:
                    res["error"] = "depth 1 or 2 does not fit"
                    continue
                free_memory()
                free_bytes, total_bytes = torch.cuda.mem_get_info()
                per_block = max(p2 - p1, 1)
                base = p1 - per_block
                d_mem = int((free_bytes * 0.92 - base) // per_block)
                per_block_s = max(min(t2) - min(t1), min(t2) / 2, 1e-3)
                # build + 2 warm + at least 3 timed steps, in 70% of what this mode has left
                d_time = int(left() * 0.7 / (per_block_s * 6))
                depth = max(2, min(max_depth, d_mem, d_time))
                res.update(bytes_per_block_probe=per_block, base_bytes_probe=base, depth_by_memory=d_mem,
                           depth_by_time=d_time, gpu_total_gib=total_bytes / GiB)
                model = None
                while True:
                    model, x, pk, tw = attempt(depth)
                    if model is not None or depth <= 2:
                        break
                    depth = max(2, depth - max(1, depth // 16))
                if model is None:
                    model, x, pk, tw = attempt(2)
                if model is None:
                    res["error"] = "no depth fits"
                    continue
            else:
                depth = max_depth
                model, x, pk, tw = attempt(depth)

            step = step_fn(model, x)
            t_warm = min(tw)
            n = max(3, min(a.steps, int(left() * 0.8 / max(t_warm, 1e-6))))
            times: list = []
            for _ in range(n):
                if times and left() < t_warm * 1.5:
                    break
                times += timed(step, 1)
            flops = stack_flops(model, depth)
            fwd = flops["forward_flops_per_image"]
            model_flops = 3 * fwd * b
            hw_flops = (4 if ckpt else 3) * fwd * b
            med = median(times)
            # the figures a training run logs, through the same code (engine.telemetry): one step of b images
            speed = speed_figures(b, 1, med, 0.0, FlopsModel(3 * fwd, peak), 1)
            res.update(depth=depth, params=sum(p.numel() for p in model.parameters()), tokens_per_step=b *
                       rec["block"]["tokens"], steps_timed=len(times), warmup_steps_excluded=len(tw), step_s=times,
                       step_s_median=med, step_s_mean=sum(times) / len(times),
                       peak_memory_gib=(torch.cuda.max_memory_allocated() / GiB) if dev == "cuda" else None,
                       model_flops_per_step=model_flops, hardware_flops_per_step=hw_flops,
                       achieved_tflops=speed["tflops_per_device"], hardware_tflops=hw_flops / med / 1e12,
                       images_per_s=speed["samples_per_s"], telemetry=speed, **flops)
            if peak:
                res.update(mfu=speed["mfu"], hfu=hw_flops / med / peak)
            else:
                res.update(mfu=None, hfu=None, mfu_note="peak unknown: achieved TFLOP/s reported")
            res["sdpa_backend_timed"] = sd["default_backend"]
            if dev == "cuda" and not sd.get("default_is_flash") and sd["flash_only_step"] == "ran" and left() > 3 * med:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    ft = timed(step, 1) + timed(step, 2)
                res["flash_forced_step_s_median"] = median(ft[1:])
            rec[label] = res
        except Exception as e:  # this mode's failure is recorded; the other mode still runs
            res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:600]
            res["traceback"] = traceback.format_exc()[-2000:]
            rec[label] = res
        model = x = step = None
        free_memory_safe()

    failed = [label for label, _ in modes if "step_s_median" not in (rec.get(label) or {})]
    if len(failed) == len(modes):
        rec.update(status="error", error="neither mode was measured: " + "; ".join(
            f"{label}: {(rec.get(label) or {}).get('error', '?')}" for label in failed))
    elif failed:
        rec["partial"] = f"not measured: {', '.join(failed)}"
    nc = rec.get("no_checkpointing") or {}
    mfu = nc.get("mfu")
    rec["goal"] = {"mfu_bf16_no_checkpointing": GOAL_MFU, "measured": mfu,
                   "applies": bool(goal_card),
                   "met": (mfu >= GOAL_MFU) if (mfu is not None and goal_card) else None,
                   "note": "goal for H100/H200 class cards; MFU counts model FLOPs (checkpointing's recompute "
                           "excluded), so the checkpointed run's MFU is reported but not held to the goal"}


# ------------------------------------------------------------------------------------------------------ LAMB
def sec_lamb(rec, a, clock):
    import torch

    dev = device_or_skip(a, rec)
    if dev is None:
        return
    from evaclip_cli.engine.lamb import FlatLayout, Lamb

    def shapes_at(depth):
        name, kw = stack_model_args(a, depth)
        import timm

        import evaclip_cli  # noqa: F401

        kw = dict(kw, depth=depth)
        with torch.device("meta"):
            m = timm.create_model(name, **kw)
        return [tuple(p.shape) for p in m.parameters()]

    one, two = shapes_at(1), shapes_at(2)
    per_block = sum(math.prod(s) for s in two) - sum(math.prod(s) for s in one)
    bytes_per_param = 4 + 4 + 4 + 4 + 2 + 4  # fp32 master, fp32 grad, m, v, bf16 copy, LAMB's update temporary
    if dev == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info()
        depth = max(1, min(a.lamb_depth, int(free_bytes * 0.55 // (bytes_per_param * per_block))))
    else:
        depth = 2
    shapes = shapes_at(depth)
    numels = [math.prod(s) for s in shapes]
    total = sum(numels)
    rec.update(depth=depth, params=total, tensors=len(shapes), bytes_per_param_held=bytes_per_param,
               settings="18b recipe: lr 4e-4, betas (0.9, 0.98), eps 1e-6, wd 0.05, FusedLamb bias correction")
    hp = dict(lr=4e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

    def measure(opt, copy, label):
        for _ in range(2):  # the first step allocates the moments
            opt.step()
            copy()
        sync(dev)
        st, ct = [], []
        for _ in range(a.lamb_steps):
            if st and clock.left() < 5:
                break
            sync(dev)
            t0 = time.perf_counter()
            opt.step()
            sync(dev)
            t1 = time.perf_counter()
            copy()
            sync(dev)
            st.append(t1 - t0)
            ct.append(time.perf_counter() - t1)
        s, c = median(st), median(ct)
        rec[label] = {"steps_timed": len(st), "warmup_steps_excluded": 2, "step_s_median": s,
                      "copy_to_bf16_s_median": c, "s_per_billion_params": (s + c) / (total / 1e9),
                      "step_only_s_per_billion_params": s / (total / 1e9),
                      "peak_memory_gib": torch.cuda.max_memory_allocated() / GiB if dev == "cuda" else None}

    free_memory()
    gen_std = 0.02
    # per tensor (what the optimizer does without ZeRO)
    masters = [torch.nn.Parameter(torch.empty(s, device=dev, dtype=torch.float32).normal_(0, gen_std)) for s in shapes]
    for p in masters:
        p.grad = torch.empty_like(p).normal_(0, 1e-3)
    low = [p.detach().to(torch.bfloat16) for p in masters]
    opt = Lamb(masters, **hp)
    measure(opt, lambda: torch._foreach_copy_(low, [p.detach() for p in masters]), "per_tensor")
    masters = low = opt = None
    free_memory()

    # flat ZeRO-style partitions (one rank), each <= 1e9 elements like ZeRO-3's default sub_group_size
    groups, cur, size = [], [], 0
    for j, n in enumerate(numels):
        if cur and size + n > 1_000_000_000:
            groups.append(cur)
            cur, size = [], 0
        cur.append(j)
        size += n
    groups.append(cur)
    flats, lows, layouts = [], [], []
    for g in groups:
        n = sum(numels[j] for j in g)
        flat = torch.nn.Parameter(torch.empty(n, device=dev, dtype=torch.float32).normal_(0, gen_std))
        flat.grad = torch.empty_like(flat).normal_(0, 1e-3)
        ranges, off = [], 0
        for k, j in enumerate(g):
            ranges.append((off, numels[j], k))
            off += numels[j]
        flats.append(flat)
        layouts.append(FlatLayout.from_ranges(n, ranges, len(g)))
        lows.append(flat.detach().to(torch.bfloat16))
    opt = Lamb(flats, **hp)
    for flat, layout in zip(flats, layouts):
        opt.set_layout(flat, layout)
    rec["flat_partitions"] = [f.numel() for f in flats]
    measure(opt, lambda: torch._foreach_copy_(lows, [f.detach() for f in flats]), "flat")
    full = 18_325_482_241
    rec["extrapolated_18b_single_gpu_s"] = {k: rec[k]["s_per_billion_params"] * full / 1e9 for k in ("per_tensor",
                                                                                                    "flat")}
    rec["note"] = "under ZeRO-3 each rank steps 1/N of the parameters: divide by the world size"


# -------------------------------------------------------------------------------------------------- zero.Init
def sec_zero_init(rec, a, clock):
    import torch

    dev = device_or_skip(a, rec)
    if dev is None:
        return
    from evaclip_cli.engine.dist import setup

    info = setup()
    from evaclip_cli.models.clip import build_clip, count_params
    from evaclip_cli.models.specs import ARCHS, TextSpec
    from evaclip_cli.models.zero_init import reinit_zero3

    base = ARCHS["18b"].model_copy(deep=True)
    if a.smoke:
        base.embed_dim = 64
        base.vision = base.vision.model_copy(update=dict(width=64, heads=4, mlp_dim=320, image_size=56))
        base.text = TextSpec(width=64, heads=4, layers=2, context_length=32)
    full_depth = base.vision.depth

    def spec_at(d):
        s = base.model_copy(deep=True)
        s.vision.depth = d
        return s

    p1 = count_params(build_clip(spec_at(1), device="meta"))
    p2 = count_params(build_clip(spec_at(2), device="meta"))
    per_block = p2 - p1

    def params_at(d):
        return p1 + (d - 1) * per_block

    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    rec.update(world_size=info.world_size, device=info.device, ds_config=ds_cfg,
               spec="18b" if not a.smoke else "18b block kinds at toy width", params_per_vision_block=per_block)

    def build(d):
        free_memory()
        t0 = time.perf_counter()
        model = build_clip(spec_at(d), zero_init=ds_cfg, engine=True)
        sync(dev)
        t1 = time.perf_counter()
        reinit_zero3(model, info.is_main)
        sync(dev)
        t2 = time.perf_counter()
        n = count_params(model)
        pk = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        out = {"vision_depth": d, "params": n, "build_s": t1 - t0, "reinit_s": t2 - t1,
               "build_s_per_billion": (t1 - t0) / (n / 1e9), "reinit_s_per_billion": (t2 - t1) / (n / 1e9),
               "peak_memory_gib": pk / GiB if pk else None,
               "param_dtype": str(next(iter(model.parameters())).dtype)}
        del model
        free_memory()
        return out

    pilot = build(1)
    rec["pilot"] = pilot
    if a.smoke:
        depth = 2
    else:
        rate = (pilot["build_s"] + pilot["reinit_s"]) / pilot["params"]
        free_bytes, _ = torch.cuda.mem_get_info()
        depth = full_depth
        while depth > 1 and (params_at(depth) * rate > clock.left() * 0.6 or params_at(depth) * 2.5 > free_bytes):
            depth -= 1
    rec["planned_vision_depth"] = depth
    if depth <= 1:
        rec["main"] = pilot
        rec["note"] = "only the pilot (vision depth 1) fitted the time"
        return
    main = build(depth)
    main["full_model"] = depth == full_depth
    rec["main"] = main


# ------------------------------------------------------------------------------------------------------ data
def demo_params(a) -> dict:
    return dict(DEMO_SMOKE if a.smoke else DEMO_GPU)


def demo_dir(a) -> Path:
    return Path(a.work) / ("demo_smoke" if a.smoke else "demo_gpu")


def ensure_demo(a) -> tuple[Path, dict]:
    from evaclip_cli.data.demo import make_demo

    t0 = time.perf_counter()
    meta = make_demo(demo_dir(a), **demo_params(a))
    return demo_dir(a), {"made_s_here": round(time.perf_counter() - t0, 2), "generation_s": meta.get("seconds")}


def sec_prepare(rec, a, clock):
    d, info = ensure_demo(a)
    rec.update(status="ok", path=str(d), **info)


def sec_loader(rec, a, clock):
    import torch  # noqa: F401

    from evaclip_cli.data.text import make_tokenizer
    from evaclip_cli.data.wds import build_train_loader
    from evaclip_cli.recipes import Source

    demo, info = ensure_demo(a)
    shards = sorted((demo / "train").glob("*.tar"))
    workers = a.workers if a.workers is not None else (1 if a.smoke else 8)
    batch = 8 if a.smoke else 64
    size = 32 if a.smoke else 224
    rec.update(demo=info, shards=len(shards), demo_image_size=demo_params(a)["image_size"], workers=workers,
               micro_batch=batch, image_size=size, cpus=os.cpu_count(),
               cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    src = [Source(shards="::".join(str(s) for s in shards))]
    loader = build_train_loader(src, image_size=size, micro_batch=batch, workers=workers,
                                tokenizer=make_tokenizer(77), seed=0, shuffle_buffer=500)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    for _ in range(max(0, max(1, workers) - 1)):  # every worker's first batch: start-up, not throughput
        next(it)
    warm = time.perf_counter() - t0
    max_batches = 12 if a.smoke else 400
    limit = min(a.loader_seconds, max(1.0, clock.left() - 8))
    n, t1 = 0, time.perf_counter()
    while True:
        b = next(it)
        n += 1
        if n >= max_batches or time.perf_counter() - t1 >= limit:
            break
    el = time.perf_counter() - t1
    assert tuple(b["image"].shape) == (batch, 3, size, size), tuple(b["image"].shape)
    rec.update(first_batch_s=first, warmup_batches_excluded=max(1, workers), warmup_s=warm, batches_timed=n,
               seconds_timed=el, images_per_s=n * batch / el)
    del it, loader


def sec_eval_zeroshot(rec, a, clock):
    import torch

    dev = device_or_skip(a, rec)
    if dev is None:
        return
    from evaclip_cli.eval.runner import run_zeroshot
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.loaded import LoadedClip
    from evaclip_cli.models.specs import resolve_arch

    demo, info = ensure_demo(a)
    full = demo / "zeroshot" / "shapes"
    # a quarter of the set as symlinks: the difference of the two runs is the steady rate, start-up excluded
    small = Path(a.work) / ("eval_small_smoke" if a.smoke else "eval_small") / "shapes"
    if not (small / "done").is_file():
        import shutil

        shutil.rmtree(small, ignore_errors=True)
        for d in sorted((full / "test").iterdir()):
            files = sorted(d.iterdir())
            (small / "test" / d.name).mkdir(parents=True, exist_ok=True)
            for f in files[: max(1, len(files) // 4)]:
                (small / "test" / d.name / f.name).symlink_to(f.resolve())
        for name in ("classnames.txt", "templates.txt"):
            if (full / name).is_file():
                (small / name).write_text((full / name).read_text())
        (small / "done").write_text("")
    arch = a.eval_arch or ("tiny" if a.smoke else "b16")
    spec = resolve_arch(arch)
    device = "cuda:0" if dev == "cuda" else "cpu"
    torch.manual_seed(0)
    model = build_clip(spec).to(device).eval()
    loaded = LoadedClip.live(model, spec, name=f"gpu-check-{arch}")
    workers = a.workers if a.workers is not None else (1 if a.smoke else 8)
    bs = 16 if a.smoke else 256
    rec.update(demo=info, arch=arch, params=sum(p.numel() for p in model.parameters()), precision="bf16 (autocast)",
               batch_size=bs, workers=workers, image_size=spec.vision.image_size,
               demo_image_size=demo_params(a)["image_size"], note="random weights: speed only, accuracy meaningless")

    def run(path):
        sync(dev)
        t0 = time.perf_counter()
        out = run_zeroshot(f"gpu-check-{arch}", str(path), loaded=loaded, batch_size=bs, workers=workers,
                           precision="bf16", cache=False, quiet=True)
        sync(dev)
        return out["samples"], time.perf_counter() - t0

    run(small)  # warm-up: CUDA context, cuDNN/cuBLAS, page cache
    runs: dict = {"small": [], "full": []}
    for _ in range(2):  # alternated, the fastest of each size kept
        for key, path in (("small", small), ("full", full)):
            if runs["full"] and clock.left() < 3 * runs["full"][0][1] + 5:
                break
            runs[key].append(run(path))
            rec[key] = [{"images": n, "seconds": t} for n, t in runs[key]]
    n_s, t_s = min(runs["small"], key=lambda r: r[1])
    n_f, t_f = min(runs["full"], key=lambda r: r[1])
    steady = (n_f - n_s) / (t_f - t_s) if t_f > t_s and n_f > n_s else None
    rec.update(images_per_s_end_to_end=n_f / t_f, images_per_s_steady=steady,
               steady_note="(n_full - n_small) / (t_full - t_small): start-up (workers, classifier) cancels"
               if steady else "not measurable: the larger set did not take longer (start-up dominates)")


# ------------------------------------------------------------------------------------------------------ NCCL
def _allreduce_worker(rank, world, port, nbytes, backend, out, iters):
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = f"cuda:{rank}"
    else:
        dev = "cpu"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        for _ in range(3):
            dist.all_reduce(t)
        sync(dev)
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        sync(dev)
        dt = (time.perf_counter() - t0) / iters
        if rank == 0:
            alg = nbytes / dt
            write_json(Path(out), {"backend": backend, "world_size": world, "bytes": nbytes, "iters": iters,
                                   "seconds_per_allreduce": dt, "algbw_GBps": alg / 1e9,
                                   "busbw_GBps": alg * 2 * (world - 1) / world / 1e9})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_allreduce(world, nbytes, backend, iters, tmpdir) -> dict:
    import torch.multiprocessing as mp

    out = Path(tmpdir) / f"allreduce_{backend}.json"
    out.unlink(missing_ok=True)
    mp.spawn(_allreduce_worker, args=(world, _free_port(), nbytes, backend, str(out), iters), nprocs=world,
             join=True)
    return json.loads(out.read_text())


def sec_nccl(rec, a, clock):
    import torch

    if a.smoke:
        rec["stand_in"] = _spawn_allreduce(2, 4 * 2**20, "gloo", 5, a.work)
        rec.update(status="skipped", reason="--smoke: NCCL needs 2+ CUDA GPUs; the same code ran on 2 gloo CPU "
                                            "processes (stand_in)")
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rec["gpus"] = n
    if n < 2:
        rec.update(status="skipped", reason=f"{n} GPU(s): the NCCL all-reduce needs 2 or more")
        return
    rec.update(**_spawn_allreduce(n, a.nccl_mib * 2**20, "nccl", 20, a.work))


# ------------------------------------------------------------------------------------------------------ env
def sec_env(rec, a, clock):
    import importlib
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "cuda_build": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "cuda_available": torch.cuda.is_available(), "smoke": a.smoke}
    for mod in ("deepspeed", "timm", "open_clip", "torchvision", "evaclip_cli"):
        try:
            info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:
            info[mod] = f"import failed: {type(e).__name__}: {e}"[:200]
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    sdpa = {}
    for fn in ("is_flash_attention_available", "flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled",
               "math_sdp_enabled"):
        f = getattr(torch.backends.cuda, fn, None)
        try:
            sdpa[fn] = f() if f else None
        except Exception as e:
            sdpa[fn] = f"{type(e).__name__}"
    info["sdpa"] = sdpa
    if torch.cuda.is_available():
        devs = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devs.append({"name": p.name, "memory_gib": p.total_memory / GiB, "capability": f"{p.major}.{p.minor}",
                         "sms": p.multi_processor_count, "peak_bf16_flops": peak_for(p.name)})
        info["gpus"] = devs
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        except Exception as e:
            info["nvidia_smi"] = f"unavailable: {type(e).__name__}"
        try:
            info["driver_cuda"] = ".".join(map(str, divmod(torch._C._cuda_getDriverVersion(), 1000)))
        except Exception:
            pass
    rec.update(**info)


FUNCS = {"env": sec_env, "train_step": sec_train_step, "lamb": sec_lamb, "zero_init": sec_zero_init,
         "loader": sec_loader, "eval_zeroshot": sec_eval_zeroshot, "nccl": sec_nccl, "prepare": sec_prepare}


def watchdog(deadline: float, grace: float = 15.0) -> None:
    """A section's process ends itself when the parent is gone (killed from outside: no GPU held by an orphan) or
    well past its deadline (the parent kills it at the deadline; this is the second line)."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent or time.time() > deadline + grace:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="gpu-check-watchdog").start()


def child_main(a) -> int:
    rec = Recorder(Path(a._result))
    rec.update(status="running", pid=os.getpid())
    clock = Clock(a._deadline)
    watchdog(a._deadline)
    try:
        FUNCS[a._section](rec, a, clock)
        if rec.get("status") == "running":
            rec["status"] = "ok"
        return 0
    except BaseException as e:  # recorded; the parent goes on with the next section
        rec.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
        return 1


# ------------------------------------------------------------------------------------------------------ parent
def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(name: str, a, deadline: float, logs: Path, env: dict) -> tuple[subprocess.Popen, Path, object]:
    res = logs / f"{name}.json"
    res.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--work", str(a.work), "--_section", name,
           "--_result", str(res), "--_deadline", str(deadline)]
    log = open(logs / f"{name}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return p, res, log


def collect(name: str, p: subprocess.Popen, res: Path, log, logs: Path, t0: float, cap: float,
            timed_out: bool) -> dict:
    log.close()
    kill_group(p)  # stray grandchildren (data workers, spawned ranks) of a finished or killed section
    try:
        data = json.loads(res.read_text())
    except Exception:
        data = {}
    if timed_out and data.get("status") in ("ok", "skipped"):
        data["exit_note"] = f"finished, then killed at its time limit ({cap:.0f} s) while exiting"
    elif timed_out:
        data.update(status="timeout", reason=f"killed at its time limit ({cap:.0f} s); figures so far kept")
    elif data.get("status") not in ("ok", "skipped", "error"):
        data["status"] = "error"
        data.setdefault("error", f"exit code {p.returncode} without a result")
    if data["status"] in ("error", "timeout"):
        try:
            data["log_tail"] = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            pass
    data["seconds"] = round(time.time() - t0, 1)
    data["cap_s"] = round(cap, 1)
    return data


def run_section(name, a, cap, logs, env) -> dict:
    t0 = time.time()
    p, res, log = spawn(name, a, t0 + cap - 3.0, logs, env)
    timed_out = False
    try:
        p.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(p)
        p.wait()
    except KeyboardInterrupt:
        kill_group(p)
        raise
    return collect(name, p, res, log, logs, t0, cap, timed_out)


def fmt(x, spec=".3g", unit=""):
    return "-" if x is None else f"{x:{spec}}{unit}"


def summary_lines(sections: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, s in sections.items():
        st = s.get("status", "?")
        if st in ("skipped",):
            rows.append((name, st, s.get("reason", "")))
            continue
        if st in ("error",):
            rows.append((name, st, (s.get("error") or "")[:100]))
            continue
        tag = "" if st == "ok" else f"[{st}] "
        if name == "env":
            g = (s.get("gpus") or [{}])[0]
            rows.append((name, st, f"{g.get('name', 'no GPU')} {fmt(g.get('memory_gib'), '.0f', ' GiB')}, torch "
                                   f"{s.get('torch')}, CUDA {s.get('cuda_build')}, deepspeed {s.get('deepspeed')}, "
                                   f"timm {s.get('timm')}, open_clip {s.get('open_clip')}"))
        elif name == "train_step":
            sd = s.get("sdpa") or {}
            rows.append((name, st, f"{tag}SDPA default: {sd.get('default_backend')}, flash-only step: "
                                   f"{(sd.get('flash_only_step') or '-')[:40]}, micro batch {s.get('micro_batch')}"))
            for mode in ("no_checkpointing", "checkpointing"):
                m = s.get(mode) or {}
                if "step_s_median" not in m:
                    rows.append((f"  {mode}", "-", m.get("error", "not measured")))
                    continue
                mfu = "MFU " + (fmt(100 * m["mfu"], ".1f", "%") if m.get("mfu") is not None else "peak unknown")
                rows.append((f"  {mode}", "", f"depth {m['depth']}, {m['step_s_median']:.3f} s/step, "
                                              f"{m['achieved_tflops']:.1f} TFLOP/s, {mfu}, HFU "
                                              f"{fmt(100 * m['hfu'] if m.get('hfu') else None, '.1f', '%')}, "
                                              f"peak {fmt(m.get('peak_memory_gib'), '.1f', ' GiB')}"))
            g = s.get("goal") or {}
            if g:
                met = {True: "met", False: "NOT met", None: "n/a"}[g.get("met")]
                rows.append(("  goal", "", f">= {100 * GOAL_MFU:.0f}% MFU bf16 (H100/H200): {met}"))
        elif name == "lamb":
            pt, fl = s.get("per_tensor") or {}, s.get("flat") or {}
            rows.append((name, st, f"{tag}{fmt(s.get('params', 0) / 1e9, '.2f')}B params: per tensor "
                                   f"{fmt(pt.get('s_per_billion_params'), '.4f')} s/B, flat "
                                   f"{fmt(fl.get('s_per_billion_params'), '.4f')} s/B (step + bf16 copy)"))
        elif name == "zero_init":
            m = s.get("main") or s.get("pilot") or {}
            rows.append((name, st, f"{tag}vision depth {m.get('vision_depth')}, "
                                   f"{fmt(m.get('params', 0) / 1e9, '.2f')}B params: build "
                                   f"{fmt(m.get('build_s'), '.1f')} s ({fmt(m.get('build_s_per_billion'), '.2f')} "
                                   f"s/B), reinit {fmt(m.get('reinit_s'), '.1f')} s "
                                   f"({fmt(m.get('reinit_s_per_billion'), '.2f')} s/B)"))
        elif name == "loader":
            rows.append((name, st, f"{tag}{fmt(s.get('images_per_s'), '.0f')} images/s ({s.get('workers')} workers,"
                                   f" batch {s.get('micro_batch')}, {s.get('image_size')} px)"))
        elif name == "eval_zeroshot":
            rows.append((name, st, f"{tag}{fmt(s.get('images_per_s_end_to_end'), '.0f')} images/s end to end, "
                                   f"{fmt(s.get('images_per_s_steady'), '.0f')} steady ({s.get('arch')}, bf16)"))
        elif name == "nccl":
            rows.append((name, st, f"{tag}busbw {fmt(s.get('busbw_GBps'), '.1f')} GB/s over {s.get('world_size')}"))
        else:
            rows.append((name, st, tag))
    return rows


def print_table(result: dict) -> None:
    rows = summary_lines(result["sections"])
    w0 = max(len(r[0]) for r in rows) if rows else 8
    print(f"\nevaclip GPU check ({result['mode']}), {result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget")
    for name, st, text in rows:
        print(f"  {name:<{w0}}  {st:<8} {text}")
    print(f"written: {result['out']}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON written (default: ./gpu_check.json)")
    ap.add_argument("--smoke", action="store_true", help="every section on the CPU at toy sizes (the test)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total time of all sections")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in this order: "
                    + ",".join(SECTIONS))
    ap.add_argument("--work", default=None, help="demo data and scratch (default: $TMPDIR/evaclip-gpu-check)")
    ap.add_argument("--logs", default=None, help="per-section logs (default: beside --out, <stem>_logs/)")
    ap.add_argument("--micro-batch", type=int, default=0, help="train_step micro batch (default: the 18b recipe's)")
    ap.add_argument("--max-depth", type=int, default=0, help="train_step depth cap (default: 48, the real depth)")
    ap.add_argument("--steps", type=int, default=8, help="timed train steps at most (after 2 warm-up steps)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s of an unlisted card")
    ap.add_argument("--lamb-depth", type=int, default=8, help="LAMB: block count at most (memory decides below)")
    ap.add_argument("--lamb-steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=None, help="loader/eval workers (default: 8; --smoke: 1)")
    ap.add_argument("--loader-seconds", type=float, default=25.0)
    ap.add_argument("--eval-arch", default=None, help="eval_zeroshot model (default: b16; --smoke: tiny)")
    ap.add_argument("--nccl-mib", type=int, default=1024)
    ap.add_argument("--_section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.work is None:
        uid = os.getuid() if hasattr(os, "getuid") else 0
        a.work = str(Path(tempfile.gettempdir()) / f"evaclip-gpu-check-{uid}")
    a.work = str(Path(a.work).resolve())
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a._section:  # the result is on disk: skip the interpreter's teardown (NCCL, DeepSpeed, workers can stall it)
        code = child_main(a)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    wanted = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        print(f"unknown section(s) {', '.join(bad)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    sections = [s for s in SECTIONS if s in wanted]
    out = Path(a.out).resolve()
    logs = Path(a.logs) if a.logs else out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # OOM probing without fragmentation
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.smoke:  # a CPU check even where a GPU exists
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    start = time.time()
    end = start + a.budget_s
    result = {"tool": "bench/gpu_check.py", "mode": "smoke" if a.smoke else "gpu",
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "budget_s": a.budget_s, "out": str(out), "logs": str(logs), "work": a.work,
              "sections": {}}
    write_json(out, result)

    def on_term(signum, frame):  # `timeout`, a scheduler: end the running section's processes too
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    prep = None
    if {"loader", "eval_zeroshot"} & set(sections):  # demo data made on the CPU while the GPU sections run
        prep = spawn("prepare", a, end, logs, env)
        prep_t0 = time.time()
    try:
        for i, name in enumerate(sections):
            left = end - time.time()
            if name in ("loader", "eval_zeroshot") and prep is not None and prep[0].poll() is None:
                try:
                    prep[0].wait(timeout=max(1.0, left * 0.5))
                except subprocess.TimeoutExpired:  # the section makes the data itself, within its own limit
                    kill_group(prep[0])
                    prep[0].wait()
                left = end - time.time()
            cap = left * SHARES[name] / sum(SHARES[s] for s in sections[i:])
            if left < MIN_SECTION_S:
                result["sections"][name] = {"status": "skipped", "reason": f"total budget exhausted ({left:.0f} s "
                                                                           "left)", "seconds": 0}
            else:
                cap = max(cap, min(FLOOR_S.get(name, MIN_SECTION_S), left))
                print(f"[{time.time() - start:6.1f} s] {name}: up to {cap:.0f} s ...", flush=True)
                result["sections"][name] = run_section(name, a, cap, logs, env)
                print(f"[{time.time() - start:6.1f} s] {name}: {result['sections'][name]['status']}", flush=True)
            result["wall_s"] = round(time.time() - start, 1)
            write_json(out, result)
    except KeyboardInterrupt as e:
        result["interrupted"] = f"interrupted ({e or 'Ctrl-C'}) during the run; the sections before are kept"
        for name in sections:
            result["sections"].setdefault(name, {"status": "skipped", "reason": result["interrupted"]})
    finally:
        if prep is not None:
            p, res, log = prep
            if p.poll() is None:
                kill_group(p)
                p.wait()
            result["prepare"] = collect("prepare", p, res, log, logs, prep_t0, a.budget_s, False)
    nc = (result["sections"].get("train_step") or {}).get("goal")
    result["goal"] = nc or {"mfu_bf16_no_checkpointing": GOAL_MFU, "measured": None, "met": None}
    result["wall_s"] = round(time.time() - start, 1)
    write_json(out, result)
    print_table(result)
    failed = [n for n, r in result["sections"].items() if r.get("status") in ("error", "timeout")]
    if failed or result.get("interrupted"):
        print(f"not clean: {', '.join(failed) or result['interrupted']} (see the JSON and {logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
