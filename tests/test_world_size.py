"""Resuming on another number of processes (engine/universal.py): a checkpoint written by N ranks continues on M
through DeepSpeed's universal checkpoint, and the next step equals the N-rank run's own next step.

The comparison needs the same global batch on both world sizes: one shard of 8 samples read in order (resampled
units of that one shard, shuffle_buffer 1), no augmentation (crop scale 1, no flip), and micro batch 16 / world
size, so every global batch is the shard twice whatever the world size. open_clip's ClipLoss gathers the features
with their gradients, so the loss and the gradient of a global batch do not depend on how it is split over ranks;
what is left is fp32 summation order."""
import io
import json
import shutil
import tarfile

import pytest
import torch

from helpers.runs import metrics, train

SHARD_SAMPLES = 8
GLOBAL_BATCH = 2 * SHARD_SAMPLES
LOSS_RTOL = 1e-6  # measured: at most 9e-8 relative (1 -> 2 ranks, ZeRO-3 LAMB); 0 for the others
WEIGHT_ATOL = 1e-5  # measured: at most 2.6e-6 (AdamW on attention key biases, whose true gradient is 0: Adam
#                     normalises their rounding noise); every other case at most 7e-7
MOMENT_RTOL = 1e-5  # Adam/LAMB moments, of each tensor's largest |value|; measured at most 3.2e-6


def _recipe(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(SHARD_SAMPLES):
            buf = io.BytesIO()
            pixels = torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"a photo of thing number {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    recipe = tmp_path / "one.toml"
    recipe.write_text(f'extends = "tiny"\n[data]\ndemo = false\ntrain = [{{ shards = "{shard}" }}]\n')
    return recipe


def _args(recipe, stage, opt, world):
    return ["--recipe", str(recipe), "--nproc", str(world), f"deepspeed.zero_stage={stage}", f"optimizer.name={opt}",
            f"data.samples={3 * GLOBAL_BATCH}", f"data.global_batch={GLOBAL_BATCH}",
            f"data.micro_batch={GLOBAL_BATCH // world}", "data.workers=1", "data.shuffle_buffer=1",
            "data.aug.scale=[1.0,1.0]", "data.aug.hflip=false", "schedule.warmup_steps=1", "logging.log_every=1",
            "logging.checkpoint_every=2", "eval.every_steps=0"]


def _resume_copy(src_run, dst_run, tag="global_step2"):
    """A run folder holding only ``src_run``'s checkpoint ``tag``: resuming it replays the steps after it."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints" / "latest").write_text(tag)


def _weights(run):
    from evaclip_cli.checkpoints.io import load_state_dict

    return load_state_dict(run / "final" / "open_clip_model.safetensors")


def _optimizer_state(tag_dir, out):
    """Every parameter's fp32 weight and moments, the step and the param groups of a checkpoint, whatever its world
    size: read from its universal conversion."""
    from evaclip_cli.engine.universal import convert

    convert(tag_dir, out)
    zero = out / "zero"
    sd = torch.load(zero / "optimizer_state.pt", weights_only=False)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    tensors, steps = {}, set()
    for p in sorted(zero.iterdir()):
        if not p.is_dir():
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            t = torch.load(p / f"{key}.pt", weights_only=False)
            tensors[(p.name, key)] = t["param"] if isinstance(t, dict) else t
        if (p / "step.pt").is_file():
            steps.add(float(torch.load(p / "step.pt", weights_only=False)))
    if not steps:  # ZeRO-3: one step in the common state
        steps = {float(s["step"]) for s in sd["optimizer_state_dict"]["state"].values()}
    return tensors, steps, groups


# ZeRO-3 without zero.Init too: built under zero.Init every parameter is 1-D when the param groups are made, so
# every group is a no-decay one, and the groups DeepSpeed's universal loading overwrites would all look alike
FULL_BUILD = ["deepspeed.zero_init=false"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,opt,before,after,extra", [
    (3, "lamb", 2, 1, []),
    (1, "adamw", 2, 1, []),
    (3, "lamb", 1, 2, FULL_BUILD),
    (3, "adamw", 2, 1, FULL_BUILD),  # ZeRO-3 universal loading shares one AdamW step tensor between sub-groups
    (2, "lamb", 1, 2, []),
    (0, "adamw", 1, 2, []),  # ZeRO-0: the whole optimizer state in one file, loaded as it is
])
def test_resume_on_another_world_size_continues_exactly(env, tmp_path, stage, opt, before, after, extra):
    recipe = _recipe(tmp_path)
    ref = tmp_path / "ref"  # steps 1-3 on `before` ranks, checkpoints after steps 2 and 3
    train(env, ref, *_args(recipe, stage, opt, before), *extra)
    run = tmp_path / "resumed"  # step 3 again, from the step-2 checkpoint, on `after` ranks
    _resume_copy(ref, run)
    r = train(env, run, *_args(recipe, stage, opt, after), *extra, "--resume", "auto")
    converted = run / "checkpoints" / "universal" / "global_step2"
    if stage == 0:
        assert "converting" not in r.stdout and not converted.exists()
    else:
        assert f"written by {before} processes, this run has {after}: converting it" in r.stdout
        assert (converted / "evaclip_manifest.json").is_file()

    ref_loss = {s["step"]: s["loss"] for s in metrics(ref)[0]}
    got_loss = {s["step"]: s["loss"] for s in metrics(run)[0]}
    assert sorted(got_loss) == [3]
    loss_diff = abs(got_loss[3] - ref_loss[3])
    a, b = _weights(ref), _weights(run)
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"ZeRO-{stage} {opt} {before}->{after}: loss {ref_loss[3]:.7f} vs {got_loss[3]:.7f} (diff {loss_diff:.1e}), "
          f"weights max |diff| {weight_diff:.1e}")
    assert loss_diff <= LOSS_RTOL * abs(ref_loss[3])
    assert weight_diff <= WEIGHT_ATOL
    if stage == 0:
        return
    # the optimizer state after the resumed step, against the reference's, both read through universal conversions
    ta, sa, ga = _optimizer_state(ref / "checkpoints" / "global_step3", tmp_path / "u_ref")
    tb, sb, gb = _optimizer_state(run / "checkpoints" / "global_step3", tmp_path / "u_run")
    assert ta.keys() == tb.keys()
    moment_diff = max(((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp(min=1e-30)).item()
                      for k in ta if k[1] != "fp32")
    master_diff = max((ta[k] - tb[k]).abs().max().item() for k in ta if k[1] == "fp32")
    print(f"  fp32 masters max |diff| {master_diff:.1e}, moments max |diff| {moment_diff:.1e} of the tensor's largest")
    assert master_diff <= WEIGHT_ATOL
    assert moment_diff <= MOMENT_RTOL
    assert sa == sb == {3.0}
    assert ga == gb  # every param group its own hyperparameters back
    if stage < 3 or extra == FULL_BUILD:
        assert {g["weight_decay"] for g in gb} == {0.0, 0.05}

    if (stage, opt) == (1, "adamw"):  # a second resume from the same checkpoint reuses the conversion
        shutil.rmtree(run / "checkpoints" / "global_step3")
        shutil.rmtree(run / "final")
        (run / "checkpoints" / "latest").write_text("global_step2")
        r = train(env, run, *_args(recipe, stage, opt, after), *extra, "--resume", "auto")
        assert "loading its universal checkpoint" in r.stdout and "converting" not in r.stdout
        again = _weights(run)
        assert all(torch.equal(b[k], again[k]) for k in b)
        # --resume pointed at the conversion itself, from a new run folder: the same step 3
        other = tmp_path / "from_universal"
        r = train(env, other, *_args(recipe, stage, opt, after), *extra, "--resume", str(converted))
        assert "converting" not in r.stdout and sorted(s["step"] for s in metrics(other)[0]) == [3]
        explicit = _weights(other)
        assert all(torch.equal(b[k], explicit[k]) for k in b)


@pytest.mark.slow
def test_world_size_change_data_streams_and_pruning(env, tmp_path):
    """2 -> 1 on the demo data: rank 0 continues its own stream, old rank 1's stream ends; the conversion goes when
    its source checkpoint is pruned."""
    args = ["--recipe", "tiny", "deepspeed.zero_stage=1", "data.samples=256", "data.global_batch=32",
            "data.micro_batch=16", "data.workers=1", "logging.log_every=1", "logging.checkpoint_every=2",
            "logging.keep_last=1", "eval.every_steps=0"]
    ref = tmp_path / "ref"
    train(env, ref, *args, "--nproc", "2", "data.samples=64")
    run = tmp_path / "run"
    _resume_copy(ref, run)
    # the run is extended (data.samples 64 -> 256): a changed recipe, applied as a new segment
    train(env, run, *args, "--nproc", "1", "--resume", "auto", "--accept-changes")
    ckpts = run / "checkpoints"
    client = torch.load(ckpts / "global_step8" / "mp_rank_00_model_states.pt", weights_only=False,
                        map_location="cpu")
    assert client["world_size"] == 1
    old = torch.load(ref / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False,
                     map_location="cpu")["data_states"]
    new = client["data_states"][0]
    assert set(new["streams"]) == {"0"}  # stream 1 (old rank 1) ended; stream 0 went on from old rank 0's position
    assert new["batches"] == old[0]["batches"] + 2 * 6  # 6 more steps, 2 micro batches each
    assert json.loads((ckpts / "global_step8" / "evaclip_manifest.json").read_text())["world_size"] == 1
    assert not (ckpts / "universal" / "global_step2").exists()  # pruned with global_step2 (keep_last = 1)


def test_rank_states_and_pruning(tmp_path):
    from evaclip_cli.engine import resume, universal

    client = {"data_states": [{"batches": 3}, {"batches": 4}], "rng_states": [{"r": 0}, {"r": 1}]}
    assert universal.rank_states(client, 1) == ({"batches": 4}, {"r": 1})
    assert universal.rank_states(client, 2) == (None, None)  # a new rank: fresh streams, seeded RNG
    assert universal.fresh_seed(0, 2, 10) != universal.fresh_seed(0, 3, 10)
    ckpts = tmp_path / "checkpoints"
    for tag in ("global_step2", "global_step4"):
        (ckpts / tag).mkdir(parents=True)
        (ckpts / "universal" / tag).mkdir(parents=True)
    (ckpts / "universal" / ".global_step6.tmp-nohost-1").mkdir()  # another host's temporary: left alone
    shutil.rmtree(ckpts / "global_step2")
    resume.prune_universal(ckpts)
    assert sorted(p.name for p in (ckpts / "universal").iterdir()) == [".global_step6.tmp-nohost-1", "global_step4"]
    assert [s for s, _ in resume.list_complete(ckpts)] == [4]
    assert universal.loading_config({"a": 1})["checkpoint"] == {"load_universal": True}
