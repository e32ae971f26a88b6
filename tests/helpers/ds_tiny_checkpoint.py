"""Train the tiny CLIP for 2 steps under DeepSpeed at one ZeRO stage and save a checkpoint (launched by torchrun
from tests/test_convert_deepspeed.py).

    python -m torch.distributed.run --nproc_per_node K tests/helpers/ds_tiny_checkpoint.py OUT --stage N [--zero-init]

Writes, in OUT:
  ckpt/                  ``engine.save_checkpoint(OUT/ckpt, tag="global_step2")`` (all ranks)
  evaclip_recipe.toml    a copy of the shipped ``tiny`` recipe, so ``evaclip convert OUT/ckpt`` finds the model
  expected.pt            rank 0: the engine's full fp32 parameters and buffers ({state-dict key: tensor})
  expected_out.pt        rank 0: a fixed batch and the engine module's encode_image / encode_text on it (eval mode)
"""
import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# open_clip / timm before anything enters zero.Init (the dynamo import inside it fails)
import open_clip  # noqa: E402
import timm  # noqa: E402,F401
import torch  # noqa: E402
from torch import nn  # noqa: E402

import evaclip_cli  # noqa: E402,F401
from evaclip_cli.models.clip import build_clip, count_params  # noqa: E402
from evaclip_cli.models.specs import ARCHS  # noqa: E402
from evaclip_cli.recipes import RECIPE_DIR  # noqa: E402

MICRO_BATCH = 4


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # partition every parameter, however small (the interesting case for consolidation)
        zero.update(stage3_param_persistence_threshold=0, reduce_bucket_size=20_000, allgather_bucket_size=20_000,
                    sub_group_size=200_000)
    elif stage in (1, 2):
        zero.update(reduce_bucket_size=20_000, allgather_bucket_size=20_000)
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 5.0,  # DeepSpeed 0.19 defaults it to 1.0: always write it
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                   "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def batch(spec, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, spec.vision.image_size, spec.vision.image_size, generator=g)
    tokens = torch.randint(1, spec.text.vocab_size, (n, spec.text.context_length), generator=g)
    return images, tokens


def full_state(module, stage: int, is_main: bool) -> dict:
    """{state-dict key: full fp32 tensor} on rank 0 (collective at stage 3)."""
    import deepspeed

    keys = list(module.state_dict().keys())
    ctx = deepspeed.zero.GatheredParameters(list(module.parameters())) if stage == 3 else contextlib.nullcontext()
    with ctx:
        if not is_main:
            return {}
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        return {k: tensors[k].detach().clone() for k in keys}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3])
    ap.add_argument("--zero-init", action="store_true", help="build the model under deepspeed.zero.Init (stage 3)")
    args = ap.parse_args()
    if args.zero_init and args.stage != 3:
        ap.error("--zero-init needs --stage 3")
    out = Path(args.out)

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 60-100 s JIT build nobody uses
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    is_main = rank == 0

    spec = ARCHS["tiny"]
    cfg = ds_config(args.stage)
    expected_count = count_params(build_clip(spec, device="meta"))
    torch.manual_seed(0)
    if args.zero_init:
        model = build_clip(spec, zero_init=cfg)
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "zero.Init did not partition the model"
        assert count_params(model) == expected_count, (count_params(model), expected_count)
        assert tuple(model.logit_scale.ds_shape) == (1,), model.logit_scale.ds_shape
    else:
        model = build_clip(spec)
        assert count_params(model) == expected_count
        assert model.logit_scale.ndim == 0  # open_clip's shape; DeepSpeed cannot flatten/partition it
        model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1).clone())

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    loss_fn = open_clip.ClipLoss()  # local (per-rank) contrastive loss
    engine.train()
    losses = []
    for step in range(2):
        images, tokens = batch(spec, MICRO_BATCH, seed=1000 * (step + 1) + rank)
        image_features, text_features, logit_scale = engine(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().item())
    assert engine.global_steps == 2, engine.global_steps
    assert all(torch.isfinite(torch.tensor(losses))), losses

    ckpt = out / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="global_step2")
    if is_main:
        shutil.copyfile(RECIPE_DIR / "tiny.toml", out / "evaclip_recipe.toml")

    module = engine.module
    expected = full_state(module, args.stage, is_main)

    # the engine module's own forward (every rank runs it: ZeRO-3's hooks gather collectively)
    module.eval()
    images, tokens = batch(spec, 3, seed=7)
    with torch.no_grad():
        image_out = module.encode_image(images)
        text_out = module.encode_text(tokens)
    if is_main:
        assert tuple(expected["logit_scale"].shape) == (1,)
        torch.save(expected, out / "expected.pt")
        torch.save({"images": images, "tokens": tokens, "image": image_out.clone(), "text": text_out.clone(),
                    "losses": losses, "world_size": world}, out / "expected_out.pt")
    torch.distributed.barrier()
    print(f"rank {rank}: stage {args.stage}, world {world}, losses {losses}", flush=True)


if __name__ == "__main__":
    main()
