"""BAAI's transformers remote-code layout (BAAI/EVA-CLIP-8B, -8B-448, -18B) both ways: parity with BAAI's own
modeling_evaclip.py (fixtures made outside the repo, tests/fixtures/hf_reference/README.md), every weights layout
transformers writes, HF -> open_clip -> HF bit-exact, --to hf from the EVA layout, refusals in one line, and the
streaming safetensors writer / memory-mapped reader the conversions use."""
import json
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import evaclip_cli  # noqa: F401
from evaclip_cli.checkpoints.io import load_state_dict
from evaclip_cli.errors import UserError

from conftest import FIXTURES, REFERENCE, run_cli

HF_REF = FIXTURES / "hf_reference"
HF_STYLES = ("18b", "8b", "qkvbias")


def load_oc(folder):
    return open_clip.create_model(f"local-dir:{folder}").eval()


def check_parity(model, style, tol=1e-5):
    x = load_file(str(HF_REF / style / "inputs.safetensors"))
    ref = load_file(str(HF_REF / style / "ref_out.safetensors"))
    with torch.no_grad():
        img = (model.encode_image(x["images"]).float() - ref["image"]).abs().max().item()
        txt = (model.encode_text(x["tokens"]).float() - ref["text"]).abs().max().item()
    assert img < tol and txt < tol, (style, img, txt)
    return img, txt


def hf_state(style):
    folder = HF_REF / style / "model"
    index = folder / "model.safetensors.index.json"
    return load_state_dict(index if index.is_file() else folder / "model.safetensors", mmap=False)


@pytest.mark.parametrize("style", HF_STYLES)
def test_parity_with_baai_code(style, tmp_path, capsys):
    """`evaclip convert DIR OUT` detects the layout from config.json; the open_clip model's encode_image/encode_text
    equal BAAI's EvaCLIPModel's on the same weights; the missing logit_scale is said in one line."""
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", HF_REF / style / "model", out], capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert sum("ln(100)" in ln for ln in notes) == 1, err
    assert ("k_proj" in err) == (style == "qkvbias")  # the dropped (softmax-invariant) key bias is reported
    model = load_oc(out)
    assert model.logit_scale.item() == pytest.approx(4.605170185988092)
    check_parity(model, style)
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["embed_dim"] == 24 and cfg["text_cfg"]["context_length"] == 16


def _save_bin_shards(state, folder, n):
    """transformers' .bin layout: pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json."""
    keys = list(state)
    chunks = [keys[i::n] for i in range(n)]
    weight_map = {}
    for i, ks in enumerate(chunks, 1):
        name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        torch.save({k: state[k] for k in ks}, folder / name)
        weight_map.update({k: name for k in ks})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["single_bin", "sharded_bin", "single_safetensors", "sharded_safetensors",
                                    "bare_file"])
def test_every_weights_layout(layout, tmp_path, capsys):
    style = "18b"
    state = hf_state(style)
    src = tmp_path / "EVA-CLIP-18B"
    src.mkdir()
    shutil.copy(HF_REF / style / "model" / "config.json", src / "config.json")
    arg = src
    if layout == "single_bin":
        torch.save(state, src / "pytorch_model.bin")
    elif layout == "sharded_bin":
        _save_bin_shards(state, src, 3)
    elif layout == "single_safetensors":
        save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded_safetensors":
        for p in (HF_REF / style / "model").glob("model*"):
            shutil.copy(p, src / p.name)
    else:  # one weights file named on the command line: its config.json beside it says the architecture
        torch.save(state, src / "pytorch_model.bin")
        arg = src / "pytorch_model.bin"
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", arg, out, "--from", "hf" if layout != "bare_file" else "auto"], capsys)
    assert code == 0, err
    check_parity(load_oc(out), style)


@pytest.mark.parametrize("style", ["18b", "8b"])
def test_hf_open_clip_hf_bit_exact(style, tmp_path, capsys):
    """HF -> open_clip -> HF returns every tensor bit-exactly under the same names; config.json keeps every
    architecture field and points at BAAI's remote code; --max-shard-size shards it with an index."""
    oc, back = tmp_path / "oc", tmp_path / "hf"
    assert run_cli(["convert", HF_REF / style / "model", oc], capsys)[0] == 0
    code, _, err = run_cli(["convert", oc, back, "--to", "hf", "--max-shard-size", "300KB"], capsys)
    assert code == 0, err
    assert "note:" not in err  # logit_scale is ln(100): nothing lost
    names = sorted(p.name for p in back.iterdir())
    assert names[0] == "config.json" and "model.safetensors.index.json" in names and len(names) > 3
    a, b = hf_state(style), load_state_dict(back / "model.safetensors.index.json")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    src_cfg = json.loads((HF_REF / style / "model" / "config.json").read_text())
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "clip" and cfg["projection_dim"] == src_cfg["projection_dim"]
    assert cfg["auto_map"]["AutoModel"].endswith("--modeling_evaclip.EvaCLIPModel")
    assert cfg["auto_map"]["AutoConfig"].endswith("--configuration_evaclip.EvaCLIPConfig")
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "use_rms_norm",
              "post_layernorm", "q_bias", "k_bias", "v_bias", "layer_norm_eps", "hidden_act")
    for tower, extra in (("vision_config", ("image_size", "patch_size")),
                         ("text_config", ("vocab_size", "max_position_embeddings"))):
        for f in fields + extra:
            assert cfg[tower][f] == src_cfg[tower][f], (tower, f)


def test_k_bias_is_dropped_exactly(tmp_path, capsys):
    """qkvbias: q, k, v biases in the vision tower; only the k biases do not come back (timm's Eva has none, and
    softmax ignores them: the parity test above holds with them dropped)."""
    oc, back = tmp_path / "oc", tmp_path / "hf"
    assert run_cli(["convert", HF_REF / "qkvbias" / "model", oc]) == 0
    assert run_cli(["convert", oc, back, "--to", "hf"]) == 0
    a, b = hf_state("qkvbias"), load_state_dict(back / "model.safetensors")
    assert set(a) - set(b) == {f"vision_model.encoder.layers.{i}.self_attn.k_proj.bias" for i in range(2)}
    assert set(b) <= set(a) and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((back / "config.json").read_text())["vision_config"]["k_bias"] is False


@pytest.mark.parametrize("style", ["18b", "8b"])
def test_eva_to_hf_to_open_clip(style, tmp_path, capsys):
    """--to hf from the EVA reference layout; converting that back gives the reference embeddings (BAAI's own code
    on this --to hf output reproduced them too, see the fixture README)."""
    d = REFERENCE / style
    hf, oc = tmp_path / "hf", tmp_path / "oc"
    capsys.readouterr()
    code, _, err = run_cli(["convert", d / "model.pt", hf, "--eva-config", d / "config.json", "--to", "hf"], capsys)
    assert code == 0, err
    assert run_cli(["convert", hf, oc]) == 0
    ref = torch.load(d / "ref_out.pt")
    model = load_oc(oc)
    with torch.no_grad():
        assert (model.encode_image(torch.load(d / "images.pt")) - ref["image"]).abs().max() < 1e-5
        assert (model.encode_text(torch.load(d / "tokens.pt")) - ref["text"]).abs().max() < 1e-5


def _one_line(err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("evaclip: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("style,needle", [("b16", "rope"), ("5b", "bias")])
def test_to_hf_refuses_what_the_layout_cannot_hold(style, needle, tmp_path, capsys):
    d = REFERENCE / style
    out = tmp_path / "hf"
    code, _, err = run_cli(["convert", d / "model.pt", out, "--eva-config", d / "config.json", "--to", "hf"], capsys)
    assert code == 2
    _one_line(err, needle)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))


def test_bad_configs_one_line(tmp_path, capsys):
    src = tmp_path / "m"
    shutil.copytree(HF_REF / "8b" / "model", src)
    cfg = json.loads((src / "config.json").read_text())
    for mutate, needle in ((lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "hidden_act"),
                           (lambda c: c["text_config"].update(use_rms_norm=True), "text_config"),
                           (lambda c: c["vision_config"].update(hidden_size=62), "divisible")):
        c = json.loads(json.dumps(cfg))
        mutate(c)
        (src / "config.json").write_text(json.dumps(c))
        code, _, err = run_cli(["convert", src, tmp_path / "out"], capsys)
        assert code == 2
        _one_line(err, needle)
    plain = {k: v for k, v in cfg.items() if k not in ("auto_map", "architectures")}  # a transformers CLIP
    plain["vision_config"] = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
    (src / "config.json").write_text(json.dumps(plain))
    code, _, err = run_cli(["convert", src, tmp_path / "out"], capsys)
    assert code == 2
    _one_line(err, "config.json")
    assert not (tmp_path / "out").exists()


def test_spec_from_config_defaults_are_baais():
    """Fields config.json leaves out mean what BAAI's config classes make of them."""
    from evaclip_cli.models.specs import spec_from_hf_config

    spec = spec_from_hf_config({"vision_config": {"hidden_size": 64, "num_attention_heads": 4},
                                "text_config": {}, "auto_map": {}})
    v, t = spec.vision, spec.text
    assert (v.patch_size, v.image_size, v.norm, v.norm_eps, v.qkv_bias, v.post_norm) == (32, 224, "rms", 1e-5, True,
                                                                                          False)
    assert (t.width, t.layers, t.heads, t.context_length, t.norm_eps, spec.embed_dim) == (512, 12, 8, 77, 1e-5, 512)
    assert not v.has_head_bias  # visual_projection has no bias


def test_eval_and_init_read_the_layout(tmp_path):
    """eval's loader and the stages' init read the folder directly (no conversion first)."""
    from evaclip_cli.checkpoints.init import load_into, read_any
    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.lazy import LazyCat

    folder = HF_REF / "8b" / "model"
    loaded = load_clip(str(folder))
    check_parity(loaded.model, "8b")
    lazy = read_any(folder, lazy=True)
    assert any(isinstance(v, LazyCat) for v in lazy.values())
    eager = read_any(folder)
    assert all(isinstance(v, torch.Tensor) for v in eager.values())
    model = build_clip(loaded.spec)
    res = load_into(model, lazy, "visual.", [], str(folder), is_main=True, zero3=False)
    assert res["loaded"] == len([k for k, _ in model.named_parameters() if k.startswith("visual.")])
    res = load_into(model, lazy, "text.", [], str(folder), is_main=True, zero3=False)
    assert not res["missing"]
    model.logit_scale.data.fill_(4.605170185988092)
    check_parity(model.eval(), "8b")


def test_streaming_writer_and_mapped_reader(tmp_path):
    from evaclip_cli.checkpoints.io import (
        load_safetensors_mmap,
        save_safetensors_sharded,
        write_safetensors,
    )
    from evaclip_cli.models.lazy import LazyCat

    st = {"w": torch.randn(5, 3).half(), "cat": LazyCat([torch.randn(2, 4), torch.randn(3, 4)]),
          "scalar": torch.tensor(1.5), "ids": torch.arange(7), "empty": torch.zeros(0, 2), "flag": torch.tensor([True])}
    write_safetensors(tmp_path / "a.safetensors", st, None, {"format": "pt"})
    ref = load_file(str(tmp_path / "a.safetensors"))  # the safetensors library reads what we wrote
    mapped = load_safetensors_mmap(tmp_path / "a.safetensors")
    for k, v in st.items():
        v = v.materialize() if isinstance(v, LazyCat) else v
        assert torch.equal(ref[k], v) and torch.equal(mapped[k], v) and mapped[k].dtype == v.dtype
    files = save_safetensors_sharded(st, tmp_path, "m.safetensors", "m.safetensors.index.json", 40, torch.bfloat16)
    assert files[-1] == "m.safetensors.index.json" and len(files) > 2
    back = load_state_dict(tmp_path / "m.safetensors.index.json")
    assert back["w"].dtype == torch.bfloat16 and back["ids"].dtype == torch.int64 and set(back) == set(st)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from evaclip_cli.errors import UserError

    with pytest.raises(UserError, match="not a safetensors file"):
        load_safetensors_mmap(tmp_path / "bad.safetensors")


def test_failed_streamed_write_leaves_nothing(tmp_path, monkeypatch):
    """A failure mid-write (disk full at the second shard) removes the temporary folder; DST never appears."""
    from evaclip_cli.checkpoints import io
    from evaclip_cli.checkpoints.convert import run_convert

    calls = {"n": 0}
    real = io.write_safetensors

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(io, "write_safetensors", flaky)
    for to in ("open_clip", "hf"):
        calls["n"] = 0
        with pytest.raises(UserError, match="cannot write .*: no space left on the device"):
            run_convert(HF_REF / "18b" / "model", tmp_path / to, dst_format=to, max_shard_size="200KB", quiet=True)
        assert list(tmp_path.iterdir()) == []


def test_hf_source_to_every_target(tmp_path, capsys):
    """Straight from BAAI's folder (q/k/v fused lazily) to each writer: HF again (bit-exact), the EVA layout and a
    vision-only timm folder (both reproduce BAAI's outputs through open_clip)."""
    import timm

    src = HF_REF / "8b" / "model"
    assert run_cli(["convert", src, tmp_path / "hf", "--to", "hf", "--max-shard-size", "100KB"]) == 0
    a, b = hf_state("8b"), load_state_dict(tmp_path / "hf" / "model.safetensors.index.json")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert run_cli(["convert", src, tmp_path / "eva.pt", "--to", "eva"]) == 0
    assert run_cli(["convert", tmp_path / "eva.pt", tmp_path / "oc", "--eva-config", tmp_path / "eva.json"]) == 0
    check_parity(load_oc(tmp_path / "oc"), "8b")
    assert run_cli(["convert", src, tmp_path / "tower", "--vision-only"]) == 0
    tower = timm.create_model(f"local-dir:{tmp_path / 'tower'}", pretrained=True).eval()
    x = load_file(str(HF_REF / "8b" / "inputs.safetensors"))["images"]
    with torch.no_grad():
        assert torch.allclose(tower(x), load_oc(tmp_path / "oc").visual.trunk(x), atol=1e-6)
