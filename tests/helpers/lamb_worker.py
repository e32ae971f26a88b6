"""Three LAMB steps of a small model under DeepSpeed at one ZeRO stage, compared with the unpartitioned reference.

Launched by tests/test_lamb.py (one engine per process):

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/lamb_worker.py STAGE OUT [--bf16] [--offload] ...

Every rank gets its own fixed batch. Rank 0 then runs the reference: the same model, the same per-rank batches,
gradients averaged over the ranks, ``Lamb`` on the plain parameters, and writes to OUT (torch.save) the largest
absolute difference between DeepSpeed's fp32 master weights and the reference, per parameter and overall.

fp32: the engine's module parameters after the step are the masters (stage 1/2: views of the updated fp32 flat
buffer; stage 3: gathered). bf16: the masters come from a DeepSpeed checkpoint through
``get_fp32_state_dict_from_zero_checkpoint`` (stage 0: the FP16_UnfusedOptimizer's fp32 copies; BF16_Optimizer:
``safe_get_full_fp32_param``), and the reference starts from the bf16-rounded weights, computes each rank's
gradients with a bf16 copy of its fp32 weights, as DeepSpeed does, and sums them over the ranks in bf16.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LR, BETAS, EPS, WD = 2e-2, (0.9, 0.98), 1e-6, 0.1
STEPS, BATCH = 3, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 37)
        self.n = nn.LayerNorm(37)
        self.b = nn.Linear(37, 29)
        self.c = nn.Linear(29, 5, bias=False)
        self.scale = nn.Parameter(torch.full((1,), 0.7))  # [1]-shaped, like the engine's logit_scale

    def forward(self, x):
        return self.c(torch.relu(self.b(self.n(self.a(x))))) * self.scale


def make_model() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def param_groups(net):
    decay = [p for _, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in net.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD, "lr": LR, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": LR * 0.5, "lr_scale": 0.5, "name": "no_decay"}]


def make_optimizer(net):
    from evaclip_cli.engine.lamb import Lamb

    return Lamb(param_groups(net), lr=LR, betas=BETAS, eps=EPS)


def rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 5, generator=g)


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def reference(world: int, gas: int, bf16: bool) -> dict:
    """The unpartitioned run: Lamb on the plain fp32 parameters, gradients averaged over ranks and micro-batches."""
    master = make_model()
    if bf16:  # DeepSpeed casts the model to bf16 first: its fp32 masters start from the rounded weights
        with torch.no_grad():
            for p in master.parameters():
                p.copy_(p.bfloat16().float())
    opt = make_optimizer(master)
    batches = [rank_batch(r) for r in range(world)]
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if not bf16:
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            loss_fn(master(x), y).backward()  # mean over all ranks' samples = DeepSpeed's average of rank means
        else:
            low = make_model().bfloat16()
            with torch.no_grad():
                for lp, hp in zip(low.parameters(), master.parameters()):
                    lp.copy_(hp)
            grads = [torch.zeros_like(p) for p in master.parameters()]
            for x, y in batches:
                low.zero_grad(set_to_none=True)
                for xm, ym in zip(x.chunk(gas), y.chunk(gas)):
                    (loss_fn(low(xm.bfloat16()), ym.bfloat16()) / gas).backward()
                for acc, lp in zip(grads, low.parameters()):
                    acc.add_(lp.grad.float())
            for p, acc in zip(master.parameters(), grads):
                # DeepSpeed sums the ranks' bf16 gradients in bf16 (measured: this matches it exactly at stage 0,
                # fp32 sums do not), BF16_Optimizer with fp32 accumulation too
                p.grad = acc.bfloat16().float() / world
        opt.step()
    return {n: p.detach().clone() for n, p in master.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", type=int)
    ap.add_argument("out")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fp32-accum", action="store_true", help="bf16 with fp32 gradient accumulation "
                    "(at stage 1: DeepSpeed's BF16_Optimizer)")
    ap.add_argument("--offload", action="store_true", help="offload_optimizer to cpu")
    ap.add_argument("--gas", type=int, default=1, help="gradient accumulation steps (micro-batches per rank)")
    ap.add_argument("--align", action="store_true", help="zero_optimization.parameter_alignment (stage 1/2)")
    ap.add_argument("--round-robin", action="store_true", help="zero_optimization.round_robin_gradients")
    ap.add_argument("--naive", action="store_true", help="skip attach_to_engine (trust ratios per flat shard)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT build nothing here uses
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from evaclip_cli.engine.lamb import attach_to_engine

    net = make_model()
    opt = make_optimizer(net)
    zero = {"stage": args.stage, "reduce_bucket_size": 64, "allgather_bucket_size": 64,
            "stage3_param_persistence_threshold": 0, "sub_group_size": 400,
            "parameter_alignment": args.align, "round_robin_gradients": args.round_robin}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": BATCH // args.gas, "gradient_accumulation_steps": args.gas,
           "gradient_clipping": 0.0, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
        if args.fp32_accum:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    if not args.naive:
        attach_to_engine(engine, opt)
    wrapper = type(engine.optimizer).__name__
    x, y = rank_batch(rank)
    if args.bf16:
        x, y = x.bfloat16(), y.bfloat16()
    for _ in range(STEPS):
        for xm, ym in zip(x.chunk(args.gas), y.chunk(args.gas)):
            engine.backward(loss_fn(engine(xm), ym))
            engine.step()
    if not args.bf16:
        if args.stage == 3:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                got = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        else:
            got = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    elif args.stage == 0:
        names = {id(p): n for n, p in engine.module.named_parameters()}
        got = {names[id(lp)]: hp.detach().clone()
               for lows, highs in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
               for lp, hp in zip(lows, highs)}
    elif wrapper == "BF16_Optimizer":  # zero_to_fp32 does not read its checkpoints
        from deepspeed.utils import safe_get_full_fp32_param

        got = {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}
    else:
        ckpt = args.out + ".ckpt"
        engine.save_checkpoint(ckpt, tag="t")
        torch.distributed.barrier()
        got = None
        if rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            shapes = {n: p.shape for n, p in make_model().named_parameters()}
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="t")
            got = {n: t.float().reshape(shapes[n]) for n, t in sd.items() if n in shapes}
    t_ds = time.perf_counter() - t0
    if rank == 0:
        ref = reference(world, args.gas, args.bf16)
        start = {n: p.detach() for n, p in make_model().named_parameters()}
        per_param = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
        res = {"max_diff": max(per_param.values()), "per_param": per_param,
               "finite": all(bool(torch.isfinite(t).all()) for t in got.values()),
               "moved": max((ref[n] - start[n]).abs().max().item() for n in ref),
               "wrapper": wrapper, "seconds": t_ds,
               "layouts": [(lay.lengths, lay.owners) for _, lay in opt._layouts.values()]}
        torch.save(res, args.out)
        print(f"stage {args.stage} {wrapper}: max |deepspeed - reference| = {res['max_diff']:.3g}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
