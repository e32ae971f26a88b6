"""evaclip distill: block masking, the MIM stage on the shared engine, outputs that train/convert accept."""
import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli
from helpers.runs import EVACLIP, metrics, train

STUDENT = ["model.vision.width=128", "model.vision.depth=4", "model.vision.heads=4", "model.vision.mlp_dim=512"]


def test_block_mask_ratio_and_blocks():
    from evaclip_cli.stages.distill import block_mask

    for grid, ratio in ((14, 0.4), (16, 0.4), (4, 0.4), (8, 0.5)):
        m = torch.tensor(block_mask(grid, ratio, 16, (0.3, 1 / 0.3), random.Random(grid)))
        assert int(m.sum()) == round(grid * grid * ratio)
    # blocks, not salt and pepper: on a 14x14 grid most masked patches have a masked 4-neighbour
    m = torch.tensor(block_mask(14, 0.4, 16, (0.3, 1 / 0.3), random.Random(0))).reshape(14, 14)
    padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert ((neighbours > 0) & m).sum() >= 0.9 * m.sum()


@pytest.fixture
def teacher(tiny_clip_folder):
    """A tiny CLIP as an open_clip folder (random weights are enough for the mechanics)."""
    return tiny_clip_folder


@pytest.mark.slow
def test_distill_then_train_from_student(env, teacher, tmp_path):
    out = tmp_path / "student"
    r = subprocess.run(
        [*EVACLIP, "distill", "--teacher", str(teacher), "--out", str(out), "data.samples=1280",
         "logging.log_every=2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "negative cosine" in r.stdout
    steps, _ = metrics(out)
    assert steps[-1]["loss"] < steps[0]["loss"] and -1.0 <= steps[-1]["loss"] <= 1.0
    assert 0.35 < steps[-1]["masked_fraction"] < 0.45
    mim = torch.load(out / "student_mim.pt")
    assert {"mask_token", "lm_head.weight", "lm_head.bias", "blocks.3.attn.qkv.weight", "pos_embed"} <= set(mim)
    assert mim["lm_head.weight"].shape == (64, 128)  # student width -> teacher embed
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["model_args"]["embed_dim"] == 128
    # train accepts both outputs as init.vision; with lr 0 the tower is exactly the student's
    run = tmp_path / "clip"
    train(env, run, "--recipe", "tiny", *STUDENT, "data.samples=64", "optimizer.lr=0", "eval.every_steps=0",
          f"init.vision={out / 'student_mim.pt'}")
    from evaclip_cli.checkpoints.io import load_state_dict

    got = load_state_dict(run / "final" / "open_clip_model.safetensors")
    tower = load_state_dict(out / "final" / "model.safetensors")
    assert all(torch.equal(got["visual.trunk." + k], v) for k, v in tower.items())


@pytest.mark.slow
def test_distill_two_rank_zero3(env, teacher, tmp_path):
    out = tmp_path / "z3"
    r = subprocess.run([*EVACLIP, "distill", "--teacher", str(teacher), "--out", str(out), "--nproc", "2",
                        "deepspeed.zero_stage=3", "data.samples=256", "data.global_batch=32", "data.micro_batch=16"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "student_mim.pt").is_file()


def test_teacher_grid_mismatch_is_one_line(env, teacher, tmp_path, capsys):
    code, out, err = run_cli(["distill", "--teacher", teacher, "--out", tmp_path / "x", "model.vision.patch_size=8"],
                             capsys)
    assert code == 2 and "patch grid" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_weak_to_strong_on_demo(env, tmp_path):
    """Teacher tiny CLIP -> distilled wider/deeper student -> its CLIP beats the same CLIP from random init."""
    sys.path.insert(0, str(ROOT / "bench"))
    from weak_to_strong import weak_to_strong

    res = weak_to_strong(tmp_path / "w2s", teacher_steps=300, distill_steps=150, clip_steps=100, env=env)
    d, s = res["distilled"], res["scratch"]
    print(f"weak-to-strong: distilled init mean top-1 {d['mean']:.3f} vs random init {s['mean']:.3f} ({d}, {s})")
    assert d["mean"] > s["mean"]
