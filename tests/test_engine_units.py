"""Engine pieces on their own: parameter groups, schedule, DeepSpeed config, token reduction, launching."""

import pytest
import torch

import evaclip_cli  # noqa: F401
from evaclip_cli.engine.config import deepspeed_config
from evaclip_cli.engine.launch import slurm_script, strip_launch_args, torchrun_args
from evaclip_cli.engine.params import TowerCfg, build_param_groups, clip_layer_id
from evaclip_cli.engine.schedule import lr_factor
from evaclip_cli.errors import UserError
from evaclip_cli.models.clip import build_clip
from evaclip_cli.models.tokens import TokenReducer
from evaclip_cli.recipes import load_recipe


def test_layer_ids_and_decay_scales():
    r = load_recipe("18b").recipe
    spec = r.spec()
    model = build_clip(spec, device="meta", engine=True)
    L, T = spec.vision.depth, spec.text.layers
    assert clip_layer_id("visual.trunk.pos_embed", L, T) == ("vision", 0)
    assert clip_layer_id("visual.trunk.patch_embed.proj.weight", L, T) == ("vision", 0)
    assert clip_layer_id("visual.trunk.blocks.47.mlp.fc2.weight", L, T) == ("vision", 48)
    assert clip_layer_id("visual.head.proj.weight", L, T) == ("vision", 49)
    assert clip_layer_id("text.token_embedding.weight", L, T) == ("text", 0)
    assert clip_layer_id("text.transformer.resblocks.3.attn.in_proj_weight", L, T) == ("text", 4)
    assert clip_layer_id("text.text_projection", L, T) == ("text", 33)
    towers = {"vision": TowerCfg(4e-4, 0.05, 0.9, L), "text": TowerCfg(4e-5, 0.05, 0.75, T)}
    groups = build_param_groups(model.named_parameters(), towers, lambda n: clip_layer_id(n, L, T))
    by_name = {g["name"]: g for g in groups}
    # scale = decay^(L+1-id): embeddings get the smallest lr, the top gets the full lr
    assert by_name["vision.layer0.no_decay"]["lr_scale"] == pytest.approx(0.9 ** 49)
    assert by_name["vision.layer49.decay"]["lr_scale"] == 1.0
    assert by_name["text.layer0.decay"]["lr_scale"] == pytest.approx(0.75 ** 33)
    assert by_name["text.layer0.decay"]["base_lr"] == 4e-5
    # no weight decay for 1-D, biases, pos/cls, logit_scale, text positional embedding; decay for matrices
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            nd = p.ndim <= 1 or n.endswith(".bias") or any(k in n for k in ("pos_embed", "cls_token", "logit_scale",
                                                                                "positional_embedding"))
            assert (g["weight_decay"] == 0.0) == nd, n
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5, abs=1e-9)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, kind="linear") == pytest.approx(0.5)


def test_deepspeed_config():
    r = load_recipe("18b").recipe
    cfg = deepspeed_config(r, 360, on_gpu=True)
    assert cfg["gradient_clipping"] == 5.0 and cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_batch_size"] == 108_000 and cfg["gradient_accumulation_steps"] == 2  # 150 x 2 per GPU
    cfg = deepspeed_config(r, 180, on_gpu=True)
    assert cfg["gradient_accumulation_steps"] == 4
    with pytest.raises(UserError, match="multiple"):
        deepspeed_config(r, 7, on_gpu=True)
    t = load_recipe("tiny", ["deepspeed.grad_clip=0"]).recipe
    assert deepspeed_config(t, 1, on_gpu=False)["gradient_clipping"] == 0.0  # written even when 0


@pytest.mark.parametrize("method", ["random", "grid", "block"])
def test_token_reducer(method):
    red = TokenReducer(method, keep_ratio=0.5, grid=8)
    red.train()
    x = torch.arange(2 * 65 * 3, dtype=torch.float32).reshape(2, 65, 3)
    red.reseed(7)
    y, idx = red(x)
    assert y.shape == (2, 1 + 32, 3) and torch.equal(y[:, 0], x[:, 0])  # CLS kept
    assert idx.shape == (2, 32) and all(len(set(r.tolist())) == 32 for r in idx)
    assert torch.equal(y[:, 1:], torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, 3)))
    red.reseed(7)
    y2, _ = red(x)
    assert torch.equal(y, y2)  # same seed, same mask (exact resume)
    if method == "block":  # one contiguous rectangle
        rows, cols = idx[0] // 8, idx[0] % 8
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) <= 40
    if method == "grid":  # 0.5 -> stride 1? keep_ratio 0.25 gives one token per 2x2 cell
        red4 = TokenReducer("grid", 0.25, grid=8)
        red4.train()
        _, i4 = red4(x)
        r4, c4 = i4[0] // 8, i4[0] % 8
        assert len(set((r4 % 2).tolist())) == 1 and len(set((c4 % 2).tolist())) == 1
    red.eval()
    assert red(x)[0] is x


def test_reducer_in_eva_tower_with_rope():
    """Masked training through a rope tower (B/16 style) runs and uses fewer tokens."""
    from evaclip_cli.models.specs import ClipSpec, TextSpec, VisionSpec
    from evaclip_cli.models.tokens import install

    spec = ClipSpec(embed_dim=16, vision=VisionSpec(image_size=32, patch_size=8, width=32, depth=1, heads=2,
                                                     mlp_dim=85, qkv_fused=False, rope=True, swiglu=True, subln=True,
                                                     rope_ref_size=4),
                    text=TextSpec(width=16, heads=2, layers=1, context_length=8, vocab_size=100))
    m = build_clip(spec)
    install(m.visual.trunk, "random", 0.5)
    m.train()
    out = m.encode_image(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_launch_args():
    argv = ["train", "--recipe", "tiny", "--nproc", "2", "--dry-run", "--master-port=1234", "optimizer.lr=1e-3"]
    assert strip_launch_args(argv) == ["train", "--recipe", "tiny", "optimizer.lr=1e-3"]
    args = torchrun_args(2, 1, 0, None, 1234, argv)
    assert "--nproc_per_node=2" in args and args[-4:] == ["train", "--recipe", "tiny", "optimizer.lr=1e-3"]
    with pytest.raises(UserError, match="master-addr"):
        torchrun_args(8, 2, 1, None, None, argv)
    script = slurm_script("18b", 45, 8, __import__("pathlib").Path("runs/18b"), ["train", "--recipe", "18b"])
    assert "#SBATCH --nodes=45" in script and "--nproc_per_node=8" in script and "--resume auto" in script
    assert "rdzv_backend=c10d" in script


def test_dry_run_prints_command(capsys):
    from conftest import run_cli

    code, out, err = run_cli(["train", "--recipe", "18b", "--dry-run", "--nproc", "8", "--nodes", "45",
                              "--master-addr", "10.1.2.3"], capsys)
    assert code == 0, err
    assert 'name = "18b"' in out and "torchrun --nproc_per_node=8 --nnodes=45" in out
    assert "global batch 108000" in " ".join(out.split())
    code, out, _ = run_cli(["train", "--recipe", "18b", "--launcher", "slurm", "--dry-run"], capsys)
    assert code == 0 and out.startswith("#!/bin/bash")
    code, out, err = run_cli(["train", "--recipe", "distill-18b", "--dry-run"], capsys)
    assert code == 2 and "evaclip distill" in err


def test_progress_rate_keeps_two_significant_digits_when_slow():
    from evaclip_cli.engine.progress import format_rate

    assert [format_rate(x) for x in (0.11, 0.0042, 5.34, 53.2, 12345.6)] == ["0.11", "0.0042", "5.3", "53", "12,346"]


def test_intra_op_threads_share_the_cpus_among_local_ranks():
    from evaclip_cli.engine.dist import cpu_budget, intra_op_threads

    n = cpu_budget()
    assert intra_op_threads(0, 1, {}) == n
    assert intra_op_threads(0, 2 * n, {}) == 1  # never zero
    assert intra_op_threads(0, 1, {"OMP_NUM_THREADS": "3"}) == 3  # the user's (or torchrun's) setting wins
    assert intra_op_threads(5, 1, {"OMP_NUM_THREADS": "3"}) == 5  # the recipe's compute.threads wins over both


def test_zero3_partitioned_matrices_still_get_weight_decay():
    """Under zero.Init every parameter is a 1-D partition; its real rank is in ds_shape (this once left an 18B run
    without any weight decay)."""
    from evaclip_cli.engine.params import TowerCfg, build_param_groups, no_weight_decay

    w = torch.nn.Parameter(torch.zeros(12))  # a partition of a [4, 6] matrix
    w.ds_shape = torch.Size([4, 6])
    g = torch.nn.Parameter(torch.zeros(3))
    g.ds_shape = torch.Size([6])
    assert not no_weight_decay("visual.trunk.blocks.0.mlp.fc1.weight", w)
    assert no_weight_decay("visual.trunk.blocks.0.norm1.weight", g)
    named = [("visual.trunk.blocks.0.mlp.fc1.weight", w), ("visual.trunk.blocks.0.norm1.weight", g)]
    groups = build_param_groups(named, {"vision": TowerCfg(1e-3, 0.05, 0.9, 1)}, lambda n: ("vision", 1))
    assert {x["name"]: x["weight_decay"] for x in groups} == {"vision.layer1.decay": 0.05,
                                                              "vision.layer1.no_decay": 0.0}
