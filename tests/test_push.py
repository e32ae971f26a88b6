"""evaclip push: against a real HTTP server on loopback that speaks the Hub's API (tests/helpers/hub_server.py), with
huggingface_hub pointed at it (HF_ENDPOINT, HF_HUB_DISABLE_XET=1), the way a user runs it: `evaclip push` in a
subprocess. The uploaded bytes equal the local files, one commit, open_clip loads the repo back."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from helpers.hub_server import HubServer

BIN = Path(sys.executable).parent
EVACLIP = str(BIN / "evaclip")
RESULTS = {
    "model": "tiny", "suite": "demo",
    "results": [
        {"dataset": "demo-digits", "model": "tiny", "task": "zeroshot_classification",
         "metrics": {"acc1": 0.625, "acc5": 0.9375, "mean_per_class_recall": 0.61}, "samples": 64, "skipped": 0,
         "language": "en"},
        {"dataset": "demo-captions", "model": "tiny", "task": "zeroshot_retrieval",
         "metrics": {f"{s}_retrieval_recall@{k}": v for s in ("image", "text")
                     for k, v in ((1, .25), (5, .5), (10, .75))},
         "samples": 32, "skipped": 1, "language": "en"},
    ],
    "missing": ["imagenet1k"],
    "aggregates": {"mean_acc1": 0.625},
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tiny_folder(tiny_clip_folder):
    """A real tiny EVA-CLIP as an open_clip folder (written by evaclip's converter)."""
    return tiny_clip_folder


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def run_push(args, hub=None, tmp_path=None, token="hub", extra_env=None, cwd=None):
    """`evaclip push ...` as a user runs it; asserts the token never shows up in what it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", EVACLIP_HUB_BACKOFF_S="0.05",
               HF_HOME=str(tmp_path / "hf_home"))
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = hub.token if token == "hub" else token
    env.update(extra_env or {})
    res = subprocess.run([EVACLIP, "push", *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=cwd or tmp_path, timeout=300)
    if token:
        secret = env["HF_TOKEN"]
        assert secret not in res.stdout and secret not in res.stderr, "the token was printed"
    return res


def load_back(hub, tmp_path, repo_id):
    """open_clip loads hf-hub:REPO from the server (after `import evaclip_cli`); returns its state dict's digest
    per tensor and the tokenizer's output shape."""
    code = textwrap.dedent(f"""
        import json, hashlib
        import evaclip_cli, open_clip, torch
        model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")
        tok = open_clip.get_tokenizer("hf-hub:{repo_id}")
        out = {{k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
                for k, v in model.state_dict().items()}}
        print(json.dumps({{"state": out, "tokens": list(tok(["a photo of a cat"]).shape)}}))
    """)
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_load"),
               HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Could not find/download default weights" not in res.stderr, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def folder_digests(folder: Path) -> dict:
    """Same digests as load_back, from a local open_clip folder (sharded or not)."""
    import torch  # noqa: F401
    from safetensors.torch import load_file

    from evaclip_cli.models.openclip_compat import INDEX_NAME, WEIGHTS_NAME, load_sharded_safetensors

    state = load_file(str(folder / WEIGHTS_NAME)) if (folder / WEIGHTS_NAME).is_file() else \
        load_sharded_safetensors(folder / INDEX_NAME)
    return {k: sha256(v.float().contiguous().numpy().tobytes()) for k, v in state.items()}


def card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def one_error_line(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("evaclip: error: ") and "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ uploads
def test_push_uploads_exact_bytes_in_one_commit_and_loads_back(tiny_folder, hub, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    res = run_push([tiny_folder, "--repo", "tester/tiny-clip", "--results", results, "-m", "Add tiny EVA-CLIP"],
                   hub, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "in one commit" in res.stdout
    history = hub.history("tester/tiny-clip")
    assert [c.title for c in history] == ["Add tiny EVA-CLIP", "initial commit"]  # create_repo's + ours: one commit
    files = hub.files("tester/tiny-clip")
    assert set(files) == {".gitattributes", "README.md", "open_clip_config.json", "open_clip_model.safetensors"}
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        assert sha256(files[name]) == sha256((tiny_folder / name).read_bytes()), name
    entry = hub.repos["tester/tiny-clip"].commits[history[0].oid].files["open_clip_model.safetensors"]
    assert entry.lfs, "weights must travel through the LFS batch API"
    assert any(r["method"] == "PUT" and r["path"].startswith("/lfs/upload/") for r in hub.requests)
    writes = [r for r in hub.requests if r["method"] == "POST" and r["path"] != "/api/validate-yaml"]
    assert all(r["authorization"] == f"Bearer {hub.token}" for r in writes)
    # the card: metadata, usage, the eval table
    card = files["README.md"].decode()
    meta = card_meta(card)
    assert meta["library_name"] == "open_clip" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert {"clip", "eva-clip", "open_clip", "zero-shot-image-classification"} <= set(meta["tags"])
    assert 'create_model_and_transforms("hf-hub:tester/tiny-clip")' in card and "evaclip" in card
    assert "| demo-digits | 62.50 | 93.75 | 61.00 | 64 |" in card
    assert "imagenet1k" in card and "mean_acc1" in card
    # open_clip loads the uploaded repo back: same tensors as the local folder
    loaded = load_back(hub, tmp_path, "tester/tiny-clip")
    assert loaded["state"] == folder_digests(tiny_folder)
    assert loaded["tokens"] == [1, 32]  # the tiny text tower's context length


@pytest.mark.slow
def test_sharded_conversion_push_equals_dry_run_and_loads_back(tiny_folder, hub, tmp_path):
    """An EVA .pt converted on the way, sharded at a small limit; --dry-run writes exactly what is uploaded."""
    from safetensors.torch import load_file

    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.models.specs import ARCHS

    write_eva_file(load_file(str(tiny_folder / "open_clip_model.safetensors")), ARCHS["tiny"], tmp_path / "tiny.pt")
    args = [tmp_path / "tiny.pt", "--repo", "evaclip-org/tiny-sharded", "--model", "tiny", "--max-shard-size", "2MB"]
    dry = run_push([*args, "--dry-run", "--out", tmp_path / "staged"], None, tmp_path, token=None)
    assert dry.returncode == 0, dry.stderr
    staged = {p.name: p.read_bytes() for p in (tmp_path / "staged").iterdir()}
    index = json.loads(staged["open_clip_model.safetensors.index.json"])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and set(shards) <= set(staged)
    assert "open_clip_model.safetensors" not in staged
    for name, data in staged.items():  # the listing names every file with its sha256
        assert name in dry.stdout and sha256(data) in dry.stdout
    res = run_push(args, hub, tmp_path)
    assert res.returncode == 0, res.stderr
    uploaded = hub.files("evaclip-org/tiny-sharded")
    assert set(uploaded) == set(staged) | {".gitattributes"}
    assert {n: sha256(d) for n, d in uploaded.items() if n != ".gitattributes"} == \
        {n: sha256(d) for n, d in staged.items()}
    assert len(hub.history("evaclip-org/tiny-sharded")) == 2
    loaded = load_back(hub, tmp_path, "evaclip-org/tiny-sharded")  # shards + index, through hf-hub:
    assert loaded["state"] == folder_digests(tiny_folder)


def test_dry_run_writes_and_lists_folder_without_token_or_network(tiny_folder, tmp_path):
    res = run_push([tiny_folder, "--repo", "someone/tiny", "--dry-run", "--license", "apache-2.0",
                    "--dataset", "laion/laion2B-en"], None, tmp_path, token=None,
                   extra_env={"HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there: no request is made
    assert res.returncode == 0, res.stderr
    out = tmp_path / "tiny-push"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        assert (out / name).read_bytes() == (tiny_folder / name).read_bytes()
        assert sha256((out / name).read_bytes()) in res.stdout
    meta = card_meta((out / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["laion/laion2B-en"]
    assert "dry run" in res.stdout and "nothing uploaded" in res.stdout
    again = run_push([tiny_folder, "--repo", "someone/tiny", "--dry-run"], None, tmp_path, token=None)
    one_error_line(again, "exists", "--force")


def test_run_folder_card_has_training_summary(tiny_folder, tmp_path):
    import shutil

    run = tmp_path / "runs" / "big"
    shutil.copytree(tiny_folder, run / "final")
    (run / "evaclip_recipe.toml").write_text(textwrap.dedent("""
        name = "big"
        description = "a test run"
        stage = "train"
        [model]
        arch = "tiny"
        [data]
        train = [{ shards = "/data/laion2b-merged/{00000..00009}.tar", weight = 1.0 }]
        global_batch = 64
        [optimizer]
        name = "lamb"
        lr = 0.0004
        weight_decay = 0.05
        [schedule]
        kind = "cosine"
        warmup_steps = 20
        [deepspeed]
        zero_stage = 3
        precision = "bf16"
    """))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 2.5, "samples": 640, "lr": 1e-4}) + "\n"
        + json.dumps({"step": 20, "loss": 1.25, "samples": 1280, "lr": 1e-4}) + "\n"
        + json.dumps({"step": 20, "demo-digits/acc1": 0.5, "demo-digits/chance": 0.1}) + "\n"
        + '{"step": 21, "loss": 1.0')  # a torn last line (run killed mid-write) is skipped
    res = run_push([run, "--repo", "someone/big", "--dry-run"], None, tmp_path, token=None)
    assert res.returncode == 0, res.stderr
    card = (tmp_path / "big-push" / "README.md").read_text()
    assert card_meta(card)["datasets"] == ["laion/laion2B-en"]
    assert "## Training" in card
    for needle in ("| steps | 20 |", "| samples seen | 1,280 |", "| final loss | 1.2500 |", "ZeRO-3, bf16",
                   "lamb, lr 0.0004", "50.0% at step 20 (chance 10.0%)", "`laion2b-merged/{00000..00009}.tar`"):
        assert needle in card, needle
    assert (tmp_path / "big-push" / "open_clip_model.safetensors").read_bytes() == \
        (run / "final" / "open_clip_model.safetensors").read_bytes()


@pytest.mark.slow
def test_interrupted_run_converted_from_deepspeed_checkpoint(hub, tmp_path):
    """A run folder with checkpoints/ but no final/ (stopped early): consolidated on the way, the run's recipe and
    metrics in the card, the engine's exact weights on the Hub."""
    import shutil
    import socket

    import torch
    from safetensors.torch import load as load_bytes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
                        str(Path(__file__).parent / "helpers" / "ds_tiny_checkpoint.py"), str(out), "--stage", "0"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copytree(out / "ckpt", run / "checkpoints")
    shutil.copy(out / "evaclip_recipe.toml", run / "evaclip_recipe.toml")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 2.04, "samples": 128}) + "\n")
    res = run_push([run, "--repo", "tester/tiny-run"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    files = hub.files("tester/tiny-run")
    card = files["README.md"].decode()
    assert "## Training" in card and "| steps | 2 |" in card and "| final loss | 2.0400 |" in card
    state = load_bytes(files["open_clip_model.safetensors"])
    expected = torch.load(out / "expected.pt")
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k].reshape(v.shape), v.float()), k


def test_existing_readme_kept_unless_overwrite_card(tiny_folder, hub, tmp_path):
    hub.create("tester/kept", files={"README.md": b"# my own card\n"})
    res = run_push([tiny_folder, "--repo", "tester/kept"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "kept the README.md" in res.stdout
    files = hub.files("tester/kept")
    assert files["README.md"] == b"# my own card\n" and "open_clip_model.safetensors" in files
    res = run_push([tiny_folder, "--repo", "tester/kept", "--overwrite-card"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    card = hub.files("tester/kept")["README.md"].decode()
    assert card_meta(card)["library_name"] == "open_clip"
    assert len(hub.history("tester/kept")) == 4  # initial, README by someone, push, push of the card


def test_revision_branch_and_pull_request(tiny_folder, hub, tmp_path):
    res = run_push([tiny_folder, "--repo", "tester/rev", "--revision", "dev", "--private"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    assert hub.repos["tester/rev"].private
    assert "open_clip_model.safetensors" in hub.files("tester/rev", "dev")
    assert set(hub.files("tester/rev", "main")) == {".gitattributes"}  # main untouched
    res = run_push([tiny_folder, "--repo", "tester/rev", "--create-pr"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pull request: " in res.stdout and "/discussions/1" in res.stdout
    assert "open_clip_model.safetensors" in hub.files("tester/rev", "refs/pr/1")
    assert set(hub.files("tester/rev", "main")) == {".gitattributes"}


# ------------------------------------------------------------------------------------------------ failures
def test_transient_errors_retried_then_succeed(tiny_folder, hub, tmp_path):
    hub.inject(503, r"^POST /api/models/tester/flaky/commit/", times=1, message="Service Unavailable")
    hub.inject(0, r"^POST /api/models/tester/flaky/commit/", times=1, drop=True)  # connection closed, no answer
    hub.inject(503, r"^POST /api/repos/create", times=1)
    res = run_push([tiny_folder, "--repo", "tester/flaky"], hub, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("retrying") == 3, res.stderr
    assert [c.title for c in hub.history("tester/flaky")][1:] == ["initial commit"]  # still exactly one commit
    assert sha256(hub.files("tester/flaky")["open_clip_model.safetensors"]) == \
        sha256((tiny_folder / "open_clip_model.safetensors").read_bytes())


def test_persistent_5xx_ends_in_one_line(tiny_folder, hub, tmp_path):
    hub.inject(503, r"^POST /api/models/tester/down/commit/", times=99)
    res = run_push([tiny_folder, "--repo", "tester/down"], hub, tmp_path)
    line = one_error_line_last(res)
    assert "503" in line and "nothing was committed" in line
    assert len(hub.history("tester/down")) == 1


def one_error_line_last(res):
    """Retries print progress lines first; the failure itself is one `evaclip: error:` line, the last."""
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("evaclip: error: ") and "Traceback" not in res.stderr
    assert all(ln.startswith("evaclip: ") for ln in lines), res.stderr
    return lines[-1]


def test_401_bad_token(tiny_folder, hub, tmp_path):
    res = run_push([tiny_folder, "--repo", "tester/x"], hub, tmp_path, token="hf_wrongWRONGwrong0123456789")
    one_error_line(res, "401", "HF_TOKEN", "hf auth login")
    assert "tester/x" not in hub.repos


def test_403_foreign_namespace(tiny_folder, hub, tmp_path):
    res = run_push([tiny_folder, "--repo", "someone-else/x"], hub, tmp_path)
    one_error_line(res, "403", "someone-else", "write")


def test_404_missing_revision_for_pr(tiny_folder, hub, tmp_path):
    hub.create("tester/pr404")
    res = run_push([tiny_folder, "--repo", "tester/pr404", "--create-pr", "--revision", "no-such-branch"],
                   hub, tmp_path)
    one_error_line(res, "404", "no-such-branch", "--revision")


def test_409_conflict_on_commit(tiny_folder, hub, tmp_path):
    hub.inject(409, r"^POST /api/models/tester/busy/commit/", message="A concurrent commit is in progress")
    res = run_push([tiny_folder, "--repo", "tester/busy"], hub, tmp_path)
    one_error_line(res, "409", "A concurrent commit is in progress", "--create-pr")
    assert len(hub.history("tester/busy")) == 1


@pytest.mark.parametrize("args,needles", [
    (["--repo", "not-a-repo-id"], ["--repo", "OWNER/NAME"]),
    (["--repo", "a/b", "--results", "{results}"], ["--results", "not JSON"]),
    (["--repo", "a/b", "--max-shard-size", "lots"], ["--max-shard-size"]),
])
def test_bad_input_one_line(tiny_folder, tmp_path, args, needles):
    (tmp_path / "bad.json").write_text("{not json")
    args = [a.replace("{results}", str(tmp_path / "bad.json")) for a in args]
    res = run_push([tiny_folder, *args, "--dry-run"], None, tmp_path, token=None)
    one_error_line(res, *needles)


def test_missing_source_and_missing_token(tmp_path, tiny_folder):
    one_error_line(run_push([tmp_path / "nope", "--repo", "a/b", "--dry-run"], None, tmp_path, token=None),
                   "no such file")
    one_error_line(run_push([tiny_folder, "--repo", "a/b"], None, tmp_path, token=None,
                            extra_env={"HF_ENDPOINT": "http://127.0.0.1:9"}), "HF_TOKEN", "hf auth login")


# ------------------------------------------------------------------------------------------------ report
def test_results_markdown_tables():
    from evaclip_cli.eval.report import results_markdown

    md = results_markdown(RESULTS)
    assert "| dataset | top-1 | top-5 | mean per-class recall | samples |" in md
    assert "| demo-captions | 25.00 | 50.00 | 75.00 | 25.00 | 50.00 | 75.00 | 32 | 1 |" in md  # skipped shown
    assert "| mean_acc1 | 62.50 |" in md and "Not evaluated (data not found): imagenet1k." in md
    video = {"results": [{"dataset": "k400", "task": "video_classification", "frames": 8, "samples": 10,
                          "metrics": {"acc1": 0.1, "acc5": 0.3, "mean_top1_top5": 0.2}}]}
    assert "| k400 | 10.00 | 30.00 | 20.00 | 10 | 8 |" in results_markdown(video)
    assert "No results." in results_markdown({"results": []})
    suite = dict(RESULTS, aggregates={"avg-27": 0.5, "mean_acc1": 0.625}, paper={"avg-27": 0.8}, failed=["voc"])
    md = results_markdown(suite)
    assert "| aggregate | value | EVA-CLIP-18B (paper) |" in md and "| avg-27 | 50.00 | 80.00 |" in md
    assert f"| mean_acc1 | 62.50 | {chr(8211)} |" in md and "voc" in md.split("Failed")[1]
    with pytest.raises(ValueError):
        results_markdown({"results": "nope"})
