"""Process-group setup shared by every stage (CPU: gloo with DS_ACCELERATOR=cpu; GPU: nccl)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


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
    return DistInfo(rank, world, local, _bind_device(local))


def setup_inference() -> DistInfo:
    """Data-parallel inference (eval, embed) under torchrun, without DeepSpeed: a process group only when torchrun
    started several ranks; a bare process stays single, with no group."""
    import torch

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank, world, local, _bind_device(local))


def _bind_device(local: int) -> str:
    """This rank's device: its GPU (made current) when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


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


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of each value over the ranks (e.g. the slowest rank's data wait, the fullest rank's memory)."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.cpu().tolist()


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


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers, Slurm)."""
    import math

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota: Optional[float] = None
    try:  # cgroup v2: "max 100000" or "200000 100000"
        v2 = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if v2[0] != "max":
            quota = int(v2[0]) / int(v2[1])
    except (OSError, ValueError, IndexError):
        try:  # cgroup v1
            q1 = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            p1 = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
            if q1 > 0:
                quota = q1 / p1
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def intra_op_threads(requested: int, local_ranks: int, environ=os.environ) -> int:
    """Threads for torch's intra-op pool: the recipe's ``compute.threads`` if set, else OMP_NUM_THREADS if set
    (torchrun sets 1 for several ranks), else this process's share of the CPUs it may use. More threads than CPUs
    make OpenMP threads of different processes spin against each other: a 20x slowdown on a shared box."""
    if requested > 0:
        return requested
    env = environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, cpu_budget() // max(1, local_ranks))


def set_threads(requested: int) -> int:
    """Apply ``intra_op_threads`` to torch in this process; returns the count."""
    import torch

    n = intra_op_threads(requested, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_PEER_FAILURE = ("connection reset by peer", "connection closed by peer", "broken pipe", "socket timeout",
                 "timed out", "timeout", "nccl", "ncclremoteerror", "gloo", "no route to host", "connection refused")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or hangs (gloo/NCCL), not for a bug here."""
    import torch.distributed as tdist

    backend_error = getattr(tdist, "DistBackendError", None)
    if backend_error is not None and isinstance(exc, backend_error):
        return True
    if not isinstance(exc, RuntimeError) or not is_multi():
        return False
    text = str(exc).lower()
    return any(k in text for k in _PEER_FAILURE)
