"""`evaclip eval zeroshot|retrieval|suite`: CLIP_benchmark's numbers on real data (scikit-learn's digits, written in
the layouts users have), every model source, data-parallel ranks, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

EVACLIP = [sys.executable, "-m", "evaclip_cli.cli"]
TOL = 0.001  # 0.1 point


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny CLIP trained on the digits (so its predictions are not degenerate) and held-out digits in the
    CLIP_benchmark wds/ layouts, an ImageFolder and a Karpathy caption JSON."""
    from helpers.realdata import write_digits, write_digits_benchmark

    root = tmp_path_factory.mktemp("eval")
    d = write_digits(root / "train")
    recipe = root / "digits.toml"
    recipe.write_text(f'extends = "tiny"\n[data]\ndemo = false\ntrain = [{{ shards = "{d["train"]}" }}]\n'
                      'samples = 12800\n[eval]\nevery_steps = 0\n')
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "EVACLIP_CACHE": str(root / "cache")}
    r = subprocess.run([*EVACLIP, "train", "--recipe", str(recipe), "--out", str(root / "run")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = write_digits_benchmark(root / "data", n=400)
    return {"model": root / "run" / "final", "run": root / "run", "env": env, "root": root, **data}


def evaclip(bench, *args, check=True):
    r = subprocess.run([*EVACLIP, *map(str, args)], env=bench["env"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def clip_benchmark(bench, task, dataset_root, out):
    """clip_benchmark 1.6.2's own CLI, in its own process, on the same model folder (fp32: --no_amp)."""
    code = "import sys, evaclip_cli; from clip_benchmark.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "eval", "--model", f"local-dir:{bench['model']}", "--pretrained",
                        "", "--dataset", "wds/digits", "--dataset_root", str(dataset_root), "--task", task,
                        "--no_amp", "--num_workers", "0", "--batch_size", "64", "--recall_k", "1", "5", "10",
                        "--output", str(out)],
                       env=bench["env"], cwd=bench["root"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(Path(out).read_text())["metrics"]


@pytest.mark.slow  # the module's digits CLIP trains first
def test_zeroshot_parity_with_clip_benchmark(bench, tmp_path):
    ref = clip_benchmark(bench, "zeroshot_classification", bench["wds_cls"], tmp_path / "cb.json")
    evaclip(bench, "eval", "zeroshot", "-m", bench["model"], "-d", bench["wds_cls"], "-o", tmp_path / "ev.json")
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["task"] == "zeroshot_classification" and out["samples"] == bench["n"] and out["skipped"] == 0
    print("clip_benchmark", ref, "\nevaclip       ", out["metrics"])
    assert ref["acc1"] > 0.3  # a real model, far above chance (0.1): the comparison means something
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(out["metrics"][k] - ref[k]) <= TOL, (k, out["metrics"][k], ref[k])


@pytest.mark.slow  # the module's digits CLIP trains first
def test_retrieval_parity_with_clip_benchmark(bench, tmp_path):
    ref = clip_benchmark(bench, "zeroshot_retrieval", bench["wds_ret"], tmp_path / "cb.json")
    evaclip(bench, "eval", "retrieval", "-m", bench["model"], "-d", bench["wds_ret"], "-o", tmp_path / "ev.json")
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["captions"] == 3 * bench["n"]
    print("clip_benchmark", ref, "\nevaclip       ", out["metrics"])
    assert set(ref) == set(out["metrics"]) == {f"{s}_retrieval_recall@{k}" for s in ("image", "text")
                                                for k in (1, 5, 10)}
    assert ref["text_retrieval_recall@10"] > 0.05
    for k, v in ref.items():
        assert abs(out["metrics"][k] - v) <= TOL, (k, out["metrics"][k], v)


@pytest.mark.slow  # the module's digits CLIP trains first
def test_layouts_agree_and_two_ranks_match(bench, tmp_path):
    """ImageFolder = wds/ layout; Karpathy JSON = wds/ retrieval; 2 data-parallel ranks = 1 process."""
    evaclip(bench, "eval", "zeroshot", "-m", bench["model"], "-d", bench["wds_cls"], "-o", tmp_path / "a.json")
    evaclip(bench, "eval", "zeroshot", "-m", bench["model"], "-d", bench["folder"], "-o", tmp_path / "b.json",
            "--nproc", "2", "--workers", "0")
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert b["samples"] == a["samples"] == bench["n"]
    for k in a["metrics"]:
        assert abs(a["metrics"][k] - b["metrics"][k]) < 1e-9, k
    evaclip(bench, "eval", "retrieval", "-m", bench["model"], "-d", bench["karpathy"], "-o", tmp_path / "c.json")
    evaclip(bench, "eval", "retrieval", "-m", bench["model"], "-d", bench["wds_ret"], "-o", tmp_path / "d.json",
            "--nproc", "2", "--workers", "0")
    c, d = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "d.json"))
    assert c["metrics"] == pytest.approx(d["metrics"], abs=1e-9)
    # plain webdataset shards with a class field, class names and templates given on the command line
    shards = f"{bench['wds_cls']}/test/{{0..1}}.tar"
    evaclip(bench, "eval", "zeroshot", "-m", bench["model"], "-d", shards, "--classnames",
            bench["wds_cls"] / "classnames.txt", "--templates",
            bench["wds_cls"] / "zeroshot_classification_templates.txt", "-o", tmp_path / "e.json")
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["samples"] == bench["n"] and e["metrics"] == pytest.approx(a["metrics"], abs=1e-9)


@pytest.mark.slow  # the module's digits CLIP trains first
def test_model_sources_agree(bench, tmp_path):
    """The run folder (its DeepSpeed checkpoint consolidated on the fly) and an EVA .pt give the open_clip folder's
    numbers."""
    import shutil

    evaclip(bench, "eval", "zeroshot", "-m", bench["model"], "-d", bench["folder"], "-o", tmp_path / "a.json")
    run = tmp_path / "run"
    shutil.copytree(bench["run"], run, ignore=shutil.ignore_patterns("final"))
    evaclip(bench, "eval", "zeroshot", "-m", run, "-d", bench["folder"], "-o", tmp_path / "b.json")
    evaclip(bench, "convert", bench["model"], tmp_path / "eva.pt", "--to", "eva")
    evaclip(bench, "eval", "zeroshot", "-m", tmp_path / "eva.pt", "--arch", "tiny", "-d", bench["folder"],
            "-o", tmp_path / "c.json")
    evaclip(bench, "eval", "zeroshot", "-m", "tiny", "--pretrained", tmp_path / "eva.pt", "-d", bench["folder"],
            "-o", tmp_path / "d.json")  # a model name with local weights
    a, b, c, d = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json", "c.json", "d.json"))
    assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(c, abs=1e-6) and a == pytest.approx(d, abs=1e-6)


@pytest.mark.slow  # the module's digits CLIP trains first
def test_suite_results_markdown_and_chart(bench, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "mnist").symlink_to(bench["wds_cls"])  # mnist's entry finds the digits
    (root / "flickr30k").symlink_to(bench["wds_ret"])
    r = evaclip(bench, "eval", "suite", "-m", bench["model"], "--root", root, "-s", "eva-clip-27", "-s",
                "eva-clip-retrieval", "--out", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [x["dataset"] for x in res["results"]] == ["mnist", "flickr30k"]
    assert len(res["missing"]) == 26 + 1 and "imagenet1k" in res["missing"] and "mscoco" in res["missing"]
    agg = res["aggregates"]
    assert agg["avg-27 (1 of 27)"] == pytest.approx(res["results"][0]["metrics"]["acc1"])
    recalls = [v for k, v in res["results"][1]["metrics"].items() if "recall@" in k]
    assert agg["retrieval-mean-recall (1 of 2)"] == pytest.approx(sum(recalls) / 6)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| mnist |" in md and "avg-27" in md
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "not found under" in r.stdout


@pytest.mark.slow  # the module's digits CLIP trains first
def test_classifier_cache(bench, tmp_path):
    env = {**bench["env"], "EVACLIP_CACHE": str(tmp_path / "cache")}
    outs = []
    for i in range(2):
        r = subprocess.run([*EVACLIP, "eval", "zeroshot", "-m", str(bench["model"]), "-d", str(bench["folder"]), "-o",
                            str(tmp_path / f"{i}.json")], env=env, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads((tmp_path / f"{i}.json").read_text())["metrics"])
    assert len(list((tmp_path / "cache" / "classifiers").glob("*.pt"))) == 1
    assert outs[0] == outs[1]


@pytest.mark.slow  # the module's digits CLIP trains first
def test_bad_input_one_line(bench, tmp_path, capsys):
    from PIL import Image

    m = bench["model"]
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", tmp_path / "nope"], capsys)
    assert code == 2 and "dataset not found" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(empty / "a" / "x.png")
    (empty / "b").mkdir()
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", empty], capsys)
    assert code == 2 and "empty class folder" in err and str(empty / "b") in err
    (empty / "b" / "y.png").write_bytes(b"not a png")  # unreadable: skipped and counted
    Image.new("RGB", (8, 8), (9, 9, 9)).save(empty / "b" / "z.png")  # (a class with none readable is an error)
    (empty / "classnames.txt").write_text("one\ntwo\nthree\n")
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", empty], capsys)
    assert code == 2 and "3 class names for 2 class folders" in err
    (empty / "classnames.txt").unlink()
    code, out, err = run_cli(["eval", "zeroshot", "-m", m, "-d", empty, "-o", tmp_path / "o.json", "--workers", "0"],
                             capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["samples"] == 2 and res["skipped"] == 1 and "1 unreadable" in err
    code, _, err = run_cli(["eval", "zeroshot", "-m", tmp_path / "missing-model", "-d", empty], capsys)
    assert code == 2 and "no such file or folder" in err
    code, _, err = run_cli(["eval", "suite", "-m", m, "--root", tmp_path / "noroot"], capsys)
    assert code == 2 and "dataset root not found" in err
    code, _, err = run_cli(["eval", "suite", "-m", m, "--root", tmp_path, "-s", "nosuch"], capsys)
    assert code == 2 and "suite 'nosuch' not found" in err


def test_shipped_class_names_and_templates():
    """A benchmark's own names/templates come with the package when the data carries none (ImageNet: 1000 names,
    OpenAI's 80 templates); the data's own and the command line's take precedence."""
    from evaclip_cli.data.benchmarks import EvalSet
    from evaclip_cli.eval.prompts import resolve_prompts, shipped_metadata

    es = EvalSet("wds_imagenet1k", "classification", [], [0, 999])
    names, tpls = resolve_prompts(es, None)
    assert len(names) == 1000 and names[0] == "tench" and len(tpls) == 80 and "{c}" in tpls[0]
    names, tpls = resolve_prompts(EvalSet("x", "classification", [], [0, 1], ["a", "b"], None), "cifar10")
    assert names == ["a", "b"] and tpls == shipped_metadata()["templates"]["cifar10"]
    with pytest.raises(Exception, match="no class names"):
        resolve_prompts(EvalSet("mystery", "classification", [], [0]), None)
    with pytest.raises(Exception, match="labels go up to 5"):
        resolve_prompts(EvalSet("x", "classification", [], [5], ["a", "b"]), None)


def test_suite_27_has_templates_for_every_set():
    from evaclip_cli.eval.prompts import metadata_key, shipped_metadata
    from evaclip_cli.eval.suite import load_suite

    meta = shipped_metadata()
    suite = load_suite("eva-clip-27")
    assert len(suite["datasets"]) == 27
    assert all(metadata_key(d.get("key", d["name"])) in meta["templates"] for d in suite["datasets"])
    named = [d["name"] for d in suite["datasets"] if metadata_key(d.get("key", d["name"])) in meta["classnames"]]
    assert len(named) >= 17 and "imagenet-a" in named and len(meta["classnames"]["imagenet_a"]) == 200
