"""`evaclip embed`: open_clip's own encode_image / encode_text on the same folder, for an image folder, webdataset
shards and a CSV; patch tokens; corrupt images skipped and counted; a SIGKILLed run resumed to the same bytes; two
data-parallel ranks = one process; bad outputs refused before any work."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

EVACLIP = [sys.executable, "-m", "evaclip_cli.cli"]
SLOW_EMBED = [sys.executable, str(Path(__file__).parent / "helpers" / "slow_embed.py")]
N = 13


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same N images (odd sizes, RGB and greyscale, PNG and JPEG) with captions as an image folder (name.txt
    beside name.png), two webdataset shards and a CSV of relative paths."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("embed")
    folder, shards = root / "folder", root / "shards"
    (folder / "sub").mkdir(parents=True)
    shards.mkdir()
    rng = np.random.default_rng(0)
    keys, captions = [], []
    tars = [tarfile.open(shards / f"{s:03d}.tar", "w") for s in range(2)]
    for i in range(N):
        ext = "jpg" if i % 3 == 0 else "png"
        key = f"{'sub/' if i % 4 == 0 else ''}img{i:02d}"
        arr = rng.integers(0, 256, (20 + 3 * i, 45 - 2 * i, 3), dtype=np.uint8)
        im = Image.fromarray(arr) if i % 5 else Image.fromarray(arr[..., 0], mode="L")
        im.save(folder / f"{key}.{ext}")
        caption = f"a picture of thing number {i}" + " and more" * (i % 4)
        (folder / f"{key}.txt").write_text(caption)
        keys.append(f"{key}.{ext}")
        captions.append(caption)
        tar = tars[i * 2 // N]
        for name, payload in ((f"s{i:04d}.{ext}", (folder / f"{key}.{ext}").read_bytes()),
                              (f"s{i:04d}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    table = root / "items.csv"
    table.write_text("filepath,caption\n" + "".join(f"folder/{k},\"{c}\"\n" for k, c in zip(keys, captions)))
    order = sorted(range(N), key=lambda i: keys[i])  # the folder is listed in sorted path order
    return {"root": root, "folder": folder, "shards": shards / "{000..001}.tar", "csv": table,
            "paths": [folder / k for k in keys], "captions": captions, "folder_order": order}


@pytest.fixture(scope="module")
def reference(tiny_clip_folder, data):
    """open_clip's own API on the same folder: unnormalised fp32 image and text embeddings, and the trunk's tokens."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_folder}")
    model.eval()
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p)) for p in data["paths"]])
        img = model.encode_image(x)
        txt = model.encode_text(tokenizer(data["captions"]))
        tokens = model.visual.trunk.forward_features(x)[:, model.visual.trunk.num_prefix_tokens:]
    return {"image": img, "text": txt, "tokens": tokens}


def read_output(out: Path) -> dict:
    """Every shard concatenated in shard order, and the metadata rows."""
    import torch
    from safetensors.torch import load_file

    got = {}
    for folder, name in (("img_emb", "embeddings"), ("text_emb", "embeddings"), ("img_tokens", "tokens")):
        files = sorted((out / folder).glob("*.safetensors"))
        if files:
            got[folder] = torch.cat([load_file(f)[name] for f in files])
    got["meta"] = [json.loads(ln) for f in sorted((out / "metadata").glob("*.jsonl"))
                   for ln in f.read_text().splitlines()]
    return got


def all_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "embed.json"}


@pytest.mark.parametrize("fmt", ["folder", "shards", "csv"])
def test_equal_to_open_clip(tiny_clip_folder, data, reference, fmt, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["embed", data[fmt], "-m", tiny_clip_folder, "-o", out, "--dtype", "fp32", "--no-normalize",
            "--write-batch-size", "5", "--batch-size", "3", "--workers", "0"]
    if fmt == "folder":
        args.append("--tokens")
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    got = read_output(out)
    order = data["folder_order"] if fmt == "folder" else list(range(N))
    assert len(got["meta"]) == N and [m["offset"] for m in got["meta"]] == [k % 5 for k in range(N)]
    assert [m["shard"] for m in got["meta"]] == [k // 5 for k in range(N)]
    assert [m["caption"] for m in got["meta"]] == [data["captions"][i] for i in order]
    if fmt == "shards":
        assert [m["key"] for m in got["meta"]] == [f"s{i:04d}" for i in range(N)] and "tar" in got["meta"][0]
    else:
        assert [Path(m["path"]).resolve() for m in got["meta"]] == [data["paths"][i].resolve() for i in order]
    assert got["img_emb"].dtype.is_floating_point and got["img_emb"].element_size() == 4
    assert (got["img_emb"] - reference["image"][order]).abs().max() <= 1e-5
    assert (got["text_emb"] - reference["text"][order]).abs().max() <= 1e-5
    if fmt == "folder":
        assert got["img_tokens"].shape == reference["tokens"].shape
        assert (got["img_tokens"] - reference["tokens"][order]).abs().max() <= 1e-5
    summary = json.loads((out / "embed.json").read_text())
    assert summary["rows"] == N and summary["skipped"] == 0 and summary["shards"] == 3
    assert f"embedded {N} rows" in stdout


def test_defaults_fp16_normalised_and_image_only(tiny_clip_folder, data, reference, tmp_path, capsys):
    import torch.nn.functional as F

    code, _, err = run_cli(["embed", data["csv"], "-m", tiny_clip_folder, "-o", tmp_path / "a", "--workers", "0"],
                           capsys)
    assert code == 0, err
    got = read_output(tmp_path / "a")
    assert str(got["img_emb"].dtype) == "torch.float16" and len(list((tmp_path / "a" / "img_emb").iterdir())) == 1
    assert (got["img_emb"].float() - F.normalize(reference["image"], dim=-1)).abs().max() <= 2e-3
    assert (got["text_emb"].float() - F.normalize(reference["text"], dim=-1)).abs().max() <= 2e-3
    code, _, err = run_cli(["embed", data["folder"], "-m", tiny_clip_folder, "-o", tmp_path / "b", "--no-text",
                            "--workers", "0"], capsys)
    assert code == 0, err
    assert not (tmp_path / "b" / "text_emb").exists() and (tmp_path / "b" / "img_emb").is_dir()


def test_corrupt_images_skipped_and_counted(tiny_clip_folder, data, reference, tmp_path, capsys):
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(data["folder"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = data["paths"][1].read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    for name in ("broken", "truncated"):
        (folder / f"{name}.txt").write_text("a caption")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["embed", folder, "-m", tiny_clip_folder, "-o", out, "--dtype", "fp32",
                                 "--no-normalize", "--write-batch-size", "4", "--workers", "0"], capsys)
    assert code == 0, err
    summary = json.loads((out / "embed.json").read_text())
    assert summary["rows"] == N and summary["skipped"] == 2 and "2 unreadable or incomplete skipped" in stdout
    got = read_output(out)
    keys = [m["key"] for m in got["meta"]]
    assert "broken.png" not in keys and "truncated.png" not in keys and len(keys) == N
    # images and captions stay aligned: row k of img_emb and text_emb belong to the same item
    assert got["img_emb"].shape[0] == got["text_emb"].shape[0] == N
    order = data["folder_order"]
    assert (got["img_emb"] - reference["image"][order]).abs().max() <= 1e-5
    assert (got["text_emb"] - reference["text"][order]).abs().max() <= 1e-5


@pytest.mark.slow  # three processes of the CLI
def test_resume_after_sigkill_gives_the_same_files(tiny_clip_folder, data, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["embed", str(data["folder"]), "-m", str(tiny_clip_folder), "--write-batch-size", "2", "--batch-size",
            "2", "--workers", "0", "--tokens"]
    r = subprocess.run([*EVACLIP, *args, "-o", str(tmp_path / "ref")], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([*SLOW_EMBED, "0.4", *args, "-o", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def partial() -> set:  # shards with tensor files but no metadata yet
        done = {f.stem[-5:] for f in (out / "metadata").glob("*.jsonl")}
        return {f.stem[-5:] for f in out.rglob("*.safetensors")} - done if len(done) >= 2 else set()

    deadline = time.monotonic() + 300
    while not partial() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # inside a shard: some of its files written, its metadata (the mark) not
    proc.wait()
    assert partial()
    finished = sorted((out / "metadata").glob("*.jsonl"))
    assert 2 <= len(finished) < 7 and not (out / "embed.json").exists()
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")
            if p.is_file() and p.stem[-5:] in {f.stem[-5:] for f in finished}}
    assert len(kept) == 4 * len(finished)
    r = subprocess.run([*EVACLIP, *args, "-o", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(finished)} shard(s) from an earlier run kept" in r.stdout
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in kept.items())  # not redone
    assert all_bytes(out) == all_bytes(tmp_path / "ref")  # same files, same bytes; no temporary left behind


@pytest.mark.slow  # torchrun, two ranks
def test_two_ranks_equal_one_process(tiny_clip_folder, data, tmp_path, capsys):
    import torch

    common = ["-m", tiny_clip_folder, "--write-batch-size", "3", "--workers", "0", "--dtype", "fp32"]
    code, _, err = run_cli(["embed", data["shards"], *common, "-o", tmp_path / "one"], capsys)
    assert code == 0, err
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*EVACLIP, "embed", str(data["shards"]), *map(str, common), "-o", str(tmp_path / "two"),
                        "--nproc", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0: shard" in r.stdout and "rank 1: shard" in r.stdout and f"embedded {N} rows" in r.stdout
    one, two = read_output(tmp_path / "one"), read_output(tmp_path / "two")
    assert one["meta"] == two["meta"]
    for k in ("img_emb", "text_emb"):
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), k


def test_bad_input_and_output_one_line(tiny_clip_folder, data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    base = ["embed", data["csv"], "-m", tiny_clip_folder, "--workers", "0"]
    cases = [
        ([*base, "-o", a_file / "out"], "is a file"),
        ([*base, "-o", a_file], "is a file"),
        ([*base, "-o", other], "not an `evaclip embed` output"),
        (["embed", tmp_path / "nope", "-m", tiny_clip_folder, "-o", tmp_path / "o1"], "input not found"),
        ([*base, "-o", tmp_path / "o2", "--caption-col", "nosuch"], "no column 'nosuch'"),
        ([*base, "-o", tmp_path / "o3", "--no-image", "--no-text"], "nothing to embed"),
        ([*base, "-o", tmp_path / "o4", "--no-image", "--tokens"], "--tokens needs the image tower"),
    ]
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttps://example.com/a.jpg,a cat\n")
    cases.append((["embed", urls, "-m", tiny_clip_folder, "-o", tmp_path / "o6"], "is a URL"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    cases.append((["embed", junk, "-m", tiny_clip_folder, "-o", tmp_path / "o7", "--workers", "0"],
                  "none of the 1 rows could be read"))
    for args, msg in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    code, _, err = run_cli([*base, "-o", tmp_path / "o5", "--write-batch-size", "4"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "-o", tmp_path / "o5", "--write-batch-size", "4", "--dtype", "fp32"], capsys)
    assert code == 2 and "differs in: dtype" in err  # never two outputs mixed in one folder
