"""Operating a long run from the rank's side: a graceful stop (signal or RUN/STOP) loses no step and resumes
exactly, a run's log is readable from a file, the telemetry's TFLOP/s is the estimator's formula, the spike guard
skips and rolls back exactly, and a resume with a changed recipe is refused or applied as a new segment."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runs import EVACLIP, ROOT, metrics, train

HELPERS = Path(__file__).parent / "helpers"
TINY = ["--recipe", "tiny", "data.global_batch=32", "data.micro_batch=32", "data.workers=1", "eval.every_steps=0",
        "logging.log_every=1"]


def _start(env, out, *args, prefix=None):
    cmd = [*(prefix or EVACLIP), "train", "--out", str(out), *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, pattern: str, timeout: float = 300) -> list[str]:
    """Lines of ``proc``'s stdout up to the first one containing ``pattern`` (they arrive while it runs: the plain
    log of a run whose stdout is a pipe is flushed line by line)."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if pattern in line:
            return seen
    raise AssertionError(f"no line with {pattern!r} in: {''.join(seen)[-2000:]}")


def _events(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigusr1_stops_at_a_step_with_its_checkpoint_and_resume_matches(env, tmp_path):
    args = [*TINY, "data.samples=1280", "logging.checkpoint_every=1000"]
    full = tmp_path / "full"
    train(env, full, *args)
    ref = {s["step"]: s["loss"] for s in metrics(full)[0]}
    run = tmp_path / "stopped"
    proc = _start(env, run, *args)
    early = _wait_for_line(proc, "step 5/40")
    assert not any("\x1b[" in ln for ln in early)  # plain lines, not a live view's escape codes
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("evaclip: stopped by SIGUSR1 after step ") and "--resume auto" in last, err[-2000:]
    stopped_at = int(last.split("after step ")[1].split("/")[0])
    assert 5 <= stopped_at < 40
    # no step lost: the checkpoint is of the step the run stopped after, and it is what `latest` names
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{stopped_at}"
    assert max(s["step"] for s in metrics(run)[0]) == stopped_at
    assert [e["kind"] for e in _events(run)][-2:] == ["checkpoint", "stop"]
    train(env, run, *args, "--resume", "auto")
    got = {s["step"]: s["loss"] for s in metrics(run)[0]}
    assert got == ref


@pytest.mark.slow
def test_stop_file_stops_two_ranks_at_the_same_step(env, tmp_path):
    args = [*TINY, "data.samples=2560", "data.global_batch=64", "logging.checkpoint_every=1000"]
    run = tmp_path / "run"
    proc = _start(env, run, *args, "--nproc", "2")
    _wait_for_line(proc, "step 3/40")
    (run / "STOP").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "evaclip: stopped by " in err and "STOP after step " in err, err[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 40 and not (run / "STOP").exists()
    # both ranks wrote their part of that one checkpoint
    assert json.loads((run / "checkpoints" / tag / "evaclip_manifest.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_telemetry_tflops_is_the_estimators_flops_times_throughput(env, tmp_path):
    train(env, tmp_path / "run", *TINY, "data.samples=320")
    rows = metrics(tmp_path / "run")[0]
    est = subprocess.run([*EVACLIP, "estimate", "--recipe", "tiny", *TINY[2:], "data.samples=320", "--gpus", "1",
                          "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert est.returncode == 0, est.stderr
    per_sample = json.loads(est.stdout)["flops"]["model_per_sample"]
    for r in rows:
        assert r["tflops_per_device"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12, rel=1e-9)
        assert "mfu" not in r  # a CPU has no peak
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["step_time_s"] > 0 and r["grad_norm"] > 0
        assert r["mem_peak_gib"] >= r["mem_alloc_gib"] > 0
        assert r["image_tokens_kept"] == json.loads(est.stdout)["tokens"]["image"]
    # MFU where a peak is given (compute.peak_tflops)
    train(env, tmp_path / "mfu", *TINY, "data.samples=64", "compute.peak_tflops=0.5")
    r = metrics(tmp_path / "mfu")[0][-1]
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5, rel=1e-9)


GUARD = ["guard.enabled=true", "guard.sigma=6", "guard.window=10", "guard.min_history=3", "guard.rollback_after=2",
         "guard.rollback_window=10", "logging.checkpoint_every=4", "data.samples=384"]


@pytest.mark.slow
def test_spike_guard_skips_rolls_back_and_equals_a_run_without_those_batches(env, tmp_path):
    # steps 7 and 8 spike (loss x 30): neither is applied; the second rolls back to step 4's checkpoint and the
    # batches of steps 5-8 are skipped
    spiked = tmp_path / "spiked"
    r = subprocess.run([sys.executable, str(HELPERS / "spike_injection.py"), "7,8", "30", "train", "--out",
                        str(spiked), *TINY, *GUARD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    kinds = [(e["kind"], e["step"]) for e in _events(spiked)]
    assert ("guard_skip", 7) in kinds and ("guard_skip", 8) in kinds and ("rollback", 8) in kinds, kinds
    rows = metrics(spiked)[0]
    assert rows[-1]["guard_skipped"] == 2 and rows[-1]["guard_rollbacks"] == 1 and rows[-1]["step"] == 12
    # the reference: the same recipe, the 4 batches after step 4 read and dropped, no spike
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, str(HELPERS / "discard_batches.py"), "4", "4", "train", "--out", str(ref),
                        *TINY, *GUARD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(next((spiked / "final").glob("*.safetensors")))
    b = load_file(next((ref / "final").glob("*.safetensors")))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]


@pytest.mark.slow
def test_resume_with_a_changed_recipe_is_refused_or_a_new_segment(env, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "data.samples=160", "logging.checkpoint_every=2"]
    train(env, run, *args)  # 5 steps of 32
    r = train(env, run, *args, "model.vision.width=128", "--resume", "auto", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("evaclip: error: cannot resume ") and \
        "model.vision.width None -> 128" in r.stderr, r.stderr[-2000:]
    r = train(env, run, *args, "optimizer.lr=0.003", "--resume", "auto", check=False)
    assert r.returncode == 2 and "optimizer.lr" in r.stderr and "--accept-changes" in r.stderr, r.stderr[-2000:]
    # accepted: 160 more samples at a global batch of 64 = 3 more steps, counted as samples seen
    train(env, run, *args[:-1], "data.samples=320", "data.global_batch=64", "logging.log_every=5",
          "--resume", "auto", "--accept-changes")
    rows = metrics(run)[0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 8]
    assert rows[-1]["samples"] == 160 + 3 * 64  # whole batches: 352 >= 320
    assert rows[-1]["segment"] == 2 and rows[0]["segment"] == 1
    assert sorted(p.name for p in (run / "recipe_history").iterdir()) == ["segment1.toml", "segment2.toml"]
    assert "global_batch = 64" in (run / "evaclip_recipe.toml").read_text()


def test_recipe_keys_are_classified_for_resume():
    from evaclip_cli.engine.segments import changed_keys, classify

    old = {"model": {"vision": {"width": 64}}, "data": {"samples": 10, "workers": 2}, "optimizer": {"lr": 1.0},
           "logging": {"log_every": 10}, "eval": {"every_steps": 0}, "deepspeed": {"zero_stage": 0, "grad_clip": 1},
           "seed": 0}
    new = {"model": {"vision": {"width": 128}}, "data": {"samples": 20, "workers": 4}, "optimizer": {"lr": 2.0},
           "logging": {"log_every": 5}, "eval": {"every_steps": 5}, "deepspeed": {"zero_stage": 3, "grad_clip": 2},
           "seed": 1}
    c = classify(changed_keys(old, new))
    assert c.shape == ["deepspeed.zero_stage", "model.vision.width"]
    assert c.schedule == ["data.samples", "deepspeed.grad_clip", "optimizer.lr", "seed"]
    assert c.silent == ["data.workers", "eval.every_steps", "logging.log_every"]


def test_spike_guard_judges_against_the_recent_mean_and_std():
    from types import SimpleNamespace

    from evaclip_cli.engine.guard import SpikeGuard

    g = SpikeGuard(SimpleNamespace(enabled=True, sigma=3.0, window=5, min_history=3, rollback_after=2,
                                   rollback_window=4))
    assert not any(g.judge(s, v) for s, v in enumerate([4.0, 3.9, 4.1, 4.0], start=1))
    assert g.judge(5, 9.0) and not g.wants_rollback()
    assert not g.judge(6, 4.05)
    assert g.judge(7, 9.0) and g.wants_rollback()  # 2 skips within 4 steps
    state = g.state_dict()
    g2 = SpikeGuard(SimpleNamespace(enabled=True, sigma=3.0, window=5, min_history=3, rollback_after=2,
                                    rollback_window=4))
    g2.load_state_dict(state)
    assert g2.threshold() == g.threshold() and g2.skipped == 2
    off = SpikeGuard(SimpleNamespace(enabled=False, sigma=3.0, window=5, min_history=3, rollback_after=2,
                                     rollback_window=4))
    assert not any(off.judge(s, v) for s, v in enumerate([1.0, 1.0, 1.0, 100.0], start=1))
