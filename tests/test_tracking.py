"""Experiment tracking (engine/tracking.py): metrics.jsonl, TensorBoard and Weights & Biases behind one interface.

wandb runs offline (WANDB_MODE=offline) and its run file (RUN/wandb/offline-run-*/run-ID.wandb) is read back
record by record, so the tests check what wandb would sync: the run id, the config, the logged values.
"""
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from evaclip_cli.errors import UserError
from evaclip_cli.recipes import load_recipe

from conftest import ROOT
from helpers.runs import EVACLIP, NAN_AT, metrics

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb not installed (pip install -e '.[dev]' brings it)")


# ------------------------------------------------------------------------------------------- the offline run file
def wandb_records(path: Path) -> list:
    """The protobuf records of a wandb run file (LevelDB log format: 7-byte file header, 32 KiB blocks, each
    record chunk behind a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class WandbRun:
    """What one offline run file holds: id, config, tags, history rows, exit code."""

    def __init__(self, path: Path):
        self.path = path
        recs = wandb_records(path)
        runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        assert runs, f"{path}: no run record"
        self.id = runs[0].run_id
        self.tags = list(runs[0].tags)
        self.config = {_key(i): json.loads(i.value_json) for i in runs[0].config.update}
        self.history = [{_key(i): json.loads(i.value_json) for i in r.history.item}
                        for r in recs if r.WhichOneof("record_type") == "history"]
        exits = [r.exit for r in recs if r.WhichOneof("record_type") == "exit"]
        self.exit_code = exits[-1].exit_code if exits else None

    def media(self, key: str) -> list:
        """The files a media value (table, image) was logged to, in order (wandb stores ``KEY/path`` etc.)."""
        return [self.path.parent / "files" / row[f"{key}/path"] for row in self.history if f"{key}/path" in row]

    def values(self, key: str) -> dict:
        """{step: value} of a logged scalar (the ``step`` metric is the x axis)."""
        return {row["step"]: row[key] for row in self.history if key in row}


def wandb_runs(run_dir: Path) -> list:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return [WandbRun(f) for f in files]


@pytest.fixture
def wandb_env(env, tmp_path):
    """The session's evaclip environment, offline wandb, its config and caches inside the test's folder."""
    e = dict(env)
    home = tmp_path / "wandb_home"
    e.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
             WANDB_DATA_DIR=str(home / "data"), WANDB_SILENT="true")
    e.pop("WANDB_API_KEY", None)
    return e


ARGS = ["--recipe", "tiny", "data.samples=256", "data.global_batch=32", "data.micro_batch=32", "logging.log_every=1",
        "logging.checkpoint_every=4", "eval.every_steps=4", "logging.wandb.enabled=true",
        "logging.wandb.project=evaclip-test", 'logging.wandb.tags=["tiny", "ci"]']


def _run(cmd, env, expect=0):
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ------------------------------------------------------------------------------------------------------ end to end
@needs_wandb
@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_values(wandb_env, tmp_path):
    out = tmp_path / "run"
    _run([*EVACLIP, "train", "--out", str(out), *ARGS], wandb_env)
    (run,) = wandb_runs(out)
    assert (out / "wandb_run_id").read_text().strip() == run.id
    assert run.path.name == f"run-{run.id}.wandb" and run.exit_code == 0
    assert run.tags == ["tiny", "ci"]
    # the resolved recipe is the run config
    assert run.config["optimizer"]["lr"] == load_recipe("tiny").recipe.optimizer.lr
    assert run.config["logging"]["wandb"]["project"] == "evaclip-test"
    assert run.config["data"]["samples"] == 256
    # the same scalars as metrics.jsonl / TensorBoard: train/* per logged step, eval/* per eval
    steps, evals = metrics(out)
    assert run.values("train/loss") == {s["step"]: s["loss"] for s in steps}
    assert run.values("train/lr") == {s["step"]: s["lr"] for s in steps}
    assert sorted(run.values("eval/demo-colors/acc1")) == [4, 8] == [e["step"] for e in evals]
    assert run.values("eval/demo-colors/acc1")[8] == evals[-1]["demo-colors/acc1"]
    # the eval table (every eval so far) and curves.png
    tables = run.media("eval/table")
    assert len(tables) == 2 and all(t.is_file() for t in tables)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "metric", "value"]
    assert [8, "demo-colors/acc1", evals[-1]["demo-colors/acc1"]] in last["data"]
    assert {r[0] for r in last["data"]} == {4, 8}
    curves = run.media("curves")
    assert len(curves) == 1 and curves[0].suffix == ".png" and curves[0].is_file()
    assert (out / "curves.png").is_file() and any((out / "tensorboard").iterdir())


@needs_wandb
@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(wandb_env, tmp_path):
    out = tmp_path / "run"
    # steps 1-4 train (checkpoint at 4), then every loss is non-finite: the run stops (exit 3) ...
    r = _run([*NAN_AT, ",".join(str(i) for i in range(5, 40)), "train", "--out", str(out), *ARGS,
              "logging.max_bad_steps=3"], wandb_env, expect=3)
    assert "non-finite" in r.stderr
    (first,) = wandb_runs(out)
    assert first.exit_code == 1  # marked failed in wandb
    assert sorted(first.values("train/loss")) == [1, 2, 3, 4]
    # ... and `--resume auto` continues it under the same wandb run id
    _run([*EVACLIP, "train", "--out", str(out), *ARGS, "--resume", "auto"], wandb_env)
    runs = wandb_runs(out)
    assert len(runs) == 2 and {r.id for r in runs} == {first.id}
    assert (out / "wandb_run_id").read_text().strip() == first.id
    second = next(r for r in runs if r.path != first.path)
    assert second.exit_code == 0
    steps, _ = metrics(out)
    assert second.values("train/loss") == {s["step"]: s["loss"] for s in steps if s["step"] > 4}
    # the eval table goes on from the resumed run's evals (step 4, kept in metrics.jsonl)
    last = json.loads(second.media("eval/table")[-1].read_text())
    assert {row[0] for row in last["data"]} == {4, 8}


@needs_wandb
def test_fresh_run_in_a_used_folder_starts_a_new_wandb_run(wandb_env, tmp_path, monkeypatch):
    """Only a resume continues the recorded run: a run started again from step 0 (no checkpoint) gets a new id."""
    from evaclip_cli.engine.tracking import WANDB_RUN_ID, WandbSink

    for k in ("WANDB_MODE", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_SILENT"):
        monkeypatch.setenv(k, wandb_env[k])
    recipe = load_recipe("tiny", ["logging.wandb.enabled=true"]).recipe
    out = tmp_path / "run"
    out.mkdir()
    ids = []
    for resuming in (False, True, False):
        sink = WandbSink(recipe, out, resuming=resuming)
        sink.begin(0, [])
        sink.log("train", 1, {"step": 1, "loss": 2.5})
        sink.end(None, ok=True)
        ids.append((out / WANDB_RUN_ID).read_text().strip())
    assert ids[0] == ids[1] != ids[2]


# ------------------------------------------------------------------------------------------------ wandb not there
NO_WANDB = "import sys; sys.modules['wandb'] = None; from evaclip_cli.cli import main; sys.exit(main(sys.argv[1:]))"


def test_missing_wandb_stops_at_start_with_the_install_line(env, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", NO_WANDB, "train", "--out", str(out), "--recipe", "tiny",
                        "logging.wandb.enabled=true"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'evaclip[wandb]'" in lines[0], r.stderr
    assert "model:" not in r.stdout  # stopped before the model was built
    assert not (out / "checkpoints").exists()


def test_check_available(monkeypatch):
    from evaclip_cli.engine.tracking import check_available

    asks = load_recipe("tiny", ["logging.wandb=true"]).recipe  # `logging.wandb = true` is short for enabled
    assert asks.logging.wandb.enabled
    check_available(load_recipe("tiny").recipe)  # wandb off: nothing to check
    if importlib.util.find_spec("wandb") is not None:
        check_available(asks)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"pip install 'evaclip\[wandb\]'"):
        check_available(asks)
    check_available(load_recipe("tiny").recipe)


# ------------------------------------------------------------------------------------------------------ the recipe
def test_recipe_keys():
    r = load_recipe("tiny", ["logging.wandb.enabled=true", "logging.wandb.entity=lab", "logging.wandb.name=r1",
                             'logging.wandb.tags=["a"]', "logging.wandb.mode=offline"]).recipe.logging.wandb
    assert (r.enabled, r.project, r.entity, r.name, r.tags, r.mode) == (True, "evaclip", "lab", "r1", ["a"], "offline")
    assert load_recipe("tiny").recipe.logging.wandb.enabled is False
    with pytest.raises(UserError, match="logging.wandb.mode"):
        load_recipe("tiny", ["logging.wandb.mode=cloud"])
    # open_clip_train's --report-to points at the table
    with pytest.raises(UserError, match="did you mean 'logging.wandb'"):
        load_recipe("tiny", ['logging.report_to=["wandb"]'])


def test_tracking_without_wandb_writes_jsonl_and_tensorboard(tmp_path):
    """The sinks' contract on their own: resume keeps records up to the resumed step, eval and train both land."""
    from evaclip_cli.engine.tracking import open_tracking

    recipe = load_recipe("tiny").recipe
    t = open_tracking(recipe, tmp_path, resuming=False, is_main=True)
    t.begin(0)
    for s in (1, 2, 3):
        t.log("train", s, {"step": s, "loss": 1.0 / s})
    t.log("eval", 2, {"step": 2, "x/acc1": 0.5})
    t.end(None, ok=True)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 2]
    t = open_tracking(recipe, tmp_path, resuming=True, is_main=True)
    t.begin(2)
    assert [r["step"] for r in t.jsonl.kept] == [1, 2, 2]
    t.log("train", 3, {"step": 3, "loss": 0.3})
    t.end(None, ok=False)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2, 3] and rows[-1]["loss"] == 0.3
    assert any((tmp_path / "tensorboard").iterdir())
    assert open_tracking(recipe, tmp_path, resuming=False, is_main=False).sinks == []
    assert not os.path.exists(tmp_path / "wandb_run_id")
