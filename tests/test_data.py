"""Data: the demo dataset, the resumable webdataset pipeline, corrupt-sample handling, text reduction."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from evaclip_cli.data.benchmarks import image_folder_set
from evaclip_cli.data.demo import make_demo
from evaclip_cli.data.text import make_tokenizer
from evaclip_cli.data.wds import build_train_loader, inspect_shards
from evaclip_cli.errors import UserError
from evaclip_cli.recipes import Source


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    make_demo(root, n_train=600, n_val=60, per_class=3)
    return root


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_complete(demo, tmp_path):
    again = tmp_path / "again"
    make_demo(again, n_train=600, n_val=60, per_class=3)
    assert _digest(demo / "train") == _digest(again / "train")
    meta = json.loads((demo / "demo.json").read_text())
    assert meta["train"] == {"samples": 600, "shards": 2}
    other = tmp_path / "other"
    make_demo(other, n_train=600, n_val=60, per_class=3, seed=1)
    assert _digest(demo / "train") != _digest(other / "train")
    # train and held-out splits share no image
    tr = {m.name: 1 for m in tarfile.open(demo / "train" / "shard-00000.tar")}
    with tarfile.open(demo / "train" / "shard-00000.tar") as t:
        train_imgs = {hashlib.md5(t.extractfile(m).read()).hexdigest() for m in t if m.name.endswith(".jpg")}
    with tarfile.open(demo / "val" / "shard-00000.tar") as t:
        val_imgs = {hashlib.md5(t.extractfile(m).read()).hexdigest() for m in t if m.name.endswith(".jpg")}
    assert tr and not (train_imgs & val_imgs)
    es = image_folder_set(demo / "zeroshot" / "shapes")
    assert len(es.classnames) == 8 and len(es.items) == 24 and all("{c}" in t for t in es.templates)
    # second call reuses the data
    assert make_demo(demo, n_train=600, n_val=60, per_class=3)["seconds"] == meta["seconds"]


def _loader(demo, workers=0, state=None, batch=16, resampled=True, rank=0, world=1, shards=None, **kw):
    tok = make_tokenizer(32)
    src = [Source(shards=shards or str(demo / "train" / "shard-{00000..00001}.tar"))]
    return build_train_loader(src, image_size=32, micro_batch=batch, workers=workers, tokenizer=tok, seed=3,
                              rank=rank, world_size=world, resampled=resampled, shuffle_buffer=50,
                              start_state=state, **kw)


def test_batches(demo):
    loader = _loader(demo)
    b = next(iter(loader))
    assert b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["text"].shape == (16, 32) and b["text"].dtype == torch.long
    assert -3 < b["image"].mean() < 3 and b["image"].std() > 0.3  # CLIP-normalised


def test_workers_start_when_iteration_starts(demo):
    """iter(loader) forks the workers at once (the training loop does it before building the model, so no worker
    keeps a copy-on-write image of parameters the optimizer rewrites); nothing is started before."""
    import multiprocessing

    loader = _loader(demo, workers=2)
    before = set(multiprocessing.active_children())
    it = iter(loader)
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2, started
    assert next(it)["image"].shape[0] == 16
    del it


def _take(loader, n):
    out, it = [], iter(loader)
    for _ in range(n):
        b = next(it)
        loader.consumed(b)
        out.append(b)
    return out


@pytest.mark.parametrize("workers,resampled", [(2, True), (2, False), (0, True)])
def test_exact_resume(demo, workers, resampled):
    full = _take(_loader(demo, workers, resampled=resampled), 12)
    first = _loader(demo, workers, resampled=resampled)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = _take(_loader(demo, workers, state=state, resampled=resampled), 7)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def _corrupt_copy(demo, tmp_path):
    """Shard 0 with one undecodable image and one sample missing its caption; shard 1 truncated mid-file."""
    out = tmp_path / "bad"
    out.mkdir()
    with tarfile.open(demo / "train" / "shard-00000.tar") as src, tarfile.open(out / "a.tar", "w") as dst:
        for i, m in enumerate(src):
            data = src.extractfile(m).read()
            if m.name == "tr0000003.jpg":
                data = b"not a jpeg" * 10
            if m.name == "tr0000005.txt":
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    raw = (demo / "train" / "shard-00001.tar").read_bytes()
    (out / "b.tar").write_bytes(raw[: (len(raw) // 3 // 512) * 512 + 100])  # cut inside a 512-byte tar block
    return out


def test_corrupt_samples_are_skipped_and_counted(demo, tmp_path):
    bad = _corrupt_copy(demo, tmp_path)
    loader = _loader(demo, 0, resampled=False, shards=str(bad / "a.tar") + "::" + str(bad / "b.tar"), batch=50)
    batches = _take(loader, 12)  # more than one epoch of the readable part
    assert all(b["image"].shape[0] == 50 for b in batches)
    c = loader.counters()
    assert c["skipped_corrupt"] >= 1 and c["skipped_missing"] >= 1 and c["shard_errors"] >= 1
    rep = inspect_shards(str(bad / "{a,b}.tar"))
    # the truncated shard ends inside a sample: its image without caption counts as a missing part too
    assert rep["corrupt"] == 1 and rep["missing_part"] in (1, 2) and rep["shard_errors"] == 1
    assert rep["samples"] > 300 and len(rep["captions"]) == 5


def test_ranks_read_different_data(demo):
    a = _take(_loader(demo, 0, rank=0, world=2, resampled=False), 3)
    b = _take(_loader(demo, 0, rank=1, world=2, resampled=False), 3)
    assert not any(torch.equal(x["image"], y["image"]) for x in a for y in b)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        _loader(tmp_path, shards=str(tmp_path / "nope-{0..3}.tar"))


@pytest.mark.parametrize("method", ["truncate", "random", "block"])
def test_text_reduction(method):
    import numpy as np

    tok = make_tokenizer(77, method, 8)
    full = make_tokenizer(77)(["a small red circle in the top left corner of a dark picture"])
    out = tok(["a small red circle in the top left corner of a dark picture", "a dog"], np.random.default_rng(0))
    assert out.shape == (2, 8)
    sot, eot = full[0, 0].item(), full[0].max().item()
    assert (out[:, 0] == sot).all() and (out.argmax(dim=1) == torch.tensor([7, 3])).all()
    assert out[0, 7].item() == eot
    words = set(full[0, 1:full[0].argmax()].tolist())
    assert set(out[0, 1:7].tolist()) <= words
    if method == "truncate":
        assert torch.equal(out[0, :7], full[0, :7])


def test_syntax_masking_is_refused_clearly():
    with pytest.raises(UserError, match="syntax"):
        make_tokenizer(77, "syntax", 8)


def test_zeroshot_folder_errors(tmp_path):
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "b").mkdir(parents=True)
    with pytest.raises(UserError, match="empty class"):
        image_folder_set(tmp_path)
    from PIL import Image

    for c in "ab":
        Image.new("RGB", (8, 8)).save(tmp_path / "test" / c / "x.jpg")
    (tmp_path / "classnames.txt").write_text("one\n")
    with pytest.raises(UserError, match="1 class names for 2 class folders"):
        image_folder_set(tmp_path)


def test_sources_mixed_by_weight(demo):
    from evaclip_cli.data.wds import StreamDataset, expand_shards

    a = expand_shards(str(demo / "train" / "shard-{00000..00001}.tar"))
    b = expand_shards(str(demo / "val" / "shard-00000.tar"))
    ds = StreamDataset([(a, 3.0), (b, 1.0)], 32, 8, None, 0, 0, 1, 1, True, 50, (0.9, 1.0), "bicubic", False, None, 0)
    picks = [ds._unit(0, u)[0] for u in range(4000)]
    frac_a = sum(p in a for p in picks) / len(picks)
    assert 0.72 < frac_a < 0.78


def test_data_cli(tmp_path, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["data", "make-demo", tmp_path / "d", "--train", "100", "--val", "20",
                              "--per-class", "2", "--videos", "8", "--video-per-class", "1"], capsys)
    assert code == 0, err
    assert "100 train pairs" in " ".join(out.split()) and "8 train clips" in " ".join(out.split())
    code, out, err = run_cli(["data", "inspect", str(tmp_path / "d" / "train" / "shard-00000.tar"), "--json"], capsys)
    assert code == 0 and json.loads(out)["samples"] == 100
    code, out, err = run_cli(["data", "inspect", str(tmp_path / "nope-{0..1}.tar")], capsys)
    assert code == 0 and "shard_errors" in out  # missing shards are counted, not a crash


def test_inspect_video_shards(tmp_path):
    """`evaclip data inspect` on video-text shards: clips decoded with the training decoder, a damaged one counted."""
    import io
    import random
    import tarfile

    from evaclip_cli.data.demo import VIDEO_FPS, mjpeg_avi, render_video
    from evaclip_cli.data.wds import inspect_shards

    jpegs, caption, _ = render_video(random.Random(0), 32)
    good = mjpeg_avi(jpegs, 32, 32, VIDEO_FPS)
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for key, data in (("a", good), ("b", good[: len(good) // 2])):  # b: cut in half
            for ext, payload in (("avi", data), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    r = inspect_shards(str(tmp_path / "v.tar"))
    assert r["samples"] == 2 and r["usable"] == 1 and r["corrupt"] == 1 and r["missing_part"] == 0
    assert r["image_size"]["max"] == [32, 32]
