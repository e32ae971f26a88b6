"""The ZeRO-aware LAMB equals the unpartitioned per-tensor LAMB at every ZeRO stage (2 ranks, CPU)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaclip_cli.engine.lamb import Lamb

ROOT = Path(__file__).resolve().parent.parent


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(stage, out, naive=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           str(ROOT / "tests" / "lamb_worker.py"), str(stage), str(out)] + (["--naive"] if naive else [])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_per_tensor_reference(stage, tmp_path):
    res = run_worker(stage, tmp_path / "res.pt")
    assert res["moved"] > 1e-3  # the steps changed the weights, so agreement means something
    assert res["max_diff"] < 1e-5, res


def test_shard_level_ratio_differs(tmp_path):
    """Without the segment maps LAMB takes one trust ratio per flat shard: the comparison above can fail."""
    res = run_worker(2, tmp_path / "naive.pt", naive=True)
    assert res["max_diff"] > 1e-4


def test_lamb_matches_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p0 = p.detach().clone()
    g = torch.randn(4, 3)
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    p.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.01 * g * g
    u = (m / 0.1) / ((v / 0.01).sqrt() + 1e-6) + 0.01 * p0
    ratio = (p0.norm() / u.norm()).clamp(0.01, 10)
    assert torch.allclose(p.detach(), p0 - 0.1 * ratio * u, atol=1e-6)
