"""The contrastive batch is the global batch under gradient accumulation (``data.contrastive_batch = "global"``):
accumulating micro batches gives the loss and gradient of one micro batch of the whole size, on ZeRO-0 and
ZeRO-3, on one rank and across ranks; "micro" keeps the cheaper per-micro-batch negatives; the estimate counts the
second forward and the negatives."""
import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import metrics, train

BASE = ["--recipe", "tiny", "data.samples=160", "data.global_batch=32", "data.workers=1", "eval.every_steps=0",
        "logging.log_every=1", "logging.checkpoint_every=0"]


def _curve(out):
    return [(r["loss"], r["grad_norm"], r["logit_scale"]) for r in metrics(out)[0]]


def _weights(out):
    return load_file(next((out / "final").glob("*.safetensors")))


def _assert_same(a, b, tol=1e-5):
    ca, cb = _curve(a), _curve(b)
    assert len(ca) == len(cb) == 5
    for x, y in zip(ca, cb):
        assert x == pytest.approx(y, rel=tol), (ca, cb)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.allclose(wa[k], wb[k], rtol=tol, atol=tol) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_two_accumulated_micro_batches_equal_one_micro_batch_of_the_global_size(env, tmp_path, zero):
    stage = [f"deepspeed.zero_stage={zero}"]
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    train(env, whole, *BASE, *stage, "data.micro_batch=32")
    train(env, accumulated, *BASE, *stage, "data.micro_batch=16")
    _assert_same(whole, accumulated)
    if zero == 0:  # the per-micro-batch loss sees 16 negatives: another loss at the same first weights
        micro = tmp_path / "micro"
        train(env, micro, *BASE, *stage, "data.micro_batch=16", "data.contrastive_batch=micro")
        assert _curve(micro)[0][0] != pytest.approx(_curve(whole)[0][0], rel=1e-3)


@pytest.mark.slow
def test_two_ranks_accumulating_equal_two_ranks_with_the_whole_micro_batch(env, tmp_path):
    args = [*BASE, "data.global_batch=64", "data.samples=320", "deepspeed.zero_stage=3", "--nproc", "2"]
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    train(env, whole, *args, "data.micro_batch=32")
    train(env, accumulated, *args, "data.micro_batch=16")
    _assert_same(whole, accumulated)


def test_estimate_counts_the_global_batch_negatives_and_the_second_forward():
    from evaclip_cli.estimate import estimate
    from evaclip_cli.recipes import load_recipe

    glob = estimate(load_recipe("18b", []).recipe)
    micro = estimate(load_recipe("18b", ["data.contrastive_batch=micro"]).recipe)
    assert glob["batch"]["negatives"] == 108_000 and micro["batch"]["negatives"] == 54_000
    towers = sum(v for k, v in glob["flops"]["forward_per_sample"].items() if k != "loss")
    extra = glob["flops"]["model_per_sample"] - micro["flops"]["model_per_sample"]
    # 4 passes (cache forward, forward, 2x backward) of towers + loss against twice the columns, vs 3 passes
    loss = glob["flops"]["forward_per_sample"]["loss"]
    assert extra == pytest.approx(towers + 4 * loss - 3 * loss / 2, rel=1e-6)
    ck_g = glob["memory"]["activations"]["checkpointed"]["loss_bytes"]
    ck_m = micro["memory"]["activations"]["checkpointed"]["loss_bytes"]
    assert ck_g > 2 * ck_m
