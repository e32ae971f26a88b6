"""`evaclip status RUN` (engine/status.py): a finished tiny run, a run whose lock is held (here, elsewhere, by a
process that died), a folder with no checkpoint yet, --json for scripts, and a folder that is not a run."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from helpers.runs import train

RECIPE = '# resolved recipe\nname = "tiny"\nstage = "train"\n\n[data]\nsamples = 3200\nglobal_batch = 32\n'


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's rows on one line each


def _row(step: int, **extra) -> dict:
    return {"step": step, "loss": 4.0 - step / 100, "lr": 1e-3, "samples_per_s": 64.0, "samples": 32 * step,
            "total_steps": 100, "step_time_s": 0.5, "data_wait_frac": 0.25, "tflops_per_device": 1.5,
            "nonfinite_skipped": 1, "guard_skipped": 2, "guard_rollbacks": 1, **extra}


def _fake_run(tmp_path, rows, events=()):
    """A run folder as a training run leaves it while it trains (no checkpoint yet)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "evaclip_recipe.toml").write_text(RECIPE)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # torn
    if events:
        (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def _status(run, capsys) -> dict:
    code, out, err = run_cli(["status", str(run), "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_a_run_in_progress_with_its_lock_held_here(tmp_path, capsys):
    from evaclip_cli import atomic

    events = [{"time": time.time() - 60, "step": 3, "kind": "error", "message": "an old failure"},
              {"time": time.time() - 30, "step": 4, "kind": "resume", "message": "resumed"}]
    run = _fake_run(tmp_path, [_row(s) for s in range(1, 9)], events)
    with atomic.run_lock(run):
        st = _status(run, capsys)
        assert st["lock"]["pid"] == os.getpid() and st["lock"]["alive"] is True and st["state"] == "running"
        code, out, err = run_cli(["status", str(run)], capsys)
    assert code == 0 and "running" in out and f"pid {os.getpid()}" in out
    assert st["step"] == 8 and st["total_steps"] == 100
    assert st["eta_s"] == pytest.approx(92 * 0.5)
    assert [r["step"] for r in st["last_losses"]] == [4, 5, 6, 7, 8]
    assert st["samples_per_s"] == 64.0 and st["tflops_per_device"] == 1.5 and st["mfu"] is None  # CPU: no MFU
    assert (st["nonfinite_skipped"], st["guard_skipped"], st["guard_rollbacks"]) == (1, 2, 1)
    assert st["last_checkpoint"] is None and "none yet" in out
    assert st["last_error"]["message"] == "an old failure" and "an old failure" in out
    assert _status(run, capsys)["lock"] is None  # released: nobody holds it


def test_a_lock_left_by_a_dead_process_and_one_held_on_another_host(tmp_path, capsys):
    run = _fake_run(tmp_path, [_row(1, mfu=0.41)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from evaclip_cli.atomic import host_label

    (run / ".evaclip.lock").write_text(json.dumps({"pid": dead.pid, "host": host_label(), "since": "then"}))
    st = _status(run, capsys)
    assert st["lock"]["alive"] is False and st["state"] == "not running"
    assert st["mfu"] == pytest.approx(0.41)
    (run / ".evaclip.lock").write_text(json.dumps({"pid": 4242, "host": "gpu-node-17", "since": "then"}))
    st = _status(run, capsys)
    assert st["lock"]["alive"] is None and st["lock"]["note"] == "on gpu-node-17, not checkable from here"
    code, out, err = run_cli(["status", str(run)], capsys)
    assert "on gpu-node-17, not checkable from here" in out and "MFU 41.0%" in out


def test_a_run_folder_before_its_first_logged_step(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "evaclip_recipe.toml").write_text(RECIPE)
    st = _status(run, capsys)
    assert st["step"] is None and st["total_steps"] == 100 and st["last_losses"] == [] and st["lock"] is None
    code, out, err = run_cli(["status", str(run)], capsys)
    assert code == 0 and "none yet" in out


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    for where in (tmp_path, tmp_path / "missing"):
        code, out, err = run_cli(["status", str(where)], capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "run folder" in err or "no such folder" in err


@pytest.mark.slow
def test_a_finished_tiny_run(env, tmp_path, capsys):
    run = tmp_path / "run"
    train(env, run, "--recipe", "tiny", "data.samples=96", "data.global_batch=32", "data.micro_batch=16",
          "logging.log_every=1", "eval.every_steps=0", "data.workers=1")
    st = _status(run, capsys)
    assert st["state"] == "finished" and st["step"] == st["total_steps"] == 3
    assert st["last_checkpoint"]["step"] == 3 and st["last_checkpoint"]["age_s"] < 600
    assert [r["step"] for r in st["last_losses"]] == [1, 2, 3] and st["lock"] is None
    assert st["samples_per_s"] > 0 and st["last_error"] is None
    code, out, err = run_cli(["status", str(run)], capsys)
    assert code == 0 and "finished" in out and "global_step3" in out
