"""Several nodes on one machine: torchrun per node, the written sbatch script under a Slurm stand-in, and the
DeepSpeed launcher with a hostfile each give the losses of `--nproc 2`.

What the Slurm stand-in (tests/helpers/slurm/srun, scontrol) exercises: the sbatch script evaclip writes, run by
bash with the variables sbatch sets (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES), `scontrol show
hostnames` for the master address, one `srun` task per node with SLURM_PROCID/NODEID/LOCALID, and torchrun's c10d
rendezvous between the per-node agents. What it does not: Slurm's scheduler, cgroups and GPU binding
(`--gpus-per-node`), nodes on different hosts (every "node" here is this machine, so the rendezvous address is
localhost), and `--kill-on-bad-exit` beyond killing the sibling tasks.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import EVACLIP, ROOT, metrics, train

pytestmark = pytest.mark.slow

ARGS = ["--recipe", "tiny", "deepspeed.zero_stage=3", "data.samples=480", "data.global_batch=32",
        "data.micro_batch=16", "logging.log_every=1", "logging.checkpoint_every=0", "eval.every_steps=0",
        "data.workers=1"]
STANDIN = Path(__file__).parent / "helpers" / "slurm"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run)[0]]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    run = tmp_path_factory.mktemp("nproc2") / "run"
    train(env, run, *ARGS, "--nproc", "2")
    losses = _losses(run)
    assert len(losses) == 15
    return losses


def _assert_same(losses, reference):
    assert len(losses) == len(reference)
    diff = max(abs(a - b) for a, b in zip(losses, reference))
    assert diff < 1e-5, (diff, losses, reference)


def test_two_nodes_with_torchrun_per_node_match_nproc_2(env, reference, tmp_path):
    run, port = tmp_path / "run", str(_port())
    procs = [subprocess.Popen([*EVACLIP, "train", "--out", str(run), *ARGS, "--nodes", "2", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", port], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    _assert_same(_losses(run), reference)


def test_the_written_sbatch_script_under_a_slurm_standin_matches_nproc_2(env, reference, tmp_path):
    run = tmp_path / "run"
    r = train(env, run, *ARGS, "--nodes", "2", "--nproc", "1", "--master-addr", "ignored", "--launcher", "slurm")
    script = run / "launch.sbatch"
    assert script.is_file(), r.stdout
    text = script.read_text()
    assert "srun --kill-on-bad-exit=1 torchrun" in text and "--nnodes=2 --nproc_per_node=1" in text
    venv_bin = str(Path(sys.executable).parent)
    slurm_env = {**env, "PATH": f"{STANDIN}:{venv_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
                 "MASTER_PORT": str(_port())}
    res = subprocess.run(["bash", str(script)], env=slurm_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same(_losses(run), reference)


def test_deepspeed_launcher_with_a_localhost_hostfile_matches_nproc_2(env, reference, tmp_path):
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    venv_bin = str(Path(sys.executable).parent)
    ds_env = {**env, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    r = subprocess.run([*EVACLIP, "train", "--out", str(run), *ARGS, "--hostfile", str(hostfile),
                        "--master-port", str(_port())], env=ds_env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _assert_same(_losses(run), reference)
