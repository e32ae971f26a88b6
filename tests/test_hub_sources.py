"""`hf-hub:` sources and released names everywhere a model is taken (convert, eval's loader, push, the stages'
init), against the loopback Hub (tests/helpers/hub_server.py) serving a BAAI-layout repo and a .pt repo, through
huggingface_hub's own cache. No test reaches the internet.

In-process tests point huggingface_hub at the server by patching its constants (they are read from the environment
once, at import); the `slow` ones run `evaclip` as a user does, with HF_ENDPOINT / HF_HUB_OFFLINE / HF_TOKEN set."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import evaclip_cli  # noqa: F401
from evaclip_cli.checkpoints.io import load_state_dict

from conftest import FIXTURES, REFERENCE, run_cli
from helpers.hub_server import HubServer, point_hub_at

HF_REF = FIXTURES / "hf_reference"
BAAI = "BAAI/EVA-CLIP-tiny"  # a BAAI-style repo: HF layout (18b-style fixture) + a big reference .pt beside it
PT = "tester/tiny-pt"  # one EVA reference .pt (the tiny arch)
EVACLIP = str(Path(sys.executable).parent / "evaclip")


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("pt") / "model.pt"
    write_eva_file(build_clip(ARCHS["tiny"]).state_dict(), ARCHS["tiny"], path)
    return path


@pytest.fixture
def hub(tiny_pt):
    with HubServer() as server:
        files = {p.name: p.read_bytes() for p in (HF_REF / "18b" / "model").iterdir()}
        files["EVA_CLIP_tiny_psz14_s6B.fp16.pt"] = (REFERENCE / "18b" / "model.pt").read_bytes()
        files["README.md"] = b"# a BAAI-style repo\n"
        server.create(BAAI, files=files, lfs=True)
        server.create(PT, files={"model.pt": tiny_pt.read_bytes(), "README.md": b"# tiny\n"}, lfs=True)
        yield server


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the loopback server, with an empty cache of its own."""

    hub.cache = point_hub_at(hub, tmp_path, monkeypatch)
    return hub


def check_parity(folder, style="18b"):
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    x = load_file(str(HF_REF / style / "inputs.safetensors"))
    ref = load_file(str(HF_REF / style / "ref_out.safetensors"))
    with torch.no_grad():
        assert (model.encode_image(x["images"]) - ref["image"]).abs().max() < 1e-5
        assert (model.encode_text(x["tokens"]) - ref["text"]).abs().max() < 1e-5


def one_line(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("evaclip: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_sources():
    from evaclip_cli.checkpoints.hub_source import is_hub_source, parse
    from evaclip_cli.errors import UserError

    assert vars(parse("hf-hub:BAAI/EVA-CLIP-8B")) == {"repo": "BAAI/EVA-CLIP-8B", "file": None, "revision": None}
    assert vars(parse("hf-hub:BAAI/EVA-CLIP-18B/EVA_CLIP_18B_psz14_s6B.fp16.pt@v1.0")) == {
        "repo": "BAAI/EVA-CLIP-18B", "file": "EVA_CLIP_18B_psz14_s6B.fp16.pt", "revision": "v1.0"}
    assert parse("hf-hub:o/n/sub/dir/w.bin@refs/pr/3").revision == "refs/pr/3"
    assert parse("hf-hub:o/n/sub/dir/w.bin").file == "sub/dir/w.bin"
    assert is_hub_source("EVA-CLIP-18B") and is_hub_source("hf-hub:o/n") and not is_hub_source("runs/x")
    for bad in ("hf-hub:noslash", "hf-hub:o/n@", "hf-hub:o/../x", "hf-hub:/n", "hf-hub:o/n/dir/"):
        with pytest.raises(UserError):
            parse(bad)


def test_choose_files_by_layout():
    from evaclip_cli.checkpoints.hub_source import choose_files
    from evaclip_cli.errors import UserError

    baai = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "EVA_CLIP_8B_psz14_s9B.pt", "EVA_8B_psz14.bin", "README.md",
            "modeling_evaclip.py", "vocab.json"]
    assert choose_files(baai, "s") == ("config", ["config.json", "pytorch_model.bin.index.json"])
    assert choose_files(baai + ["model.safetensors.index.json"], "s")[1][1] == "model.safetensors.index.json"
    oc = ["open_clip_config.json", "open_clip_model.safetensors.index.json", "open_clip_model-00001-of-00002"
          ".safetensors", "open_clip_model-00002-of-00002.safetensors", "README.md", "tokenizer.json"]
    kind, files = choose_files(oc, "s")
    assert kind == "open_clip" and files[0] == "open_clip_config.json" and len(files) == 5
    assert choose_files(["a.pt", "README.md"], "s") == ("file", ["a.pt"])
    with pytest.raises(UserError, match="several checkpoints"):
        choose_files(["a.pt", "b.bin"], "hf-hub:o/n")
    with pytest.raises(UserError, match="no checkpoint"):
        choose_files(["README.md"], "hf-hub:o/n")


def test_released_table_matches_the_specs():
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import REFERENCE_PARAMS, RELEASED, resolve_arch

    for name, rel in RELEASED.items():
        model = build_clip(resolve_arch(name), device="meta")
        n = sum(p.numel() for p in (model.visual.trunk if rel.layout == "mim" else model).parameters())
        assert n == rel.params, name
        assert rel.source.startswith(("hf-hub:BAAI/", "hf-hub:QuanSun/EVA-CLIP/"))  # BAAI's two Hub homes
        if rel.layout != "mim" and rel.image_size is None:
            assert rel.params == REFERENCE_PARAMS[rel.arch]


# ------------------------------------------------------------------------------------------------ convert
def test_whole_repo_fetches_only_the_layout(hf, tmp_path, capsys):
    """hf-hub:OWNER/NAME of a BAAI repo: the HF layout is detected and only config.json + index + shards are
    downloaded (not the reference .pt beside them); a second conversion takes everything from the cache."""
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", f"hf-hub:{BAAI}", out], capsys)
    assert code == 0, err
    check_parity(out)
    got = {r["path"].rsplit("/", 1)[1] for r in hf.downloads(BAAI)}
    assert got == {p.name for p in (HF_REF / "18b" / "model").iterdir()}
    assert not hf.downloads(BAAI, "EVA_CLIP_tiny_psz14_s6B.fp16.pt")
    before = len(hf.downloads(BAAI))
    code, _, err = run_cli(["convert", f"hf-hub:{BAAI}", tmp_path / "oc2"], capsys)
    assert code == 0, err
    assert len(hf.downloads(BAAI)) == before  # cached files are not fetched again
    assert (hf.cache / ("models--" + BAAI.replace("/", "--"))).is_dir()  # huggingface_hub's own cache
    # the index named as FILE brings its shards and the config.json beside it; one shard-less weights file too
    code, _, err = run_cli(["convert", f"hf-hub:{BAAI}/model.safetensors.index.json", tmp_path / "oc3"], capsys)
    assert code == 0, err
    check_parity(tmp_path / "oc3")


def test_one_file_and_revisions(hf, tiny_pt, tmp_path, capsys):
    local = tmp_path / "local"
    assert run_cli(["convert", tiny_pt, local, "--model", "tiny"]) == 0
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", f"hf-hub:{PT}/model.pt", out, "--model", "tiny"], capsys)
    assert code == 0, err
    a = load_state_dict(local / "open_clip_model.safetensors")
    b = load_state_dict(out / "open_clip_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a branch with other weights: @v2 gets them, @main (and no revision) the first ones, a commit id works too
    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    torch.manual_seed(4)
    write_eva_file(build_clip(ARCHS["tiny"]).state_dict(), ARCHS["tiny"], tmp_path / "v2.pt")
    commit = hf.add_files(PT, {"model.pt": (tmp_path / "v2.pt").read_bytes()}, lfs=True, branch="v2")
    for rev, same in (("v2", False), ("main", True), (commit.oid, False), (commit.oid[:12], False)):
        o = tmp_path / f"oc-{rev}"
        code, _, err = run_cli(["convert", f"hf-hub:{PT}/model.pt@{rev}", o, "--model", "tiny"], capsys)
        assert code == 0, (rev, err)
        c = load_state_dict(o / "open_clip_model.safetensors")
        assert torch.equal(c["text.token_embedding.weight"], a["text.token_embedding.weight"]) == same, rev
    # the whole repo holds one checkpoint: that is the layout
    code, _, err = run_cli(["convert", f"hf-hub:{PT}", tmp_path / "whole", "--model", "tiny"], capsys)
    assert code == 0, err


def test_released_name_is_enough(hf, tmp_path, capsys, monkeypatch):
    """`evaclip convert NAME OUT`: the table says repo, file and architecture."""
    from evaclip_cli.models import specs

    monkeypatch.setitem(specs.RELEASED, "EVA-CLIP-tiny", specs.Released(
        repo=PT, file="model.pt", layout="eva", size="1 MB", params=0, arch="tiny"))
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", "EVA-CLIP-tiny", out], capsys)
    assert code == 0, err
    assert "hf-hub:tester/tiny-pt/model.pt" in err
    assert (out / "open_clip_config.json").is_file()


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("source,setup,needles", [
    ("hf-hub:nobody/missing", None, ("repository nobody/missing not found",)),
    (f"hf-hub:{PT}/nothere.pt", None, ("nothere.pt not found in tester/tiny-pt",)),
    (f"hf-hub:{PT}/model.pt@nosuchbranch", None, ("revision 'nosuchbranch' not found",)),
    ("hf-hub:tester/gated/model.pt", "gated-auto", ("gated", "HF_TOKEN")),
    ("hf-hub:tester/gated/model.pt", "gated-manual-token", ("gated",)),
    (f"hf-hub:{PT}/model.pt", "bad-token", ("401", "HF_TOKEN")),
    (f"hf-hub:{PT}/model.pt", "forbidden", ("403",)),
    (f"hf-hub:{PT}/model.pt", "offline", ("HF_HUB_OFFLINE", "not in the cache")),
    (f"hf-hub:{BAAI}", "offline", ("HF_HUB_OFFLINE", "not in the cache")),
    (f"hf-hub:{PT}/model.pt", "no-disk", ("not enough disk space", "HF_HUB_CACHE")),
    (f"hf-hub:{BAAI}", "no-disk", ("not enough disk space",)),
    ("hf-hub:tester/empty", "empty", ("no checkpoint",)),
    (f"hf-hub:{PT}", "two-files", ("several checkpoints", f"hf-hub:{PT}/FILE")),
])
def test_errors_one_line_nothing_written(source, setup, needles, hf, tiny_pt, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from evaclip_cli.checkpoints import hub_source

    if setup == "gated-auto":
        hf.create("tester/gated", files={"model.pt": tiny_pt.read_bytes()}, lfs=True, gated="auto")
    elif setup == "gated-manual-token":
        hf.create("tester/gated", files={"model.pt": tiny_pt.read_bytes()}, lfs=True, gated="manual")
        monkeypatch.setenv("HF_TOKEN", hf.token)
    elif setup == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    elif setup == "forbidden":
        hf.inject(403, r"^(HEAD|GET) /tester/tiny-pt/resolve/", times=9, message="Forbidden")
    elif setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif setup == "no-disk":
        monkeypatch.setattr(hub_source, "_free_bytes", lambda path: 1000)
    elif setup == "empty":
        hf.create("tester/empty", files={"README.md": b"nothing\n"})
    elif setup == "two-files":
        hf.add_files(PT, {"other.bin": b"x" * 100}, lfs=True)
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", source, out, "--model", "tiny"], capsys)
    line = one_line(code, err, *needles)
    assert "hf_not_the_right_one" not in line and hf.token not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_disk_full_while_downloading_is_one_line():
    from evaclip_cli.checkpoints.hub_source import HubRef, hub_error

    err = OSError(errno.ENOSPC, "No space left on device")
    msg = str(hub_error(err, HubRef("o/n", "f.pt", None), "f.pt"))
    assert "disk filled up" in msg and "resumes" in msg


def test_offline_with_a_warm_cache(hf, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    assert run_cli(["convert", f"hf-hub:{BAAI}", tmp_path / "a"]) == 0
    assert run_cli(["convert", f"hf-hub:{PT}/model.pt", tmp_path / "b", "--model", "tiny"]) == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hf.requests)
    for src, extra in ((f"hf-hub:{BAAI}", []), (f"hf-hub:{PT}/model.pt", ["--model", "tiny"])):
        code, _, err = run_cli(["convert", src, tmp_path / ("c" + str(len(extra))), *extra], capsys)
        assert code == 0, err
    assert len(hf.requests) == n  # nothing asked of the Hub
    check_parity(tmp_path / "c0")


# ------------------------------------------------------------------------------------------------ everywhere else
def test_eval_loader_init_and_teacher_take_hub_sources(hf, tmp_path, monkeypatch):
    """eval -m (checkpoints.load.load_clip), train's init.vision/init.text, distill's teacher and finetune-video's
    init.clip (checkpoints.init.read_any) all resolve hf-hub: sources and released names."""
    from evaclip_cli.checkpoints.init import read_any
    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.models import specs

    loaded = load_clip(f"hf-hub:{BAAI}")
    assert loaded.name == "EVA-CLIP-tiny"
    x = load_file(str(HF_REF / "18b" / "inputs.safetensors"))
    ref = load_file(str(HF_REF / "18b" / "ref_out.safetensors"))
    with torch.no_grad():
        assert (loaded.model.encode_image(x["images"]) - ref["image"]).abs().max() < 1e-5
    state = read_any(f"hf-hub:{BAAI}")
    assert "visual.trunk.blocks.0.attn.qkv.weight" in state and "text.text_projection" in state
    monkeypatch.setitem(specs.RELEASED, "EVA-CLIP-tiny", specs.Released(
        repo=PT, file="model.pt", layout="eva", size="1 MB", params=0, arch="tiny"))
    state = read_any("EVA-CLIP-tiny")
    assert "visual.head.proj.weight" in state
    assert load_clip("EVA-CLIP-tiny").spec == specs.ARCHS["tiny"]


def test_push_takes_a_hub_source(hf, tmp_path):
    """push SRC = hf-hub: (dry run: the folder it would upload, converted from BAAI's layout)."""
    from evaclip_cli.hub.push import run_push

    out = tmp_path / "push"
    res = run_push(f"hf-hub:{BAAI}", "tester/converted", dry_run=True, out=out, echo=lambda s: None)
    assert res["dry_run"] and (out / "open_clip_config.json").is_file() and (out / "README.md").is_file()
    check_parity(out)


# ------------------------------------------------------------------------------------------------ as a user runs it
def _env(hub, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(tmp_path / "hf_home"), **extra)
    return env


@pytest.mark.slow
def test_cli_end_to_end_with_environment(hub, tmp_path):
    """`evaclip convert hf-hub:...` in a subprocess: HF_ENDPOINT, HF_HOME (the cache), then HF_HUB_OFFLINE=1 served
    from that cache; offline with another (empty) cache ends in one line and writes nothing."""
    run = lambda args, **e: subprocess.run([EVACLIP, *map(str, args)], capture_output=True, text=True,  # noqa: E731
                                           env=_env(hub, tmp_path, **e), timeout=300)
    res = run(["convert", f"hf-hub:{BAAI}", tmp_path / "oc"])
    assert res.returncode == 0, res.stderr
    assert sum("ln(100)" in ln for ln in res.stderr.splitlines()) == 1
    check_parity(tmp_path / "oc")
    res = run(["convert", f"hf-hub:{BAAI}", tmp_path / "oc2"], HF_HUB_OFFLINE="1")
    assert res.returncode == 0, res.stderr
    res = run(["convert", f"hf-hub:{BAAI}", tmp_path / "oc3"], HF_HUB_OFFLINE="1",
              HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    one_line(res.returncode, res.stderr, "HF_HUB_OFFLINE")
    assert not (tmp_path / "oc3").exists()
    res = run(["convert", f"hf-hub:{PT}/model.pt", tmp_path / "oc4", "--model", "tiny"], HF_TOKEN="hf_wrong")
    one_line(res.returncode, res.stderr, "401")
    assert "hf_wrong" not in res.stderr


def test_a_read_only_cache_is_one_line(hf, tmp_path, capsys):
    """A genuinely read-only file system as the Hugging Face cache (a tmpfs mounted read-only; as root)."""
    from huggingface_hub import constants

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64M", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        constants.HF_HUB_CACHE = str(ro / "hub")
        code, _, err = run_cli(["convert", f"hf-hub:{PT}/model.pt", tmp_path / "out", "--model", "tiny"], capsys)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    line = err.strip().splitlines()[-1]  # after the "downloading ..." line
    assert code == 2 and "Traceback" not in err, err
    assert line.startswith(f"evaclip: error: cannot write {ro / 'hub'}") and "read-only file system" in line \
        and "HF_HUB_CACHE" in line, line
