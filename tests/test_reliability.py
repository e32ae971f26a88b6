"""Faults and bad inputs users meet, each ending in one line with nothing lost (data side)."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaclip_cli.data.images import to_rgb8
from evaclip_cli.data.text import make_tokenizer
from evaclip_cli.data.wds import build_train_loader
from evaclip_cli.errors import UserError
from evaclip_cli.recipes import Source


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb=(200, 40, 40), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar: each sample a dict of extension -> bytes (plus "__key__")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(samples):
            key = s.get("__key__", f"{i:06d}")
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def loader(shards, workers=0, caption="txt", batch=4, **kw):
    src = [Source(shards=str(shards), caption=caption)]
    return build_train_loader(src, image_size=16, micro_batch=batch, workers=workers, tokenizer=make_tokenizer(16),
                              seed=0, resampled=False, shuffle_buffer=10, **kw)


# ------------------------------------------------------------------------------------- image modes -> 8-bit RGB
def test_16bit_and_other_modes_convert_like_the_reference():
    ramp16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    ref16 = np.rint(ramp16 / 257.0).astype(np.uint8)
    # I;16 as a 16-bit PNG decodes (Pillow) and as an in-memory image
    png16 = Image.open(io.BytesIO(_png(Image.fromarray(ramp16))))
    assert png16.mode == "I;16"
    got = np.asarray(to_rgb8(png16))
    assert got.shape == (32, 32, 3) and np.array_equal(got[..., 0], ref16) and np.array_equal(got[..., 2], ref16)
    assert np.asarray(png16.convert("RGB")).mean() > 250  # what plain convert() gives: almost white
    # I: 32-bit ints holding 16-bit values are scaled; 8-bit values are kept
    got = np.asarray(to_rgb8(Image.fromarray(ramp16.astype(np.int32), mode="I")))[..., 1]
    assert np.array_equal(got, ref16)
    small = (np.arange(256, dtype=np.int32).reshape(16, 16))
    assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(small, mode="I")))[..., 0], small.astype(np.uint8))
    # F: [0, 1] floats scaled to 0..255
    f = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(f, mode="F")))[..., 0], np.rint(f * 255).astype(np.uint8))
    # CMYK: Pillow's own conversion
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.array_equal(np.asarray(to_rgb8(cmyk)), np.asarray(cmyk.convert("RGB")))
    # transparency over white: P with a transparent index, LA, RGBA
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((0, 0), 1)
    got = np.asarray(to_rgb8(p))
    assert tuple(got[0, 0]) == (255, 0, 0) and tuple(got[1, 1]) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(to_rgb8(la)).min() == 255
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert np.allclose(np.asarray(to_rgb8(half)).astype(int), 127, atol=1)
    assert to_rgb8(Image.new("L", (3, 3), 7)).mode == "RGB"


def test_16bit_png_trains_as_its_content_and_bad_images_are_counted(tmp_path):
    dark16 = np.full((16, 16), 20000, dtype=np.uint16)  # about 78/255: a mid-dark grey, not white
    samples = [{"png": _png(Image.fromarray(dark16)), "txt": b"a grey square"} for _ in range(4)]
    samples.append({"png": b"\x89PNG broken", "txt": b"broken"})
    shard = write_shard(tmp_path / "s.tar", samples)
    lo = loader(shard, batch=4)
    b = next(iter(lo))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixel = b["image"][0, 0, 8, 8].item() * std[0] + mean[0]
    assert abs(pixel - round(20000 / 257) / 255) < 0.02, pixel


# --------------------------------------------------------------------------------------------- no usable sample
def _json_only(tmp_path, n=40):
    samples = [{"jpg": _jpeg(), "json": json.dumps({"caption": f"red square {i}", "width": 16}).encode()}
               for i in range(n)]
    return write_shard(tmp_path / "json_only.tar", samples)


def test_captions_only_in_json_stop_with_one_line_and_the_recipe_key_reads_them(tmp_path):
    shard = _json_only(tmp_path)
    with pytest.raises(UserError) as e:
        next(iter(loader(shard, max_skipped=20)))
    msg = str(e.value)
    assert "\n" not in msg
    assert "20 samples in a row without a usable one" in msg and "caption in 'txt'" in msg
    assert ".jpg 20" in msg and ".json 20" in msg and 'caption = "json:caption"' in msg
    # what img2dataset users set: the caption inside the .json member
    b = next(iter(loader(shard, caption="json:caption", batch=8)))
    assert b["image"].shape == (8, 3, 16, 16) and b["text"].shape == (8, 16)


def test_every_shard_unreadable_is_one_line_and_a_bad_one_is_named_once(tmp_path, caplog):
    good = write_shard(tmp_path / "good.tar", [{"jpg": _jpeg(), "txt": b"red"} for _ in range(8)])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file\n" * 100)
    with pytest.raises(UserError) as e:
        next(iter(loader(junk)))
    assert "none of the 1 shard(s) yields a sample" in str(e.value) and "\n" not in str(e.value)
    # one good shard, one junk shard, resampled: training goes on, the junk named once, counted every time
    src = [Source(shards=f"{good}::{junk}")]
    lo = build_train_loader(src, image_size=16, micro_batch=4, workers=0, tokenizer=make_tokenizer(16), seed=0,
                            resampled=True, shuffle_buffer=4)
    it = iter(lo)
    with caplog.at_level("WARNING", logger="evaclip.data"):
        for _ in range(30):
            lo.consumed(next(it))
    assert lo.counters()["shard_errors"] >= 3
    named = [r for r in caplog.records if str(junk) in r.getMessage()]
    assert len(named) <= 1 and all("not a tar file" in r.getMessage() for r in named)


WORKER_SCRIPT = """
import sys, time
from evaclip_cli.data.text import make_tokenizer
from evaclip_cli.data.wds import build_train_loader
from evaclip_cli.recipes import Source
lo = build_train_loader([Source(shards=sys.argv[1])], image_size=16, micro_batch=4, workers=1,
                        tokenizer=make_tokenizer(16), seed=0, resampled=True, shuffle_buffer=4,
                        max_skipped=10**12)
print("started", flush=True)
next(iter(lo))
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_worker_spinning_on_unusable_data_exits_when_the_main_process_dies(tmp_path):
    shard = _json_only(tmp_path, n=8)  # no .txt: every sample skipped, the worker spins (no batch ever comes)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(shard)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "started"
    workers = []
    for _ in range(100):
        workers = _children(proc.pid)
        if workers:
            break
        time.sleep(0.1)
    assert workers, "no DataLoader worker started"
    time.sleep(1.0)  # the worker is now looping over skipped samples
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"worker(s) {survivors} outlived the main process by 10 s"


@pytest.mark.slow
def test_train_on_json_captions_stops_with_one_line_then_trains_with_the_caption_key(env, tmp_path):
    from helpers.runs import train

    shard = _json_only(tmp_path, n=64)
    recipe = tmp_path / "json.toml"
    recipe.write_text(f'extends = "tiny"\n[data]\ndemo = false\nsamples = 64\nglobal_batch = 16\nmicro_batch = 16\n'
                      f'workers = 1\nmax_skipped_in_a_row = 50\ntrain = [{{ shards = "{shard}" }}]\n'
                      '[eval]\nevery_steps = 0\n')
    r = train(env, tmp_path / "run1", "--recipe", recipe, check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("evaclip: error: 50 samples in a row without a usable one"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and 'caption = \\"json:caption\\"' not in lines[-1]
    assert 'caption = "json:caption"' in lines[-1]
    source = f'data.train=[{{shards="{shard}", caption="json:caption"}}]'
    r = train(env, tmp_path / "run2", "--recipe", recipe, source, timeout=300)
    assert "done" in r.stdout


# ------------------------------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root: Path, step: int) -> Path:
    import torch

    from evaclip_cli.engine.resume import write_manifest

    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    torch.save({"w": torch.arange(1000)}, d / "mp_rank_00_model_states.pt")
    write_manifest(d)
    (root / "latest").write_text(d.name)
    return d


def test_resume_auto_passes_over_a_truncated_newest_checkpoint(tmp_path):
    from evaclip_cli.engine.resume import damage, find_resume

    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck, 10)
    newest = _fake_checkpoint(ck, 20)
    assert find_resume("auto", ck) == (ck, "global_step20")
    f = newest / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "mp_rank_00_model_states.pt has" in damage(newest)
    said = []
    assert find_resume("auto", ck, log=said.append) == (ck, "global_step10")
    assert len(said) == 1 and "global_step20 is incomplete" in said[0] and "resuming from global_step10" in said[0]
    # without a manifest (older runs) the zip directory of each torch file is checked
    (newest / "evaclip_manifest.json").unlink()
    assert "truncated" in damage(newest)
    # nothing whole left: one line
    old = ck / "global_step10" / "mp_rank_00_model_states.pt"
    old.write_bytes(b"")
    with pytest.raises(UserError, match="every checkpoint is incomplete"):
        find_resume("auto", ck)


def test_zero_byte_checkpoint_and_non_utf8_recipe_are_one_line(tmp_path, capsys):
    from conftest import run_cli

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code = run_cli(["convert", empty, tmp_path / "out", "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "empty.pt: empty file (0 bytes)" in err[0]
    assert not (tmp_path / "out").exists()
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    code = run_cli(["recipes", "show", latin])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "latin.toml: not UTF-8 text (byte 0xe9" in err[0]


def test_override_errors_name_the_command_line_and_extends_names_its_file(tmp_path, capsys):
    from conftest import run_cli

    assert run_cli(["recipes", "show", "tiny", "optimiser.lr=1e-3"]) == 2
    assert capsys.readouterr().err.strip() == \
        "evaclip: error: command line: unknown section 'optimiser'; did you mean 'optimizer'?"
    child = tmp_path / "child.toml"
    child.write_text('extends = "tinyy"\n')
    assert run_cli(["recipes", "show", child]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaclip: error: {child}: extends = \"tinyy\": recipe 'tinyy' not found")


def test_outputs_get_the_users_umask(tmp_path):
    import torch

    from evaclip_cli.checkpoints.folders import write_open_clip_folder
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    old = os.umask(0o027)
    try:
        torch.manual_seed(0)
        write_open_clip_folder(build_clip(ARCHS["tiny"]).state_dict(), ARCHS["tiny"], tmp_path / "f")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "f").iterdir()}
    assert modes == {"open_clip_config.json": 0o640, "open_clip_model.safetensors": 0o640}, modes
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------------------------------- outputs: locks, writes
def test_a_second_run_into_a_locked_folder_stops_with_the_holders_pid_and_host(env, tmp_path):
    from evaclip_cli.atomic import host_label, run_lock

    from helpers.runs import train

    run = tmp_path / "run"
    with run_lock(run):
        r = train(env, run, "--recipe", "tiny", "data.samples=64", check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"evaclip: error: {run} is in use by another evaclip process (pid {os.getpid()} on "
                           f"{host_label()}"), line
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_a_lock_left_to_a_dead_holders_children_is_waited_for(tmp_path, monkeypatch):
    """A killed rank's data workers inherit its run lock and live a few seconds longer: a `--resume auto` started
    at once waits for them instead of refusing; children that never end get their own one line."""
    import subprocess
    import sys
    import time

    from evaclip_cli import atomic

    holder = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from evaclip_cli.atomic import run_lock\n"
              "lock = run_lock(sys.argv[2]).acquire()\n"
              "if os.fork() == 0:\n    os.close(1); os.close(2); time.sleep(float(sys.argv[3])); os._exit(0)\n"
              "print('locked', flush=True); os._exit(0)\n")
    run = tmp_path / "run"
    # the holder ends and is not reaped (a zombie, as a killed rank under a killed launcher is for a while)
    p = subprocess.Popen([sys.executable, "-c", holder, str(Path(__file__).parent.parent), str(run), "2"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    time.sleep(0.3)
    t = time.monotonic()
    with atomic.run_lock(run):  # the holder is gone; its child lets go within 2 s
        waited = time.monotonic() - t
    assert 0.5 < waited < 20, waited
    p.wait()

    monkeypatch.setattr(atomic, "ORPHAN_WAIT_S", 1)
    p = subprocess.run([sys.executable, "-c", holder, str(Path(__file__).parent.parent), str(run), "8"],
                       capture_output=True, text=True, timeout=60)
    with pytest.raises(UserError, match="still locked by processes pid .* started: it has ended") as e:
        atomic.run_lock(run).acquire()
    assert "\n" not in str(e.value)


def test_out_that_is_a_file_is_one_line(env, tmp_path):
    from helpers.runs import train

    f = tmp_path / "afile"
    f.write_text("x")
    r = train(env, f, "--recipe", "tiny", "data.samples=64", check=False, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"evaclip: error: cannot write {f}: {f} is a file, not a folder", r.stderr[-2000:]


def test_convert_lock_and_stale_temporaries_of_killed_converts(tiny_clip_folder, tmp_path, capsys):
    from evaclip_cli.atomic import host_label, output_lock

    from conftest import run_cli

    dst = tmp_path / "out"
    with output_lock(dst):
        assert run_cli(["convert", tiny_clip_folder, dst]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dst} is in use by another evaclip process (pid {os.getpid()}" in err[0]
    # a convert killed mid-write left its temporary folder (a dead PID of this host); the next one removes it
    stale = tmp_path / f".other.tmp-{host_label()}-999999999"
    stale.mkdir()
    (stale / "open_clip_model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".busy.tmp-{host_label()}-{os.getpid()}"  # a running process's: kept
    alive.mkdir()
    assert run_cli(["convert", tiny_clip_folder, dst]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and alive.exists() and (dst / "open_clip_config.json").is_file()
    assert f"removed {stale}" in err and "pid 999999999" in err


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(env, tmp_path):
    from helpers.runs import ROOT, metrics, train

    run = tmp_path / "run"
    args = ["--recipe", "tiny", "data.samples=640", "data.global_batch=32", "data.micro_batch=32",
            "logging.log_every=5", "logging.checkpoint_every=5", "eval.every_steps=0"]
    script = [sys.executable, str(Path(__file__).parent / "helpers" / "enospc_at_save.py"), "2"]
    r = subprocess.run([*script, "train", "--out", str(run), *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"evaclip: error: cannot write {run / 'checkpoints' / 'global_step10'}: no space left")
    assert line.endswith(f"the last complete checkpoint ({run / 'checkpoints' / 'global_step5'}) is intact"), line
    assert "Traceback" not in r.stderr
    r = train(env, run, *args, "--resume", "auto")
    assert "resumed from" in r.stdout and "global_step5" in r.stdout, r.stdout[-2000:]
    assert metrics(run)[0][-1]["step"] == 20


# ------------------------------------------------------------------------------------------------------------ eval
def test_eval_with_no_readable_image_or_a_class_without_one_is_one_line(tiny_clip_folder, tmp_path, capsys):
    from conftest import run_cli

    def make(root, good):
        for c in ("cat", "dog"):
            (root / "test" / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                f = root / "test" / c / f"{i}.jpg"
                if good.get(c):
                    Image.new("RGB", (32, 32), (i * 40, 90, 200)).save(f)
                else:
                    f.write_bytes(b"not a jpeg")
        return root

    none = make(tmp_path / "none", {})
    code = run_cli(["eval", "zeroshot", "-m", tiny_clip_folder, "-d", none, "--workers", "0", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("evaclip: error: none: none of the 6 images could be decoded"), err
    half = make(tmp_path / "half", {"cat": True})
    code = run_cli(["eval", "zeroshot", "-m", tiny_clip_folder, "-d", half, "--workers", "0", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("evaclip: error: half: no readable image in class 'dog'"), err
