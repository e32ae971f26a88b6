"""The EVA02-CLIP family by name (BAAI's .pt files in QuanSun/EVA-CLIP) and open_clip pretrained tags
(``open_clip:MODEL/TAG``, ``MODEL:TAG``, ``-m MODEL --pretrained TAG``), against the loopback Hub
(tests/helpers/hub_server.py) under the real repo and file names, with tiny weights behind them: the names resolve
through the released table and open_clip's own registry, download only what they name, and the models load, convert,
initialise a tower, teach distill and evaluate. Nothing reaches the internet."""
import io
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import evaclip_cli  # noqa: F401

from conftest import run_cli
from helpers.hub_server import HubServer, point_hub_at

QS = "QuanSun/EVA-CLIP"
E_PLUS = "EVA02_CLIP_E_psz14_plus_s9B.pt"
L14 = "EVA02_CLIP_L_psz14_s4B.pt"
OC_REPO = "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k"  # what open_clip 3.3's registry names
TAG = "open_clip:EVA02-E-14-plus/laion2b_s9b_b144k"


def _tiny_open_clip_cfg() -> dict:
    """The tiny arch written the way open_clip's own EVA02 configs are: timm_proj null (timm's head projects)."""
    from evaclip_cli.models.specs import ARCHS, open_clip_model_cfg

    cfg = open_clip_model_cfg(ARCHS["tiny"])
    cfg["vision_cfg"]["timm_proj"] = None
    cfg["vision_cfg"].pop("timm_proj_bias")
    return cfg


@pytest.fixture
def tiny_eva02(monkeypatch):
    """open_clip's EVA02-E-14-plus model config swapped for a tiny one (the registry's tag -> repo stays real) and a
    model of it with seeded weights: what open_clip itself builds for the tag."""
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "EVA02-E-14-plus", _tiny_open_clip_cfg())
    torch.manual_seed(7)
    return open_clip.create_model("EVA02-E-14-plus").eval()


def _eva_pt(seed: int) -> bytes:
    import tempfile
    from pathlib import Path

    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        write_eva_file(build_clip(ARCHS["tiny"]).state_dict(), ARCHS["tiny"], Path(d) / "m.pt")
        return (Path(d) / "m.pt").read_bytes()


def _open_clip_repo_files(model, safetensors: bool) -> dict:
    """An open_clip repo as timm's Hub org holds them: open_clip files plus the timm tower's own (not to be taken)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"open_clip_config.json": json.dumps({"model_cfg": _tiny_open_clip_cfg(),
                                                  "preprocess_cfg": {}}).encode(),
             "open_clip_pytorch_model.bin": buf.getvalue(),
             "config.json": json.dumps({"architecture": "eva02_enormous_patch14_clip_224"}).encode(),
             "README.md": b"# tiny stand-in\n"}
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    files["model.safetensors"] = _safetensors_bytes(trunk)
    if safetensors:
        files["open_clip_model.safetensors"] = _safetensors_bytes(state)
    return files


def _safetensors_bytes(state: dict) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        save_file(state, str(Path(d) / "w.safetensors"))
        return (Path(d) / "w.safetensors").read_bytes()


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at a loopback Hub with an empty cache of its own."""

    with HubServer() as hub:
        point_hub_at(hub, tmp_path, monkeypatch)
        yield hub


def _images(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ names, offline
def test_family_names_and_open_clip_registry_agree():
    """The released rows name BAAI's files in QuanSun/EVA-CLIP; open_clip's configs of the same models give the same
    architectures (parameter counts: tests/test_hub_sources.py builds every row on the meta device)."""
    from evaclip_cli.checkpoints.hub_source import open_clip_ref
    from evaclip_cli.models.specs import ARCHS, RELEASED, resolve_arch

    for name, file, arch in (("EVA02-CLIP-E-14-plus", E_PLUS, "5b"), ("EVA02-CLIP-bigE-14-plus", E_PLUS, "5b"),
                             ("EVA02-CLIP-L-14", L14, "l14"), ("EVA02-CLIP-E-14", "EVA02_CLIP_E_psz14_s4B.pt", "e14")):
        assert RELEASED[name].source == f"hf-hub:{QS}/{file}" and RELEASED[name].arch == arch
        assert resolve_arch(name) == ARCHS[arch]
    assert resolve_arch(TAG) == ARCHS["5b"] == resolve_arch("EVA02-E-14-plus")
    assert resolve_arch("open_clip:EVA02-L-14/merged2b_s4b_b131k") == ARCHS["l14"]
    assert resolve_arch("EVA02-E-14") == ARCHS["e14"] and resolve_arch("EVA02-B-16") == ARCHS["b16"]
    assert resolve_arch("EVA02-CLIP-L-14-336").vision.image_size == 336
    assert str(open_clip_ref("EVA02-E-14-plus", "laion2b_s9b_b144k")) == f"hf-hub:{OC_REPO}/open_clip_pytorch_model.bin"


def test_open_clip_tag_spellings_and_errors():
    from evaclip_cli.checkpoints.hub_source import is_hub_source, open_clip_ref
    from evaclip_cli.errors import UserError
    from evaclip_cli.models.specs import parse_open_clip_tag, resolve_arch

    want = ("EVA02-E-14-plus", "laion2b_s9b_b144k")
    for text in (TAG, "open_clip:EVA02-E-14-plus:laion2b_s9b_b144k", "EVA02-E-14-plus:laion2b_s9b_b144k"):
        assert parse_open_clip_tag(text) == want and is_hub_source(text)
    for text in ("hf-hub:o/n", "local-dir:x", "runs/x", "runs/a:b", "EVA-CLIP-18B", "tiny"):
        assert parse_open_clip_tag(text) is None
    with pytest.raises(UserError, match="its tags: laion2b_s9b_b144k"):
        open_clip_ref("EVA02-E-14-plus", "laion400m")
    with pytest.raises(UserError, match="close: EVA02-E-14-plus"):
        open_clip_ref("EVA02-E-14-plux", "x")
    with pytest.raises(UserError, match="not built of EVA towers"):  # eval takes it; train/convert cannot build it
        resolve_arch("open_clip:ViT-B-32/laion2b_s34b_b79k")


# ------------------------------------------------------------------------------------------------ BAAI's .pt by name
def test_released_family_name_downloads_its_file_only(hf, tmp_path, monkeypatch, capsys):
    """EVA02-CLIP-E-14-plus -> hf-hub:QuanSun/EVA-CLIP/EVA02_CLIP_E_psz14_plus_s9B.pt: that file, not the repo's
    others; eval's loader, convert, train's init.text and distill's teacher take the name."""
    from evaclip_cli.checkpoints.init import read_any
    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.models import specs
    from evaclip_cli.recipes import load_recipe
    from evaclip_cli.stages.distill import load_teacher_state, teacher_spec_for

    hf.create(QS, files={E_PLUS: _eva_pt(1), L14: _eva_pt(2), "README.md": b"# EVA-CLIP\n"}, lfs=True)
    for name in ("EVA02-CLIP-E-14-plus", "EVA02-CLIP-L-14"):  # the real rows, only their architecture made tiny
        monkeypatch.setitem(specs.RELEASED, name, specs.RELEASED[name].model_copy(update={"arch": "tiny"}))
    a = load_clip("EVA02-CLIP-E-14-plus")
    assert a.spec == specs.ARCHS["tiny"] and a.name == "EVA02-CLIP-E-14-plus"
    assert [r["path"].rsplit("/", 1)[1] for r in hf.downloads(QS)] == [E_PLUS]
    b = load_clip("EVA02-CLIP-L-14")
    with torch.no_grad():
        assert not torch.allclose(a.model.encode_image(_images()), b.model.encode_image(_images()))
    local = tmp_path / "local"
    assert run_cli(["convert", a.extra["resolved"], local, "--model", "tiny"]) == 0
    code, _, err = run_cli(["convert", "EVA02-CLIP-E-14-plus", tmp_path / "named"], capsys)
    assert code == 0, err
    assert f"hf-hub:{QS}/{E_PLUS}" in err
    ref = load_clip(str(local))
    with torch.no_grad():
        assert torch.allclose(load_clip(str(tmp_path / "named")).model.encode_image(_images()),
                              ref.model.encode_image(_images()))
    text = read_any("EVA02-CLIP-E-14-plus")
    assert torch.equal(text["text.text_projection"], ref.model.text.text_projection.detach())
    recipe = load_recipe("distill-tiny", ["distill.teacher=EVA02-CLIP-E-14-plus", "distill.teacher_arch=b16"]).recipe
    assert teacher_spec_for(recipe) == specs.ARCHS["tiny"]  # the name says the architecture, not teacher_arch
    assert "visual.head.proj.weight" in load_teacher_state("EVA02-CLIP-E-14-plus", specs.ARCHS["tiny"])


# ------------------------------------------------------------------------------------------------ open_clip tags
@pytest.mark.parametrize("safetensors", [True, False])
def test_open_clip_tag_loads_as_open_clip_builds_it(safetensors, hf, tiny_eva02, tmp_path, capsys):
    """The tag resolves through open_clip's registry to timm's repo, fetches only the weights open_clip itself would
    load (the .safetensors twin when there is one), and gives open_clip's own model; the three spellings agree."""
    from evaclip_cli.checkpoints.load import load_clip

    hf.create(OC_REPO, files=_open_clip_repo_files(tiny_eva02, safetensors), lfs=True)
    with torch.no_grad():
        want = tiny_eva02.encode_image(_images())
        for loaded in (load_clip(TAG), load_clip("EVA02-E-14-plus:laion2b_s9b_b144k"),
                       load_clip("EVA02-E-14-plus", pretrained="laion2b_s9b_b144k")):
            assert torch.allclose(loaded.model.encode_image(_images()), want, atol=1e-6)
            assert loaded.name == "EVA02-E-14-plus/laion2b_s9b_b144k"
    got = {r["path"].rsplit("/", 1)[1] for r in hf.downloads(OC_REPO)}
    assert got == {"open_clip_model.safetensors" if safetensors else "open_clip_pytorch_model.bin"}


def test_open_clip_tag_converts_inits_and_teaches(hf, tiny_eva02, tmp_path, capsys):
    """convert (architecture from open_clip's config, timm's head -> evaclip's projection), train's init.text and
    distill's teacher from the tag."""
    from evaclip_cli.checkpoints.init import read_any
    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.models.specs import spec_from_open_clip_cfg
    from evaclip_cli.recipes import load_recipe
    from evaclip_cli.stages.distill import load_teacher_state, teacher_spec_for

    hf.create(OC_REPO, files=_open_clip_repo_files(tiny_eva02, True), lfs=True)
    code, _, err = run_cli(["convert", TAG, tmp_path / "oc"], capsys)
    assert code == 0, err
    assert "open_clip's pretrained registry" in err
    converted = load_clip(str(tmp_path / "oc"))
    assert converted.spec == spec_from_open_clip_cfg(_tiny_open_clip_cfg()) and converted.spec.vision.has_head_bias
    with torch.no_grad():
        assert torch.allclose(converted.model.encode_image(_images()), tiny_eva02.encode_image(_images()), atol=1e-6)
    state = read_any(TAG)
    assert torch.equal(state["visual.head.proj.bias"], tiny_eva02.visual.trunk.head.bias.detach())
    assert torch.equal(state["text.token_embedding.weight"], tiny_eva02.text.token_embedding.weight.detach())
    recipe = load_recipe("distill-tiny", [f"distill.teacher={TAG}"]).recipe
    assert teacher_spec_for(recipe) == converted.spec
    assert "visual.head.proj.weight" in load_teacher_state(TAG, converted.spec)


def test_open_clip_tag_evaluates(hf, tiny_eva02, tmp_path, capsys):
    """`evaclip eval zeroshot -m open_clip:MODEL/TAG` runs and gives the numbers of the same weights converted."""
    from helpers.realdata import write_digits_benchmark

    hf.create(OC_REPO, files=_open_clip_repo_files(tiny_eva02, True), lfs=True)
    data = write_digits_benchmark(tmp_path / "data", n=60)
    assert run_cli(["convert", TAG, tmp_path / "oc"]) == 0
    res = {}
    for key, model in (("tag", TAG), ("folder", tmp_path / "oc")):
        out = tmp_path / f"{key}.json"
        code, _, err = run_cli(["eval", "zeroshot", "-m", model, "-d", data["wds_cls"], "-o", out], capsys)
        assert code == 0, err
        res[key] = json.loads(out.read_text())
    assert res["tag"]["samples"] == 60
    assert res["tag"]["metrics"] == res["folder"]["metrics"]


def test_unknown_open_clip_tag_is_one_line(hf, tmp_path, capsys):
    code, _, err = run_cli(["convert", "open_clip:EVA02-E-14-plus/laion400m", tmp_path / "x"], capsys)
    assert code == 2 and "its tags: laion2b_s9b_b144k" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_plain_open_clip_text_tower_inits_ours(hf, monkeypatch):
    """A plain open_clip CLIP's tag (laion's ViT-bigG-14, the 5B's published text init; OpenAI's) gives its text tower
    (top-level keys) to init.text: our tower then encodes as open_clip's did. A QuickGELU tag is refused in one line,
    before any download."""
    from open_clip import factory

    from evaclip_cli.checkpoints.init import load_into, read_any
    from evaclip_cli.errors import UserError
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    text = ARCHS["tiny"].text.open_clip_cfg()
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-bigG-14", {
        "embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                        "patch_size": 16}, "text_cfg": text})
    torch.manual_seed(5)
    plain = open_clip.create_model("ViT-bigG-14").eval()
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    hf.create("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
              files={"open_clip_pytorch_model.bin": buf.getvalue(), "README.md": b"# bigG\n"}, lfs=True)
    state = read_any("open_clip:ViT-bigG-14/laion2b_s39b_b160k")
    assert state and all(k.startswith("text.") for k in state)
    ours = build_clip(ARCHS["tiny"]).eval()
    res = load_into(ours, state, "text.", skip=[], where="bigG", is_main=True, zero3=False)
    assert not res["missing"]
    tokens = torch.randint(1, 49000, (3, text["context_length"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours.encode_text(tokens), plain.encode_text(tokens), atol=1e-5)
    n = len(hf.requests)
    with pytest.raises(UserError, match="QuickGELU"):
        read_any("ViT-bigG-14:metaclip_fullcc")
    assert len(hf.requests) == n
