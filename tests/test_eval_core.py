"""The one evaluation core: padded rank slices (every rank runs the same forwards, fillers never counted), the
skip-and-count rule, video prompts checked like image prompts, and training's periodic eval giving exactly the
numbers of `evaclip eval zeroshot` on the exported model."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

EVACLIP = [sys.executable, "-m", "evaclip_cli.cli"]


# ------------------------------------------------------------------------------------------------ a fake set/model
class _Set:
    """n items of one number each; the items in ``bad`` cannot be decoded; label = item % 3."""

    kind, prefetch, unreadable, name, missing = "image", 2, "no readable item", "fake", 0

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def dataset(self):
        import torch

        return [(i, None if i in self.bad else torch.tensor([float(i)])) for i in range(self.n)]

    def label(self, i):
        return i % 3

    def filler(self):
        import torch

        return torch.full((1, 1), -1.0)

    @staticmethod
    def embed(model, x, dtype=None):
        return model.encode_image(x)

    def captions(self, order):
        return [f"item {i}" for i in order], list(range(len(order)))


class _Model:
    """Embeds item i as one-hot(i % 3): a perfect classifier; counts forwards and filler forwards."""

    def __init__(self, collective=False):
        self.forwards, self.fillers, self.collective = 0, 0, collective

    def encode_image(self, x):
        import torch

        if self.collective:  # what a ZeRO-3 forward does: a collective every rank must join
            import torch.distributed as tdist

            t = torch.ones(1)
            tdist.all_reduce(t)
        self.forwards += 1
        self.fillers += int(bool((x < 0).all()))
        return torch.nn.functional.one_hot(x[:, 0].long().clamp(min=0) % 3, 3).float()


def _rt(model, rank, world, batch):
    from evaclip_cli.eval.loops import Runtime
    from evaclip_cli.models.loaded import LoadedClip

    return Runtime(LoadedClip(model=model, tokenize=None, image_size=1, name="fake"), "cpu", rank, world, batch, 0)


def test_rank_slices_are_padded_to_the_same_steps():
    from evaclip_cli.eval.loops import rank_slice

    for n in (0, 1, 5, 10, 11, 64, 65, 449):
        for world in (1, 2, 3, 4, 7):
            for batch in (1, 4, 32):
                slices = [rank_slice(n, r, world, batch) for r in range(world)]
                assert sorted(i for idx, _ in slices for i in idx) == list(range(n))  # each item once
                assert len({steps for _, steps in slices}) == 1  # every rank the same number of steps
                assert all(-(-len(idx) // batch) <= steps for idx, steps in slices)


def test_one_loop_counts_real_items_only():
    """3 ranks on 10 items (4+4+2) in batches of 2, items 2 and 3 (rank 0's whole second batch) unreadable: every
    rank runs 2 forwards, rank 0's empty batch and rank 2's step past its slice on fillers; summed over the ranks
    the counts are those of one process."""
    import torch

    from evaclip_cli.eval.loops import classify

    W = torch.eye(3)
    ds = _Set(10, bad={2, 3})
    single = classify(ds, W, _rt(_Model(), 0, 1, 2))
    assert single["samples"] == 8 and single["skipped"] == 2 and single["acc1"] == 1.0
    models = [_Model() for _ in range(3)]
    parts = [classify(ds, W, _rt(m, r, 3, 2)) for r, m in enumerate(models)]  # no process group: no all-reduce
    assert [m.forwards for m in models] == [2, 2, 2]
    assert [m.fillers for m in models] == [1, 0, 1]
    assert sum(p["samples"] for p in parts) == 8 and sum(p["skipped"] for p in parts) == 2
    # one process never runs a filler
    m = _Model()
    classify(_Set(4, bad={0, 1}), W, _rt(m, 0, 1, 2))
    assert (m.forwards, m.fillers) == (1, 0)


def _lockstep_worker(rank, world, port, q):
    import torch
    import torch.distributed as tdist

    from evaclip_cli.eval.loops import classify

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _Model(collective=True)
        res = classify(_Set(10, bad={2, 3}), torch.eye(3), _rt(m, rank, world, 2))
        q.put((rank, m.forwards, res["samples"], res["skipped"], res["acc1"]))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_ranks_stay_in_lockstep_with_collective_forwards():
    """A model whose every forward is a collective (ZeRO-3's parameter gather): 3 gloo ranks with uneven slices
    and an all-unreadable batch finish (no hang), with the counts of one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_lockstep_worker, args=(r, 3, port, q)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = sorted(q.get(timeout=5) for _ in procs)
    assert [g[1] for g in got] == [2, 2, 2]
    assert all(g[2:] == (8, 2, 1.0) for g in got)  # counts summed over the ranks, on every rank


def test_retrieval_loop_drops_unreadable_items_with_their_captions():
    import torch

    from evaclip_cli.eval.loops import retrieve
    from evaclip_cli.models.loaded import LoadedClip

    class TextModel(_Model):
        def encode_text(self, tokens):
            return torch.nn.functional.one_hot(tokens[:, 0] % 3, 3).float()

    m = TextModel()
    loaded = LoadedClip(model=m, tokenize=lambda texts: torch.tensor([[int(t.split()[1])] for t in texts]),
                        image_size=1, name="fake")
    from evaclip_cli.eval.loops import Runtime

    r = retrieve(_Set(6, bad={4}), Runtime(loaded, "cpu", 0, 1, 4, 0), text_batch_size=2)
    assert (r["samples"], r["captions"], r["skipped"]) == (5, 5, 1)
    assert set(r["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_video_prompts_are_checked_like_image_prompts(tmp_path):
    """`eval video --classnames/--templates`: a missing file, a template without {c}, fewer names than labels are
    one-line errors, found before the model is loaded (the model path here does not exist)."""
    from evaclip_cli.errors import UserError
    from evaclip_cli.eval.runner import run_video

    root = tmp_path / "clips"
    for c in ("jumping", "running"):
        (root / c).mkdir(parents=True)
        (root / c / "v1.avi").write_bytes(b"RIFF not really a video")
    kw = dict(name=None, frames=1, quiet=True)
    with pytest.raises(UserError, match="class-names file not found"):
        run_video("no-model", str(root), classnames=str(tmp_path / "missing.txt"), **kw)
    (tmp_path / "tpl.txt").write_text("a video of people\n")
    with pytest.raises(UserError, match="without the {c} placeholder"):
        run_video("no-model", str(root), templates=str(tmp_path / "tpl.txt"), **kw)
    (tmp_path / "names.txt").write_text("jump\n")
    with pytest.raises(UserError, match="labels go up to 1 but there are 1 class names"):
        run_video("no-model", str(root), classnames=str(tmp_path / "names.txt"), **kw)
    (tmp_path / "names.txt").write_text("jump\nrun\n")
    with pytest.raises(UserError, match="no such file or folder"):  # prompts fine: now the model is loaded
        run_video("no-model", str(root), classnames=str(tmp_path / "names.txt"), **kw)


# ------------------------------------------------------------------------------------------ training = evaclip eval
@pytest.mark.slow
def test_periodic_eval_of_last_step_equals_eval_zeroshot(tmp_path):
    """A tiny run (fp32, 50 steps) on the digits with periodic zero-shot eval on held-out digits (one unreadable
    image among them) and on a retrieval set (CLIP_benchmark wds/, three captions an image): the last eval record in
    metrics.jsonl and `evaclip eval zeroshot|retrieval -m RUN/final -d SET` give the same acc1, acc5, recalls and
    skip count."""
    from helpers.realdata import write_digits, write_digits_benchmark

    d = write_digits(tmp_path / "digits")
    ret = write_digits_benchmark(tmp_path / "bench", n=120, shard_size=60)["wds_ret"]
    zs = d["zeroshot"]
    bad = tmp_path / "digits" / "zeroshot" / "test" / "0_zero" / "zzz_broken.png"
    bad.write_bytes(b"\x89PNG not an image")
    recipe = tmp_path / "digits.toml"
    recipe.write_text(f'extends = "tiny"\n[data]\ndemo = false\ntrain = [{{ shards = "{d["train"]}" }}]\n'
                      f'samples = 3200\n[eval]\nevery_steps = 25\ndatasets = [{{ name = "digits", path = "{zs}" }}, '
                      f'{{ name = "captions", path = "{ret}", task = "retrieval" }}]\n'
                      '[logging]\ncheckpoint_every = 0\ntensorboard = false\n')
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "EVACLIP_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    r = subprocess.run([*EVACLIP, "train", "--recipe", str(recipe), "--out", str(run)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_out = " ".join(r.stdout.split())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [x for x in rows if "digits/acc1" in x]
    assert [x["step"] for x in evals] == [25, 50]
    last = evals[-1]
    r = subprocess.run([*EVACLIP, "eval", "zeroshot", "-m", str(run / "final"), "-d", zs, "-o",
                        str(tmp_path / "ev.json")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = json.loads((tmp_path / "ev.json").read_text())
    print("training eval", last, "\nevaclip eval ", ev["metrics"], ev["samples"], ev["skipped"])
    assert ev["samples"] == d["n_test"] and ev["skipped"] == 1 and last["digits/skipped"] == 1
    assert 0.0 < ev["metrics"]["acc1"] < 1.0  # not a degenerate comparison
    assert abs(last["digits/acc1"] - ev["metrics"]["acc1"]) <= 1e-6
    assert abs(last["digits/acc5"] - ev["metrics"]["acc5"]) <= 1e-6
    assert last["digits/chance"] == pytest.approx(0.1)
    r = subprocess.run([*EVACLIP, "eval", "retrieval", "-m", str(run / "final"), "-d", str(ret), "-o",
                        str(tmp_path / "ret.json")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = json.loads((tmp_path / "ret.json").read_text())
    assert ev["samples"] == 120 and ev["captions"] == 360 and len(ev["metrics"]) == 6
    assert 0.0 < ev["metrics"]["text_retrieval_recall@10"] < 1.0
    for k, v in ev["metrics"].items():
        assert abs(last[f"captions/{k}"] - v) <= 1e-6, k
    assert "captions/image_retrieval_recall@1" in evals[0]  # evaluated periodically too, not only at the end
    from evaclip_cli.eval.report import training_summary

    assert "zero-shot retrieval R@1, captions" in training_summary(run)  # the model card's training table
    assert "captions R@1 text→image" in train_out  # the line `evaclip train` ends with


def test_imagefolder_class_names_classnames_txt_then_shipped_list_then_folder_names(tmp_path):
    """An ImageNet copy's folders are WordNet ids: the shipped names apply when there is one per folder."""
    from PIL import Image

    from evaclip_cli.data.benchmarks import image_folder_set
    from evaclip_cli.eval.prompts import resolve_prompts, shipped_metadata

    def folder(root, names):
        for n in names:
            (root / "test" / n).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "test" / n / "x.jpg")
        return image_folder_set(root)

    cifar = shipped_metadata()["classnames"]["cifar10"]
    es = folder(tmp_path / "cifar10", [f"{i:02d}" for i in range(10)])
    assert resolve_prompts(es, "cifar10")[0] == cifar  # shipped, one per folder
    es = folder(tmp_path / "c3" / "cifar10", ["apple_pie", "b", "c"])
    assert resolve_prompts(es, "cifar10")[0] == ["apple pie", "b", "c"]  # count differs: the folder names
    (tmp_path / "c3" / "cifar10" / "classnames.txt").write_text("x\ny\nz\n")
    assert resolve_prompts(image_folder_set(tmp_path / "c3" / "cifar10"), "cifar10")[0] == ["x", "y", "z"]


def test_live_eval_covers_every_task_with_the_commands_numbers(env, tmp_path):
    """Training's periodic eval (``evaluate_live``) on a zero-shot set, an image-text retrieval set, a video
    classification set and a video-text retrieval manifest gives what `evaclip eval zeroshot|retrieval|video` gives
    on the same model."""
    from pathlib import Path

    import torch

    import evaclip_cli  # noqa: F401
    from evaclip_cli.eval.runner import LiveSet, evaluate_live, run_retrieval, run_video, run_zeroshot
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.loaded import LoadedClip
    from evaclip_cli.models.specs import ARCHS

    from helpers.realdata import write_digits_benchmark

    demo = Path(env["EVACLIP_DEMO_DIR"])
    torch.manual_seed(0)
    spec = ARCHS["tiny"]
    model = build_clip(spec).eval()
    zs = sorted(p for p in (demo / "zeroshot").iterdir() if p.is_dir())[0]
    vcls = sorted(p for p in (demo / "zeroshot_video").iterdir() if p.is_dir())[0]
    ret = write_digits_benchmark(tmp_path, n=60, shard_size=30)["wds_ret"]
    sets = [LiveSet("zs", zs), LiveSet("ret", ret, "retrieval"), LiveSet("vcls", vcls, "video", 1),
            LiveSet("vret", demo / "video_val.csv", "video", 2)]
    live = evaluate_live(model, spec, sets, device="cpu", batch_size=256)
    kw = {"loaded": LoadedClip.live(model, spec), "quiet": True, "workers": 0, "batch_size": 256}
    expected = {"zs": run_zeroshot("live", str(zs), cache=False, **kw)["metrics"],
                "ret": run_retrieval("live", str(ret), **kw)["metrics"],
                "vcls": run_video("live", str(vcls), frames=1, **kw)["metrics"],
                "vret": run_video("live", str(demo / "video_val.csv"), frames=2, **kw)["metrics"]}
    assert len(expected["ret"]) == len(expected["vret"]) == 6
    for name, metrics in expected.items():
        for k, v in metrics.items():
            if k in ("acc1", "acc5") or "recall@" in k:
                assert live[f"{name}/{k}"] == pytest.approx(v, abs=1e-6), (name, k)
    assert live["zs/chance"] > 0 and not any(k.endswith("/skipped") for k in live)
