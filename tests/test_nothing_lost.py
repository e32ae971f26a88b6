"""Nothing lost, nothing misstated (issue 24): convert never touches its own source, --resume PATH never overwrites
another run, outputs are checked before the work, a full disk is one line, a run that cannot fit is refused."""
import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, args) -> str:
    code, out, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaclip: error:"), (code, out, err)
    return lines[0]


# ------------------------------------------------------------------------------------ convert and its own source
def test_convert_never_writes_into_or_over_its_own_source(tiny_clip_folder, tmp_path, capsys):
    run = tmp_path / "run"
    src = run / "checkpoints"
    shutil.copytree(tiny_clip_folder, src)
    (run / "metrics.jsonl").write_text("{}\n")
    before, run_before = _digest(src), _digest(run)
    alias = tmp_path / "alias"
    alias.symlink_to(src, target_is_directory=True)
    cases = [([src, src], "is the source itself"), ([src, src, "--force"], "is the source itself"),
             ([src, run, "--force"], "contains the source"), ([src, run], "contains the source"),
             ([src, src / "oc"], "is inside the source"), ([src, src / "oc", "--force"], "is inside the source"),
             ([alias, src, "--force"], "is the source itself"), ([src, alias / "oc"], "is inside the source")]
    for args, how in cases:
        line = _one_line(capsys, ["convert", *args])
        assert how in line and "--force" not in line, (args, line)
        assert _digest(src) == before and _digest(run) == run_before, args
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    # an output beside the source is fine, and "pass --force" is offered where --force is safe
    beside = run / "oc"
    beside.mkdir()
    assert "pass --force to replace it" in _one_line(capsys, ["convert", src, beside])
    assert run_cli(["convert", src, beside, "--force"]) == 0
    assert (beside / "open_clip_config.json").is_file() and _digest(src) == before


# ------------------------------------------------------------------------------------------ a genuinely full disk
@contextlib.contextmanager
def mounted(tmp_path: Path, size_mb: int):
    """A small file system of its own at ``tmp_path/mnt``: a tmpfs (we run as root in CI), or else a loop-mounted
    ext2 image; the test is skipped, with the reason, where neither can be mounted. Unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        image = tmp_path / "fs.img"
        made = subprocess.run(["mkfs.ext2", "-q", "-F", str(image), f"{size_mb}M"], capture_output=True)
        if made.returncode or subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                                             capture_output=True).returncode:
            pytest.skip(f"cannot mount a small file system here (tmpfs: {r.stderr.decode().strip()}; a loop mount "
                        "failed too): both need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 24 MB file system of the test's own (see ``mounted``)."""
    with mounted(tmp_path, 24) as mnt:
        yield mnt


def fill(folder: Path, leave: int = 0) -> None:
    """Take every free byte of ``folder``'s file system but ``leave``."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize - leave
    with open(folder / "filler", "wb") as fh:
        try:
            while free > 0:
                n = min(free, 1 << 20)
                fh.write(b"\0" * n)
                free -= n
            fh.flush()
        except OSError:
            pass
    if leave == 0:  # the last partial page of a tmpfs: one byte at a time
        with open(folder / "filler2", "wb", buffering=0) as fh:
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)


# ------------------------------------------------------------------------------------ outputs checked before work
def _image_folder(root: Path) -> Path:
    from PIL import Image

    for c in ("cat", "dog"):
        (root / "test" / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 60, 90 if c == "cat" else 200, 40)).save(root / "test" / c / f"{i}.jpg")
    return root


def test_eval_output_is_checked_before_the_model_loads(tmp_path, capsys):
    data = _image_folder(tmp_path / "pets")
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "results"
    folder.mkdir()
    missing = tmp_path / "no-such-model"  # never reached: the output is checked first
    for cmd in (["eval", "zeroshot", "-d", data], ["eval", "retrieval", "-d", data], ["eval", "video", "-d", data]):
        line = _one_line(capsys, [*cmd, "-m", missing, "--workers", "0", "-o", afile / "r.json"])
        assert line == f"evaclip: error: cannot write {afile / 'r.json'}: {afile} is a file, not a folder", line
        line = _one_line(capsys, [*cmd, "-m", missing, "--workers", "0", "-o", folder])
        assert line.startswith(f"evaclip: error: cannot write {folder}: it is a folder; name a file"), line
    line = _one_line(capsys, ["eval", "suite", "-m", missing, "--root", tmp_path, "--out", afile])
    assert line == f"evaclip: error: cannot write {afile}: {afile} is a file, not a folder", line


def test_eval_whose_output_fills_the_disk_prints_its_results_then_one_line(tiny_clip_folder, full_disk, tmp_path,
                                                                           capsys):
    data = _image_folder(tmp_path / "pets")
    fill(full_disk)
    out = full_disk / "r.json"
    code, stdout, err = run_cli(["eval", "zeroshot", "-m", tiny_clip_folder, "-d", data, "--workers", "0",
                                 "--no-cache", "-o", out], capsys)
    assert code == 2 and "acc1" in stdout and "pets" in stdout, (code, stdout, err)
    assert err.strip().splitlines()[-1] == f"evaclip: error: cannot write {out}: no space left on the device " \
                                           f"holding {out}", err
    assert not out.exists() and not [p for p in full_disk.iterdir() if p.name.startswith(".")]


def test_push_dry_run_folder_is_checked_before_staging_and_never_replaces_the_source(tiny_clip_folder, tmp_path,
                                                                                     capsys):
    src = tmp_path / "model"
    shutil.copytree(tiny_clip_folder, src)
    before = _digest(src)
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line(capsys, ["push", tmp_path / "no-such-model", "--repo", "a/b", "--dry-run", "--out",
                              afile / "staged"])
    assert line == f"evaclip: error: cannot write {afile / 'staged'}: {afile} is a file, not a folder", line
    for out in (src, tmp_path):
        line = _one_line(capsys, ["push", src, "--repo", "a/b", "--dry-run", "--out", out, "--force"])
        assert line.startswith(f"evaclip: error: cannot stage {src} into {out}: the output ") and "--force" not in line
    assert _digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model"]


def test_train_out_under_a_file_names_the_file(env, tmp_path):
    from helpers.runs import train

    afile = tmp_path / "afile"
    afile.write_text("x")
    r = train(env, afile / "run", "--recipe", "tiny", "data.samples=64", check=False, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == \
        [f"evaclip: error: cannot write {afile / 'run'}: {afile} is a file, not a folder"], r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- the memory check
def test_a_run_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    from evaclip_cli.stages import clip

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    run = tmp_path / "run"
    for extra in ([], ["--nproc", "2"]):  # a single process, and the launcher of two (one line, no ranks started)
        line = _one_line(capsys, ["train", "--recipe", "18b", "--out", run, *extra])
        assert line.startswith("evaclip: error: 18b does not fit: a rank of this ") and "GiB of parameters" in line \
            and "even ZeRO-3 at micro batch 1 needs" in line and line.endswith("--skip-memory-check if you know "
                                                                               "better"), line
        assert not run.exists()
    started = []
    monkeypatch.setattr(clip, "run_train", lambda r, **kw: started.append(r.name) or {"step": 0})
    monkeypatch.setattr(clip, "summary_line", lambda result: "")
    assert run_cli(["train", "--recipe", "18b", "--out", run, "--skip-memory-check"]) == 0 and started == ["18b"]


def test_memory_fit_names_what_would_fit():
    from evaclip_cli.estimate import GiB, memory_fit, rank_bytes
    from evaclip_cli.recipes import load_recipe

    tiny = load_recipe("tiny", []).recipe
    assert memory_fit(tiny, 1, 1 * GiB, False, "of RAM") is None  # the demo's recipes fit in far less than a GB
    big = load_recipe("18b", []).recipe
    assert memory_fit(big, 360, 78 * GiB, True, "free on cuda:0") is None  # the paper's setting fits on 80 GB cards
    line = memory_fit(big, 8, 40 * GiB, True, "free on cuda:0")
    assert "a rank of this 8-process run needs about " in line and "data.micro_batch=" in line, line
    one = load_recipe("18b", ["deepspeed.zero_stage=1"]).recipe
    line = memory_fit(one, 64, 60 * GiB, True, "free on cuda:0")
    assert "deepspeed.zero_stage=2 data.micro_batch=" in line, line
    assert "offload_optimizer=true" in memory_fit(one, 8, 20 * GiB, True, "free on cuda:0")
    # on CPU an offload keeps the states on the same machine: it is counted, never suggested
    off = load_recipe("tiny", ["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=true"]).recipe
    on_device = sum(rank_bytes(off, 1, True)) * 1.01
    assert sum(rank_bytes(off, 1, False)) > on_device
    assert memory_fit(off, 1, on_device, True, "free on cuda:0") is None
    assert memory_fit(off, 1, on_device, False, "of RAM") is not None


# ------------------------------------------------------------------------------- --resume PATH into another run
def _ckpts(root: Path, *steps: int) -> Path:
    for s in steps:
        (root / f"global_step{s}").mkdir(parents=True)
    return root


def test_resume_path_into_another_run_is_refused_and_elsewhere_or_own_is_allowed(tmp_path):
    from evaclip_cli.engine.resume import find_resume
    from evaclip_cli.errors import UserError

    src = _ckpts(tmp_path / "a" / "checkpoints", 10, 20)
    busy = _ckpts(tmp_path / "b" / "checkpoints", 30, 40)
    for spec in (src / "global_step20", src, tmp_path / "a"):
        with pytest.raises(UserError, match=r"already holds checkpoints of another run \(up to step 40\)") as e:
            find_resume(str(spec), busy)
        assert "\n" not in str(e.value) and "choose a new or empty --out" in str(e.value)
    finished = tmp_path / "c"
    (finished / "final").mkdir(parents=True)
    with pytest.raises(UserError, match=r"already holds a finished run \(final/\)"):
        find_resume(str(src / "global_step10"), finished / "checkpoints")
    # a new or empty --out, and the run's own checkpoints (an earlier step; through a symlink too)
    assert find_resume(str(src / "global_step10"), tmp_path / "new" / "checkpoints") == (src, "global_step10")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert find_resume(str(src), tmp_path / "empty" / "checkpoints") == (src, "global_step20")
    assert find_resume(str(busy / "global_step30"), busy) == (busy, "global_step30")
    (tmp_path / "link").symlink_to(tmp_path / "b", target_is_directory=True)
    assert find_resume(str(tmp_path / "link" / "checkpoints" / "global_step30"), busy)[1] == "global_step30"


@pytest.mark.slow
def test_resume_of_another_runs_checkpoint_never_touches_a_finished_run(env, tmp_path):
    from helpers.runs import train

    args = ["--recipe", "tiny", "data.samples=320", "data.global_batch=32", "data.micro_batch=32",
            "logging.checkpoint_every=5", "eval.every_steps=0"]
    a = tmp_path / "a"
    train(env, a, *args)
    other = tmp_path / "other"
    shutil.copytree(a / "checkpoints", other)
    before = _digest(a)
    before.pop("events.jsonl", None)  # the event log records the refusal: everything else is untouched
    r = train(env, a, *args, "--resume", other / "global_step5", check=False, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"evaclip: error: --resume {other / 'global_step5'}: {a} already holds checkpoints of another run (up to "
        f"step 10), which resuming another checkpoint there would replace; choose a new or empty --out, or --resume "
        f"auto to continue {a}'s own run"], r.stderr[-3000:]
    assert {k: v for k, v in _digest(a).items() if k != "events.jsonl"} == before


# ---------------------------------------------------------------------------------- every write failure: one line
@pytest.mark.slow
def test_a_checkpoint_that_fills_the_disk_is_one_line_and_latest_stays_intact(env, tmp_path):
    """A real full file system (70 MB; a tiny checkpoint is 44 MB): torch's C++ zip writer inside DeepSpeed fails
    ('unexpected pos', a RuntimeError); the run ends in the one line with exit 2, nothing partial left."""
    from evaclip_cli.engine.resume import damage, read_client_state

    from helpers.runs import train

    with mounted(tmp_path, 70) as mnt:
        run = mnt / "run"
        r = train(env, run, "--recipe", "tiny", "data.samples=320", "data.global_batch=32", "data.micro_batch=32",
                  "logging.checkpoint_every=5", "eval.every_steps=0", check=False, timeout=600)
        ck = run / "checkpoints"
        assert r.returncode == 2 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"evaclip: error: cannot write {ck / 'global_step10'}: no space left on the device holding {ck}; the "
            f"last complete checkpoint ({ck / 'global_step5'}) is intact"), r.stderr[-3000:]
        assert (ck / "latest").read_text() == "global_step5" and damage(ck / "global_step5") is None
        assert read_client_state(ck / "global_step5")["step"] == 5
        assert sorted(p.name for p in ck.iterdir()) == ["global_step5", "latest"]  # the partial one removed


def test_metrics_and_tensorboard_on_a_full_disk_are_one_line(full_disk):
    from evaclip_cli.engine.tracking import JsonlSink, TensorBoardSink, Tracking
    from evaclip_cli.errors import UserError

    run = full_disk / "run"
    (run / "checkpoints" / "global_step5").mkdir(parents=True)
    (run / "checkpoints" / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    jsonl = JsonlSink(run / "metrics.jsonl")
    for sinks, name in (([jsonl], "metrics.jsonl"), ([TensorBoardSink(run / "tensorboard")], "tensorboard")):
        track = Tracking(sinks, jsonl if sinks[0] is jsonl else None, run)
        track.begin(0)
        fill(full_disk)
        with pytest.raises(UserError) as e:
            for step in range(1, 100_000):
                track.log("train", step, {"step": step, "loss": 1.0, "lr": 1e-3, "note": "x" * 200})
            track.end(None, ok=True)
        line = str(e.value)
        assert line.startswith(f"cannot write {run / name}") and "no space left on the device" in line and \
            line.endswith(f"the last complete checkpoint ({run / 'checkpoints' / 'global_step5'}) is intact"), line
        track.end(None, ok=False)
        for f in ("filler", "filler2"):
            (full_disk / f).unlink(missing_ok=True)


def test_a_pt_export_that_fills_the_disk_is_one_line(tiny_clip_folder, full_disk, capsys):
    """convert --to eva writes through torch's C++ zip writer too: a full disk is 'cannot write', not internal."""
    fill(full_disk, leave=2 << 20)  # room for the start of the file, not for the tensors
    out = full_disk / "model.pt"
    line = _one_line(capsys, ["convert", tiny_clip_folder, out, "--to", "eva"])
    assert line == f"evaclip: error: cannot write {out}: no space left on the device holding {out}", line
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_commands_that_start_on_a_full_disk_are_one_line_and_leave_no_lock(env, full_disk, capsys):
    from helpers.runs import train

    fill(full_disk)
    run = full_disk / "run"
    r = train(env, run, "--recipe", "tiny", "data.samples=64", check=False, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"evaclip: error: cannot write {run}: no space left on the device holding {run}"], r.stderr[-2000:]
    assert not (run / ".evaclip.lock").exists()
    demo = full_disk / "demo"
    line = _one_line(capsys, ["data", "make-demo", demo, "--train", "64", "--val", "16", "--videos", "0"])
    assert line == f"evaclip: error: cannot write {demo}: no space left on the device holding {demo}", line


def test_a_write_failure_no_writer_named_is_still_one_line():
    import errno

    from evaclip_cli.cli.app import _write_failure_line

    assert _write_failure_line(OSError(errno.ENOSPC, "No space left on device", "/x/f")) == \
        "evaclip: error: cannot write /x/f: no space left on the device holding /x/f"
    assert _write_failure_line(OSError(errno.EDQUOT, "Disk quota exceeded")).startswith(
        "evaclip: error: a write failed: disk quota exceeded")
    assert _write_failure_line(OSError(errno.ENOENT, "No such file or directory", "/x")) is None  # internal
