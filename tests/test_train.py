"""evaclip train end to end on CPU: the demo, 2-rank ZeRO-3 + convert, exact resume after kill -9, non-finite
losses, real data (scikit-learn's digits), CLIPA token reduction and initialisation from checkpoints."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, run_cli
from helpers.runs import EVACLIP, NAN_AT, metrics, train


@pytest.mark.slow
def test_two_rank_zero3_lamb_then_convert(env, tmp_path):
    out = tmp_path / "run"
    r = train(env, out, "--recipe", "tiny", "--nproc", "2", "deepspeed.zero_stage=3", "optimizer.name=lamb",
              "data.samples=1280", "data.global_batch=64", "data.micro_batch=16", "logging.log_every=5",
              "logging.checkpoint_every=10")
    assert "demo-colors top-1" in r.stdout
    assert "model: 3,684,225 parameters (partitioned by zero.Init" in r.stdout  # counted from ds_numel
    steps, evals = metrics(out)
    assert [s["step"] for s in steps] == [5, 10, 15, 20] and evals
    assert steps[-1]["loss"] < steps[0]["loss"]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("global_step"))
    assert ckpts == ["global_step10", "global_step20"]
    assert len(list((out / "checkpoints" / "global_step20").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    # the documented command consolidates the 2-rank ZeRO-3 checkpoint into an open_clip folder
    conv = tmp_path / "converted"
    assert run_cli(["convert", out / "checkpoints", conv, "--from", "deepspeed"]) == 0
    import open_clip

    import evaclip_cli  # noqa: F401
    from evaclip_cli.checkpoints.io import load_state_dict

    a = load_state_dict(conv / "open_clip_model.safetensors")
    b = load_state_dict(out / "final" / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["logit_scale"].shape == ()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{conv}")
    assert (out / "curves.png").is_file() and any((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(env, tmp_path):
    args = ["--recipe", "tiny", "data.samples=1280", "data.global_batch=32", "data.micro_batch=16",
            "data.workers=2", "logging.log_every=1", "logging.checkpoint_every=8", "eval.every_steps=0"]
    full = tmp_path / "full"
    train(env, full, *args)
    ref = {s["step"]: s["loss"] for s in metrics(full)[0]}
    assert len(ref) == 40
    # the same run, killed with SIGKILL after step 12 (last checkpoint: step 8), then resumed
    run = tmp_path / "killed"
    proc = subprocess.Popen([*EVACLIP, "train", "--out", str(run), *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.exists() and any(json.loads(ln)["step"] >= 12 for ln in m.read_text().splitlines() if ln.strip()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    done = {s["step"] for s in metrics(run)[0]}
    assert 12 <= max(done) < 40
    train(env, run, *args, "--resume", "auto")
    got = {s["step"]: s["loss"] for s in metrics(run)[0]}
    assert sorted(got) == sorted(ref)
    assert all(got[k] == ref[k] for k in ref), [(k, got[k], ref[k]) for k in ref if got[k] != ref[k]][:5]


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop(env, tmp_path):
    args = ["--recipe", "tiny", "data.samples=640", "data.global_batch=32", "data.micro_batch=32",
            "logging.log_every=5", "eval.every_steps=0"]
    r = subprocess.run([*NAN_AT, "3,7", "train", "--out", str(tmp_path / "skip"), *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps, _ = metrics(tmp_path / "skip")
    assert steps[-1]["step"] == 20 and steps[-1]["nonfinite_skipped"] == 2
    nan_at = ",".join(str(i) for i in range(4, 40))
    r = subprocess.run([*NAN_AT, nan_at, "train", "--out", str(tmp_path / "stop"), *args, "logging.max_bad_steps=5"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("evaclip: stopped at step 4: 5 non-finite losses in a row"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_real_data_digits_zero_shot(env, tmp_path):
    """scikit-learn's handwritten digits with captions from the class names: far above chance (10%)."""
    from helpers.realdata import write_digits

    d = write_digits(tmp_path / "digits")
    recipe = tmp_path / "digits.toml"
    recipe.write_text(f'extends = "tiny"\n[data]\ndemo = false\ntrain = [{{ shards = "{d["train"]}" }}]\n'
                      f'samples = 19200\n[eval]\ndatasets = [{{ name = "digits", path = "{d["zeroshot"]}" }}]\n')
    out = tmp_path / "run"
    train(env, out, "--recipe", str(recipe))
    _, evals = metrics(out)
    acc = evals[-1]["digits/acc1"]
    print(f"digits zero-shot top-1 {acc:.3f} (chance 0.100) on {d['n_test']} held-out images")
    assert acc > 0.35


@pytest.mark.slow
def test_clipa_low_res_then_finetune_with_masking(env, tmp_path):
    """CLIPA-v2 in small: pretrain at 32 px with 8 text tokens, fine-tune at 64 px with random masking from it
    (the position embedding is resampled 2x2 -> 4x4)."""
    pre = tmp_path / "pre"
    train(env, pre, "--recipe", "tiny", "data.samples=640", "tokens.image.method=resize", "tokens.image.image_size=32",
          "tokens.text.method=truncate", "tokens.text.length=8", "eval.every_steps=0")
    cfg = json.loads((pre / "final" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 32
    ft = tmp_path / "ft"
    r = train(env, ft, "--recipe", "tiny", "data.samples=640", f"init.vision={pre / 'final'}",
              f"init.text={pre / 'final'}", "tokens.image.method=random", "tokens.image.keep_ratio=0.5",
              "eval.every_steps=0")
    assert "init visual from" in r.stdout and "init text from" in r.stdout
    assert json.loads((ft / "final" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "image_size"] == 64


@pytest.mark.slow
def test_init_from_mim_student_and_eva_text(env, tmp_path):
    """Vision from a MIM-layout student, text from an EVA-layout .pt; with lr 0 the weights are exactly those."""
    import evaclip_cli  # noqa: F401
    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.checkpoints.io import load_state_dict
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.keymaps import open_clip_to_eva
    from evaclip_cli.recipes import load_recipe

    spec = load_recipe("tiny").recipe.spec()
    torch.manual_seed(5)
    src = build_clip(spec)
    state = src.state_dict()
    mim = {k[len("visual."):]: v for k, v in open_clip_to_eva(state, False).items()
           if k.startswith("visual.") and not k.startswith("visual.head")}
    mim["mask_token"] = torch.zeros(1, 1, spec.vision.width)
    mim["lm_head.weight"] = torch.zeros(8, spec.vision.width)
    torch.save({"model": mim}, tmp_path / "mim.pt")
    write_eva_file(state, spec, tmp_path / "clip.pt")
    out = tmp_path / "run"
    r = train(env, out, "--recipe", "tiny", "data.samples=64", f"init.vision={tmp_path / 'mim.pt'}",
              f"init.text={tmp_path / 'clip.pt'}", "optimizer.lr=0", "eval.every_steps=0")
    assert "skipped by init.skip" in r.stdout
    got = load_state_dict(out / "final" / "open_clip_model.safetensors")
    for k, v in state.items():
        if k.startswith(("visual.trunk.", "text.")):
            assert torch.equal(got[k], v), k
    assert not torch.equal(got["visual.head.proj.weight"], state["visual.head.proj.weight"])  # 'head' skipped


@pytest.mark.parametrize("stage,nproc,extra", [(1, 1, ["model.grad_checkpointing=true"]),
                                               (2, 2, ["optimizer.name=lamb"])])
@pytest.mark.slow
def test_zero_stages_export_and_convert(env, tmp_path, stage, nproc, extra):
    out = tmp_path / "run"
    train(env, out, "--recipe", "tiny", "--nproc", str(nproc), f"deepspeed.zero_stage={stage}",
          "data.samples=256", "data.global_batch=64", "data.micro_batch=32", "eval.every_steps=0", *extra)
    from evaclip_cli.checkpoints.io import load_state_dict

    conv = tmp_path / "converted"
    assert run_cli(["convert", out / "checkpoints" / "global_step4", conv, "--from", "deepspeed"]) == 0
    a = load_state_dict(conv / "open_clip_model.safetensors")
    b = load_state_dict(out / "final" / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_eval_set_stops_the_run_before_the_model_is_built(env, tmp_path):
    """A recipe's eval set (any task) that is not there is one line and exit 2 at start, not a failure at the
    first eval hours into the run; nothing is trained."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "tiny"\n[[eval.datasets]]\nname = "flickr"\npath = "'
                      + str(tmp_path / "flickr.json") + '"\ntask = "retrieval"\n')
    out = tmp_path / "run"
    r = subprocess.run([*EVACLIP, "train", "--recipe", str(recipe), "--out", str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "flickr.json: eval set of eval.datasets 'flickr' not found" in lines[0] and "Traceback" not in r.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
