"""Launching a stage: in this process, on N local processes (torchrun), on many nodes (DeepSpeed's launcher with a
hostfile, or torchrun per node), or as a Slurm batch script.

The child processes run ``python -m evaclip_cli.cli <stage> ...`` with the same arguments minus the launcher ones,
so every rank parses the same recipe and overrides.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError

LAUNCH_FLAGS_WITH_VALUE = ("--nproc", "--nodes", "--node-rank", "--master-addr", "--master-port", "--hostfile",
                           "--launcher")
LAUNCH_FLAGS_BOOL = ("--dry-run",)


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def strip_launch_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS_WITH_VALUE:
            skip = "=" not in a
            continue
        if name in LAUNCH_FLAGS_BOOL:
            continue
        out.append(a)
    return out


def child_argv(stage_argv: list[str]) -> list[str]:
    return ["-m", "evaclip_cli.cli", *strip_launch_args(stage_argv)]


def torchrun_args(nproc: int, nodes: int, node_rank: int, master_addr: Optional[str], master_port: Optional[int],
                  stage_argv: list[str]) -> list[str]:
    args = [f"--nproc_per_node={nproc}", f"--nnodes={nodes}"]
    if nodes > 1:
        if not master_addr:
            raise UserError("--nodes > 1 needs --master-addr (the address of node 0) and --node-rank")
        args += [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port or 29500}"]
    else:
        from evaclip_cli.engine.dist import _free_port

        args += ["--master_addr=127.0.0.1", f"--master_port={master_port or _free_port()}"]
    return [*args, "--no-python", sys.executable, *child_argv(stage_argv)]


def deepspeed_args(hostfile: Path, nproc: Optional[int], master_addr: Optional[str], stage_argv) -> list[str]:
    if not hostfile.is_file():
        raise UserError(f"--hostfile {hostfile}: no such file (lines like 'node1 slots=8')")
    args = ["deepspeed", "--hostfile", str(hostfile), "--no_local_rank"]
    if nproc:
        args += ["--num_gpus", str(nproc)]
    if master_addr:
        args += ["--master_addr", master_addr]
    return [*args, "--module", "evaclip_cli.cli", *strip_launch_args(stage_argv)]


def slurm_script(job: str, nodes: int, nproc: int, out_dir: Path, stage_argv: list[str],
                 time_limit: str = "72:00:00") -> str:
    child = " ".join(shlex.quote(a) for a in [sys.executable, *child_argv(stage_argv)])
    return f"""#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={max(8, 8 * nproc)}
#SBATCH --time={time_limit}
#SBATCH --output={out_dir}/slurm-%j.out
# written by evaclip; submit with: sbatch {out_dir}/launch.sbatch
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${{MASTER_PORT:-29500}}
srun --kill-on-bad-exit=1 torchrun \\
  --nnodes={nodes} --nproc_per_node={nproc} \\
  --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT \\
  --no-python {child} --resume auto
"""


def run_torchrun(args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c not in (0, None)), 1)
    return 0
