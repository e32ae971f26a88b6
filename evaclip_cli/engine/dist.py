"""Process-group setup shared by every stage (CPU: gloo with DS_ACCELERATOR=cpu; GPU: nccl)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (works for a bare single process too)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import logging
    import warnings

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed warns about every client optimizer ("untested") and torch about deprecated collectives it calls;
    # evaclip's own messages say what matters
    ds_logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    # the shm_comm op is only for CPU inference all-reduce; skip its 60-100 s JIT build
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:
        pass
    import torch.distributed as tdist

    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    return DistInfo(rank, world, local, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier():
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def all_gather_object(obj):
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def _comm_device() -> str:
    import torch.distributed as tdist

    return "cuda" if tdist.get_backend() == "nccl" else "cpu"


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps ranks in lockstep)."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return t.cpu().tolist()


def shutdown() -> None:
    """Leave the process group cleanly (a gloo group torn down at interpreter exit can abort the process)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()


def is_multi() -> bool:
    import torch.distributed as tdist

    return tdist.is_initialized() and tdist.get_world_size() > 1
