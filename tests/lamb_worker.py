"""Run 3 LAMB steps of a small model under DeepSpeed at a given ZeRO stage (launched by torchrun from
tests/test_lamb.py) and save the full parameters; rank 0 also runs the unpartitioned reference."""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 37)
        self.n = nn.LayerNorm(37)
        self.b = nn.Linear(37, 29)
        self.c = nn.Linear(29, 5, bias=False)
        self.scale = nn.Parameter(torch.ones(1) * 0.7)  # [1]-shaped, like the engine's logit_scale

    def forward(self, x):
        return self.c(torch.relu(self.b(self.n(self.a(x))))) * self.scale


def make(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def groups(net, lr):
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    nodecay = [p for n, p in net.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1, "lr": lr, "name": "decay"},
            {"params": nodecay, "weight_decay": 0.0, "lr": lr * 0.5, "lr_scale": 0.5, "name": "no_decay"}]


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 13, generator=g), torch.randn(8, 5, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", type=int)
    ap.add_argument("out")
    ap.add_argument("--naive", action="store_true", help="skip attach (shard-level trust ratios)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from evaclip_cli.engine.lamb import Lamb, attach_to_engine

    lr = 1e-2
    net = make()
    opt = Lamb(groups(net, lr), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 50, "allgather_bucket_size": 50,
                                 "stage3_param_persistence_threshold": 0, "sub_group_size": 400},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    if not args.naive:
        attach_to_engine(engine, opt)
    x, y = batch(rank)
    for _ in range(3):
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters())
    if args.stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            got = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        got = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        ref = make()
        ropt = Lamb(groups(ref, lr), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        xs, ys = zip(*[batch(r) for r in range(world)])
        for _ in range(3):
            ropt.zero_grad()
            # DeepSpeed averages the per-rank mean losses' gradients
            loss = sum(((ref(xr) - yr) ** 2).mean() for xr, yr in zip(xs, ys)) / world
            loss.backward()
            ropt.step()
        diff = max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
        moved = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(make().parameters(), ref.parameters()))
        torch.save({"max_diff": diff, "moved": moved}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
